"""SD 3 / 3.5 and all-in-one Flux files: text encoders under `text_encoders.*` (ComfyUI's layout).

`text_encoders.clip_l.transformer.text_model.*` (CLIP-L) and `text_encoders.clip_g.transformer.*`
(bigG, transformers naming, with text_projection) are scanned; `text_encoders.t5xxl.*` is a T5
encoder, not a CLIP one: it is reported as not scanned, never treated as clean.

SD 3 (clip_g present) names them as its diffusers pipeline does: text_encoder (CLIP-L),
text_encoder_2 (bigG), text_encoder_3 (T5); both CLIP encoders feed hidden_states[-2] and their
pooled outputs. Flux (no clip_g) has text_encoder (CLIP-L, of which it reads only the pooled
output: the final layer's EOS feature) and text_encoder_2 (T5).
"""

from __future__ import annotations

from amdet_gate.checkpoints.layouts.common import transformers_tower
from amdet_gate.checkpoints.parts import Keys, Layout, Match
from amdet_gate.sources.selection import EncoderPart, LayerChoice, Naming, Unscanned

ROOT = "text_encoders."
CLIP_L, CLIP_G, T5 = f"{ROOT}clip_l.transformer.", f"{ROOT}clip_g.transformer.", f"{ROOT}t5xxl."
T5_REASON = "a T5 encoder is not a CLIP text encoder; AMDet scans CLIP-style encoders only"


def detect(keys: Keys) -> Match | None:
    has_l, has_g = transformers_tower(keys, CLIP_L), transformers_tower(keys, CLIP_G)
    if not (has_l or has_g):
        return None
    parts: list[EncoderPart] = []
    if has_g or not keys.any_under(T5):  # SD 3 (or a file with CLIP encoders only)
        title, t5_name = "SD 3 single-file checkpoint", "text_encoder_3"
        reads = "SD 3 reads hidden_states[-2] (no final LayerNorm) and the pooled output"
        if has_l:
            parts.append(EncoderPart("text_encoder", CLIP_L, Naming.TRANSFORMERS, "clip-l", LayerChoice(-2, "SD 3"),
                                     reads, aliases=("clip_l",)))
        if has_g:
            parts.append(EncoderPart("text_encoder_2", CLIP_G, Naming.TRANSFORMERS, "openclip-bigg",
                                     LayerChoice(-2, "SD 3"), reads, aliases=("clip_g",)))
    else:
        title, t5_name = "Flux all-in-one checkpoint", "text_encoder_2"
        parts.append(EncoderPart("text_encoder", CLIP_L, Naming.TRANSFORMERS, "clip-l", LayerChoice(None, "Flux"),
                                 "Flux reads CLIP-L's pooled output only (the final layer's EOS feature)",
                                 aliases=("clip_l",)))
    unscanned = (Unscanned(t5_name, "T5 encoder", T5, T5_REASON),) if keys.any_under(T5) else ()
    return Match("sd3" if t5_name == "text_encoder_3" else "flux", title, tuple(parts), unscanned)


LAYOUTS = (Layout("sd3-flux", 7, detect),)
