"""What a checkpoint holds, as found from its safetensors header: text encoders and parts that cannot be scanned.

Torch-free, like the model sources: recognising a layout reads only the header (a 7 GB file costs a few
hundred kilobytes), so a refusal is immediate and the cache can be asked before any tensor is read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from amdet_gate.sources.selection import EncoderPart, Unscanned


@dataclass(frozen=True)
class Match:
    """A layout recognised in a file: its encoders and what is not scanned."""

    layout: str  # the registry name (layouts/)
    title: str  # "SDXL base single-file checkpoint"
    parts: tuple[EncoderPart, ...]
    unscanned: tuple[Unscanned, ...] = ()


class Keys:
    """A header's tensor names, with the prefix questions layouts ask."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = frozenset(names)

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def under(self, prefix: str) -> list[str]:
        return sorted(n for n in self.names if n.startswith(prefix))

    def any_under(self, prefix: str) -> bool:
        return any(n.startswith(prefix) for n in self.names)


@dataclass(frozen=True)
class Layout:
    """A plug point: one way of laying text encoders out in a single file (see layouts/, whose
    `LAYOUTS` lists them all).

    `detect` answers None when the file is not of this layout. Layouts are tried in `order`
    (lowest first), so a specific one (SDXL: two encoders) is asked before a general one
    (a stand-alone text_model.* file).
    """

    name: str
    order: int
    detect: Callable[[Keys], Match | None]
