"""OpenCLIP text-tower names -> transformers CLIPTextModel names (what SD 2.x, SDXL's bigG and
open_clip_model.safetensors use).

OpenCLIP keeps q, k and v as one `attn.in_proj_weight` (3d x d) and `in_proj_bias` (3d): they are
split by rows, q first. Its `text_projection` is a (width x projection) matrix applied as
x @ P, so transformers' Linear weight is its transpose. `positional_embedding` is a bare
parameter (L x d). The block of SD 2.x that its pipeline never runs is dropped (`dropped`).
"""

from __future__ import annotations

import re

from amdet_gate.encoders.clip import PROJECTION

_BLOCK = re.compile(r"transformer\.resblocks\.(\d{1,4})\.(.+)")
_TOP = {"token_embedding.weight": "embeddings.token_embedding.weight",
        "positional_embedding": "embeddings.position_embedding.weight",
        "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
_INSIDE = {"attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
           "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
           "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
           "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
           "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias"}
# Not weights of the text model: the causal mask buffer, the contrastive temperature, the image tower.
_NOT_TEXT = ("attn_mask", "logit_scale", "logit_bias")
_OTHER_TOWERS = ("visual.",)

Names = list[tuple[str, tuple[int, int] | None, bool]]  # (CLIPTextModel name, rows, transpose)


def open_clip_name(inner: str, shape: tuple[int, ...], dropped: int | None) -> Names | None:
    """The CLIPTextModel tensors one OpenCLIP key gives (three for a fused in_proj); None for a key that
    is not the text tower's weights; a name starting with '?' for an unknown key of the tower."""
    if inner in _TOP:
        return [(_TOP[inner], None, False)]
    if inner == "text_projection":  # a bare parameter: x @ P
        return [(PROJECTION, None, True)]
    if inner == "text_projection.weight":  # an nn.Linear projection (some OpenCLIP configs): already (out, in)
        return [(PROJECTION, None, False)]
    if inner in _NOT_TEXT or inner.startswith(_OTHER_TOWERS):
        return None
    match = _BLOCK.fullmatch(inner)
    if match is None:
        return [(f"?{inner}", None, False)]
    index, rest = int(match.group(1)), match.group(2)
    if index == dropped:
        return None
    layer = f"encoder.layers.{index}."
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = "weight" if rest.endswith("weight") else "bias"
        if not shape or shape[0] % 3:
            return [(f"?{inner} (its first dimension is not 3 x width)", None, False)]
        width = shape[0] // 3
        return [(f"{layer}self_attn.{proj}_proj.{kind}", (i * width, (i + 1) * width), False)
                for i, proj in enumerate(("q", "k", "v"))]
    if rest in _INSIDE:
        return [(layer + _INSIDE[rest], None, False)]
    return [(f"?{inner}", None, False)]
