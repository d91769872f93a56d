"""Model sources: a spec (a path, a Hub id) turned into files on disk, and those files' identities.

A plug point. Each kind of source is a `ModelSourceKind` (model.py): `matches(spec)`,
`resolve(spec, revision, subfolder) -> ResolvedModel`, `check_pin`, `verify`. `SOURCE_KINDS` lists
them; `resolve_source` asks them in order (local paths first, so an existing folder wins over a Hub
id of the same spelling, unless the caller prefers remote kinds: a policy's anchor id).

  model.py      ResolvedModel (what every kind resolves to), the kind interface, the subfolder rule
  identity.py   WeightFile, the sha256 of a file and of a model
  selection.py  which encoder of a model one scan reads (EncoderRef and the value types it holds)
  local.py      the local kind (a folder or a file here), and a folder's weight files
  hub.py        the Hugging Face Hub kind (pins, downloads, the Hub's sha256 listing)
  files.py      every file of a resolved model that a scan reads, its weight identities, its tokenizer

Layered over these: amdet_gate/checkpoints/attach.py refines a resolved local path into one encoder
of a single-file checkpoint, a diffusers pipeline or an OpenCLIP folder (and any model with --layer,
--lora, --config, --tokenizer) by setting its `EncoderRef`; the kinds never look inside a file.

Torch-free: resolving reads no tensors, so that a cache hit, `verify` and `fetch` stay fast.
"""

from __future__ import annotations

from dataclasses import replace

from amdet_gate.errors import LoadError
from amdet_gate.sources.files import check_contained, identities
from amdet_gate.sources.hub import HubRepo
from amdet_gate.sources.identity import WeightFile
from amdet_gate.sources.local import LocalFolder
from amdet_gate.sources.model import ModelSourceKind, ResolvedModel, check_subfolder

# Asked in this order (a remote kind first only when the caller prefers remote kinds).
SOURCE_KINDS: tuple[ModelSourceKind, ...] = (LocalFolder(), HubRepo())


def _kinds(prefer_remote: bool) -> list[ModelSourceKind]:
    return sorted(SOURCE_KINDS, key=lambda kind: not kind.remote) if prefer_remote else list(SOURCE_KINDS)


def kind_for(spec: str, prefer_remote: bool = False) -> ModelSourceKind | None:
    """The first kind that takes `spec`, or None."""
    return next((kind for kind in _kinds(prefer_remote) if kind.matches(spec)), None)


def kind_of(model: ResolvedModel) -> ModelSourceKind:
    """The kind that resolved `model`."""
    return next(kind for kind in SOURCE_KINDS if kind.name is model.kind)


def resolve_source(spec: str, revision: str | None = None, subfolder: str | None = None,
                   prefer_hub: bool = False, follow_symlinks: bool = False) -> ResolvedModel:
    """A local folder as is, or a Hub id downloaded (only what the scan needs) and pinned.

    An existing path wins over a Hub id of the same spelling, unless `prefer_hub`.
    """
    subfolder = check_subfolder(subfolder)
    kind = kind_for(spec, prefer_remote=prefer_hub)
    if kind is None:
        raise LoadError(f"model folder {spec} does not exist (and it is not a Hub id of the form org/name)")
    return replace(kind.resolve(spec, revision, subfolder), follow_symlinks=follow_symlinks)


def check_pin(spec: str, revision: str | None, what: str = "model") -> None:
    """UnpinnedRevision (exit 1) when the kind `spec` names needs a pin and `revision` is none; before any
    download, so that an unpinned model is never fetched. A local path has nothing to pin."""
    kind = kind_for(spec)
    if kind is not None:
        kind.check_pin(spec, revision, what)


def identify(model: ResolvedModel, deadline: float | None = None) -> list[WeightFile]:
    """The weight files' identities, after every file the scan reads was found inside the model folder
    and every safetensors header was checked; hashing stops at `deadline` (exit 2). The kind then checks
    them against what it lists (the Hub's sha256s)."""
    check_contained(model)
    weights = identities(model, deadline)
    kind_of(model).verify(model, weights)
    return weights


__all__ = ["SOURCE_KINDS", "ModelSourceKind", "ResolvedModel", "WeightFile", "check_pin", "identify", "kind_for",
           "kind_of", "resolve_source"]
