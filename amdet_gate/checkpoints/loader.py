"""Load the encoder an EncoderRef names: from a checkpoint file (load.py) or a folder (encoder.py), then
merge the LoRA, choose the layer, and give the tokenizer its family's padding."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from amdet_gate.checkpoints.adapter import LayerAdapter
from amdet_gate.checkpoints.lora import ANY_ENCODER, LoraPlan, merge, plan_lora
from amdet_gate.checkpoints.parts import Pad
from amdet_gate.errors import UnsupportedModel, UsageError
from amdet_gate.safetensors_header import read_header
from amdet_gate.sanitise import one_line
from amdet_gate.sources.selection import EncoderRef

if TYPE_CHECKING:
    from amdet_gate.encoder import LoadedEncoder
    from amdet_gate.source import ModelSource, WeightFile
    from amdet_gate.tokenizer import PromptTokenizer

PAD_ZERO_TOKEN = "!"  # id 0 of the CLIP BPE vocabulary, what OpenCLIP pads with


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


def load_ref(source: ModelSource, weights: list[WeightFile] | None) -> LoadedEncoder:
    from amdet_gate.checkpoints.attach import identities, model_file
    from amdet_gate.checkpoints.load import load_part

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

    file = model_file(source)
    if file is not None and ref.part is not None:
        architecture = f"CLIPTextModel ({ref.layout_title}: {ref.name})"
        loaded = load_part(file, ref.part, ref.layer, weights, architecture=architecture, config=ref.config,
                           merge=apply)
        encoder, details = loaded.encoder, {"config_source": loaded.chosen.describe()}
        pad = loaded.chosen.pad
    else:
        from amdet_gate.encoder import load_encoder

        if ref.config is not None:
            raise UsageError("--config is for single-file checkpoints; a folder brings its own config.json")
        encoder = load_encoder(source.root, source.subfolder, weights)
        apply(encoder.adapter.model.state_dict())  # the parameters themselves: the merge is in place
        adapter = encoder.adapter
        encoder.adapter = LayerAdapter(adapter.model, adapter.eos_token_id, adapter.projection, ref.layer)
        details, pad = {"config_source": {"source": "config.json", "family": None, "pad": None,
                                          "note": "the folder's config.json"}}, None
    layers = encoder.config["num_hidden_layers"]
    details |= ref.describe(layers)
    if ref.lora is not None and plan is not None:
        details["lora"] = {"file": ref.lora.path.name, "format": plan.format.value, "scale": scale,
                           "rank_scaling": plan.rank_scaling, "modules_merged": merged.get("count", 0),
                           "denoiser_keys_ignored": plan.other_keys}
    details["pad"] = pad.value if pad else None
    encoder.details = details
    return encoder


def wrap_anchor(anchor: LoadedEncoder, model: ModelSource) -> LoadedEncoder:
    """The anchor read at the model's layer: gate 3 compares the same features of both."""
    ref = model.encoder
    if ref is not None and ref.layer.index is not None:
        a = anchor.adapter
        anchor.adapter = LayerAdapter(a.model, a.eos_token_id, a.projection, ref.layer)
    return anchor


def tokenizer_of(source: ModelSource, encoder: LoadedEncoder | None = None) -> PromptTokenizer:
    """--tokenizer, else the folder's (or its pipeline's) tokenizer, else the bundled CLIP BPE padded as the
    encoder's family pads (OpenCLIP-trained towers with id 0)."""
    from amdet_gate.source import tokenizer_folder
    from amdet_gate.tokenizer import load_tokenizer

    folder = tokenizer_folder(source)
    tokenizer = load_tokenizer(Path(folder) if folder is not None else None)
    pad = (getattr(encoder, "details", None) or {}).get("pad") if encoder is not None else None
    if folder is None and pad == Pad.ZERO.value:
        tokenizer.tokenizer.pad_token = PAD_ZERO_TOKEN
        tokenizer.source += " (padded with id 0, as OpenCLIP)"
    return tokenizer
