"""The verdict cache: round trip, keys, and every way a hostile or broken entry is refused."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from amdet_gate import cache as cache_mod
from amdet_gate.cache import (
    CacheKey,
    VerdictCache,
    default_cache_dir,
    default_key_file,
    digest_settings,
    open_cache,
)
from amdet_gate.errors import ExitCode, UsageError
from amdet_gate.result import from_dict
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
WEIGHT_SHA = "e9" * 32
POLICY_SHA = "ab" * 32
OUTPUTS = {  # relative path -> bytes, as a scan writes them (result.json added by the fixture)
    "result.sarif": b'{"version": "2.1.0"}\n',
    "report.html": b"<!doctype html><title>amdet</title>\n",
    "summary.md": b"# amdet-gate: FAIL\n",
    "pseudo_trigger.safetensors": os.urandom(3000),
    "target_feature.safetensors": os.urandom(5000),
    "landscape.safetensors": os.urandom(700),
    "textual_inversion/learned_embeds.safetensors": os.urandom(736),
    "images/target.png": b"\x89PNG\r\n\x1a\n" + os.urandom(400),
}


SAMPLE = Path(__file__).parent / "data" / "sample_result.json"  # a real scan's result.json


def result_dict(verdict: str = "fail", anchor: str | None = None, tool: str = "0.1.0") -> dict:
    """A real result.json with the identity, anchor, verdict and policy a test's key names."""
    sample = json.loads(SAMPLE.read_text("utf-8"))
    model = sample["model"] | {"source": "models/backdoored", "identity_sha256": WEIGHT_SHA, "subfolder": None,
                               "weight_files": [{"name": "model.safetensors", "sha256": WEIGHT_SHA, "size": 28516856}]}
    return sample | {
        "tool": {"name": "amdet-gate", "version": tool}, "model": model,
        "anchor": model | {"source": "models/clean", "identity_sha256": anchor} if anchor else None,
        "verdict": verdict, "score": 1.0 if verdict == "fail" else 0.01,
        "policy": {"source": "built-in default", "sha256": POLICY_SHA, "exit_code": 1, "note": ""},
    }


def make_key(**changes) -> CacheKey:
    key = CacheKey(("model.safetensors:" + WEIGHT_SHA,), None, POLICY_SHA, "0.1.0", 0,
                   digest_settings({"max_steps": 640, "thresholds": {"same_target": 0.92}}))
    return replace(key, **changes)


