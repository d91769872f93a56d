"""Stable Diffusion 2.x single-file checkpoints: an OpenCLIP ViT-H/14 text tower (diffusers' "v2").

Keys `cond_stage_model.model.*` in OpenCLIP naming. SD 2.x reads the penultimate block's output
through the final LayerNorm (FrozenOpenCLIPEmbedder, layer "penultimate"), so, as diffusers
does, the last of the 24 blocks is not part of the converted encoder, and the text_projection
(which nothing in SD 2.x reads) is left out; the encoder's final features are then what the UNet reads.
"""

from __future__ import annotations

from amdet_gate.checkpoints.layouts.common import open_clip_tower
from amdet_gate.checkpoints.parts import Keys, Layout, Match
from amdet_gate.sources.selection import EncoderPart, LayerChoice, Naming

PREFIX = "cond_stage_model.model."


def detect(keys: Keys) -> Match | None:
    if not open_clip_tower(keys, PREFIX):
        return None
    part = EncoderPart("text_encoder", PREFIX, Naming.OPEN_CLIP, "openclip-h", LayerChoice(None, "SD 2.x"),
                       "SD 2.x reads the penultimate block through the final LayerNorm (the last block is dropped)",
                       drop_last_block=True, use_projection=False)
    return Match("sd2", "Stable Diffusion 2.x single-file checkpoint", (part,))


LAYOUTS = (Layout("sd2", 10, detect),)
