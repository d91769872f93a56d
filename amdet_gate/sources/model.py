"""What every model source produces: the weight files' identities (torch-free)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class WeightFile:
    name: str
    sha256: str
    size: int


def identity_sha256(files: Sequence[WeightFile]) -> str:
    """The model's identity: its weight file's sha256, or for shards a sha256 over all of them."""
    if len(files) == 1:
        return files[0].sha256
    lines = "".join(f"{w.name} {w.sha256}\n" for w in sorted(files, key=lambda w: w.name))
    return hashlib.sha256(lines.encode()).hexdigest()