def write_outputs(folder: Path, result: dict) -> Path:
    for rel, data in OUTPUTS.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    (folder / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return folder


@pytest.fixture()
def out_dir(tmp_path: Path) -> Path:
    folder = write_outputs(tmp_path / "out", result_dict())
    (folder / "notes.txt").write_text("the user's own file: never cached\n")
    secret_elsewhere = tmp_path / "secret.safetensors"
    secret_elsewhere.write_bytes(b"not an output")
    (folder / "linked.safetensors").symlink_to(secret_elsewhere)  # a symlink is never followed into the cache
    return folder


@pytest.fixture()
def vcache(tmp_path: Path) -> VerdictCache:
    return VerdictCache(tmp_path / "cache", key_file=tmp_path / "config" / "cache-key")


def entry_of(vcache: VerdictCache, key: CacheKey) -> Path:
    return vcache.entries_dir / key.digest()


def resign(vcache: VerdictCache, entry: Path, manifest_bytes: bytes) -> None:
    """Write a manifest signed with the real key: what our own bug (not an attacker) could produce."""
    (entry / "manifest.json").write_bytes(manifest_bytes)
    (entry / "manifest.hmac").write_text(cache_mod._sign(vcache._load_secret(), manifest_bytes) + "\n")


def edit_manifest(vcache: VerdictCache, entry: Path, change) -> None:
    manifest = json.loads((entry / "manifest.json").read_bytes())
    change(manifest)
    resign(vcache, entry, json.dumps(manifest).encode())


# --- round trip ----------------------------------------------------------------------------

def test_store_then_lookup_restores_identical_files(vcache: VerdictCache, out_dir: Path, tmp_path: Path) -> None:
    key = make_key()
    assert vcache.fetch(key, tmp_path / "first").hit is False  # empty cache: a plain miss
    assert vcache.store(key, out_dir) is None
    restored = tmp_path / "restored"
    found = vcache.fetch(key, restored)
    assert found.hit and found.warning is None and found.digest == key.digest()
    assert found.result == from_dict(json.loads((out_dir / "result.json").read_text()))
    expected = {**OUTPUTS, "result.json": (out_dir / "result.json").read_bytes()}
    assert set(found.files) == set(expected)
    for rel, data in expected.items():
        assert (restored / rel).read_bytes() == data
    assert not (restored / "notes.txt").exists() and not (restored / "linked.safetensors").exists()
    assert not [p for p in restored.rglob(".*")]  # no temporary files left behind
    assert found.created and found.created.endswith("Z")


def test_lookup_of_another_key_is_a_miss(vcache: VerdictCache, out_dir: Path, tmp_path: Path) -> None:
    vcache.store(make_key(), out_dir)
    other = vcache.fetch(make_key(seed=1), tmp_path / "x")
    assert not other.hit and other.warning is None and not (tmp_path / "x").exists()


@pytest.mark.parametrize("change", [
    {"weight_sha256s": ("model.safetensors:" + "00" * 32,)},
    {"weight_sha256s": ("other.safetensors:" + WEIGHT_SHA,)},
    {"anchor_identity": "cd" * 32},
    {"policy_sha256": "ef" * 32},
    {"tool_version": "0.2.0"},
    {"seed": 7},
    {"settings_sha256": digest_settings({"max_steps": 641, "thresholds": {"same_target": 0.92}})},
])
def test_every_key_field_changes_the_digest(change: dict) -> None:
    assert make_key(**change).digest() != make_key().digest()


def test_key_is_order_independent_and_validated() -> None:
    a = CacheKey.create([("b.safetensors", "11" * 32), ("a.safetensors", "22" * 32)], anchor_identity=None,
                        policy_sha256=POLICY_SHA, tool_version="1", seed=0, settings={"x": 1, "y": [1, 2]})
    b = CacheKey.create([("a.safetensors", "22" * 32), ("b.safetensors", "11" * 32)], anchor_identity=None,
                        policy_sha256=POLICY_SHA, tool_version="1", seed=0, settings={"y": [1, 2], "x": 1})
    assert a == b and a.digest() == b.digest()
    with pytest.raises(ValueError):
        make_key(policy_sha256="not-a-sha")
    with pytest.raises(ValueError):
        make_key(seed=-1)
    with pytest.raises(ValueError):
        make_key(weight_sha256s=())
    with pytest.raises(ValueError):
        digest_settings({"x": float("nan")})
    with pytest.raises(TypeError):
        digest_settings({"x": object()})
    assert digest_settings({"p": Path("a/b")}) == digest_settings({"p": "a/b"})


# --- tampering -----------------------------------------------------------------------------

def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("rel", ["result.json", *OUTPUTS])
def test_one_flipped_byte_in_any_file_is_detected(vcache: VerdictCache, out_dir: Path, tmp_path: Path,
                                                  rel: str) -> None:
    key = make_key()
    vcache.store(key, out_dir)
    _flip(entry_of(vcache, key) / "files" / rel)
    found = vcache.fetch(key, tmp_path / "restored")
    assert not found.hit
    assert found.warning.startswith(f"cache entry {key.digest()[:12]} ignored: {rel} changed")
    assert not (tmp_path / "restored").exists()  # nothing of a bad entry is copied
    assert not entry_of(vcache, key).exists()  # and the entry is gone


def _set_symlink(entry: Path, tmp: Path) -> None:
    """Replace a stored file by a symlink to a file with the very same bytes: still refused."""
    target = entry / "files" / "summary.md"
    copy = tmp / "copy.md"
    copy.write_bytes(target.read_bytes())
    target.unlink()
    target.symlink_to(copy)


def _verdict_in_result(entry: Path, tmp: Path) -> None:
    path = entry / "files" / "result.json"
    path.write_text(path.read_text().replace('"verdict": "fail"', '"verdict": "pass"'))


TAMPERING = {  # name -> (change to the stored entry, words expected in the warning)
    "manifest verdict fail->pass": (
        lambda e, t: (e / "manifest.json").write_bytes(
            (e / "manifest.json").read_bytes().replace(b'"verdict":"fail"', b'"verdict":"pass"')),
        "signature does not match"),
    "result.json verdict fail->pass": (_verdict_in_result, "result.json changed"),
    "extra file": (lambda e, t: (e / "files" / "extra.png").write_bytes(b"x"), "extra ['extra.png']"),
    "extra file in the entry folder": (lambda e, t: (e / "README").write_text("x"), "unexpected ['README']"),
    "missing file": (lambda e, t: (e / "files" / "summary.md").unlink(), "missing ['summary.md']"),
    "symlink to identical bytes": (_set_symlink, "summary.md is a symlink"),
    "symlinked folder": (lambda e, t: (e / "files" / "images" / "evil").symlink_to("/etc"), "is a symlink"),
    "FIFO": (lambda e, t: os.mkfifo(e / "files" / "pipe"), "not a regular file"),
    "manifest truncated": (lambda e, t: (e / "manifest.json").write_bytes((e / "manifest.json").read_bytes()[:50]),
                           "signature does not match"),
    "signature removed": (lambda e, t: (e / "manifest.hmac").unlink(), "missing ['manifest.hmac']"),
    "signature garbage": (lambda e, t: (e / "manifest.hmac").write_text("0" * 64), "signature does not match"),
}


@pytest.mark.parametrize("name", list(TAMPERING))
def test_tampered_entries_are_ignored_with_a_reason(vcache: VerdictCache, out_dir: Path, tmp_path: Path,
                                                    name: str) -> None:
    key = make_key()
    vcache.store(key, out_dir)
    change, words = TAMPERING[name]
    change(entry_of(vcache, key), tmp_path)
    found = vcache.fetch(key, tmp_path / "restored")
    assert not found.hit and found.result is None
    assert "ignored" in found.warning and words in found.warning, found.warning
    assert not (tmp_path / "restored").exists()
    assert not entry_of(vcache, key).exists()
    assert vcache.store(key, out_dir) is None and vcache.fetch(key, tmp_path / "again").hit  # re-scan heals


# Checks behind the signature: they catch our own bugs, or an attacker who has the key's help.
SIGNED_TAMPERING = {
    "path with ..": (lambda m: m["files"][0].update(path="../../outside.json"), "unsafe path"),
    "absolute path": (lambda m: m["files"][0].update(path="/etc/passwd"), "unsafe path"),
    "manifest of another key": (lambda m: m["key"].update(seed=9), "belongs to another entry"),
    "manifest verdict pass": (lambda m: m.update(verdict="pass"), "result.json disagrees with the manifest"),
    "file listed twice": (lambda m: m["files"].append(dict(m["files"][0])), "a file twice"),
    "wrong types": (lambda m: m.update(files="all of them"), "malformed"),
}


@pytest.mark.parametrize("name", list(SIGNED_TAMPERING))
def test_signed_but_inconsistent_manifests_are_ignored(vcache: VerdictCache, out_dir: Path, tmp_path: Path,
                                                       name: str) -> None:
    key = make_key()
    vcache.store(key, out_dir)
    change, words = SIGNED_TAMPERING[name]
    edit_manifest(vcache, entry_of(vcache, key), change)
    found = vcache.fetch(key, tmp_path / "restored")
    assert not found.hit and words in found.warning, found.warning
    assert not (tmp_path / "outside.json").exists() and not (tmp_path / "restored").exists()


def test_signed_truncated_manifest_is_not_parsed_as_valid(vcache: VerdictCache, out_dir: Path, tmp_path: Path) -> None:
    key = make_key()
    vcache.store(key, out_dir)
    entry = entry_of(vcache, key)
    resign(vcache, entry, (entry / "manifest.json").read_bytes()[:-20])
    found = vcache.fetch(key, tmp_path / "r")
    assert not found.hit and "manifest is not valid JSON" in found.warning


def test_result_json_with_another_verdict_and_a_matching_manifest_is_refused(
        vcache: VerdictCache, out_dir: Path, tmp_path: Path) -> None:
    """Even a fully re-signed entry must describe the weights of the key it is stored under."""
    key = make_key()
    vcache.store(key, out_dir)
    entry = entry_of(vcache, key)
    forged = result_dict()
    forged["model"]["weight_files"][0]["sha256"] = "00" * 32
    data = json.dumps(forged).encode()
    (entry / "files" / "result.json").write_bytes(data)

    def point_at_forged(m: dict) -> None:
        f = next(f for f in m["files"] if f["path"] == "result.json")
        f.update(size=len(data), sha256=cache_mod.hashlib.sha256(data).hexdigest())

    edit_manifest(vcache, entry, point_at_forged)
    found = vcache.fetch(key, tmp_path / "r")
    assert not found.hit and "does not match the key (weight files)" in found.warning


def test_an_entry_copied_under_another_key_is_refused(vcache: VerdictCache, out_dir: Path, tmp_path: Path) -> None:
    """A fail stored for one model must not be replayable as the answer for another."""
    key, other = make_key(), make_key(seed=3)
    vcache.store(key, out_dir)
    os.rename(entry_of(vcache, key), entry_of(vcache, other))
    found = vcache.fetch(other, tmp_path / "r")
    assert not found.hit and "belongs to another entry" in found.warning


def test_an_entry_that_is_a_symlink_is_refused(vcache: VerdictCache, out_dir: Path, tmp_path: Path) -> None:
    key = make_key()
    vcache.store(key, out_dir)
    real = tmp_path / "elsewhere"
    os.rename(entry_of(vcache, key), real)
    entry_of(vcache, key).symlink_to(real)
    found = vcache.fetch(key, tmp_path / "r")
    assert not found.hit and "not a plain folder" in found.warning
    assert real.is_dir() and not entry_of(vcache, key).exists()  # the link is removed, not its target


def test_wrong_secret_means_ignored(out_dir: Path, tmp_path: Path) -> None:
    key = make_key()
    writer = VerdictCache(tmp_path / "shared", secret=b"the CI secret, 32 bytes long....")
    assert writer.store(key, out_dir) is None
    reader = VerdictCache(tmp_path / "shared", secret=b"another secret, also long enough")
    found = reader.fetch(key, tmp_path / "r")
    assert not found.hit and "signature does not match" in found.warning


def test_same_secret_shares_entries_between_cache_users(out_dir: Path, tmp_path: Path) -> None:
    env = {"AMDET_CACHE_KEY": "s3cret-from-the-ci-secret-store", "AMDET_CACHE_DIR": str(tmp_path / "c")}
    open_cache(env).store(make_key(), out_dir)
    assert open_cache(env).fetch(make_key(), tmp_path / "r").hit


# --- key file ------------------------------------------------------------------------------

def test_key_file_is_created_private_and_reused(vcache: VerdictCache, out_dir: Path, tmp_path: Path) -> None:
    vcache.store(make_key(), out_dir)
    key_file = tmp_path / "config" / "cache-key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    again = VerdictCache(tmp_path / "cache", key_file=key_file)
    assert again.fetch(make_key(), tmp_path / "r").hit
    assert not (tmp_path / "cache" / "cache-key").exists()  # the key never lives in the cache folder


def test_readable_key_file_is_refused(vcache: VerdictCache, out_dir: Path, tmp_path: Path) -> None:
    vcache.store(make_key(), out_dir)
    key_file = tmp_path / "config" / "cache-key"
    key_file.chmod(0o644)
    found = VerdictCache(tmp_path / "cache", key_file=key_file).fetch(make_key(), tmp_path / "r")
    assert not found.hit and found.warning.startswith("cache unusable") and "readable" in found.warning
    assert entry_of(vcache, make_key()).exists()  # a key problem does not delete entries


def test_symlinked_key_file_is_refused(out_dir: Path, tmp_path: Path) -> None:
    real = tmp_path / "real-key"
    real.write_text("ab" * 32 + "\n")
    real.chmod(0o600)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "cache-key").symlink_to(real)
    vc = VerdictCache(tmp_path / "cache", key_file=tmp_path / "config" / "cache-key")
    warning = vc.store(make_key(), out_dir)
    assert warning and "cache key" in warning
    assert not (tmp_path / "cache" / "v1").exists()


