"""LoRA adapters: find the text-encoder part of one, and merge it into the base encoder's weights.

`scan BASE --lora FILE [--lora-scale S]` scans W + S * (alpha / rank) * up @ down for every
adapted linear layer of each text encoder; the identity recorded is both files' sha256.
Formats (read from the header, torch-free):
  kohya      lora_te_* (SD 1.x/2.x), lora_te1_* / lora_te2_* (SDXL, SD 3), with .lora_down.weight,
             .lora_up.weight and .alpha; lora_te3_* adapts SD 3's T5, which is not scanned;
  PEFT       <prefix>.lora_A.weight / .lora_B.weight, prefix text_encoder., text_encoder_2. (diffusers)
             or base_model.model. (a PEFT adapter of the one encoder), alpha and rank from
             adapter_config.json beside the file (else alpha = rank);
  diffusers  <prefix>.lora_linear_layer.down.weight / .up.weight (the older text-encoder format).
UNet / transformer keys are counted and left alone (they do not change the text encoder). Any other
key of a text-encoder module (LyCORIS's LoHa/LoKr/LoCon, DoRA's magnitude, embedding LoRAs) and any
key of no known family is refused: an adapter is never half-applied.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from amdet_gate.errors import LoadError, UnsupportedModel
from amdet_gate.files import read_capped_text
from amdet_gate.safetensors_header import Header
from amdet_gate.sanitise import one_line

ANY_ENCODER = "*"  # a PEFT adapter of a lone encoder: whichever the base has
_KOHYA = re.compile(r"lora_(te|te1|te2|te3)_(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)")
_KOHYA_ANY = re.compile(r"lora_(te|te1|te2|te3)_")
_KOHYA_MODULE = re.compile(r"text_model_encoder_layers_(\d{1,4})_(self_attn_(?:q|k|v|out)_proj|mlp_fc1|mlp_fc2)")
_KOHYA_ENCODER = {"te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2", "te3": "text_encoder_3"}
_PEFT_PREFIXES = {"text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2",
                  "text_encoder_3.": "text_encoder_3", "base_model.model.": ANY_ENCODER}
_MODULE = re.compile(r"(?:text_model\.)?encoder\.layers\.(\d{1,4})\.(self_attn\.(?:q|k|v|out)_proj|mlp\.fc1|mlp\.fc2)")
_PEFT_SUFFIX = re.compile(r"\.(lora_A\.weight|lora_B\.weight|alpha)$")
_DIFFUSERS_SUFFIX = re.compile(r"\.(lora_linear_layer\.down\.weight|lora_linear_layer\.up\.weight|alpha)$")
# Keys that adapt the denoiser, not a text encoder: counted, never applied.
_OTHER_PARTS = ("lora_unet_", "lora_transformer_", "unet.", "transformer.", "lora_mmdit_", "diffusion_model.")
_KNOWN_EXTRAS = {"dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "hada_": "LyCORIS LoHa",
                 "lokr_": "LyCORIS LoKr", "lora_mid": "LyCORIS LoCon", "oft_": "OFT", "diff": "a full weight diff",
                 "lora_embedding_": "an embedding LoRA"}


class LoraFormat(str, Enum):
    KOHYA = "kohya"
    PEFT = "peft"
    DIFFUSERS = "diffusers"


@dataclass(frozen=True)
class LoraModule:
    """One adapted linear layer: W (out x in) += scale * alpha / rank * up (out x r) @ down (r x in)."""

    encoder: str  # the diffusers name of the encoder it adapts, or ANY_ENCODER
    target: str  # CLIPTextModel weight name, e.g. encoder.layers.0.self_attn.q_proj.weight
    down: str  # keys in the LoRA file
    up: str
    alpha_key: str | None
    rank: int


@dataclass(frozen=True)
class LoraPlan:
    file: Path
    format: LoraFormat
    modules: tuple[LoraModule, ...]
    other_keys: int  # UNet / transformer keys, not applied
    alpha: dict[str, float]  # PEFT: alpha per module from adapter_config.json (else alpha = rank)
    rank_scaling: str  # "alpha / rank", or "alpha / sqrt(rank)" (PEFT's use_rslora)
    base_hint: str

    def encoders(self) -> set[str]:
        return {m.encoder for m in self.modules}

    def for_encoder(self, name: str, only: bool) -> list[LoraModule]:
        """The modules that adapt encoder `name` (`only`: it is the base's one encoder)."""
        return [m for m in self.modules if m.encoder == name or (only and m.encoder == ANY_ENCODER)]


def looks_like_lora(header: Header) -> bool:
    return any(".lora_" in k or k.startswith(("lora_te", "lora_unet_", "lora_transformer_")) or "lora_A" in k
               for k in header.tensors)


def plan_lora(path: Path, header: Header) -> LoraPlan:
    """The text-encoder modules of a LoRA file; UnsupportedModel (exit 3) for unknown keys or none at all."""
    name = one_line(path.name, 80)
    pieces: dict[tuple[str, str], dict[str, str]] = {}
    fmt: LoraFormat | None = None
    other = 0
    for key in sorted(header.tensors):
        parsed = _parse_key(key, name)
        if parsed is None:
            other += 1
            continue
        found_fmt, encoder, module, role = parsed
        if found_fmt is not None and fmt is not None and fmt is not found_fmt:
            raise UnsupportedModel(f"LoRA {name} mixes {fmt.value} and {found_fmt.value} keys; refused")
        fmt = found_fmt or fmt
        pieces.setdefault((encoder, module), {})[role] = key
    if fmt is None:
        raise UnsupportedModel(f"LoRA {name} has no text-encoder keys ({other} UNet/transformer keys): nothing to "
                               "scan in the text encoder")
    modules = []
    for (encoder, target), roles in sorted(pieces.items()):
        if "down" not in roles or "up" not in roles:
            lacking = "down" if "down" not in roles else "up"
            raise UnsupportedModel(f"LoRA {name}: {one_line(target, 80)} has no {lacking} matrix; refused rather than "
                                   "half-applied")
        down, up = header.tensors[roles["down"]].shape, header.tensors[roles["up"]].shape
        if len(down) != 2 or len(up) != 2 or down[0] != up[1] or down[0] < 1:
            raise LoadError(f"LoRA {name}: {one_line(target, 80)} has down {list(down)} and up {list(up)}, not a "
                            "rank-r pair")
        modules.append(LoraModule(encoder, target, roles["down"], roles["up"], roles.get("alpha"), down[0]))
    alpha, scaling = _adapter_config(path, fmt, modules)
    return LoraPlan(path, fmt, tuple(modules), other, alpha, scaling, base_hint(header, modules))


def _parse_key(key: str, name: str) -> tuple[LoraFormat | None, str, str, str] | None:
    """(format, encoder, CLIPTextModel target, role down|up|alpha) for a text-encoder key; None for a
    denoiser's key; UnsupportedModel for anything else."""
    if key.startswith(_OTHER_PARTS):
        return None
    if _KOHYA_ANY.match(key):
        match = _KOHYA.fullmatch(key)
        module = _KOHYA_MODULE.fullmatch(match.group(2)) if match else None
        if match is None or module is None:
            raise _unknown(key, name)
        target = f"encoder.layers.{module.group(1)}.{_kohya_module(module.group(2))}.weight"
        role = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[match.group(3)]
        return LoraFormat.KOHYA, _KOHYA_ENCODER[match.group(1)], target, role
    prefix = next((p for p in _PEFT_PREFIXES if key.startswith(p)), None)
    if prefix is None:
        raise _unknown(key, name)
    rest = key[len(prefix):]
    for fmt, suffix, roles in ((LoraFormat.PEFT, _PEFT_SUFFIX, ("lora_A.weight", "lora_B.weight")),
                               (LoraFormat.DIFFUSERS, _DIFFUSERS_SUFFIX,
                                ("lora_linear_layer.down.weight", "lora_linear_layer.up.weight"))):
        match = suffix.search(rest)
        module = _MODULE.fullmatch(rest[: match.start()]) if match else None
        if match is None or module is None:
            continue
        role = "down" if match.group(1) == roles[0] else "up" if match.group(1) == roles[1] else "alpha"
        # An .alpha key belongs to either format: the matrices beside it decide.
        return (None if role == "alpha" else fmt), _PEFT_PREFIXES[prefix], \
            f"encoder.layers.{module.group(1)}.{module.group(2)}.weight", role
    raise _unknown(key, name)


def _kohya_module(name: str) -> str:
    return {"mlp_fc1": "mlp.fc1", "mlp_fc2": "mlp.fc2"}.get(name) or name.replace("self_attn_", "self_attn.")


def _unknown(key: str, name: str) -> UnsupportedModel:
    kind = next((v for k, v in _KNOWN_EXTRAS.items() if k in key.rsplit(".", 2)[-2:][0] or k in key), None)
    what = f"{kind} keys are" if kind else "a key of no known LoRA format is"
    return UnsupportedModel(f"LoRA {name}: {what} not supported ({one_line(key, 100)}); refused rather than "
                            "half-applied")


def _adapter_config(path: Path, fmt: LoraFormat, modules: list[LoraModule]) -> tuple[dict[str, float], str]:
    """PEFT's lora_alpha (and alpha_pattern, use_rslora) from adapter_config.json beside the file."""
    config = path.parent / "adapter_config.json"
    if fmt is not LoraFormat.PEFT or not config.is_file():
        return {}, "alpha / rank"
    try:
        raw = json.loads(read_capped_text(config, 1024 * 1024, "adapter_config.json", LoadError))
    except (json.JSONDecodeError, RecursionError):
        raise LoadError(f"{one_line(config)} is not valid JSON") from None
    if not isinstance(raw, dict):
        raise LoadError(f"{one_line(config)} is not a JSON object")
    if raw.get("use_dora"):
        raise UnsupportedModel(f"{one_line(config)} describes a DoRA adapter; not supported, refused")
    default = raw.get("lora_alpha")
    patterns = raw.get("alpha_pattern") or {}
    if not isinstance(default, int | float) or isinstance(default, bool) or not isinstance(patterns, dict):
        raise LoadError(f"{one_line(config)}: lora_alpha is not a number")
    alpha = {}
    for module in modules:
        value = next((v for k, v in patterns.items() if module.target.removesuffix(".weight").endswith(str(k))),
                     default)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise LoadError(f"{one_line(config)}: alpha_pattern has a value that is not a number")
        alpha[module.target] = float(value)
    return alpha, "alpha / sqrt(rank)" if raw.get("use_rslora") else "alpha / rank"


def base_hint(header: Header, modules: list[LoraModule] | None = None) -> str:
    """Which base a LoRA adapts, from kohya's metadata or from the encoders it names."""
    meta = header.metadata.get("ss_base_model_version") or header.metadata.get("ss_sd_model_name")
    encoders = {m.encoder for m in modules or []}
    if meta:
        return f"its metadata names {one_line(meta, 80)}"
    if "text_encoder_2" in encoders:
        return "it adapts two text encoders (text_encoder and text_encoder_2): an SDXL or SD 3 base"
    return "it adapts one text encoder: an SD 1.x / 2.x base or a stand-alone CLIP text encoder"


def scale_of(plan: LoraPlan, module: LoraModule, alpha_value: float | None, scale: float) -> float:
    alpha = plan.alpha.get(module.target, alpha_value if alpha_value is not None else float(module.rank))
    divisor = math.sqrt(module.rank) if plan.rank_scaling.endswith("sqrt(rank)") else module.rank
    return scale * alpha / divisor


def merge(plan: LoraPlan, modules: list[LoraModule], scale: float, tensors: dict) -> int:
    """Add every module's update to `tensors` (CLIPTextModel names, float32) in place; the count merged."""
    import torch
    from safetensors import safe_open

    name = one_line(plan.file.name, 80)
    try:
        with safe_open(str(plan.file), framework="pt") as fh:
            for module in modules:
                weight = tensors.get(module.target)
                if weight is None:
                    raise LoadError(f"LoRA {name} adapts {module.target}, which the base encoder does not have")
                down, up = fh.get_tensor(module.down).float(), fh.get_tensor(module.up).float()
                if (up.shape[0], down.shape[1]) != tuple(weight.shape):
                    raise LoadError(f"LoRA {name}: {module.target} update is {up.shape[0]} x {down.shape[1]}, the "
                                    f"weight is {list(weight.shape)}; not this base's LoRA")
                alpha = float(fh.get_tensor(module.alpha_key).float().reshape(-1)[0]) if module.alpha_key else None
                factor = scale_of(plan, module, alpha, scale)
                if not math.isfinite(factor):
                    raise LoadError(f"LoRA {name}: {module.target} has a non-finite alpha")
                with torch.no_grad():
                    weight.add_(factor * (up @ down))
    except LoadError:
        raise
    except Exception as exc:  # untrusted bytes: any failure to read them is a load error
        raise LoadError(f"LoRA {name} is not a readable safetensors file ({one_line(exc, 160)})") from exc
    return len(modules)
