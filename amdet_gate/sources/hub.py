"""The Hugging Face Hub kind of model source: a repository id `org/name`, its revision pinned to a commit
sha, only what the scan needs downloaded (config, safetensors, tokenizer files; never pickle) into the
Hugging Face cache, and the downloaded bytes checked against the sha256s the Hub lists (torch-free).

huggingface_hub does the Hub work and honours HF_TOKEN, HF_HOME, HF_ENDPOINT and
HF_HUB_OFFLINE from the environment.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from amdet_gate.errors import ExitCode, GateError, LoadError, UnsupportedModel
from amdet_gate.sanitise import one_line
from amdet_gate.sources.files import TOKENIZER_FILES
from amdet_gate.sources.identity import WeightFile
from amdet_gate.sources.local import INDEX_FILE, weights_to_read
from amdet_gate.sources.model import ResolvedModel, SourceKindName

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
COMMIT_SHA = re.compile(r"[0-9a-f]{40}")  # always used with fullmatch: "$" would accept a trailing newline
STANDARD_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


class UnpinnedRevision(GateError):
    """The policy requires a 40-hex commit pin and the model was named by a branch or tag."""

    exit_code = ExitCode.FAIL
    rule_id = "AMDET100"


class HubRepo:
    """A Hub repository id: `org/name` (an existing local path of that spelling is the local kind's,
    unless the caller prefers the Hub: a policy's anchor)."""

    name = SourceKindName.HUB
    remote = True

    def matches(self, spec: str) -> bool:
        return bool(HUB_ID.fullmatch(spec)) and ".." not in spec and "--" not in spec

    def resolve(self, spec: str, revision: str | None, subfolder: str | None) -> ResolvedModel:
        return download(spec, revision, subfolder)

    def check_pin(self, spec: str, revision: str | None, what: str) -> None:
        """UnpinnedRevision unless the revision is a commit sha."""
        if not is_pinned(revision):
            named = f"revision {revision!r}" if revision else "no revision (the default branch)"
            raise UnpinnedRevision(f"the policy requires a pinned revision but {what} {spec} is named by {named}; "
                                   "pass --revision with the 40-hex commit sha")

    def verify(self, model: ResolvedModel, files: Sequence[WeightFile]) -> None:
        check_hub_sha256(model, files)


def is_hub_id(spec: str) -> bool:
    """`org/name` that is not an existing local path."""
    return HubRepo().matches(spec) and not Path(spec).exists()


def is_pinned(revision: str | None) -> bool:
    return revision is not None and bool(COMMIT_SHA.fullmatch(revision))


def check_hub_sha256(source: ResolvedModel, files: Sequence[WeightFile]) -> None:
    """The downloaded weights must be the bytes the Hub lists for the recorded commit.

    A poisoned or tampered local cache (restored by CI, copied to an air-gapped machine) would
    otherwise be scanned, locked and reported under the commit's name.
    """
    listed = dict(source.hub_sha256)
    for file in files:
        if file.name in listed and listed[file.name] != file.sha256:
            raise LoadError(f"{source.spec}@{source.resolved_sha}: {file.name} in the local cache has sha256 "
                            f"{file.sha256[:16]}..., the Hub lists {listed[file.name][:16]}...; clear the cache")


# --- downloads ---------------------------------------------------------------------------

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


def download(repo_id: str, revision: str | None, subfolder: str | None) -> ResolvedModel:
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
    return ResolvedModel(repo_id, root, subfolder, repo_id, revision, sha, hub_sha256, kind=SourceKindName.HUB,
                         containment=root.parent.parent)  # snapshots/<sha>/ links into ../../blobs


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
