"""Model sources: a local folder or a Hub repository, turned into files on disk and identities.

This stage reads no tensors and imports no torch, so that a cache hit, `verify` and `fetch`
stay fast. It decides which files a scan needs, downloads only those from the Hub (config,
safetensors, tokenizer files; never pickle), pins the revision to a commit sha, and
identifies every weight file by its sha256.

huggingface_hub does the Hub work and honours HF_TOKEN, HF_HOME, HF_ENDPOINT and
HF_HUB_OFFLINE from the environment.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from amdet_gate.errors import ExitCode, GateError, LoadError, PickleRefused, UnsupportedModel, UsageError
from amdet_gate.files import OutsideFolder, open_regular, read_capped_text, resolve_inside
from amdet_gate.sanitise import one_line
from amdet_gate.sources.model import WeightFile, identity_sha256  # noqa: F401 - importers move in the next commit
from amdet_gate.sources.selection import EncoderRef

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Every file a CLIP tokenizer reads. The tokenizer is loaded from a private copy of exactly these
# (tokenizer.load_tokenizer), and the verdict cache key hashes exactly these: a changed
# added_tokens.json changes tokenization, so it must change the key too.
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")
MAX_SMALL_FILE_BYTES = 1024 * 1024
MAX_TOKENIZER_FILE_BYTES = 64 * 1024 * 1024
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
COMMIT_SHA = re.compile(r"[0-9a-f]{40}")  # always used with fullmatch: "$" would accept a trailing newline
STANDARD_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


class BudgetExceeded(GateError):
    """The time budget ran out before the scan could decide: exit 2 (inconclusive, AMDET003)."""


class UnpinnedRevision(GateError):
    """The policy requires a 40-hex commit pin and the model was named by a branch or tag."""

    exit_code = ExitCode.FAIL
    rule_id = "AMDET100"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are on disk, and what the user asked for."""

    spec: str  # as given: a folder path or a Hub id
    root: Path  # the local folder, or the downloaded snapshot of the Hub revision
    subfolder: str | None = None
    hub_id: str | None = None
    revision: str | None = None  # as asked (branch, tag or sha)
    resolved_sha: str | None = None  # the commit the revision pointed to
    hub_sha256: tuple[tuple[str, str], ...] = ()  # (file name, sha256) the Hub lists for LFS weight files
    follow_symlinks: bool = False  # --follow-symlinks: files may resolve anywhere on the machine
    # Which text encoder, when the model is not one plain encoder folder: a single-file checkpoint's
    # (root is then the file), a pipeline's, or one read with --layer/--lora (amdet_gate/checkpoints).
    encoder: EncoderRef | None = None

    @property
    def folder(self) -> Path:
        return self.root / self.subfolder if self.subfolder else self.root

    @property
    def boundary(self) -> Path | None:
        """Where every file the scan reads must resolve: the folder given (a pipeline's root with
        --subfolder), or for a Hub model its repository in the Hugging Face cache (snapshot files
        are symlinks to ../../blobs). None with --follow-symlinks."""
        if self.follow_symlinks:
            return None
        return self.root.parent.parent if self.hub_id else self.root

    def describe(self) -> dict:
        return {"source": self.spec, "hub_id": self.hub_id, "revision": self.revision,
                "resolved_sha": self.resolved_sha, "subfolder": self.subfolder}


def is_hub_id(spec: str) -> bool:
    """`org/name` that is not an existing local path."""
    return bool(HUB_ID.fullmatch(spec)) and not Path(spec).exists() and ".." not in spec and "--" not in spec


def is_pinned(revision: str | None) -> bool:
    return revision is not None and bool(COMMIT_SHA.fullmatch(revision))


def check_pin(spec: str, revision: str | None, what: str = "model") -> None:
    """Raise UnpinnedRevision for a Hub id whose revision is not a commit sha (local folders have none)."""
    if is_hub_id(spec) and not is_pinned(revision):
        named = f"revision {revision!r}" if revision else "no revision (the default branch)"
        raise UnpinnedRevision(f"the policy requires a pinned revision but {what} {spec} is named by {named}; "
                               "pass --revision with the 40-hex commit sha")


def _check_subfolder(subfolder: str | None) -> None:
    if subfolder and (PurePosixPath(subfolder).is_absolute() or ".." in PurePosixPath(subfolder).parts
                      or "\\" in subfolder):
        raise UsageError(f"--subfolder {subfolder!r} must be a relative path inside the model")


def resolve_source(spec: str, revision: str | None = None, subfolder: str | None = None,
                   prefer_hub: bool = False, follow_symlinks: bool = False) -> ModelSource:
    """A local folder as is, or a Hub id downloaded (only what the scan needs) and pinned.

    An existing path wins over a Hub id of the same spelling, unless `prefer_hub`.
    """
    _check_subfolder(subfolder)
    subfolder = subfolder.strip("/") if subfolder else None
    if prefer_hub and HUB_ID.fullmatch(spec) and ".." not in spec and "--" not in spec:
        source = download(spec, revision, subfolder)
    elif Path(spec).exists():
        if revision:
            raise UsageError(f"--revision applies to Hub ids; {spec} is a local folder")
        source = ModelSource(spec, Path(spec), subfolder)
    elif is_hub_id(spec):
        source = download(spec, revision, subfolder)
    else:
        raise LoadError(f"model folder {spec} does not exist (and it is not a Hub id of the form org/name)")
    return replace(source, follow_symlinks=follow_symlinks)


