"""What a source kind resolves a model to (`ResolvedModel`), the interface of a kind, the subfolder rule.

Torch-free: resolving reads no tensors, so that a cache hit, `verify` and `fetch` stay fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path, PurePosixPath
from typing import Protocol

from amdet_gate.errors import UsageError
from amdet_gate.sources.identity import WeightFile
from amdet_gate.sources.selection import EncoderRef


class SourceKindName(str, Enum):
    """Which kind of source resolved a model (sources/__init__.py lists the kinds)."""

    LOCAL = "local"  # a folder or a checkpoint file on this machine
    HUB = "hub"  # a Hugging Face Hub repository, downloaded into the Hugging Face cache


def check_subfolder(subfolder: str | None) -> str | None:
    """The one rule for --subfolder (and an anchor's): a relative path inside the model, else a usage
    error (exit 4). Returns it without leading or trailing slashes."""
    if subfolder and (PurePosixPath(subfolder).is_absolute() or ".." in PurePosixPath(subfolder).parts
                      or "\\" in subfolder):
        raise UsageError(f"--subfolder {subfolder!r} must be a relative path inside the model")
    return subfolder.strip("/") if subfolder else None


@dataclass(frozen=True)
class ResolvedModel:
    """A model's files on disk, what the user asked for, and which of its encoders a scan reads.

    Every loader takes one of these, never a bare folder. The weight files' identities are
    computed from it later (`sources.identify`), inside the scan's time budget.
    """

    spec: str  # as given: a folder or file path, or a Hub id
    root: Path  # the local folder or checkpoint file, or the downloaded snapshot of the Hub revision
    subfolder: str | None = None
    hub_id: str | None = None
    revision: str | None = None  # as asked (branch, tag or sha)
    resolved_sha: str | None = None  # the commit the revision pointed to
    hub_sha256: tuple[tuple[str, str], ...] = ()  # (file name, sha256) the Hub lists for LFS weight files
    follow_symlinks: bool = False  # --follow-symlinks: files may resolve anywhere on the machine
    # Which text encoder, when the model is not one plain encoder folder: a single-file checkpoint's
    # (root is then the file), a pipeline's, or one read with --layer/--lora (amdet_gate/checkpoints).
    encoder: EncoderRef | None = None
    kind: SourceKindName = SourceKindName.LOCAL
    # Where every file must resolve when that is not `root`: a Hub snapshot's files are symlinks into
    # its repository's blobs/ in the Hugging Face cache.
    containment: Path | None = None

    def __post_init__(self) -> None:
        check_subfolder(self.subfolder)

    @property
    def folder(self) -> Path:
        return self.root / self.subfolder if self.subfolder else self.root

    @property
    def checkpoint_file(self) -> Path | None:
        """The single file the encoder is read from (a checkpoint's, an OpenCLIP file), else None (a folder)."""
        return self.root if self.encoder is not None and self.encoder.part is not None else None

    @property
    def key_prefix(self) -> str | None:
        """The prefix of the encoder's tensors inside its single file; None for a folder in Hugging Face layout."""
        return self.encoder.part.prefix if self.encoder is not None and self.encoder.part is not None else None

    @property
    def config_file(self) -> Path | None:
        """The config the encoder is built with: --config, else the folder's config.json (None for a single
        file without --config: its config is chosen from the tensors, checkpoints/families.py)."""
        if self.encoder is not None and self.encoder.config is not None:
            return Path(self.encoder.config)
        return None if self.checkpoint_file is not None else self.folder / "config.json"

    @property
    def boundary(self) -> Path | None:
        """Where every file the scan reads must resolve: the folder given (a pipeline's root with
        --subfolder), or `containment`. None with --follow-symlinks."""
        if self.follow_symlinks:
            return None
        return self.containment or self.root

    def describe(self) -> dict:
        return {"source": self.spec, "hub_id": self.hub_id, "revision": self.revision,
                "resolved_sha": self.resolved_sha, "subfolder": self.subfolder}


class ModelSourceKind(Protocol):
    """A plug point: one kind of place a model comes from (sources/__init__.py lists them).

    `matches` looks at the spelling of the spec (and whether such a path exists) only; `resolve`
    turns it into files on disk, downloading what the scan needs; `check_pin` refuses, before any
    download, a spec whose revision is not pinned when the policy requires a pin; `verify` checks
    the hashed weight files against what the source itself lists for them.
    """

    name: SourceKindName
    remote: bool  # its files come from elsewhere: a policy's anchor id is looked up here first

    def matches(self, spec: str) -> bool: ...

    def resolve(self, spec: str, revision: str | None, subfolder: str | None) -> ResolvedModel: ...

    def check_pin(self, spec: str, revision: str | None, what: str) -> None: ...

    def verify(self, model: ResolvedModel, files: Sequence[WeightFile]) -> None: ...
