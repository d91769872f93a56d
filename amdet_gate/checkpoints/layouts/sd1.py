"""Stable Diffusion 1.x single-file checkpoints: one CLIP ViT-L/14 text model (diffusers' "v1").

Keys `cond_stage_model.transformer.text_model.*`; older files (before transformers added the
`text_model` level) have `cond_stage_model.transformer.{embeddings,encoder,final_layer_norm}.*`.
SD 1.x reads the last layer after the final LayerNorm (last_hidden_state).
"""

from __future__ import annotations

from amdet_gate.checkpoints.layouts.common import transformers_tower
from amdet_gate.checkpoints.parts import Keys, Layout, Match
from amdet_gate.sources.selection import EncoderPart, LayerChoice, Naming

PREFIX = "cond_stage_model.transformer."


def detect(keys: Keys) -> Match | None:
    if not transformers_tower(keys, PREFIX):
        return None
    part = EncoderPart("text_encoder", PREFIX, Naming.TRANSFORMERS, "clip-l", LayerChoice(None, "SD 1.x"),
                       "SD 1.x reads the last layer after the final LayerNorm", aliases=("clip_l",))
    return Match("sd1", "Stable Diffusion 1.x single-file checkpoint", (part,))


LAYOUTS = (Layout("sd1", 10, detect),)
