"""Who scanned what: the tool, and the model's (or anchor's) identity as result.json records it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from amdet_gate.result.codec import flat, omit


@dataclass(frozen=True)
class Tool:
    name: str
    version: str


@dataclass(frozen=True)
class WeightFileRecord:
    """One weight file: its name in the model folder, sha256 and size in bytes."""

    name: str
    sha256: str
    size: int


@dataclass(frozen=True)
class ConfigSource:
    """Where an encoder's config came from (a family's bundled config, --config, the folder's config.json)."""

    source: str
    family: str | None
    pad: str | None
    note: str


@dataclass(frozen=True, kw_only=True)
class LayerInfo:
    """Which features were scanned (final or -N), and why."""

    scanned: str
    layers_run: int | None = omit()
    of_layers: int | None = omit()
    final_layer_norm: bool | None = omit()
    chosen_by: str
    consumer_reads: str | None = None


@dataclass(frozen=True)
class UnscannedPart:
    """A component of the model that was not scanned (a T5 encoder): reported, never treated as clean."""

    name: str
    kind: str
    where: str
    reason: str


@dataclass(frozen=True)
class LoraInfo:
    file: str
    format: str
    scale: float
    rank_scaling: str
    modules_merged: int
    denoiser_keys_ignored: int


@dataclass(frozen=True, kw_only=True)
class EncoderDetails:
    """An encoder of a checkpoint file or pipeline, a LoRA, --layer (amdet_gate/checkpoints): written
    into the model object beside the folder's identity."""

    config_source: ConfigSource | None = omit()
    encoder: str | None
    layout: str | None
    layout_title: str | None
    key_prefix: str | None
    naming: str | None
    consumer: str | None
    layer: LayerInfo
    encoders_in_model: tuple[str, ...]
    not_scanned: tuple[UnscannedPart, ...]
    lora: LoraInfo | None = omit()
    pad: str | None = None


@dataclass(frozen=True, kw_only=True)
class ModelIdentity:
    """The scanned model (or the anchor): where it came from, its weights' sha256s, its config."""

    source: str
    hub_id: str | None = None
    revision: str | None = None
    resolved_sha: str | None = None
    subfolder: str | None = None
    identity_sha256: str
    architecture: str
    config: dict[str, Any]  # the encoder's config.json values, as read (opaque, untrusted)
    weight_files: tuple[WeightFileRecord, ...]
    details: EncoderDetails | None = flat()
    tokenizer: str | None = omit()  # where the tokenizer came from (the model's, not the anchor's)

    @property
    def encoder(self) -> str | None:
        return self.details.encoder if self.details else None

    @property
    def not_scanned(self) -> tuple[UnscannedPart, ...]:
        return self.details.not_scanned if self.details else ()

    def named(self) -> dict[str, str | None]:
        """The keys `ResolvedModel.describe` sets: what a cached result is relabelled with."""
        return {"source": self.source, "hub_id": self.hub_id, "revision": self.revision,
                "resolved_sha": self.resolved_sha, "subfolder": self.subfolder}
