"""The verdict cache: a second scan of the same weights with the same settings is a file copy.

Content-addressed. An entry's key (`CacheKey`) is every input the result depends on: the
weight files' sha256s, the anchor's identity, the effective policy's sha256, the tool
version, the seed and a sha256 of the remaining effective scan settings (thresholds, search
settings, prompts, device, tokenizer files, ...: whatever the caller passes to
`digest_settings`). The key says nothing about where the model came from, so the same
weights scanned from another path, pipeline or machine hit the same entry; the stored
result then still names the source of the scan that filled it (see `CacheLookup.result`).

This module imports only the standard library and `amdet_gate.errors` (no torch, no
transformers, no yaml), so a whole hit -- interpreter start-up, import, verifying and
restoring a 20 MB entry -- takes about 0.2 s; `bench/cache_hit.py` measures it.

Layout (under the cache root, `default_cache_dir`):

    CACHEDIR.TAG                 tells backup tools to skip the folder
    v1/<key digest>/manifest.json  key fields, model identity, verdict, score, and every
                                   file's relative path, size and sha256
    v1/<key digest>/manifest.hmac  HMAC-SHA256 of manifest.json's bytes under the cache key
    v1/<key digest>/files/...      the output folder's files (result.json, each report format's
                                   file, *.safetensors, images/*.png, ...)
    v1/.tmp-*                    entries being written; renamed into place when complete

Integrity. `lookup` trusts nothing it reads from the cache folder. An entry is used only
if the manifest's HMAC verifies (constant-time compare), the key recorded in the manifest is
the key asked for, the folder holds exactly the files the manifest lists (no extra or
missing file, no symlink, FIFO or device, no absolute or `..` path; every file opened
without following symlinks), every file has its recorded size and sha256, and result.json
names the same model identity, weights, verdict, score and tool version as the manifest
and the key. Anything else: the entry is ignored (the scan runs), removed, and the reason
comes back as one line for stderr (`take_warnings()` after `lookup`, or `fetch(...).warning`). A torn entry (crash while
writing, disk full) fails the same checks, so it is never half-trusted either.

What the HMAC protects against: anyone who can write the cache folder but cannot read the
HMAC secret -- another user or job sharing a cache directory, a poisoned CI cache restored
from a tarball, a corrupted disk. They cannot forge an entry, move one entry under another
key, or flip a stored verdict. What it does not protect against: anyone who can read the
secret (the same OS user, or whoever can read the CI secret) can forge entries; and the
cache can still be emptied or have entries deleted (that only costs a re-scan), and an
older genuine entry for the same key can be put back (same weights, settings, policy and
tool version: it says what a re-scan would say, up to the scan's own nondeterminism). The
secret is either

* `AMDET_CACHE_KEY` (at least 16 characters), for caches shared between machines or
  restored from a CI cache: set it from a CI secret, never from the cache itself; or
* a random 32-byte key created on first use in `default_key_file` (under
  `$XDG_CONFIG_HOME/amdet-gate/`, deliberately *outside* the cache folder so that
  restoring or sharing the cache folder never hands out the key). It is created with mode
  0600 (exclusive create, no symlink following) and refused if another user owns it or
  others can read or write it. On an ephemeral CI runner without `AMDET_CACHE_KEY` every
  run gets a fresh key, so a restored cache is ignored (safe, but no speed-up).

Cache failures never fail a scan: `lookup` and `store` report a one-line warning instead of
raising (a full disk, a read-only folder, an unusable key file all just mean no caching).
Inconclusive results are not cached: an undecided scan (often a time budget hit on a slow
runner) is worth re-running, a pass or fail is not. There is no size limit or eviction;
`clear` empties the cache.

Every open, read, walk and delete under the root goes through `cache_fs`, which never follows a
symlink below the root: a symlinked `v1/` or CACHEDIR.TAG makes the cache unusable (a warning
for a scan, an error for `cache list` / `cache clear`), never a way to write or delete elsewhere.

POSIX only for the hardened reads (`dir_fd`, `O_NOFOLLOW`); elsewhere the cache reports
itself unavailable and every scan runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath
from typing import Any

from amdet_gate.cache_fs import (
    ENTRIES,
    HARDENED,
    MAX_FILES,
    BadEntry,
    EntryNotRegular,
    EntryTooLarge,
    check_rel,
    check_tree,
    load_or_create_key,
    make_root,
    open_dir,
    open_entries,
    os_reason,
    read_at,
    remove_tree,
    tree_size,
    walk,
)
from amdet_gate.errors import GateError, OutputError, UsageError
from amdet_gate.files import write_atomic
from amdet_gate.result import ResultError, ScanResult, load

FORMAT = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.hmac"
FILES = "files"
KEY_FILE_NAME = "cache-key"
MIN_ENV_SECRET_CHARS = 16
MAX_MANIFEST_BYTES = 1024 * 1024
MAX_ENTRY_BYTES = 256 * 1024 * 1024  # all files of one entry; a scan's outputs are a few MiB
CACHEABLE_VERDICTS = ("pass", "fail")
# The files of an output folder worth restoring, besides each report format's file (`output_patterns`);
# anything else there (the user's own files, a model that happens to sit in the output folder) is never
# copied into the cache.
ARTIFACT_PATTERNS = ("*.safetensors", "*.png", "textual_inversion/*.safetensors", "images/*.png")

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_DIGEST_NAME = _SHA256
_DOMAIN = b"amdet-gate/cache-manifest/v1\0"  # HMAC domain separation: this tag signs nothing else



# --- the key -------------------------------------------------------------------------------

@dataclass(frozen=True)
class CacheKey:
    """Everything a scan's result depends on. Equal keys must mean equal results.

    weight_sha256s: "name:sha256" for every weight file the scan reads (sorted on creation).
    anchor_identity: the anchor's identity sha256, or None without an anchor.
    policy_sha256: `Policy.sha256`, the effective policy after AMDET_* variables.
    tool_version: `amdet_gate.__version__`.
    seed: the search seed.
    settings_sha256: `digest_settings(...)` of the other effective settings, flags included
        (search settings, thresholds, prompts sha256 and count, device, tokenizer files'
        sha256s, anchor subfolder, ...), so a flag that changes the scan changes the key.
    """

    weight_sha256s: tuple[str, ...]
    anchor_identity: str | None
    policy_sha256: str
    tool_version: str
    seed: int
    settings_sha256: str

    def __post_init__(self) -> None:
        # Normalise (sorted, as a tuple) so that file order never changes the key.
        object.__setattr__(self, "weight_sha256s", tuple(sorted(self.weight_sha256s)))
        if not self.weight_sha256s or len(set(self.weight_sha256s)) != len(self.weight_sha256s):
            raise ValueError("CacheKey needs one or more distinct weight files")
        for item in self.weight_sha256s:
            name, _, sha = item.rpartition(":")
            if not name or not _SHA256.fullmatch(sha) or "\n" in name:
                raise ValueError(f"weight entry {item!r} is not 'name:<sha256>'")
        for label, value in (("anchor_identity", self.anchor_identity), ("policy_sha256", self.policy_sha256),
                             ("settings_sha256", self.settings_sha256)):
            if (value is not None or label != "anchor_identity") and not (
                    isinstance(value, str) and _SHA256.fullmatch(value)):
                raise ValueError(f"{label} must be a lowercase hex sha256, not {value!r}")
        if not isinstance(self.tool_version, str) or not self.tool_version:
            raise ValueError("tool_version must be a non-empty string")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, not {self.seed!r}")

    @classmethod
    def create(cls, weight_files: Iterable[Any], *, anchor_identity: str | None, policy_sha256: str,
               tool_version: str, seed: int, settings: Mapping[str, Any]) -> CacheKey:
        """The key from weight files (objects with .name and .sha256, e.g. `source.WeightFile`, or
        (name, sha256[, size]) tuples) and the settings mapping (hashed with `digest_settings`)."""
        pairs = []
        for item in weight_files:
            name, sha = (item[0], item[1]) if isinstance(item, tuple | list) else (item.name, item.sha256)
            pairs.append(f"{name}:{sha}")
        return cls(tuple(pairs), anchor_identity, policy_sha256, tool_version, seed, digest_settings(settings))

    def to_dict(self) -> dict[str, Any]:
        return {"weight_sha256s": list(self.weight_sha256s), "anchor_identity": self.anchor_identity,
                "policy_sha256": self.policy_sha256, "tool_version": self.tool_version, "seed": self.seed,
                "settings_sha256": self.settings_sha256}

    def digest(self) -> str:
        """sha256 over the canonical JSON of the key: the entry's name in the cache."""
        return hashlib.sha256(_canonical({"format": FORMAT, **self.to_dict()})).hexdigest()