# --- local files ------------------------------------------------------------------------

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


def weight_identities(folder: Path, deadline: float | None = None, inside: Path | None = None) -> list[WeightFile]:
    """sha256 and size of every weight file the scan reads: every header is checked first (cheap), so a
    huge file that is no safetensors is refused at once instead of after a full-file hash."""
    from amdet_gate.safetensors_header import check_header

    files = find_weight_files(folder)
    for path in files:
        check_header(path, inside)
    return [WeightFile(p.name, sha256_file(p, deadline, inside), p.stat().st_size) for p in files]


def model_files(source: ModelSource) -> list[Path]:
    """Every file of the model that a scan reads: config.json, the shard index, the weights, the tokenizer's."""
    folder = source.folder
    if source.encoder is not None and source.encoder.part is not None:  # a single-file checkpoint
        tok = tokenizer_folder(source)
        return [source.root, *([tok / name for name in TOKENIZER_FILES] if tok is not None else [])]
    files = [folder / "config.json", folder / INDEX_FILE]
    files += find_weight_files(folder) if folder.is_dir() else []
    tok = tokenizer_folder(source)
    if tok is not None:
        files += [tok / name for name in TOKENIZER_FILES]
    return [p for p in files if p.exists() or p.is_symlink()]


def check_contained(source: ModelSource) -> None:
    """LoadError (exit 2) for a model file that resolves outside the model folder (or its Hub cache
    repository): a symlinked weight or tokenizer file must not pull in a file from elsewhere on the
    machine, unless --follow-symlinks says so."""
    boundary = source.boundary
    if boundary is None:
        return
    for path in model_files(source):
        try:
            resolve_inside(path, boundary)
        except OutsideFolder as exc:
            raise LoadError(f"{path.name} in {source.spec}: {exc}; refused (pass --follow-symlinks to allow it)"
                            ) from None


def check_hub_sha256(source: ModelSource, files: list[WeightFile]) -> None:
    """The downloaded weights must be the bytes the Hub lists for the recorded commit.

    A poisoned or tampered local cache (restored by CI, copied to an air-gapped machine) would
    otherwise be scanned, locked and reported under the commit's name.
    """
    listed = dict(source.hub_sha256)
    for file in files:
        if file.name in listed and listed[file.name] != file.sha256:
            raise LoadError(f"{source.spec}@{source.resolved_sha}: {file.name} in the local cache has sha256 "
                            f"{file.sha256[:16]}..., the Hub lists {listed[file.name][:16]}...; clear the cache")


def has_tokenizer_files(folder: Path) -> bool:
    """Whether the folder brings its own tokenizer. Whatever is there counts (a FIFO named tokenizer.json
    too): the capped reader refuses what is not a regular file, the bundled tokenizer never stands in for it."""
    def present(name: str) -> bool:
        return os.path.lexists(folder / name)

    return present("tokenizer.json") or (present("vocab.json") and present("merges.txt"))


def tokenizer_folder(source: ModelSource) -> Path | None:
    """The model folder when it has tokenizer files, else a diffusers pipeline's sibling tokenizer.

    A pipeline keeps text_encoder/ and tokenizer/ (text_encoder_2/ and tokenizer_2/) side by side.
    `--tokenizer FOLDER` (source.encoder.tokenizer) comes first; a single-file checkpoint has none of its own.
    """
    if source.encoder is not None and source.encoder.tokenizer is not None:
        return Path(source.encoder.tokenizer)
    if source.encoder is not None and source.encoder.part is not None:
        return None
    if has_tokenizer_files(source.folder):
        return source.folder
    if source.subfolder and source.subfolder.startswith("text_encoder"):
        sibling = source.root / source.subfolder.replace("text_encoder", "tokenizer", 1)
        if has_tokenizer_files(sibling):
            return sibling
    return None


# --- the Hub ----------------------------------------------------------------------------

def files_to_fetch(repo_files: list[str], subfolder: str | None) -> list[str]:
    """What a scan needs from a repository listing; refuses before any download."""
    prefix = f"{subfolder}/" if subfolder else ""
    here = {f[len(prefix):]: f for f in repo_files if f.startswith(prefix) and "/" not in f[len(prefix):]}
    if "config.json" not in here:
        if not here:
            raise UnsupportedModel(f"nothing found under {prefix or 'the repository root'}; wrong --subfolder?")
        raise UnsupportedModel(f"no config.json in {prefix or 'the repository root'}")
    first = weights_to_read(set(here), prefix or "the repository")
    # For an index, only the default shards: never a variant's (model.fp16-00001-of-...).
    shards = sorted(n for n in here if STANDARD_SHARD.fullmatch(n)) if first == INDEX_FILE else []
    weights = [first, *shards]
    wanted = ["config.json", *weights, *(n for n in TOKENIZER_FILES if n in here)]
    paths = [here[n] for n in wanted]
    if subfolder and subfolder.startswith("text_encoder"):  # a diffusers pipeline's tokenizer
        tok_prefix = subfolder.replace("text_encoder", "tokenizer", 1) + "/"
        paths += [tok_prefix + n for n in TOKENIZER_FILES if tok_prefix + n in repo_files]
    return paths


