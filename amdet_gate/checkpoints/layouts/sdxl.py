"""SDXL single-file checkpoints (diffusers' "xl_base" and "xl_refiner").

Base: CLIP ViT-L at `conditioner.embedders.0.transformer.text_model.*` (transformers naming) and
OpenCLIP bigG at `conditioner.embedders.1.model.*` (OpenCLIP naming, with text_projection).
Refiner: bigG only, at `conditioner.embedders.0.model.*`. Both encoders feed the UNet their
hidden_states[-2] (no final LayerNorm); bigG's projected pooled output is the added conditioning.
The names are a diffusers SDXL pipeline's: text_encoder (CLIP-L) and text_encoder_2 (bigG).
"""

from __future__ import annotations

from amdet_gate.checkpoints.layouts.common import open_clip_tower, transformers_tower
from amdet_gate.checkpoints.parts import Keys, Layout, Match
from amdet_gate.sources.selection import EncoderPart, LayerChoice, Naming

CLIP_L = "conditioner.embedders.0.transformer."
BIG_G = "conditioner.embedders.1.model."
REFINER_BIG_G = "conditioner.embedders.0.model."
READS = "SDXL reads hidden_states[-2] (no final LayerNorm)"


def _big_g(prefix: str, alias: str) -> EncoderPart:
    return EncoderPart("text_encoder_2", prefix, Naming.OPEN_CLIP, "openclip-bigg", LayerChoice(-2, "SDXL"),
                       f"{READS} and the projected pooled output", aliases=("clip_g", alias))


def detect_base(keys: Keys) -> Match | None:
    if not (transformers_tower(keys, CLIP_L) and open_clip_tower(keys, BIG_G)):
        return None
    clip_l = EncoderPart("text_encoder", CLIP_L, Naming.TRANSFORMERS, "clip-l", LayerChoice(-2, "SDXL"), READS,
                         aliases=("clip_l", "embedders.0"))
    return Match("sdxl-base", "SDXL base single-file checkpoint", (clip_l, _big_g(BIG_G, "embedders.1")))


def detect_refiner(keys: Keys) -> Match | None:
    if not open_clip_tower(keys, REFINER_BIG_G) or keys.any_under("conditioner.embedders.1."):
        return None
    return Match("sdxl-refiner", "SDXL refiner single-file checkpoint", (_big_g(REFINER_BIG_G, "embedders.0"),))


LAYOUTS = (Layout("sdxl-base", 5, detect_base), Layout("sdxl-refiner", 6, detect_refiner))
