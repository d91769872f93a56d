"""A safetensors file's layout, checked from its first bytes (no torch, no full read).

Run on every weight file before it is hashed: a 10 GB sparse file of zeros, a truncated or padded
file, or a header whose tensors do not tile the data is refused in microseconds, not after a
full-file sha256. The safetensors library checks the same when it opens the file; the encoder
then checks keys, shapes and dtypes against config.json (encoder.read_tensors).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from amdet_gate.errors import LoadError
from amdet_gate.files import open_regular
from amdet_gate.sanitise import one_line

SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2,
                      "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a safetensors header (checked: dtype known, shape and byte range agree)."""

    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Header:
    """A safetensors file's header: its tensors by name and its metadata (both untrusted text)."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def check_header(path: Path, inside: Path | None = None) -> None:
    """A safetensors file's layout, read from its first bytes only (no torch): an 8-byte header length,
    a JSON header of that length, and tensor byte ranges that fit the file exactly. LoadError if not."""
    read_header(path, inside)


def read_header(path: Path, inside: Path | None = None) -> Header:
    """`check_header`, returning what the header says: the checkpoint layouts are recognised from it
    (amdet_gate/checkpoints) without reading a byte of tensor data."""
    with open_regular(path, "weight file", LoadError, inside=inside) as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else 0
        if not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
            raise LoadError(f"{path.name} is not a safetensors file (header length {length}, file {size} bytes)")
        try:
            header = json.loads(fh.read(length))
        except (ValueError, RecursionError):
            raise LoadError(f"{path.name} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise LoadError(f"{path.name} is not a safetensors file (its header is not a JSON object)")
    end, tensors, metadata = 0, {}, header.get("__metadata__")
    for name, info in header.items():
        if name == "__metadata__":
            continue
        shown = one_line(name, 80)
        ok = (isinstance(info, dict) and info.get("dtype") in SAFETENSORS_DTYPES
              and isinstance(info.get("shape"), list) and all(type(n) is int and n >= 0 for n in info["shape"])
              and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
              and all(type(n) is int for n in info["data_offsets"]))
        if not ok:
            raise LoadError(f"{path.name}: tensor {shown} has a malformed header entry")
        start, stop = info["data_offsets"]
        count = math.prod(info["shape"]) * SAFETENSORS_DTYPES[info["dtype"]]
        if not 0 <= start <= stop or stop - start != count:
            raise LoadError(f"{path.name}: tensor {shown}'s byte range does not match its shape and dtype")
        end = max(end, stop)
        tensors[name] = TensorInfo(info["dtype"], tuple(info["shape"]))
    if 8 + length + end != size:
        raise LoadError(f"{path.name}: the header describes {8 + length + end} bytes but the file has {size} "
                        "(truncated or padded)")
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        metadata = {}  # the format says str -> str; anything else carries nothing we read
    return Header(tensors, metadata)
