"""The lock file (`amdet.lock`): its model, parsing, writing, entry lookup and verification.

`amdet-gate scan --lock` records what was scanned (`entry_from_result` + `write_lock`);
`amdet-gate verify` recomputes the weight files' sha256s and refuses a model whose weights
changed since (`verify_entry`); `amdet-gate lock check` (`check_lock`) is a cheap hook for
pre-commit and CI: no model is read, nothing heavy is imported (stdlib, yaml, jsonschema).
The pinned-revision check of policies, workflows and locks (`amdet-gate pins`,
`pin_problems`) lives in pins.py; the lock's own part of it is `lock_pin_problems` here.

Format: JSON, keys sorted, two-space indent, entries sorted by (id, subfolder), one trailing
newline. JSON rather than YAML because the file holds hashes and commit shas: YAML 1.1 reads
an unquoted all-digit sha as an integer and `1e5...` as a float, while JSON strings are
always strings; a machine-written file that humans only review in diffs gains nothing from
YAML, and sorted, indented JSON gives one line per field, so diffs are small and stable.

    {
      "models": [
        {
          "id": "org/name",                      Hub id or local path, as given to `scan`
          "subfolder": "text_encoder",           or null
          "revision": "main",                    as asked, or null
          "resolved_sha": "<40 hex>",            the commit scanned; null for local folders
          "weight_files": [{"name": ..., "sha256": ..., "size": ...}],
          "identity_sha256": "<64 hex>",         as result.json's model.identity_sha256
          "verdict": "pass", "score": 0.01,
          "tool_version": "0.1.0", "policy_sha256": "<64 hex>" or null,
          "scanned_at": "2026-11-22T10:00:00Z"
        }
      ],
      "version": 1
    }

One entry per (id, subfolder): writing an entry replaces the one with the same key and
keeps the others. Lock content is untrusted input: size-capped, duplicate JSON keys and
NaN refused, validated against `schemas/lock.schema.json`; an invalid lock is a
`LockError` (a `UsageError`, exit 4) naming the line, entry and key.
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from amdet_gate.errors import UsageError
from amdet_gate.files import read_capped_text, write_atomic
from amdet_gate.result import ScanResult
from amdet_gate.sanitise import one_line
from amdet_gate.sources.hub import COMMIT_SHA, is_hub_id
from amdet_gate.sources.identity import WeightFile, identity_sha256

LOCK_FILE = "amdet.lock"
LOCK_VERSION = 1
MAX_LOCK_BYTES = 4 * 1024 * 1024
MAX_LINE_MAP_BYTES = 256 * 1024  # line numbers for bigger locks would cost a slow YAML parse
UNPINNED = "AMDET100"  # the SARIF rule for an unpinned revision
# libyaml when available: marks (line numbers) are the same, parsing is ten times faster.
_BaseLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class LockError(UsageError):
    """An invalid or unreadable lock or pin file: exit 4, with the file, line and key."""


class YamlLoader(_BaseLoader):
    """Safe YAML (no Python tags), a subclass so that nothing global is changed (also used by pins.py)."""


# --- data ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class LockEntry:
    """One scanned model. `line` is where the entry starts in the file it was read from."""

    id: str
    subfolder: str | None
    revision: str | None
    resolved_sha: str | None
    weight_files: tuple[WeightFile, ...]
    identity_sha256: str
    verdict: str
    score: float | None
    tool_version: str
    policy_sha256: str | None
    scanned_at: str
    line: int | None = field(default=None, compare=False)

    @property
    def key(self) -> tuple[str, str | None]:
        return _norm_id(self.id), _norm_subfolder(self.subfolder)

    @property
    def label(self) -> str:
        """How messages name the entry: `org/name` or `org/name [text_encoder]`."""
        return f"{self.id} [{self.subfolder}]" if self.subfolder else self.id

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "subfolder": self.subfolder, "revision": self.revision,
            "resolved_sha": self.resolved_sha,
            "weight_files": [{"name": w.name, "sha256": w.sha256, "size": w.size} for w in self.weight_files],
            "identity_sha256": self.identity_sha256, "verdict": self.verdict, "score": self.score,
            "tool_version": self.tool_version, "policy_sha256": self.policy_sha256, "scanned_at": self.scanned_at,
        }


@dataclass(frozen=True)
class Lock:
    """A lock file's entries; `source` is the file it was read from ("" for a new lock)."""

    models: tuple[LockEntry, ...] = ()
    source: str = ""
    version: int = LOCK_VERSION

    def find(self, model_id: str, subfolder: str | None = None) -> LockEntry | None:
        """The entry for a model as given to `scan` (trailing slashes and empty subfolders ignored)."""
        wanted = (_norm_id(model_id), _norm_subfolder(subfolder))
        return next((e for e in self.models if e.key == wanted), None)

    def with_entry(self, entry: LockEntry) -> Lock:
        """A new lock where `entry` replaces the entry with the same (id, subfolder), others kept."""
        kept = [e for e in self.models if e.key != entry.key]
        return replace(self, models=tuple(sorted([*kept, entry], key=_sort_key)))

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "models": [e.to_dict() for e in sorted(self.models, key=_sort_key)]}

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"