def _canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _plain(value: Any) -> Any:
    if isinstance(value, PurePath):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, set | frozenset):
        return sorted(value)
    # Anything else (objects whose str() may hold a memory address) would make keys unstable.
    raise TypeError(f"cannot put {type(value).__name__} into a cache key")


def digest_settings(settings: Mapping[str, Any]) -> str:
    """sha256 over canonical JSON of the settings (Paths as strings, dataclasses as dicts).

    NaN and infinities are refused: they have no canonical JSON form.
    """
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False,
                      default=_plain)
    return hashlib.sha256(text.encode()).hexdigest()


# --- where things live ---------------------------------------------------------------------

def default_cache_dir(env: Mapping[str, str]) -> Path:
    """AMDET_CACHE_DIR, else $XDG_CACHE_HOME/amdet-gate, else ~/.cache/amdet-gate."""
    if env.get("AMDET_CACHE_DIR"):
        return Path(env["AMDET_CACHE_DIR"]).expanduser()
    xdg = env.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).is_absolute():  # the XDG spec says relative values are to be ignored
        return Path(xdg) / "amdet-gate"
    return _home(env) / ".cache" / "amdet-gate"


def default_key_file(env: Mapping[str, str]) -> Path:
    """$XDG_CONFIG_HOME/amdet-gate/cache-key, else ~/.config/amdet-gate/cache-key.

    Outside the cache folder on purpose: sharing or restoring a cache folder must not share
    the key that authenticates it.
    """
    xdg = env.get("XDG_CONFIG_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else _home(env) / ".config"
    return base / "amdet-gate" / KEY_FILE_NAME


def _home(env: Mapping[str, str]) -> Path:
    return Path(env["HOME"]) if env.get("HOME") else Path.home()


def open_cache(env: Mapping[str, str], cache_dir: Path | None = None) -> VerdictCache:
    """The cache for the CLI: `--cache-dir` (cache_dir) > AMDET_CACHE_DIR > XDG default, and the
    secret from AMDET_CACHE_KEY, else the per-user key file.

    Raises `UsageError` (exit 4) for an AMDET_CACHE_KEY shorter than 16 characters: a weak
    shared secret is a configuration mistake worth stopping for. Nothing is read or created
    on disk here; that happens on first use.
    """
    root = cache_dir if cache_dir is not None else default_cache_dir(env)
    value = env.get("AMDET_CACHE_KEY")
    if value is not None and value != "":
        if len(value) < MIN_ENV_SECRET_CHARS:
            raise UsageError(f"AMDET_CACHE_KEY must be at least {MIN_ENV_SECRET_CHARS} characters "
                             "(use a random CI secret, e.g. `openssl rand -hex 32`)")
        return VerdictCache(root, value.encode("utf-8"))
    return VerdictCache(root, key_file=default_key_file(env))


# --- results -------------------------------------------------------------------------------

@dataclass(frozen=True)
class CacheLookup:
    """What `fetch` found. `result` is set only on a verified hit, after the files were restored.

    `result` is the stored result.json: its model.source (and revision) are those of the scan
    that filled the entry, which may have named the same weights differently.
    """

    digest: str
    result: ScanResult | None = None
    files: tuple[str, ...] = ()  # relative paths restored into the output folder
    created: str | None = None  # when the entry was stored (ISO 8601 UTC)
    warning: str | None = None  # one line for stderr: an entry was ignored, or the cache is unusable

    @property
    def hit(self) -> bool:
        return self.result is not None


@dataclass(frozen=True)
class CacheEntryInfo:
    """One row of `amdet-gate cache list`. Fields other than digest, size and problem are None
    for an invalid entry: what an unverified manifest says is not shown as if it were true."""

    digest: str
    valid: bool
    problem: str | None
    size: int  # bytes of the regular files under the entry
    source: str | None = None
    identity_sha256: str | None = None
    verdict: str | None = None
    score: float | None = None  # None also for a valid entry whose score was not a number
    tool_version: str | None = None
    created: str | None = None

    @property
    def key(self) -> str:
        """The key digest (the entry's name), as `cache list` shows it."""
        return self.digest

    @property
    def model(self) -> str | None:
        """The model as the scan that filled the entry named it."""
        return self.source

    def row(self) -> str:
        """One line for `cache list`: digest, verdict, score, model, stored, and ok or why not."""
        if not self.valid:
            return f"{self.digest[:16]}  {'-':12s} {'-':>5s}  INVALID: {self.problem}  ({self.size} bytes)"
        score = f"{self.score:.3f}" if isinstance(self.score, int | float) else "  -  "
        return f"{self.digest[:16]}  {self.verdict:12s} {score}  {self.source}  {self.created}  ok"


# --- the cache -----------------------------------------------------------------------------

class VerdictCache:
    """A verdict cache rooted at `root`, authenticated by `secret` or by the key in `key_file`.

    secret: the shared secret (AMDET_CACHE_KEY's bytes), else None. key_file: where the
    per-user key lives when there is no secret; default `default_key_file(os.environ)`. The
    key file is created on first use, not here. `open_cache(env, cache_dir)` does all of
    this from the environment and refuses a short AMDET_CACHE_KEY.

    `lookup` and `store` never raise for cache problems: lookup's warnings are kept until
    `take_warnings()`, store returns its warning.
    """

    def __init__(self, root: Path, secret: bytes | None = None, *, key_file: Path | None = None,
                 max_entry_bytes: int = MAX_ENTRY_BYTES) -> None:
        if secret is not None and not secret:
            raise ValueError("an empty secret authenticates nothing")
        if secret is not None and key_file is not None:
            raise ValueError("give a secret or a key file, not both")
        self.root = Path(root)
        self.key_file = None if secret is not None else (key_file or default_key_file(os.environ))
        self.max_entry_bytes = max_entry_bytes
        self._secret = secret
        self._warnings: list[str] = []

    @property
    def entries_dir(self) -> Path:
        return self.root / ENTRIES

    # -- public operations ------------------------------------------------------------------

    def lookup(self, key: CacheKey, out_dir: Path) -> ScanResult | None:
        """On a verified hit, copy the stored files into `out_dir` and return the stored result
        (result.json, validated and typed); else None. A bad entry is removed and a one-line warning
        ("cache entry <digest> ignored: <why>") is kept for `take_warnings()`."""
        found = self.fetch(key, out_dir)
        if found.warning:
            self._warnings.append(found.warning)
        return found.result

    def take_warnings(self) -> list[str]:
        """The warnings of lookups since the last call (each one line, for stderr), then forget them."""
        taken, self._warnings = self._warnings, []
        return taken

    def fetch(self, key: CacheKey, out_dir: Path) -> CacheLookup:
        """`lookup` with the details: restored files, when the entry was stored, the warning.

        A miss returns quickly (one lstat). A bad entry is removed and reported in `warning`;
        the caller prints the warning and scans as usual. Never raises for cache problems.
        """
        digest = key.digest()
        entry = self.entries_dir / digest
        try:
            check_tree(self.root)  # a symlinked v1/ is never read, written or emptied
        except BadEntry as exc:
            return CacheLookup(digest, warning=f"cache unusable: {exc}")
        try:
            before = os.lstat(entry)
        except FileNotFoundError:
            return CacheLookup(digest)
        except OSError as exc:
            return CacheLookup(digest, warning=f"cache unusable: cannot read {entry}: {os_reason(exc)}")
        if not HARDENED:
            return CacheLookup(digest, warning="cache unusable on this platform (no O_NOFOLLOW/dir_fd)")
        try:
            secret = self._load_secret()
        except BadEntry as exc:
            return CacheLookup(digest, warning=f"cache unusable: {exc}")
        try:
            manifest, files, result = _verify(entry, digest, secret, key, self.max_entry_bytes)
        except Exception as exc:  # BadEntry, or anything a hostile entry provokes: never trusted
            # Remove it (a re-scan stores a good one), unless a concurrent store has just put a
            # new entry in its place: that one was not what failed.
            with contextlib.suppress(OSError):
                now = os.lstat(entry)
                if (now.st_dev, now.st_ino) == (before.st_dev, before.st_ino):
                    remove_tree(entry)
            why = str(exc) if isinstance(exc, BadEntry) else f"unreadable ({type(exc).__name__})"
            return CacheLookup(digest, warning=f"cache entry {digest[:12]} ignored: {why}")
        try:
            _restore(files, Path(out_dir))
        except OSError as exc:
            return CacheLookup(digest, warning=f"cache entry {digest[:12]} not used: cannot write into "
                                               f"{out_dir}: {os_reason(exc)}")
        return CacheLookup(digest, result=result, files=tuple(sorted(files)), created=manifest["created"])

    def store(self, key: CacheKey, out_dir: Path, result: ScanResult | None = None,
              files: Sequence[str] | None = None) -> str | None:
        """Copy a finished scan's output folder into the cache; returns None, or a one-line warning.

        result: the result the caller is about to report; if given, result.json in `out_dir`
        must say the same (model identity, verdict, score), else nothing is stored.
        files: relative paths to store (default: whatever matches output_patterns()). Only
        regular files, never through a symlink; result.json is required and must describe the
        weights, anchor, policy and tool version of `key` (else the key was computed wrongly
        and nothing is stored). Inconclusive results are not stored (None is returned). The
        entry is written to a temporary folder and renamed into place, so readers see all of
        it or nothing.
        """
        digest = key.digest()
        try:
            if not HARDENED:
                return "not cached: cache unusable on this platform (no O_NOFOLLOW/dir_fd)"
            payload = _collect(Path(out_dir), files, self.max_entry_bytes)
            on_disk = _parse_result(payload.get("result.json"))
            if result is not None and _summary(result) != _summary(on_disk):
                return "not cached: result.json in the output folder is not the result reported"
            result = on_disk
            mismatch = _result_mismatch(result, key)
            if mismatch:
                return f"not cached: result.json does not match the cache key ({mismatch})"
            if result.verdict not in CACHEABLE_VERDICTS:
                return None  # documented: inconclusive scans are re-run, silently
            secret = self._load_secret()
            model = result.model
            manifest = {
                "format": FORMAT, "digest": digest, "key": key.to_dict(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "model": {"source": model.source, "identity_sha256": model.identity_sha256,
                          "subfolder": model.subfolder},
                "verdict": str(result.verdict), "score": result.score,
                "tool_version": key.tool_version,
                "files": [{"path": p, "size": len(b), "sha256": hashlib.sha256(b).hexdigest()}
                          for p, b in sorted(payload.items())],
            }
            self._publish(digest, manifest, payload, secret)
        except BadEntry as exc:
            return f"not cached: {exc}"
        except OSError as exc:
            return f"not cached: cannot write {self.root}: {os_reason(exc)}"
        except Exception as exc:  # a cache write must never fail the scan it follows
            return f"not cached: {type(exc).__name__}: {exc}"
        return None

    def entries(self) -> list[CacheEntryInfo]:
        """Every entry, verified (HMAC, files, result.json), newest first; invalid ones flagged."""
        names = sorted(self._names("list"))
        try:
            secret: bytes | None = self._load_secret()
            key_problem = None
        except BadEntry as exc:
            secret, key_problem = None, f"cache key unusable: {exc}"
        rows = []
        for name in names:
            if not _DIGEST_NAME.fullmatch(name):
                continue  # temporary or trash folders of a write in progress
            path = self.entries_dir / name
            size = tree_size(path)
            if secret is None or not HARDENED:
                rows.append(CacheEntryInfo(name, False, key_problem or "platform unsupported", size))
                continue
            try:
                manifest, _, _ = _verify(path, name, secret, None, self.max_entry_bytes)
            except Exception as exc:  # as in lookup: whatever goes wrong, the entry is not valid
                why = str(exc) if isinstance(exc, BadEntry) else f"unreadable ({type(exc).__name__})"
                rows.append(CacheEntryInfo(name, False, why, size))
                continue
            model = manifest["model"]
            rows.append(CacheEntryInfo(name, True, None, size, model["source"], model["identity_sha256"],
                                       manifest["verdict"], manifest["score"], manifest["tool_version"],
                                       manifest["created"]))
        rows.sort(key=lambda r: r.created or "", reverse=True)
        return rows

    def clear(self) -> int:
        """Remove every entry (and unfinished writes); returns how many entries were removed.

        Only `root/v1/` is touched, never other files under the root (a mistyped
        `--cache-dir ~` must not empty a home folder). The key file is kept.
        """
        names = self._names("clear")
        removed = 0
        for name in names:
            remove_tree(self.entries_dir / name)
            removed += bool(_DIGEST_NAME.fullmatch(name))
        return removed

    # -- internals ---------------------------------------------------------------------------

    def _names(self, doing: str) -> list[str]:
        """What `v1/` holds, read through a descriptor opened without following a symlink.

        A symlinked `v1/` (or CACHEDIR.TAG) is a GateError (exit 2): `cache clear` must never
        empty the folder it points at.
        """
        try:
            fd = open_entries(self.root)
        except BadEntry as exc:
            raise GateError(f"cannot {doing} the cache: {exc}") from None
        if fd is None:
            return []
        try:
            return os.listdir(fd)
        except OSError as exc:
            raise GateError(f"cannot {doing} the cache {self.entries_dir}: {os_reason(exc)}") from None
        finally:
            os.close(fd)

    def _load_secret(self) -> bytes:
        if self._secret is None:
            assert self.key_file is not None
            self._secret = load_or_create_key(self.key_file)
        return self._secret

    def _publish(self, digest: str, manifest: dict, payload: dict[str, bytes], secret: bytes) -> None:
        make_root(self.root)  # refuses a symlinked v1/: entries are never written through one
        staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.entries_dir))
        try:
            for rel, data in payload.items():
                target = staging / FILES / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            text = _canonical(manifest)
            (staging / MANIFEST).write_bytes(text)
            (staging / SIGNATURE).write_text(_sign(secret, text) + "\n", "ascii")
            final = self.entries_dir / digest
            try:
                os.rename(staging, final)
            except OSError:  # an entry (good, bad or a planted symlink) is there: replace it
                trash = self.entries_dir / f".trash-{secrets.token_hex(8)}"
                with contextlib.suppress(FileNotFoundError):
                    os.rename(final, trash)
                # A concurrent store of the same key may win the race: its entry is as good.
                with contextlib.suppress(OSError):
                    os.rename(staging, final)
                remove_tree(trash)
        finally:
            remove_tree(staging)


