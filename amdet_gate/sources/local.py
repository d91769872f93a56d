"""The local kind of model source: a folder (or a checkpoint file) on this machine, and how a folder's
weight files are found, in transformers' order (torch-free)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from amdet_gate.errors import LoadError, PickleRefused, UnsupportedModel, UsageError
from amdet_gate.files import read_capped_text
from amdet_gate.safetensors_header import check_header
from amdet_gate.sources.identity import WeightFile, sha256_file
from amdet_gate.sources.model import ResolvedModel, SourceKindName

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_SMALL_FILE_BYTES = 1024 * 1024


class LocalFolder:
    """A path that exists here: a Hugging Face folder, a pipeline folder, a checkpoint file."""

    name = SourceKindName.LOCAL
    remote = False

    def matches(self, spec: str) -> bool:
        return Path(spec).exists()

    def resolve(self, spec: str, revision: str | None, subfolder: str | None) -> ResolvedModel:
        if revision:
            raise UsageError(f"--revision applies to Hub ids; {spec} is a local folder")
        return ResolvedModel(spec, Path(spec), subfolder)

    def check_pin(self, spec: str, revision: str | None, what: str) -> None:
        """A local folder has no revision to pin."""

    def verify(self, model: ResolvedModel, files: Sequence[WeightFile]) -> None:
        """Nothing lists a local folder's sha256s but the files themselves."""


def local_model(path: Path | str, subfolder: str | None = None) -> ResolvedModel:
    """A local folder (or file) as a resolved model, for callers that hold a path (tests, the renderer,
    benchmarks): LoadError (exit 2) when it does not exist."""
    model = ResolvedModel(str(path), Path(path), subfolder)
    if not model.folder.exists():
        raise LoadError(f"model folder {model.folder} does not exist")
    return model


def read_small(path: Path, inside: Path | None = None) -> str:
    """A model's small JSON file (config.json, the shard index): 1 MiB at most, exit 2 if refused."""
    return read_capped_text(path, MAX_SMALL_FILE_BYTES, path.name, LoadError, inside=inside)


def find_weight_files(folder: Path) -> list[Path]:
    """The safetensors files a loader would read from this folder, in transformers' order.

    model.safetensors first, then a sharded index, then a lone safetensors file. A folder
    that also holds weights the scan would not cover (a variant such as model.fp16.safetensors,
    stray safetensors files, or pickle weights a loader would pick instead) is refused: the
    scanned file must be the one that gets deployed. Pickle-only folders are refused, never opened.
    """
    if not folder.is_dir():
        raise UnsupportedModel(f"{folder} is not a folder")
    safetensors = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    index = folder / INDEX_FILE
    if (folder / SINGLE_FILE).is_file() and index.is_file():
        _files_from_index(folder, index)  # an untrusted index is checked even when it only confuses
        raise UnsupportedModel(f"{folder} has both {SINGLE_FILE} and {INDEX_FILE}; loaders disagree on which "
                               "to read: keep one")
    names = {p.name for p in folder.iterdir() if p.is_file()}
    first = weights_to_read(names, str(folder))
    chosen = _files_from_index(folder, index) if first == INDEX_FILE else [folder / first]
    uncovered = sorted(p.name for p in safetensors if p not in chosen)
    if uncovered:
        raise UnsupportedModel(
            f"{folder} also holds weights the scan would not cover ({', '.join(uncovered[:3])}); a loader "
            "asked for a variant would read them: scan each variant in its own folder")
    pickles = sorted(n for n in names if n.lower().endswith(PICKLE_SUFFIXES))
    if pickles:  # weights_to_read picked the safetensors; a loader told use_safetensors=False would not
        raise PickleRefused(
            f"{folder} also holds pickle weights the scan would not cover ({', '.join(pickles[:3])}); a loader "
            "asked for use_safetensors=False would unpickle them, which can run code: remove them, or scan a "
            "folder without them")
    return chosen


def weights_to_read(names: set[str], where: str) -> str:
    """The file a loader starts from, in transformers' order: model.safetensors, the sharded index,
    else a lone safetensors file. Pickle weights a loader would pick instead are refused."""
    if SINGLE_FILE in names:
        return SINGLE_FILE  # preferred to shards' index and to pickle weights
    if INDEX_FILE in names:
        return INDEX_FILE
    pickles = sorted(n for n in names if n.lower().endswith(PICKLE_SUFFIXES))
    if pickles:
        raise _pickle_refused(where, pickles)
    safetensors = sorted(n for n in names if n.endswith(".safetensors"))
    if len(safetensors) == 1:
        return safetensors[0]
    if safetensors:
        raise UnsupportedModel(f"{where} has several .safetensors files but no {SINGLE_FILE} or {INDEX_FILE}")
    raise UnsupportedModel(f"no weights found in {where} (expected {SINGLE_FILE})")


def _pickle_refused(where: str, pickles: list[str]) -> PickleRefused:
    return PickleRefused(
        f"{where} has only pickle-based weights ({', '.join(pickles[:3])}); pickle can run "
        "code when loaded, so amdet-gate reads safetensors only - convert the weights first")


def _files_from_index(folder: Path, index: Path) -> list[Path]:
    files = []
    for name in _shard_names(read_small(index), str(index)):
        path = folder / name
        if not path.is_file():
            raise LoadError(f"shard {name} listed in {index.name} is missing")
        files.append(path)
    return files


def _shard_names(index_text: str, where: str) -> list[str]:
    try:
        names = sorted(set(json.loads(index_text)["weight_map"].values()))
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError, RecursionError) as exc:
        raise LoadError(f"{where} is not a valid safetensors index") from exc
    for name in names:
        # The index is untrusted: shard names must be plain file names inside the folder.
        if not isinstance(name, str) or PurePosixPath(name).name != name or not name.endswith(".safetensors"):
            raise LoadError(f"{where} names an invalid shard file {name!r}")
    if not names:
        raise LoadError(f"{where} lists no shard files")
    return names


def weight_identities(folder: Path, deadline: float | None = None, inside: Path | None = None) -> list[WeightFile]:
    """sha256 and size of every weight file the scan reads: every header is checked first (cheap), so a
    huge file that is no safetensors is refused at once instead of after a full-file hash."""
    files = find_weight_files(folder)
    for path in files:
        check_header(path, inside)
    return [WeightFile(p.name, sha256_file(p, deadline, inside), p.stat().st_size) for p in files]