# --- store never fails the scan ------------------------------------------------------------

def test_store_problems_are_warnings_not_exceptions(vcache: VerdictCache, out_dir: Path, tmp_path: Path) -> None:
    assert "not cached" in vcache.store(make_key(), tmp_path / "no-such-folder")
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder should be")
    assert "not cached" in VerdictCache(blocked, secret=b"x" * 32).store(make_key(), out_dir)
    assert "larger than" in VerdictCache(tmp_path / "small", secret=b"x" * 32, max_entry_bytes=1000).store(
        make_key(), out_dir)
    assert "does not match the cache key (policy)" in vcache.store(make_key(policy_sha256="00" * 32), out_dir)
    assert "(tool version)" in vcache.store(make_key(tool_version="9.9"), out_dir)
    assert "(anchor)" in vcache.store(make_key(anchor_identity="cd" * 32), out_dir)
    (out_dir / "result.json").unlink()
    assert "no result.json" in vcache.store(make_key(), out_dir)
    assert vcache.entries() == []


def test_inconclusive_results_are_not_cached(vcache: VerdictCache, tmp_path: Path) -> None:
    folder = write_outputs(tmp_path / "out", result_dict("inconclusive"))
    assert vcache.store(make_key(), folder) is None
    assert not vcache.fetch(make_key(), tmp_path / "r").hit