@dataclass(frozen=True)
class Problem:
    """One finding of `check_lock` or `pins.pin_problems`; str() is `file:line: message`."""

    file: str
    line: int | None
    message: str
    rule: str | None = None  # a SARIF rule id where one applies (AMDET100: unpinned revision)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}" if self.line else f"{self.file}: {self.message}"


def find_entry(lock: Lock, model_id: str, subfolder: str | None = None) -> LockEntry | None:
    """`lock.find(model_id, subfolder)`: the entry for a model as given to `scan`, or None."""
    return lock.find(model_id, subfolder)


def _norm_id(model_id: str) -> str:
    return model_id.rstrip("/") or model_id


def _norm_subfolder(subfolder: str | None) -> str | None:
    return subfolder.strip("/") or None if subfolder else None


def _sort_key(entry: LockEntry) -> tuple[str, str]:
    return entry.key[0], entry.key[1] or ""


# --- reading and writing -------------------------------------------------------------------

def _schema() -> dict:
    return json.loads(resources.files("amdet_gate").joinpath("schemas/lock.schema.json").read_text("utf-8"))


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number in a lock file")


def _json_lines(text: str) -> dict[tuple, int]:
    """Key path -> 1-based line, from YAML's view of the JSON text; best effort, {} if unknown."""
    if len(text) > MAX_LINE_MAP_BYTES:
        return {}
    loader = YamlLoader(text)
    try:
        node = loader.get_single_node()
    except yaml.YAMLError:
        return {}
    finally:
        loader.dispose()
    return _node_lines(node) if node is not None else {}


def _node_lines(node: yaml.Node) -> dict[tuple, int]:
    out: dict[tuple, int] = {}
    stack: list[tuple[yaml.Node, tuple]] = [(node, ())]
    seen: set[int] = set()  # aliases share nodes: visit each once (no billion-laughs walk)
    while stack:
        current, path = stack.pop()
        out.setdefault(path, current.start_mark.line + 1)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, yaml.MappingNode):
            for key, value in current.value:
                if isinstance(key, yaml.ScalarNode):
                    out.setdefault((*path, key.value), key.start_mark.line + 1)
                    stack.append((value, (*path, key.value)))
        elif isinstance(current, yaml.SequenceNode):
            stack.extend((item, (*path, i)) for i, item in enumerate(current.value))
    return out


def _schema_message(error: jsonschema.ValidationError, data: Any, lines: dict[tuple, int], source: str) -> str:
    path = tuple(error.absolute_path)
    if path == ("version",):
        return f"{source}: version {repr(error.instance)[:40]} is not supported (this amdet-gate reads version 1)"
    where = ".".join(map(str, path))
    if len(path) >= 2 and path[0] == "models" and isinstance(path[1], int):
        entry = data["models"][path[1]]
        name = entry.get("id") if isinstance(entry, dict) and isinstance(entry.get("id"), str) else None
        label = f"models[{path[1]}]" + (f" ({name[:100]})" if name else "")
        rest = ".".join(str(p) for p in path[2:])
        where = f"{label}: {rest}" if rest else label
    probe = path
    while probe and probe not in lines:
        probe = probe[:-1]
    line = lines.get(probe)
    message = one_line(error.message, 200)  # it quotes the offending value, which may be huge
    return f"{source}: " + (f"line {line}: " if line else "") + f"{where or '(top level)'}: {message}"