# --- key file ------------------------------------------------------------------------------

def _sign(secret: bytes, manifest_bytes: bytes) -> str:
    return hmac.new(secret, _DOMAIN + manifest_bytes, hashlib.sha256).hexdigest()


# --- verification --------------------------------------------------------------------------

def _verify(entry: Path, digest: str, secret: bytes, key: CacheKey | None,
            max_bytes: int) -> tuple[dict, dict[str, bytes], ScanResult]:
    """The manifest, every file's bytes and the parsed result.json, or BadEntry.

    Each file is read once, hashed from the bytes in memory and restored from the same
    bytes, so it cannot be swapped between the check and the copy. `key` None (listing)
    checks the entry against the key its own manifest records.
    """
    try:
        fd = open_dir(entry)
    except OSError as exc:
        raise BadEntry(f"not a plain folder ({os_reason(exc)})") from None
    try:
        names = set(os.listdir(fd))
        expected = {MANIFEST, SIGNATURE, FILES}
        if names != expected:
            raise BadEntry(f"unexpected {sorted(names - expected)[:3]} or missing {sorted(expected - names)} "
                            "in the entry folder")
        raw = read_at(fd, MANIFEST, MAX_MANIFEST_BYTES)
        tag = read_at(fd, SIGNATURE, 200).strip()
        # Authenticate before parsing: nothing an attacker wrote is interpreted unless signed.
        if not hmac.compare_digest(tag, _sign(secret, raw).encode()):
            raise BadEntry("manifest signature does not match (tampered, or written under another cache key)")
        manifest, recorded = _parse_manifest(raw)
        if manifest["digest"] != digest or recorded.digest() != digest:
            raise BadEntry("manifest belongs to another entry")
        if key is not None and recorded != key:
            raise BadEntry("manifest key differs from the key asked for")
        listed = {f["path"]: f for f in manifest["files"]}
        on_disk = walk(fd, FILES)
        if set(on_disk) != set(listed):
            extra, missing = sorted(set(on_disk) - set(listed)), sorted(set(listed) - set(on_disk))
            raise BadEntry(f"files differ from the manifest (extra {extra[:3]}, missing {missing[:3]})")
        if sum(f["size"] for f in listed.values()) > max_bytes:
            raise BadEntry(f"larger than {max_bytes} bytes")
        files = {}
        for rel, meta in sorted(listed.items()):
            data = read_at(fd, f"{FILES}/{rel}", meta["size"])
            if len(data) != meta["size"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
                raise BadEntry(f"{rel} changed since it was stored (size or sha256 differs)")
            files[rel] = data
    except OSError as exc:
        raise BadEntry(f"unreadable ({os_reason(exc)})") from None
    finally:
        os.close(fd)
    result = _parse_result(files.get("result.json"))
    model = result.model
    if (model.identity_sha256, model.source, result.verdict, result.score) != (
            manifest["model"]["identity_sha256"], manifest["model"]["source"], manifest["verdict"],
            manifest["score"]):
        raise BadEntry("result.json disagrees with the manifest (model, verdict or score)")
    mismatch = _result_mismatch(result, recorded)
    if mismatch:
        raise BadEntry(f"result.json does not match the key ({mismatch})")
    return manifest, files, result


def _parse_manifest(raw: bytes) -> tuple[dict, CacheKey]:
    """Structure check of an authenticated manifest (belt and braces against our own bugs)."""
    try:
        m = json.loads(raw)
    except (ValueError, RecursionError):
        raise BadEntry("manifest is not valid JSON") from None
    ok = (isinstance(m, dict) and m.get("format") == FORMAT and isinstance(m.get("digest"), str)
          and isinstance(m.get("key"), dict) and isinstance(m.get("created"), str)
          and isinstance(m.get("model"), dict) and isinstance(m["model"].get("identity_sha256"), str)
          and {"source", "subfolder"} <= set(m["model"]) and "score" in m
          and isinstance(m.get("verdict"), str) and isinstance(m.get("tool_version"), str)
          and isinstance(m.get("files"), list) and 0 < len(m["files"]) <= MAX_FILES
          and all(isinstance(f, dict) and set(f) == {"path", "size", "sha256"} and type(f["size"]) is int
                  and f["size"] >= 0 and isinstance(f["sha256"], str) and _SHA256.fullmatch(f["sha256"])
                  for f in m["files"]))
    if not ok:
        raise BadEntry("manifest is malformed")
    for f in m["files"]:
        check_rel(f["path"])
    if len({f["path"] for f in m["files"]}) != len(m["files"]):
        raise BadEntry("manifest lists a file twice")
    fields = m["key"]
    try:
        recorded = CacheKey(tuple(fields["weight_sha256s"]), fields["anchor_identity"], fields["policy_sha256"],
                            fields["tool_version"], fields["seed"], fields["settings_sha256"])
    except (KeyError, TypeError, ValueError):
        raise BadEntry("manifest key is malformed") from None
    return m, recorded


def _parse_result(data: bytes | None) -> ScanResult:
    if data is None:
        raise BadEntry("no result.json")
    try:
        return load(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadEntry("result.json is not UTF-8") from None
    except ResultError as exc:
        raise BadEntry(f"result.json: {exc}") from None


def _summary(result: ScanResult) -> tuple:
    return result.model.identity_sha256, result.verdict, result.score


def _result_mismatch(result: ScanResult, key: CacheKey) -> str | None:
    """Which key field the result contradicts, if any (weights, anchor, policy, tool version)."""
    weights = tuple(sorted(f"{w.name}:{w.sha256}" for w in result.model.weight_files))
    if weights != key.weight_sha256s:
        return "weight files"
    anchor_identity = result.anchor.identity_sha256 if result.anchor is not None else None
    if anchor_identity != key.anchor_identity:
        return "anchor"
    if result.policy is not None and result.policy.sha256 != key.policy_sha256:
        return "policy"
    if result.tool.version != key.tool_version:
        return "tool version"
    return None


def output_patterns() -> tuple[str, ...]:
    """What `store` copies from an output folder by default: the result, the artifacts, every report."""
    from amdet_gate.report import formats  # the registry imports the format modules: not for a bare import

    return ("result.json", *(f.file_name for f in formats()), *ARTIFACT_PATTERNS)


def _collect(out_dir: Path, files: Sequence[str] | None, max_bytes: int) -> dict[str, bytes]:
    """The bytes of the output files to store; symlinks and special files are left out."""
    if files is None:
        found: set[str] = set()
        for pattern in output_patterns():
            found.update(p.relative_to(out_dir).as_posix() for p in out_dir.glob(pattern))
        files = sorted(found)
    if len(files) > MAX_FILES:
        raise BadEntry(f"more than {MAX_FILES} output files")
    try:
        fd = open_dir(out_dir, follow=True)
    except OSError as exc:
        raise BadEntry(f"cannot read {out_dir}: {os_reason(exc)}") from None
    payload: dict[str, bytes] = {}
    total = 0
    try:
        for rel in files:
            check_rel(rel)
            try:
                data = read_at(fd, rel, max_bytes - total)
            except EntryNotRegular:
                continue  # never copy what a symlink points at
            except EntryTooLarge:
                raise BadEntry(f"the outputs are larger than {max_bytes} bytes") from None
            except FileNotFoundError:
                continue  # listed by the caller but not written (e.g. no images on this run)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    continue  # under a symlinked folder
                raise
            payload[rel] = data
            total += len(data)
    finally:
        os.close(fd)
    return payload


def _restore(files: dict[str, bytes], out_dir: Path) -> None:
    """Write each file to a temporary name, then rename it over the target: no torn files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for rel, data in sorted(files.items()):
        try:
            write_atomic(out_dir / PurePosixPath(rel), data)
        except OutputError as exc:
            raise OSError(errno.EIO, str(exc)) from None