def test_store_replaces_an_existing_entry(vcache: VerdictCache, tmp_path: Path) -> None:
    key = make_key()
    vcache.store(key, write_outputs(tmp_path / "a", result_dict("fail")))
    vcache.store(key, write_outputs(tmp_path / "b", result_dict("pass")))
    assert vcache.fetch(key, tmp_path / "r").result.verdict == "pass"
    assert [p.name for p in vcache.entries_dir.iterdir()] == [key.digest()]  # no temp or trash left


def test_explicit_file_list(vcache: VerdictCache, out_dir: Path, tmp_path: Path) -> None:
    (out_dir / "linkdir").symlink_to(out_dir / "images")
    vcache.store(make_key(), out_dir, files=["result.json", "notes.txt", "linked.safetensors", "absent.png",
                                             "linkdir/target.png"])
    found = vcache.fetch(make_key(), tmp_path / "r")
    assert set(found.files) == {"result.json", "notes.txt"}  # symlinks, through folders too, and absent files
    assert "unsafe path" in vcache.store(make_key(), out_dir, files=["result.json", "../outside"])


# --- list and clear ------------------------------------------------------------------------

def test_entries_and_clear(vcache: VerdictCache, out_dir: Path, tmp_path: Path) -> None:
    vcache.store(make_key(), out_dir)
    vcache.store(make_key(seed=1), out_dir)
    _flip(entry_of(vcache, make_key(seed=1)) / "files" / "summary.md")
    (vcache.root / "unrelated.txt").write_text("not ours")
    rows = {r.digest: r for r in vcache.entries()}
    good, bad = rows[make_key().digest()], rows[make_key(seed=1).digest()]
    assert good.valid and good.verdict == "fail" and good.score == 1.0 and good.tool_version == "0.1.0"
    assert good.source == "models/backdoored" and good.identity_sha256 == WEIGHT_SHA and good.size > 9000
    assert not bad.valid and "summary.md changed" in bad.problem and bad.verdict is None
    assert good.row().endswith("ok") and "fail" in good.row() and "1.000" in good.row()
    assert "INVALID: summary.md changed" in bad.row()
    assert "  -  " in replace(good, score=None).row()
    assert vcache.clear() == 2
    assert vcache.entries() == [] and (vcache.root / "unrelated.txt").exists()
    assert vcache.clear() == 0


