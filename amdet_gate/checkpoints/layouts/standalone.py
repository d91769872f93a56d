"""Stand-alone text-encoder files: what ComfyUI's models/text_encoders and A1111 keep, and OpenCLIP's.

- transformers naming at the top (`text_model.*`, optionally `text_projection.weight`; or bare
  `embeddings.*`, `encoder.*` as transformers 5 saves CLIPTextModel): clip_l.safetensors,
  clip_g.safetensors, a model.safetensors given on its own;
- ComfyUI's CLIPSave naming: `clip_l.transformer.text_model.*`, `clip_g.transformer.text_model.*`
  (and `t5xxl.transformer.*`, not scanned);
- OpenCLIP naming at the top (open_clip_model.safetensors, beside `visual.*`) or under `text.`
  (OpenCLIP's CustomTextCLIP).
Nobody's consumer is known here, so the final layer is read (after the final LayerNorm).
"""

from __future__ import annotations

from amdet_gate.checkpoints.layouts.common import open_clip_tower, transformers_tower
from amdet_gate.checkpoints.parts import Keys, Layout, Match
from amdet_gate.sources.selection import EncoderPart, LayerChoice, Naming, Unscanned

READS = "a stand-alone encoder: its consumer is not known, the final layer is read"
T5_REASON = "a T5 encoder is not a CLIP text encoder; AMDet scans CLIP-style encoders only"


def _part(name: str, prefix: str, naming: Naming, aliases: tuple[str, ...] = ()) -> EncoderPart:
    return EncoderPart(name, prefix, naming, None, LayerChoice(None, "stand-alone"), READS, aliases=aliases)


def detect_transformers(keys: Keys) -> Match | None:
    if not transformers_tower(keys, ""):
        return None
    return Match("text-encoder", "stand-alone text-encoder file (transformers naming)",
                 (_part("text_encoder", "", Naming.TRANSFORMERS),))


def detect_comfy_save(keys: Keys) -> Match | None:
    found = [(name, f"{name}.transformer.") for name in ("clip_l", "clip_g")
             if transformers_tower(keys, f"{name}.transformer.")]
    if not found:
        return None
    parts = tuple(_part("text_encoder" if i == 0 else f"text_encoder_{i + 1}", prefix, Naming.TRANSFORMERS, (name,))
                  for i, (name, prefix) in enumerate(found))
    unscanned = (Unscanned(f"text_encoder_{len(parts) + 1}", "T5 encoder", "t5xxl.", T5_REASON),
                 ) if keys.any_under("t5xxl.") else ()
    return Match("comfyui-clip", "ComfyUI text-encoder file (CLIPSave naming)", parts, unscanned)


def detect_open_clip(keys: Keys) -> Match | None:
    for prefix in ("", "text."):
        if open_clip_tower(keys, prefix):
            return Match("open-clip", "OpenCLIP checkpoint", (_part("text_encoder", prefix, Naming.OPEN_CLIP),))
    return None


LAYOUTS = (Layout("text-encoder", 20, detect_transformers), Layout("comfyui-clip", 21, detect_comfy_save),
           Layout("open-clip", 22, detect_open_clip))
