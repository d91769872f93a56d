"""Which text encoder of a model one scan reads, and how (torch-free value types).

A `ResolvedModel` carries an `EncoderRef` when the scan is not the plain "one Hugging Face folder,
final layer" case: an encoder inside a single file, one encoder of a pipeline folder, or any
encoder with --layer, --config, --tokenizer or --lora. Everything that depends on it (the weight
identities, the files the cache key hashes, the loader, the tokenizer) asks it.

These types sit with the sources, below the checkpoint layouts that produce them
(amdet_gate/checkpoints) and the encoder families that read them (amdet_gate/encoders): both
layers import them, neither is imported from here.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from amdet_gate.errors import UsageError
from amdet_gate.sources.identity import WeightFile, identity_sha256

FINAL = "final"
CONSUMER = "consumer"


@dataclass(frozen=True)
class LayerChoice:
    """Which layer's features a scan reads (numbering and defaults: checkpoints/layer.py).

    `index`: None for the final features (after the final LayerNorm), else a negative
    hidden_states index (-1 the last layer's output, -2 the penultimate's), never normed."""

    index: int | None = None
    chosen_by: str = "default"  # "default", "--layer", or the family whose consumer reads it
    consumer_reads: str | None = None  # the consumer's layer, when the default reads another

    @property
    def name(self) -> str:
        return FINAL if self.index is None else str(self.index)

    @classmethod
    def parse(cls, text: str | None) -> LayerChoice | None:
        """`--layer final|-1|-2|...`; None when not given (`consumer` is `choose`'s)."""
        if text is None:
            return None
        value = text.strip().lower()
        if value in (FINAL, "last"):
            return cls(None, "--layer")
        if not re.fullmatch(r"-\d{1,3}", value) or int(value) == 0:
            raise UsageError(f"--layer {text!r}: use final (after the final LayerNorm), consumer (the layer "
                             "the model's pipeline reads) or a negative hidden-states index such as -2")
        return cls(int(value), "--layer")

    def check(self, layers: int) -> None:
        """The index must name a layer's output (-1 .. -layers; -layers-1 would be the embeddings)."""
        if self.index is not None and -self.index > layers:
            raise UsageError(f"--layer {self.index}: the encoder has {layers} layers (use -1 .. -{layers} "
                             "or final)")

    def layers_run(self, layers: int) -> int:
        """How many transformer layers produce the features read."""
        return layers if self.index is None else layers + 1 + self.index

    def describe(self, layers: int) -> dict:
        """What result.json records: which features were scanned, and why."""
        return {"scanned": self.name, "layers_run": self.layers_run(layers), "of_layers": layers,
                "final_layer_norm": self.index is None, "chosen_by": self.chosen_by,
                "consumer_reads": self.consumer_reads}


class Naming(str, Enum):
    """How a text tower's tensors are named."""

    TRANSFORMERS = "transformers"  # embeddings.token_embedding.weight, encoder.layers.N.self_attn.q_proj ...
    OPEN_CLIP = "open_clip"  # token_embedding.weight, transformer.resblocks.N.attn.in_proj_weight ...


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
class LoraRef:
    path: Path
    scale: float = 1.0


@dataclass(frozen=True)
class EncoderRef:
    name: str | None  # None: the model is a single encoder folder
    layer: LayerChoice
    part: EncoderPart | None = None  # set for an encoder inside a single file
    layout: str | None = None  # registry name of the file's layout, or "pipeline"
    layout_title: str | None = None
    config: Path | None = None  # --config
    tokenizer: Path | None = None  # --tokenizer
    lora: LoraRef | None = None
    not_scanned: tuple[Unscanned, ...] = ()
    encoders_in_model: tuple[str, ...] = ()  # every encoder of the model, this one included

    def identity(self, files: Sequence[WeightFile]) -> str:
        """The identity a policy, the lock and SARIF fingerprints name this encoder by.

        One encoder per file (a folder's weights, a stand-alone file): its weight file's sha256 (with a
        LoRA: a sha256 over both files' lines, as for shards). Several encoders in one file: that, plus
        the encoder's name, so an allow entry or fingerprint for text_encoder never covers text_encoder_2.
        """
        if self.part is None or len(self.encoders_in_model) <= 1:
            return identity_sha256(files)
        lines = "".join(f"{w.name} {w.sha256}\n" for w in sorted(files, key=lambda w: w.name))
        return hashlib.sha256((lines + f"encoder {self.name}\n").encode()).hexdigest()

    def cache_identity(self) -> dict:
        """What the verdict cache key adds for this choice: which encoder, which layer, the LoRA scale."""
        return {"encoder": self.name, "layout": self.layout, "layer": self.layer.name,
                "lora_scale": self.lora.scale if self.lora else None,
                "tokenizer": str(self.tokenizer) if self.tokenizer else None}

    def describe(self, layers: int | None = None) -> dict:
        """What result.json records about which encoder was scanned, and how."""
        return {
            "encoder": self.name,
            "layout": self.layout,
            "layout_title": self.layout_title,
            "key_prefix": self.part.prefix if self.part else None,
            "naming": self.part.naming.value if self.part else None,
            "consumer": self.part.consumer if self.part else None,
            "layer": self.layer.describe(layers) if layers is not None else {"scanned": self.layer.name,
                                                                              "chosen_by": self.layer.chosen_by},
            "encoders_in_model": list(self.encoders_in_model),
            "not_scanned": [u.describe() for u in self.not_scanned],
        }
