"""What a checkpoint holds, as found from its safetensors header: text encoders and parts that cannot be scanned.

Torch-free, like source.py: recognising a layout reads only the header (a 7 GB file costs a few
hundred kilobytes), so a refusal is immediate and the cache can be asked before any tensor is read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum

from amdet_gate.checkpoints.layer import LayerChoice

# The projection a tower may carry, by the name CLIPTextModelWithProjection gives it.
PROJECTION = "text_projection.weight"


class Naming(str, Enum):
    """How a text tower's tensors are named."""

    TRANSFORMERS = "transformers"  # embeddings.token_embedding.weight, encoder.layers.N.self_attn.q_proj ...
    OPEN_CLIP = "open_clip"  # token_embedding.weight, transformer.resblocks.N.attn.in_proj_weight ...


class Pad(str, Enum):
    """What fills a prompt after its end-of-text token. OpenAI's CLIP (and SD 1.x) pads with
    <|endoftext|>; OpenCLIP-trained towers (SD 2.x, SDXL's bigG) pad with id 0 ("!")."""

    EOS = "eos"
    ZERO = "zero"


@dataclass(frozen=True)
class EncoderPart:
    """One CLIP text encoder inside a checkpoint file."""

    name: str  # as a diffusers pipeline names it: text_encoder, text_encoder_2
    prefix: str  # every tensor of this encoder starts with it
    naming: Naming
    family: str | None  # the family this layout ships (families.py); the shapes decide whether it is that
    layer: LayerChoice  # what the layout's consumer reads
    consumer: str  # who reads what, in one line (recorded in result.json)
    aliases: tuple[str, ...] = ()  # other names --encoder accepts (clip_l, clip_g, embedders.1)
    drop_last_block: bool = False  # SD 2.x reads the penultimate block: the last is not part of the model
    use_projection: bool = True  # SD 2.x's text_projection is in the file but nothing reads it

    def answers_to(self, name: str) -> bool:
        return name == self.name or name in self.aliases


@dataclass(frozen=True)
class Unscanned:
    """A component that is not a CLIP text encoder (a T5): reported in every report, never treated as clean."""

    name: str
    kind: str  # "T5 encoder"
    where: str  # its key prefix or subfolder
    reason: str

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "kind": self.kind, "where": self.where, "reason": self.reason}


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
    """A plug point: one way of laying text encoders out in a single file (see layouts/).

    `detect` answers None when the file is not of this layout. Layouts are tried in `order`
    (lowest first), so a specific one (SDXL: two encoders) is asked before a general one
    (a stand-alone text_model.* file).
    """

    name: str
    order: int
    detect: Callable[[Keys], Match | None]


_LAYOUTS: dict[str, Layout] = {}


def register(layout: Layout) -> Layout:
    if layout.name in _LAYOUTS:
        raise ValueError(f"layout {layout.name} registered twice")
    _LAYOUTS[layout.name] = layout
    return layout


def layouts() -> list[Layout]:
    from amdet_gate.checkpoints import layouts as _  # noqa: F401 - importing the package registers them

    return sorted(_LAYOUTS.values(), key=lambda layout: (layout.order, layout.name))