def download(repo_id: str, revision: str | None, subfolder: str | None) -> ModelSource:
    """Resolve the revision to a commit and download what the scan needs into the HF cache."""
    from huggingface_hub import HfApi, constants, snapshot_download

    asked = revision or "main"
    hub_sha256: tuple[tuple[str, str], ...] = ()  # offline: the cache is all there is
    try:
        if constants.HF_HUB_OFFLINE:
            # Air-gapped: the cache filled by `amdet-gate fetch` maps the branch or tag to its commit.
            # Ask for config.json only: the cached listing names files a scan never fetches
            # (pickle weights, other subfolders), which would make the snapshot look incomplete.
            config = f"{subfolder}/config.json" if subfolder else "config.json"
            root = Path(snapshot_download(repo_id, revision=asked, local_files_only=True, allow_patterns=[config]))
            sha = root.name
            if not COMMIT_SHA.fullmatch(sha):
                raise LoadError(f"the cached snapshot of {repo_id} has no commit sha")
            files_to_fetch([p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()], subfolder)
            # files_to_fetch found the weights in the snapshot; find_weight_files checks them again at load.
        else:
            # files_metadata: the Hub's own sha256 of every LFS file, to check the downloaded bytes against.
            info = HfApi().model_info(repo_id, revision=asked, files_metadata=True)
            sha = info.sha
            if not isinstance(sha, str) or not COMMIT_SHA.fullmatch(sha):
                raise LoadError(f"the Hub did not resolve {repo_id}@{asked} to a commit sha")
            wanted = files_to_fetch([s.rfilename for s in info.siblings or []], subfolder)
            # snapshot_download resolves the revision once and fetches every file at that commit,
            # and records the branch/tag -> commit ref in the cache for offline scans. If the
            # branch moved since model_info, the files would not be the listing's: refuse.
            root = Path(snapshot_download(repo_id, revision=asked, allow_patterns=wanted))
            prefix = f"{subfolder}/" if subfolder else ""
            hub_sha256 = tuple(sorted(
                (s.rfilename[len(prefix):], s.lfs.sha256) for s in info.siblings or []
                if s.rfilename.startswith(prefix) and s.rfilename.endswith(".safetensors") and s.lfs is not None
                and isinstance(getattr(s.lfs, "sha256", None), str)))
            if root.name != sha:
                raise LoadError(f"{repo_id}@{asked} moved from {sha[:12]} to {root.name[:12]} during the download; "
                                "scan again, or pin --revision to a commit sha")
    except GateError:
        raise
    except Exception as exc:
        raise LoadError(hub_error_message(exc, repo_id, asked)) from None
    return ModelSource(repo_id, root, subfolder, repo_id, revision, sha, hub_sha256)


PIPELINE_FILES = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                  "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"]


def download_pipeline(repo_id: str, revision: str | None) -> Path:
    """A Stable Diffusion pipeline for the diffusion renderer: only its UNet, VAE and scheduler (safetensors)."""
    from huggingface_hub import snapshot_download

    asked = revision or "main"
    try:
        return Path(snapshot_download(repo_id, revision=asked, allow_patterns=PIPELINE_FILES))
    except Exception as exc:
        raise LoadError(hub_error_message(exc, repo_id, asked)) from None


def hub_error_message(exc: Exception, repo_id: str, revision: str) -> str:
    """One line that says what went wrong, never the token."""
    from huggingface_hub import constants
    from huggingface_hub import errors as hf

    where = f"{repo_id}@{revision}"
    if isinstance(exc, hf.GatedRepoError):
        return f"{where}: the repository is gated; accept its terms on the Hub and set HF_TOKEN"
    if isinstance(exc, hf.RepositoryNotFoundError):
        return f"{where}: repository not found on {constants.ENDPOINT} (or private: set HF_TOKEN)"
    if isinstance(exc, hf.RevisionNotFoundError):
        return f"{where}: revision not found"
    if isinstance(exc, hf.LocalEntryNotFoundError):
        return (f"{where} is not in the local Hugging Face cache and the Hub cannot be used "
                "(HF_HUB_OFFLINE or no network); run `amdet-gate fetch` where the Hub is reachable")
    if isinstance(exc, hf.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        return f"{where}: the Hub at {constants.ENDPOINT} answered HTTP {status}"
    text = one_line(exc, 200)
    return f"{where}: cannot download from {constants.ENDPOINT} ({type(exc).__name__}: {text})"
