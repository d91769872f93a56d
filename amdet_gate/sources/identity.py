"""What identifies a model: every weight file's sha256 and size, and the model's one sha256 (torch-free)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from amdet_gate.errors import GateError, LoadError
from amdet_gate.files import open_regular


class BudgetExceeded(GateError):
    """The time budget ran out before the scan could decide: exit 2 (inconclusive, AMDET003)."""


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


def sha256_file(path: Path, deadline: float | None = None, inside: Path | None = None) -> str:
    """The file's sha256, read in 1 MiB chunks; BudgetExceeded once `deadline` (monotonic) has passed."""
    digest = hashlib.sha256()
    with open_regular(path, "weight file", LoadError, inside=inside) as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
            if deadline is not None and time.monotonic() > deadline:
                raise BudgetExceeded(f"the time budget ran out while hashing {path.name}; raise --time-budget "
                                     "(hashing counts against it)")
    return digest.hexdigest()
