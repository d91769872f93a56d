"""A text encoder's tensors named as transformers' CLIPTextModel names them, worked out from the header alone.

`map_tower` turns the checkpoint keys under an encoder's prefix into CLIPTextModel state-dict
names (`embeddings.token_embedding.weight`, `encoder.layers.3.self_attn.q_proj.weight`, ...,
plus `text_projection.weight`), each with where its values come from: a whole tensor, rows of
OpenCLIP's fused in_proj (split into q, k, v), or OpenCLIP's transposed text_projection. The
shapes that result are known before a byte is read, so the config can be chosen and checked
(families.py) and a mismatch refused, before the loader reads only these tensors.

Fail closed: a key under the prefix that is neither a known tensor nor a known buffer is
refused (LyCORIS-style extras, layer scales, a second attention norm): a tower we would
half-understand is not scanned as if it were a CLIP one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from amdet_gate.checkpoints.openclip import open_clip_name
from amdet_gate.encoders.clip import PROJECTION
from amdet_gate.errors import LoadError
from amdet_gate.safetensors_header import Header
from amdet_gate.sanitise import one_line
from amdet_gate.sources.selection import EncoderPart, Naming

_LAYER = re.compile(r"encoder\.layers\.(\d{1,4})\.")
# Buffers and scalars a tower's file may carry that are not weights of the text model.
_TRANSFORMERS_IGNORED = ("embeddings.position_ids",)


@dataclass(frozen=True)
class TensorSource:
    """Where a CLIPTextModel tensor's values are: `key`, optionally rows [start, stop) of it, optionally transposed."""

    key: str
    shape: tuple[int, ...]  # of the result
    rows: tuple[int, int] | None = None
    transpose: bool = False


@dataclass(frozen=True)
class TowerMap:
    """The encoder's tensors by CLIPTextModel name (and `text_projection.weight` when it is read)."""

    part: EncoderPart
    tensors: dict[str, TensorSource]
    dtypes: frozenset[str]

    @property
    def layers(self) -> int:
        found = {int(m.group(1)) for name in self.tensors if (m := _LAYER.match(name))}
        return len(found)

    def shape(self, name: str) -> tuple[int, ...] | None:
        source = self.tensors.get(name)
        return None if source is None else source.shape


def map_tower(part: EncoderPart, header: Header, file_name: str) -> TowerMap:
    """The encoder's tensors, named and shaped as CLIPTextModel's; LoadError for anything that does not fit."""
    keys = sorted(k for k in header.tensors if k.startswith(part.prefix))
    if part.naming is Naming.OPEN_CLIP:
        blocks = _block_indices(part, keys)
        dropped = max(blocks) if part.drop_last_block and blocks else None
        if part.drop_last_block and len(blocks) < 2:
            raise LoadError(f"{file_name}: {part.name} has {len(blocks)} block(s); SD 2.x reads the penultimate one")
    tensors: dict[str, TensorSource] = {}
    for key in keys:
        inner = key[len(part.prefix):]
        if part.naming is Naming.TRANSFORMERS:
            named = _transformers_name(inner, top_level=not part.prefix)
            if named is None:
                continue
            names = [(named, None, False)]
        else:
            names = open_clip_name(inner, header.tensors[key].shape, dropped)
            if names is None:
                continue
        for name, rows, transpose in names:
            if name == PROJECTION and not part.use_projection:
                continue
            if name.startswith("?"):
                raise LoadError(f"{file_name}: {part.name} has a tensor this loader does not know "
                                f"({one_line(key, 100)}); refused rather than scanned half-understood")
            if name in tensors:
                raise LoadError(f"{file_name}: {part.name} has tensor {one_line(name, 100)} twice "
                                f"({one_line(tensors[name].key, 100)} and {one_line(key, 100)})")
            shape = header.tensors[key].shape
            if rows is not None:
                shape = (rows[1] - rows[0], *shape[1:])
            if transpose:
                shape = tuple(reversed(shape))
            tensors[name] = TensorSource(key, shape, rows, transpose)
    if not tensors:
        raise LoadError(f"{file_name}: no {part.name} tensors under {one_line(part.prefix, 80) or 'the top level'}")
    dtypes = frozenset(header.tensors[s.key].dtype for s in tensors.values())
    return TowerMap(part, tensors, dtypes)


def _transformers_name(inner: str, top_level: bool) -> str | None:
    """CLIPTextModel's own name for a key under the prefix; None for what is not this tower's weights
    (a buffer, or at the top level of a stand-alone file another model's tensor: visual.*); '?key' for
    an unknown key inside the tower (the expected-shape check refuses unknown names under text_model.)."""
    if inner == PROJECTION:
        return PROJECTION
    if inner.startswith("text_model."):
        inner = inner[len("text_model."):]
    elif not inner.startswith(("embeddings.", "encoder.", "final_layer_norm.")):
        return None if top_level or inner == "logit_scale" else f"?{inner}"
    return None if inner in _TRANSFORMERS_IGNORED else inner


def _block_indices(part: EncoderPart, keys: list[str]) -> list[int]:
    pattern = re.compile(re.escape(part.prefix) + r"transformer\.resblocks\.(\d{1,4})\.")
    return sorted({int(m.group(1)) for k in keys if (m := pattern.match(k))})
