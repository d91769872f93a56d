"""The two interfaces of an encoder family: what the scan engine may use of a loaded encoder
(`EncoderAdapter`, with `AdapterTraits` saying what the engine must not assume) and how a family is
read from untrusted files (`EncoderFamily`); and the loaded encoder handed from loading to the scan.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from amdet_gate.sources.identity import WeightFile

if TYPE_CHECKING:
    from amdet_gate.sources.selection import LayerChoice
    from amdet_gate.tokenizer import PromptTokenizer


class Pad(str, Enum):
    """What fills a prompt after its end-of-text token. OpenAI's CLIP (and SD 1.x) pads with
    <|endoftext|>; OpenCLIP-trained towers (SD 2.x, SDXL's bigG) pad with id 0 ("!")."""

    EOS = "eos"
    ZERO = "zero"


class Pooling(str, Enum):
    """How an encoder's pooled (sentence) feature is read from its token features."""

    FIRST_EOS = "first_eos"  # the feature at the first end-of-text token (CLIP: argmax of ids == eos)


@dataclass(frozen=True)
class AdapterTraits:
    """What the scan engine must not assume about an encoder, stated by its family.

    `causal`: each position sees only itself and earlier ones (CLIP's causal mask), so features
    before the trigger do not depend on it and sequences may be cut after the last EOS.
    `trigger_slot`: where a pseudo-trigger is inserted, as an index into the input embeddings
    (1: right after BOS). `pooling`: how the pooled feature is read.
    """

    causal: bool
    trigger_slot: int
    pooling: Pooling


class EncoderAdapter(Protocol):
    """What the scan (engine/, confirm.py, token_search.py, reverse.py) uses of a text encoder."""

    traits: AdapterTraits
    model: torch.nn.Module  # the module itself: its tensors (the anchor check compares them, a LoRA merges into them)
    hidden_size: int
    seq_len: int
    eos_token_id: int  # the tokenizer's, set by the scanner before any prompt is encoded
    projection: torch.Tensor | None

    @property
    def device(self) -> torch.device: ...

    @property
    def token_embedding(self) -> torch.Tensor: ...

    @property
    def position_embedding(self) -> torch.Tensor: ...

    def to(self, device: torch.device | str) -> EncoderAdapter: ...

    def at_layer(self, layer: LayerChoice) -> EncoderAdapter:
        """The same encoder read at another layer (checkpoints/layer.py: --layer, a pipeline's consumer)."""
        ...

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled features (..., d) in the space downstream models read (after a projection if any)."""
        ...

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings (B, L, d): what a trigger is inserted into."""
        ...

    def encode(self, hidden: torch.Tensor) -> torch.Tensor:
        """The features the scan reads (..., L, d) from input embeddings (..., L, d)."""
        ...

    def residual(self, hidden: torch.Tensor, layers: int | None = None) -> torch.Tensor:
        """The residual stream after the first `layers` layers (all by default), before the final norm."""
        ...

    def pooled(self, features: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The pooled feature of each prompt, as `traits.pooling` says, projected when the model projects."""
        ...


class EncoderFamily(Protocol):
    """A plug point: one kind of text encoder (encoders/__init__.py lists them; CLIP is clip.py).

    Loading runs these in this order, so that hostile input is refused before a tensor is built:
    `matches` a config.json, `text_config` picks the text tower's part of it, `validate` bounds its
    sizes, `expected_shapes` and `module_key` check the safetensors headers, `build` makes the module
    on the meta device and assigns the tensors, `adapter` wraps it for the scan; `tokenizer` reads
    prompts as the family's models expect.
    """

    name: str
    title: str  # what an "unsupported architecture" error names as scannable
    traits: AdapterTraits

    def matches(self, config: Mapping) -> bool: ...

    def text_config(self, config: Mapping) -> Mapping:
        """The text tower's config inside a config.json (LoadError when it has none)."""
        ...

    def validate(self, raw: Mapping, where: str) -> dict:
        """The config's sizes within the family's limits, as plain values (LoadError otherwise)."""
        ...

    def module_key(self, key: str) -> str | None:
        """A checkpoint key under the module's own name, or None when it is not this tower's."""
        ...

    def expected_shapes(self, cfg: dict) -> dict[str, tuple[int, ...]]: ...

    def build(self, cfg: dict, tensors: dict[str, torch.Tensor]) -> torch.nn.Module: ...

    def read_projection(self, files: list[Path], cfg: dict) -> torch.Tensor | None: ...

    def adapter(self, module: torch.nn.Module, cfg: dict, projection: torch.Tensor | None,
                layer: LayerChoice | None = None) -> EncoderAdapter: ...

    def tokenizer(self, folder: Path | None, pad: Pad | None = None) -> PromptTokenizer:
        """The folder's tokenizer, else the family's bundled one padded as `pad` says."""
        ...


@dataclass(frozen=True)
class LoadedEncoder:
    """A text encoder read from untrusted files, ready for the scan."""

    family: EncoderFamily
    adapter: EncoderAdapter
    architecture: str  # as declared in config.json
    config: dict[str, int | float | str]  # the validated sizes
    weight_files: list[WeightFile] = field(default_factory=list)
    folder: Path | None = None
    # What result.json's model block adds for an encoder of a checkpoint file, a pipeline or a LoRA
    # (amdet_gate/checkpoints): which encoder and layer, which config, the LoRA.
    details: dict = field(default_factory=dict)
