"""Load the encoder a resolved model names: a plain folder as its encoder family loads it (encoders/), or the
encoder an EncoderRef names, from a checkpoint file (load.py) or a folder, with the LoRA merged and the layer
chosen; and its tokenizer, padded as its family pads. The one entry point the scanner loads through."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from amdet_gate.checkpoints.load import load_part
from amdet_gate.checkpoints.lora import ANY_ENCODER, LoraPlan, merge, plan_lora
from amdet_gate.encoders import load_encoder
from amdet_gate.encoders.base import LoadedEncoder, Pad
from amdet_gate.errors import UnsupportedModel, UsageError
from amdet_gate.safetensors_header import read_header
from amdet_gate.sanitise import one_line
from amdet_gate.sources.files import identities, tokenizer_folder
from amdet_gate.sources.selection import EncoderRef

if TYPE_CHECKING:
    from amdet_gate.sources.identity import WeightFile
    from amdet_gate.sources.model import ResolvedModel
    from amdet_gate.tokenizer import PromptTokenizer


def lora_plan(ref: EncoderRef) -> LoraPlan | None:
    """The LoRA's text-encoder modules, checked against the base's encoders (torch-free; before any hashing)."""
    if ref.lora is None:
        return None
    plan = plan_lora(ref.lora.path, read_header(ref.lora.path))
    encoders = set(ref.encoders_in_model) or {ref.name or "text_encoder"}
    unscanned = {u.name for u in ref.not_scanned}
    name = one_line(ref.lora.path.name, 80)
    foreign = sorted(e for e in plan.encoders() if e != ANY_ENCODER and e not in encoders | unscanned)
    if ref.name is None and plan.encoders() <= {"text_encoder", ANY_ENCODER}:
        foreign = []  # a single-encoder folder: the LoRA's one encoder is it
    if foreign:
        raise UsageError(f"LoRA {name} adapts {', '.join(foreign)}, which the base does not have "
                         f"({', '.join(sorted(encoders))}); {plan.base_hint}")
    if ANY_ENCODER in plan.encoders() and len(encoders) > 1:
        raise UsageError(f"LoRA {name} is a PEFT adapter of one encoder, but the base has {len(encoders)}: pass "
                         "--encoder NAME")
    if plan.encoders() <= unscanned:
        raise UnsupportedModel(f"LoRA {name} adapts only {', '.join(sorted(plan.encoders()))}, which is not a CLIP "
                               "text encoder: nothing to scan in the text encoder")
    return plan


def _modules_for(plan: LoraPlan, ref: EncoderRef) -> list:
    only = len(ref.encoders_in_model) <= 1
    name = ref.name or "text_encoder"
    return plan.for_encoder(name, only) if ref.name is not None else \
        [m for m in plan.modules if m.encoder in ("text_encoder", ANY_ENCODER)]


def load(source: ResolvedModel, weights: list[WeightFile] | None = None) -> LoadedEncoder:
    """The encoder `source` names: a plain folder exactly as its family loads it, else `load_ref`'s."""
    return load_encoder(source, weights) if source.encoder is None else load_ref(source, weights)


def load_ref(source: ResolvedModel, weights: list[WeightFile] | None) -> LoadedEncoder:
    ref = source.encoder
    assert ref is not None
    weights = weights if weights is not None else identities(source)
    plan = lora_plan(ref)
    modules = _modules_for(plan, ref) if plan is not None else []
    scale = ref.lora.scale if ref.lora else 1.0
    merged: dict[str, int] = {}

    def apply(tensors: dict) -> None:
        if plan is not None and modules:
            merged["count"] = merge(plan, modules, scale, tensors)

    file = source.checkpoint_file
    if file is not None and ref.part is not None:
        architecture = f"CLIPTextModel ({ref.layout_title}: {ref.name})"
        loaded = load_part(file, ref.part, ref.layer, weights, architecture=architecture, config=ref.config,
                           merge=apply)
        encoder, details = loaded.encoder, {"config_source": loaded.chosen.describe()}
        pad = loaded.chosen.pad
    else:
        if ref.config is not None:
            raise UsageError("--config is for single-file checkpoints; a folder brings its own config.json")
        encoder = load_encoder(source, weights)
        apply(encoder.adapter.model.state_dict())  # the parameters themselves: the merge is in place
        encoder = replace(encoder, adapter=encoder.adapter.at_layer(ref.layer))
        details, pad = {"config_source": {"source": "config.json", "family": None, "pad": None,
                                          "note": "the folder's config.json"}}, None
    layers = encoder.config["num_hidden_layers"]
    details |= ref.describe(layers)
    if ref.lora is not None and plan is not None:
        details["lora"] = {"file": ref.lora.path.name, "format": plan.format.value, "scale": scale,
                           "rank_scaling": plan.rank_scaling, "modules_merged": merged.get("count", 0),
                           "denoiser_keys_ignored": plan.other_keys}
    details["pad"] = pad.value if pad else None
    return replace(encoder, details=details)


def wrap_anchor(anchor: LoadedEncoder, model: ResolvedModel) -> LoadedEncoder:
    """The anchor read at the model's layer: gate 3 compares the same features of both."""
    ref = model.encoder
    if ref is not None and ref.layer.index is not None:
        return replace(anchor, adapter=anchor.adapter.at_layer(ref.layer))
    return anchor


def tokenizer_of(source: ResolvedModel, encoder: LoadedEncoder) -> PromptTokenizer:
    """--tokenizer, else the folder's (or its pipeline's) tokenizer, else the family's bundled one padded as
    the encoder's file says (CLIP: OpenCLIP-trained towers with id 0)."""
    pad = encoder.details.get("pad")
    return encoder.family.tokenizer(tokenizer_folder(source), Pad(pad) if pad else None)