# --- configuration -------------------------------------------------------------------------

def test_default_locations() -> None:
    assert default_cache_dir({"AMDET_CACHE_DIR": "/c", "XDG_CACHE_HOME": "/x"}) == Path("/c")
    assert default_cache_dir({"XDG_CACHE_HOME": "/x", "HOME": "/h"}) == Path("/x/amdet-gate")
    assert default_cache_dir({"XDG_CACHE_HOME": "relative", "HOME": "/h"}) == Path("/h/.cache/amdet-gate")
    assert default_key_file({"HOME": "/h"}) == Path("/h/.config/amdet-gate/cache-key")
    assert default_key_file({"XDG_CONFIG_HOME": "/cfg"}) == Path("/cfg/amdet-gate/cache-key")


def test_open_cache(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as err:
        open_cache({"AMDET_CACHE_KEY": "short"})
    assert err.value.exit_code == ExitCode.USAGE
    vc = open_cache({"HOME": str(tmp_path)}, cache_dir=tmp_path / "flag")
    assert vc.root == tmp_path / "flag" and vc.key_file == tmp_path / ".config" / "amdet-gate" / "cache-key"
    assert not (tmp_path / "flag").exists()  # nothing is created until used


def test_import_is_light() -> None:
    """A cache hit must not pay for torch: these modules import only the stdlib, yaml and jsonschema."""
    code = ("import sys, amdet_gate.cache, amdet_gate.lock; "
            "heavy = [m for m in ('torch', 'transformers', 'safetensors', 'numpy') if m in sys.modules]; "
            "print(heavy); sys.exit(bool(heavy))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


# --- the short interface the gate uses -----------------------------------------------------

def test_lookup_returns_the_result_and_keeps_warnings(vcache: VerdictCache, out_dir: Path, tmp_path: Path) -> None:
    key = make_key()
    assert vcache.lookup(key, tmp_path / "a") is None and vcache.take_warnings() == []
    assert vcache.store(key, out_dir, from_dict(json.loads((out_dir / "result.json").read_text()))) is None
    assert vcache.lookup(key, tmp_path / "b") == from_dict(json.loads((out_dir / "result.json").read_text()))
    _flip(entry_of(vcache, key) / "files" / "report.html")
    assert vcache.lookup(key, tmp_path / "c") is None
    warnings = vcache.take_warnings()
    assert len(warnings) == 1 and warnings[0].startswith(f"cache entry {key.digest()[:12]} ignored: report.html")
    assert vcache.take_warnings() == []


def test_store_refuses_a_result_that_is_not_the_one_on_disk(vcache: VerdictCache, out_dir: Path) -> None:
    assert "not the result reported" in vcache.store(make_key(), out_dir, from_dict(result_dict("pass")))
    assert vcache.entries() == []


def test_default_key_file_comes_from_the_environment(out_dir: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    vc = VerdictCache(tmp_path / "c")
    assert vc.key_file == tmp_path / "xdg" / "amdet-gate" / "cache-key"
    assert vc.store(make_key(), out_dir) is None and vc.key_file.is_file()
    row = VerdictCache(tmp_path / "c").entries()  # the same key file again: valid
    assert row[0].valid and row[0].key == make_key().digest() and row[0].model == "models/backdoored"
    shared = VerdictCache(tmp_path / "c", b"a shared secret of some length")
    assert shared.key_file is None and shared.lookup(make_key(), tmp_path / "r") is None
    assert "signature does not match" in shared.take_warnings()[0]


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "precious.txt").write_text("keep")
    (victim / ("e" * 64)).mkdir()  # named like an entry: must survive too
    (victim / "sub" / "data").write_text("keep")
    return victim


def _victim_files(victim: Path) -> list[str]:
    return sorted(p.relative_to(victim).as_posix() for p in victim.rglob("*"))


def test_a_symlinked_v1_is_never_emptied_written_or_read(out_dir: Path, tmp_path: Path) -> None:
    """`ln -s $PWD/victim c/v1; amdet-gate cache clear --cache-dir c` emptied the victim's folder."""
    victim = _victim(tmp_path)
    before = _victim_files(victim)
    root = tmp_path / "c"
    root.mkdir()
    (root / "v1").symlink_to(victim)
    code, _, stderr = run_cli("cache", "clear", "--cache-dir", root)
    assert code == ExitCode.ERROR and "symlink" in stderr and len(stderr.strip().splitlines()) == 1
    code, _, stderr = run_cli("cache", "list", "--cache-dir", root)
    assert code == ExitCode.ERROR and "symlink" in stderr
    cache = VerdictCache(root, secret=b"a secret of at least 16 chars")
    assert "symlink" in cache.store(make_key(), out_dir)  # a warning, never an exception
    found = cache.fetch(make_key(), tmp_path / "r")
    assert not found.hit and "symlink" in found.warning
    assert _victim_files(victim) == before


def test_a_symlinked_cachedir_tag_is_not_written_through(out_dir: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    root = tmp_path / "c"
    root.mkdir()
    (root / "CACHEDIR.TAG").symlink_to(victim)
    assert "symlink" in VerdictCache(root, secret=b"a secret of at least 16 chars").store(make_key(), out_dir)
    assert victim.read_text() == "keep"


def test_clear_removes_links_inside_entries_without_following_them(vcache: VerdictCache, out_dir: Path,
                                                                 tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    before = _victim_files(victim)
    key = make_key()
    vcache.store(key, out_dir)
    (entry_of(vcache, key) / "files" / "link").symlink_to(victim)
    (vcache.entries_dir / ("f" * 64)).symlink_to(victim)
    assert vcache.clear() == 2
    assert not any(vcache.entries_dir.iterdir()) and _victim_files(victim) == before
