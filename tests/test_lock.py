"""The lock file, `lock check`, `verify` and the pinned-revision check, including hostile input."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from amdet_gate.errors import ExitCode
from amdet_gate.lock import (
    MAX_LOCK_BYTES,
    Lock,
    LockEntry,
    LockError,
    Problem,
    check_lock,
    entry_from_result,
    find_entry,
    read_lock,
    verify_entry,
    write_lock,
)
from amdet_gate.pins import pin_problems
from amdet_gate.result import ResultError, ScanResult
from amdet_gate.sources.identity import WeightFile, identity_sha256
from tests.results import sample_result

SHA_A, SHA_B = "aa" * 32, "bb" * 32
COMMIT = "0123456789abcdef0123456789abcdef01234567"
HUB = "example-org/clip-text"  # has the form of a Hub id and is no local path


def result(verdict: str = "pass", **model) -> ScanResult:
    """A scan result as result.json holds it (what the lock reads, plus the rest of a real scan)."""
    return sample_result(
        tool={"name": "amdet-gate", "version": "0.1.0"},
        model={"source": HUB, "identity_sha256": SHA_A, "subfolder": "text_encoder", "architecture": "CLIPTextModel",
               "weight_files": [{"name": "model.safetensors", "sha256": SHA_A, "size": 1234}],
               "revision": COMMIT, "resolved_sha": COMMIT, **model},
        verdict=verdict, score=0.01,
        policy={"source": ".amdet.yaml", "sha256": SHA_B, "exit_code": 0, "note": ""})


def entry(verdict: str = "pass", model_id: str = HUB, **model) -> LockEntry:
    return entry_from_result(result(verdict, **model), model_id, None, scanned_at="2026-11-22T10:00:00Z")


def write(tmp_path: Path, text: str, name: str = "amdet.lock") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- entries, writing and reading ----------------------------------------------------------

def test_entry_from_result() -> None:
    e = entry_from_result(result(), HUB + "/", "v1.0")
    assert (e.id, e.subfolder, e.revision, e.resolved_sha) == (HUB, "text_encoder", "v1.0", COMMIT)
    assert e.weight_files == (WeightFile("model.safetensors", SHA_A, 1234),)
    assert (e.identity_sha256, e.verdict, e.score, e.tool_version, e.policy_sha256) == (
        SHA_A, "pass", 0.01, "0.1.0", SHA_B)
    assert e.scanned_at.endswith("Z") and time.strptime(e.scanned_at, "%Y-%m-%dT%H:%M:%SZ")
    assert entry_from_result(result(), HUB, None).revision == COMMIT  # falls back to what the result says
    local = entry_from_result(result(resolved_sha=None, revision=None), "./models/clean", None)
    assert local.resolved_sha is None and local.revision is None


@pytest.mark.parametrize("broken", [{"model": None}, {"verdict": "maybe"}, {"tool": {}}])
def test_a_broken_result_never_reaches_the_lock(broken: dict) -> None:
    with pytest.raises(ResultError):  # refused where it is read (exit 4), before any lock entry
        sample_result(**broken)


def test_entry_from_a_result_the_lock_cannot_hold_is_refused() -> None:
    with pytest.raises(LockError):
        entry_from_result(result(identity_sha256="not a sha256"), HUB, None)


def test_write_read_round_trip_and_replacement(tmp_path: Path) -> None:
    path = tmp_path / "amdet.lock"
    first = entry()
    other = entry(model_id="./models/local", resolved_sha=None, revision=None, subfolder=None)
    write_lock(path, first)
    write_lock(path, other)
    lock = read_lock(path)
    assert lock.models == tuple(sorted([first, other], key=lambda e: e.id))  # sorted by id: stable diffs
    assert lock.source == str(path) and all(e.line for e in lock.models)
    text = path.read_text()
    assert text.endswith("}\n") and json.loads(text)["version"] == 1
    assert text == lock.dumps()  # reading and writing again changes nothing

    updated = entry(verdict="fail")
    write_lock(path, updated)
    lock = read_lock(path)
    assert len(lock.models) == 2 and lock.find(HUB, "text_encoder") == updated  # replaced, other kept
    assert lock.find(HUB + "/", "/text_encoder/") == updated and lock.find(HUB) is None
    assert find_entry(lock, HUB, "text_encoder") == updated and find_entry(lock, "nobody/else") is None
    assert [p.name for p in tmp_path.iterdir()] == ["amdet.lock"]  # no temporary file left behind


def test_write_keeps_the_file_mode(tmp_path: Path) -> None:
    path = tmp_path / "amdet.lock"
    write_lock(path, entry())
    path.chmod(0o640)
    write_lock(path, entry(verdict="fail"))
    assert path.stat().st_mode & 0o777 == 0o640


def test_an_invalid_existing_lock_is_not_overwritten(tmp_path: Path) -> None:
    path = write(tmp_path, '{"version": 1, "models": "oops"}')
    with pytest.raises(LockError):
        write_lock(path, entry())
    assert path.read_text() == '{"version": 1, "models": "oops"}'


def good_lock_text() -> str:
    return Lock((entry(),)).dumps()


HOSTILE = {  # name -> (lock text, words in the error)
    "empty": ("", "not valid JSON"),
    "YAML, not JSON": ("version: 1\nmodels: []\n", "not valid JSON"),
    "python tag": ("!!python/object/apply:os.system ['echo pwned']\n", "not valid JSON"),
    "a list": ("[1, 2]", "a JSON object"),
    "a string": ('"amdet"', "a JSON object"),
    "wrong version": ('{"version": 2, "models": []}', "version 2 is not supported"),
    "no models": ('{"version": 1}', "'models' is a required property"),
    "extra top key": ('{"version": 1, "models": [], "x": 1}', "Additional properties"),
    "duplicate key": ('{"version": 1, "version": 1, "models": []}', "duplicate key 'version'"),
    "NaN": (good_lock_text().replace('"score": 0.01', '"score": NaN'), "NaN is not a number"),
    "size a string": (good_lock_text().replace('"size": 1234', '"size": "big"'),
                      "models[0] (example-org/clip-text): weight_files.0.size"),
    "bad sha": (good_lock_text().replace(SHA_A, "A" * 64, 1), "does not match"),
    "bad verdict": (good_lock_text().replace('"verdict": "pass"', '"verdict": "ok"'), "verdict"),
    "short commit": (good_lock_text().replace(COMMIT, "abc123"), "resolved_sha"),
    "path in weight name": (good_lock_text().replace('"model.safetensors"', '"../../etc/passwd"'), "name"),
    "deep nesting": ("[" * 100000 + "]" * 100000, "nested too deeply"),
    "repeated entry": (json.dumps({"version": 1, "models": [entry().to_dict(), entry().to_dict()]}),
                       "repeats models[0]"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_lock_content_is_a_usage_error(tmp_path: Path, name: str) -> None:
    text, words = HOSTILE[name]
    with pytest.raises(LockError) as err:
        read_lock(write(tmp_path, text))
    assert words in str(err.value), str(err.value)
    assert err.value.exit_code == ExitCode.USAGE and "\n" not in str(err.value)


def test_schema_errors_name_the_line(tmp_path: Path) -> None:
    text = good_lock_text().replace('"verdict": "pass"', '"verdict": 7')
    line = next(i for i, t in enumerate(text.splitlines(), 1) if '"verdict"' in t)
    with pytest.raises(LockError, match=rf"amdet.lock: line {line}: models\[0\] \(example-org/clip-text\): verdict"):
        read_lock(write(tmp_path, text))


def test_oversized_and_special_files_are_refused(tmp_path: Path) -> None:
    big = write(tmp_path, " " * (MAX_LOCK_BYTES + 1))
    with pytest.raises(LockError, match="larger than"):
        read_lock(big)
    with pytest.raises(LockError, match="not a regular file"):
        read_lock(tmp_path)
    with pytest.raises(LockError, match="cannot read"):
        read_lock(tmp_path / "missing.lock")
    (tmp_path / "bin.lock").write_bytes(b"\xff\xfe{}")
    with pytest.raises(LockError, match="not UTF-8"):
        read_lock(tmp_path / "bin.lock")


# --- lock check ----------------------------------------------------------------------------

def test_check_lock() -> None:
    assert check_lock(Lock((entry(),))) == []
    failing = Lock((entry("fail"),), "amdet.lock")
    problems = check_lock(failing)
    assert [p.rule for p in problems] == ["AMDET001"] and "verdict is fail" in problems[0].message
    assert check_lock(failing, require_pass=False) == []
    assert check_lock(Lock((entry("inconclusive"),)))[0].rule == "AMDET003"
    unpinned = entry(resolved_sha=None)
    assert [p.rule for p in check_lock(Lock((unpinned,)))] == ["AMDET100"]
    local = entry(model_id="./models/clean", resolved_sha=None, revision=None)
    assert check_lock(Lock((local,))) == []
    other_commit = entry(revision="f" * 40)
    assert "is not resolved_sha" in check_lock(Lock((other_commit,)))[0].message
    by_branch = check_lock(Lock((entry(revision="main"),)))  # scanned by a moving name: not pinned
    assert [p.rule for p in by_branch] == ["AMDET100"] and "scanned by revision 'main'" in by_branch[0].message
    assert f"--revision {COMMIT}" in by_branch[0].message
    assert "no revision (the default branch)" in check_lock(Lock((entry(revision=None),)))[0].message


def test_check_lock_recomputes_the_identity(tmp_path: Path) -> None:
    text = good_lock_text().replace(f'"identity_sha256": "{SHA_A}"', f'"identity_sha256": "{SHA_B}"')
    problems = check_lock(read_lock(write(tmp_path, text)))
    assert len(problems) == 1 and "identity_sha256 does not match" in problems[0].message
    assert problems[0].line == 3 and str(problems[0]).startswith(f"{tmp_path / 'amdet.lock'}:3: ")


# --- verify --------------------------------------------------------------------------------

def test_verify_entry_unchanged_and_changed() -> None:
    e = entry()
    assert verify_entry(e, [("model.safetensors", SHA_A, 1234)]) == []
    assert verify_entry(e, [WeightFile("model.safetensors", SHA_A, 1234)]) == []  # source.weight_identities
    changed = verify_entry(e, [("model.safetensors", SHA_B, 1234)])
    assert any("model.safetensors changed: sha256" in m for m in changed)
    assert any("model identity changed" in m for m in changed)
    assert "missing" in verify_entry(e, [("other.safetensors", SHA_A, 1)])[0]
    extra = verify_entry(e, [("model.safetensors", SHA_A, 1234), ("extra.safetensors", SHA_B, 1)])
    assert any("extra.safetensors is not in the lock" in m for m in extra)
    assert "1235 bytes" in verify_entry(e, [("model.safetensors", SHA_A, 1235)])[0]
    assert verify_entry(e, []) == ["model.safetensors is missing (locked sha256 " + SHA_A + ")",
                                   "no weight files found"]


def test_verify_sharded_identity_and_verdict() -> None:
    shards = [WeightFile("model-00001-of-00002.safetensors", SHA_A, 10),
              WeightFile("model-00002-of-00002.safetensors", SHA_B, 20)]
    weight_files = [{"name": w.name, "sha256": w.sha256, "size": w.size} for w in shards]
    e = entry(weight_files=weight_files, identity_sha256=identity_sha256(shards))
    assert verify_entry(e, [(w.name, w.sha256, w.size) for w in reversed(shards)]) == []
    failed = entry("fail", weight_files=weight_files, identity_sha256=identity_sha256(shards))
    assert verify_entry(failed, shards, require_pass=True) == ["the locked scan's verdict is fail, not pass"]
    assert verify_entry(failed, shards) == []  # by default only the weights: the caller reports the verdict


# --- pinned revisions ----------------------------------------------------------------------

def test_policy_pins(tmp_path: Path) -> None:
    base = "version: 1\non_finding: fail\n"
    assert pin_problems(write(tmp_path, base, ".amdet.yaml")) == []
    assert pin_problems(write(tmp_path, base + f"anchor: {{id: {HUB}, revision: {COMMIT}}}\n", "a.yaml")) == []
    assert pin_problems(write(tmp_path, base + "anchor: {id: ./models/clean}\n", "b.yaml")) == []
    missing = pin_problems(write(tmp_path, base + f"anchor:\n  id: {HUB}\n", "c.yaml"))
    assert missing == [Problem(str(tmp_path / "c.yaml"), 4, f"anchor {HUB} has no revision (the default branch, "
                               "which can move); set anchor.revision to the commit sha", "AMDET100")]
    branch = pin_problems(write(tmp_path, base + f"anchor:\n  id: {HUB}\n  revision: main\n", "d.yaml"))
    assert branch[0].line == 5 and "'main', not a 40-hex commit sha" in branch[0].message


WORKFLOW = f"""\
name: models
on:
  pull_request:
jobs:
  scan:
    runs-on: ubuntu-latest
    steps:
      - uses: actions/checkout@v4
        with:
          model: {HUB}
      - uses: example-org/amdet-gate@v1
        with:
          model: {HUB}
      - uses: ./
        with:
          model: {HUB}
          revision: main
      - uses: ./
        with:
          model: {HUB}
          revision: {COMMIT}
      - uses: ./.github/actions/amdet-gate
        with:
          model: ./models/clean
      - uses: ./
        with:
          model: ${{{{ inputs.model }}}}
      - uses: example-org/amdet-gate@v1
        with:
          model: {HUB}
          revision: ${{{{ env.REV }}}}
      - uses: ./
        with:
          model: ./models/clean
          anchor: {HUB}
          anchor-revision: v1.0
  other:
    uses: ./.github/workflows/reusable.yml
"""


def test_workflow_pins(tmp_path: Path) -> None:
    path = write(tmp_path, WORKFLOW, "scan.yml")
    problems = pin_problems(path)
    assert [(p.line, p.rule) for p in problems] == [(13, "AMDET100"), (17, "AMDET100"), (31, "AMDET100"),
                                                    (36, "AMDET100")]
    assert "has no revision" in problems[0].message and "uses: example-org/amdet-gate@v1" in problems[0].message
    assert "'main', not a 40-hex" in problems[1].message
    assert "an expression that cannot be checked" in problems[2].message
    assert "anchor example-org/clip-text has revision 'v1.0'" in problems[3].message
    assert "set `anchor-revision:`" in problems[3].message


def test_lock_pins(tmp_path: Path) -> None:
    path = tmp_path / "amdet.lock"
    write_lock(path, entry())
    write_lock(path, entry(model_id="./models/clean", resolved_sha=None))
    assert pin_problems(path) == []
    write_lock(path, entry(model_id="other-org/unpinned", resolved_sha=None))
    write_lock(path, entry(model_id="other-org/by-branch", revision="v2"))
    problems = pin_problems(path)
    assert [p.message.split(":")[0] for p in problems] == ["other-org/by-branch [text_encoder]",
                                                           "other-org/unpinned [text_encoder]"]
    assert "without resolved_sha" in problems[1].message and all(p.line for p in problems)


HOSTILE_YAML = {  # name -> (file text, words in the error)
    "python object tag": ("version: 1\nanchor: !!python/object/apply:os.system ['touch MARKER']\n",
                          "line 2: not valid YAML"),
    "python name tag": ("jobs: !!python/name:os.system ''\n", "not valid YAML"),
    "duplicate key": ("version: 1\nanchor: {id: a/b}\nanchor: {id: c/d}\n", "line 3: duplicate key 'anchor'"),
    "not a mapping": ("- version: 1\n", "not a mapping"),
    "scalar": ("just text\n", "not a mapping"),
    "unrecognised mapping": ("name: something else\n", "not an amdet policy, lock file or GitHub workflow"),
    "invalid YAML": ("version: 1\nanchor: {id: [\n", "not valid YAML"),
    "empty": ("", "not a mapping"),
}


@pytest.mark.parametrize("name", list(HOSTILE_YAML))
def test_hostile_pin_files_are_usage_errors(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "pwned"
    text, words = HOSTILE_YAML[name]
    path = write(tmp_path, text.replace("MARKER", str(marker)), "policy.yaml")
    with pytest.raises(LockError) as err:
        pin_problems(path)
    assert words in str(err.value), str(err.value)
    assert err.value.exit_code == ExitCode.USAGE and "\n" not in str(err.value)
    assert not marker.exists()  # nothing in the file was ever executed


def test_alias_bomb_is_cheap(tmp_path: Path) -> None:
    """Nested aliases expand exponentially; the checks visit each node once."""
    lines = ["version: 1", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    path = write(tmp_path, "\n".join(lines) + "\n", "bomb.yaml")
    start = time.perf_counter()
    assert pin_problems(path) == []
    assert time.perf_counter() - start < 5


def test_oversized_yaml_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "version: 1\n" + "# padding\n" * 200_000, "big.yaml")
    with pytest.raises(LockError, match="larger than"):
        pin_problems(path)
