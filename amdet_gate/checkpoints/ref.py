"""Which text encoder of a model one scan reads, with the options that change what is read (torch-free).

A `ModelSource` carries an `EncoderRef` when the scan is not the plain "one Hugging Face folder,
final layer" case: an encoder inside a single file, one encoder of a pipeline folder, or any
encoder with --layer, --config, --tokenizer or --lora. Everything that depends on it (the weight
identities, the files the cache key hashes, the loader, the tokenizer) asks it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from amdet_gate.checkpoints.layer import LayerChoice
from amdet_gate.checkpoints.parts import EncoderPart, Unscanned


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

    def identity(self, files: list) -> str:
        """The identity a policy, the lock and SARIF fingerprints name this encoder by.

        One encoder per file (a folder's weights, a stand-alone file): its weight file's sha256 (with a
        LoRA: a sha256 over both files' lines, as for shards). Several encoders in one file: that, plus
        the encoder's name, so an allow entry or fingerprint for text_encoder never covers text_encoder_2.
        """
        from amdet_gate.source import identity_sha256

        if self.part is None or len(self.encoders_in_model) <= 1:
            return identity_sha256(files)
        lines = "".join(f"{w.name} {w.sha256}\n" for w in sorted(files, key=lambda w: w.name))
        return hashlib.sha256((lines + f"encoder {self.name}\n").encode()).hexdigest()

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