def parse_lock(text: str, source: str) -> Lock:
    """Lock text -> validated `Lock` (raises LockError naming the line, entry and key)."""
    if len(text.encode("utf-8")) > MAX_LOCK_BYTES:
        raise LockError(f"{source}: larger than {MAX_LOCK_BYTES // 1024} KiB")
    try:
        data = json.loads(text, object_pairs_hook=_refuse_duplicates, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise LockError(f"{source}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
    except ValueError as exc:  # duplicate key or NaN, from the hooks
        raise LockError(f"{source}: not a valid lock file ({exc})") from None
    except RecursionError:
        raise LockError(f"{source}: nested too deeply to be a lock file") from None
    if not isinstance(data, dict):
        raise LockError(f"{source}: a lock file is a JSON object with `version` and `models`")
    lines = _json_lines(text)
    errors = sorted(jsonschema.Draft202012Validator(_schema()).iter_errors(data),
                    key=lambda e: (len(e.absolute_path) != 1 or e.absolute_path[0] != "version",
                                   [str(p) for p in e.absolute_path]))
    if errors:
        raise LockError(_schema_message(errors[0], data, lines, source))
    entries = []
    seen: dict[tuple, int] = {}
    for i, item in enumerate(data["models"]):
        entry = _entry_from_dict(item, lines.get(("models", i)))
        if entry.key in seen:
            raise LockError(f"{source}: " + (f"line {entry.line}: " if entry.line else "")
                            + f"models[{i}] ({entry.label}) repeats models[{seen[entry.key]}]; "
                            "a lock has one entry per model and subfolder")
        seen[entry.key] = i
        entries.append(entry)
    return Lock(tuple(entries), source)


def signature_path(lock: Path) -> Path:
    """Where a lock's detached HMAC signature lives: beside it, `<lock>.sig`."""
    return lock.with_name(lock.name + ".sig")


def read_lock(path: Path) -> Lock:
    """Read and validate a lock file (LockError, exit 4, if it is missing or invalid)."""
    return parse_lock(read_capped_text(Path(path), MAX_LOCK_BYTES, "lock file", LockError), str(path))


def _entry_from_dict(item: Mapping[str, Any], line: int | None = None) -> LockEntry:
    return LockEntry(
        id=item["id"], subfolder=item["subfolder"], revision=item["revision"], resolved_sha=item["resolved_sha"],
        weight_files=tuple(WeightFile(w["name"], w["sha256"], w["size"]) for w in item["weight_files"]),
        identity_sha256=item["identity_sha256"], verdict=item["verdict"], score=item["score"],
        tool_version=item["tool_version"], policy_sha256=item["policy_sha256"], scanned_at=item["scanned_at"],
        line=line,
    )


def write_lock(path: Path, entry: LockEntry) -> Lock:
    """Add or replace `entry` in the lock at `path` (created if absent), atomically; returns the lock.

    An existing lock that does not validate is not overwritten (LockError): fix or delete it.
    Two writers at once may lose one update (last rename wins); the file is never torn.
    """
    path = Path(path)
    lock = read_lock(path) if path.exists() else Lock(source=str(path))
    new = lock.with_entry(entry)
    text = new.dumps()
    errors = list(jsonschema.Draft202012Validator(_schema()).iter_errors(json.loads(text)))
    if errors:  # never write a lock this module would refuse to read
        raise LockError(_schema_message(errors[0], new.to_dict(), {}, str(path)))
    try:
        mode: int | None = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mode = None  # a new lock: as any new file under the umask
    # durable: a deployment gate reads this later, it must survive a crash
    write_atomic(path, text.encode("utf-8"), mode=mode, durable=True)
    return replace(new, source=str(path))


def entry_from_result(result: ScanResult, requested_id: str, revision: str | None = None, *,
                      scanned_at: str | None = None) -> LockEntry:
    """The lock entry for a scan result.

    requested_id: the model as given to `scan` (Hub id or local path). revision: as asked
    (falls back to the result's model.revision). The commit comes from model.resolved_sha
    (None for local folders), the policy sha256 from the policy record when a policy was
    applied. scanned_at defaults to now (UTC). Raises LockError if the entry does not validate.
    """
    model = result.model
    entry = LockEntry(
        id=_norm_id(requested_id), subfolder=_norm_subfolder(model.subfolder),
        revision=revision if revision is not None else model.revision,
        resolved_sha=model.resolved_sha,
        weight_files=tuple(WeightFile(w.name, w.sha256, w.size) for w in model.weight_files),
        identity_sha256=model.identity_sha256, verdict=str(result.verdict), score=result.score,
        tool_version=result.tool.version,
        policy_sha256=result.policy.sha256 if result.policy is not None else None,
        scanned_at=scanned_at or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    errors = list(jsonschema.Draft202012Validator(_schema()).iter_errors({"version": 1, "models": [entry.to_dict()]}))
    if errors:
        raise LockError(_schema_message(errors[0], {"models": [entry.to_dict()]}, {}, "scan result"))
    return entry


# --- checks --------------------------------------------------------------------------------

def _is_hub(entry: LockEntry) -> bool:
    return entry.resolved_sha is not None or is_hub_id(entry.id)


def lock_pin_problems(lock: Lock) -> list[Problem]:
    """A Hub entry must record its commit, and must have been scanned by a commit sha: a
    branch or tag in `revision` means the scan command itself was not pinned."""
    problems = []
    for e in lock.models:
        if not _is_hub(e):
            continue
        if e.resolved_sha is None:
            problems.append(Problem(lock.source, e.line, f"{e.label}: a Hub model without resolved_sha: "
                                    "the commit it was scanned at is unknown", UNPINNED))
        elif e.revision is None or not COMMIT_SHA.fullmatch(e.revision):
            named = f"revision {e.revision!r}" if e.revision else "no revision (the default branch)"
            problems.append(Problem(lock.source, e.line, f"{e.label}: scanned by {named}, not a 40-hex commit "
                                    f"sha; scan with --revision {e.resolved_sha}", UNPINNED))
    return problems


def check_lock(lock: Lock, require_pass: bool = True) -> list[Problem]:
    """Problems of a (schema-valid) lock for `amdet-gate lock check`; [] means fine.

    A locked model must have passed (unless require_pass=False); its identity must match its
    weight files; a Hub model must record the 40-hex commit it was scanned at, must have been
    scanned by a 40-hex revision (not a branch or tag), and that revision must be the commit.
    """
    problems = []
    for e in lock.models:
        found: list[tuple[str, str | None]] = []  # (message, rule)
        if require_pass and e.verdict != "pass":
            found.append((f"verdict is {e.verdict}; only a model that passed its scan may be locked",
                          "AMDET001" if e.verdict == "fail" else "AMDET003"))
        if len({w.name for w in e.weight_files}) != len(e.weight_files):
            found.append(("a weight file is listed twice", None))
        elif identity_sha256([WeightFile(w.name, w.sha256, w.size) for w in e.weight_files]) != e.identity_sha256:
            found.append(("identity_sha256 does not match its weight files (edited by hand?)", None))
        if e.revision and COMMIT_SHA.fullmatch(e.revision) and e.resolved_sha and e.revision != e.resolved_sha:
            found.append((f"revision {e.revision} is not resolved_sha {e.resolved_sha}", None))
        problems.extend(Problem(lock.source, e.line, f"{e.label}: {message}", rule) for message, rule in found)
        problems.extend(lock_pin_problems(Lock((e,), lock.source)))
    return problems


def verify_entry(entry: LockEntry, weight_files: Iterable[Any], *, require_pass: bool = False) -> list[str]:
    """What differs between a lock entry and the weight files on disk now; [] means unchanged.

    weight_files: (name, sha256, size) tuples or objects with .name/.sha256/.size (e.g.
    `source.weight_identities(folder)`), recomputed by the caller. A size of None is not
    compared. With require_pass, a locked verdict other than pass is reported too (off by
    default: `gate.verify_model` reports the verdict itself).
    """
    now: dict[str, tuple[str, int | None]] = {}
    out = []
    for item in weight_files:
        name, sha, size = (item if isinstance(item, tuple | list)
                           else (item.name, item.sha256, getattr(item, "size", None)))
        if name in now:
            out.append(f"{name} is listed twice")
        now[name] = (sha, size)
    for w in entry.weight_files:
        if w.name not in now:
            out.append(f"{w.name} is missing (locked sha256 {w.sha256})")
            continue
        sha, size = now[w.name]
        if sha != w.sha256:
            out.append(f"{w.name} changed: sha256 {sha}, locked {w.sha256}")
        elif size is not None and size != w.size:
            out.append(f"{w.name} changed: {size} bytes, locked {w.size}")
    locked = {w.name for w in entry.weight_files}
    out.extend(f"{name} is not in the lock (sha256 {now[name][0]})" for name in sorted(set(now) - locked))
    if now:
        identity = identity_sha256([WeightFile(n, s, z or 0) for n, (s, z) in sorted(now.items())])
        if identity != entry.identity_sha256:
            out.append(f"model identity changed: {identity}, locked {entry.identity_sha256}")
    else:
        out.append("no weight files found")
    if require_pass and entry.verdict != "pass":
        out.append(f"the locked scan's verdict is {entry.verdict}, not pass")
    return out
