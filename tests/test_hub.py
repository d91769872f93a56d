"""Hub sources through the real huggingface_hub client, against a local Hub server (olah, tests/hubserver.py).

huggingface_hub reads HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE at import, so these tests run the real
`amdet-gate` console script in a subprocess with that environment, as CI would.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hubserver import HubServer, free_port

AMDET = str(Path(sys.executable).parent / "amdet-gate")
FAST = ("--max-steps", "16", "--n-prompts", "40", "--restarts", "2", "-q")
PASS = (*FAST, "--threshold", "same_target=1")  # a threshold nothing reaches: the scan passes


def amdet(env: dict[str, str], *args: object, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([AMDET, *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture()
def published(hub_server: HubServer, tiny_dir: Path, tmp_path: Path) -> tuple[str, str]:
    """tiny_dir as a Hub repo (with a decoy pickle that must never be downloaded), tag v1."""
    repo = f"acme/tiny-{hashlib.sha256(str(tmp_path).encode()).hexdigest()[:12]}"
    (tiny_dir / "pytorch_model.bin").write_bytes(b"not a real pickle")
    sha = hub_server.publish(repo, tiny_dir, tag="v1")
    return repo, sha


def test_scan_by_id_and_tag_records_the_commit(hub_server: HubServer, published, tmp_path: Path) -> None:
    repo, sha = published
    env = hub_server.client_env(tmp_path / "hf")
    done = amdet(env, "scan", repo, "--revision", "v1", *PASS, "--out", tmp_path / "out", "--no-cache")
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["model"]["hub_id"] == repo and result["model"]["revision"] == "v1"
    assert result["model"]["resolved_sha"] == sha == hub_server.rev_parse(repo, "v1")
    cached = [p.name for p in (tmp_path / "hf").rglob("*") if p.is_file() or p.is_symlink()]
    assert "model.safetensors" in cached and "config.json" in cached
    assert not any(name.endswith(".bin") for name in cached)  # the pickle was never fetched


def test_unpinned_revision_under_a_pinning_policy_is_amdet100(hub_server: HubServer, published,
                                                               tmp_path: Path) -> None:
    repo, sha = published
    policy = tmp_path / "pin.yaml"
    policy.write_text("version: 1\nrequire_pinned_revision: true\n")
    env = hub_server.client_env(tmp_path / "hf")
    done = amdet(env, "scan", repo, "--revision", "v1", "--policy", policy, "--sarif", tmp_path / "s.sarif",
                 "--out", tmp_path / "out", *FAST)
    assert done.returncode == 1, done.stderr
    assert "pinned revision" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    sarif = json.loads((tmp_path / "s.sarif").read_text())
    assert [r["ruleId"] for r in sarif["runs"][0]["results"]] == ["AMDET100"]
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").rglob("*.safetensors"))  # nothing fetched
    pinned = amdet(env, "scan", repo, "--revision", sha, "--policy", policy, "--out", tmp_path / "ok", *PASS)
    assert pinned.returncode == 0, pinned.stderr
    assert json.loads((tmp_path / "ok" / "result.json").read_text())["model"]["resolved_sha"] == sha


def test_missing_private_and_unreachable_exit_2(hub_server: HubServer, tiny_dir: Path, tmp_path: Path) -> None:
    env = hub_server.client_env(tmp_path / "hf")
    missing = amdet(env, "scan", "acme/does-not-exist", *FAST)
    assert missing.returncode == 2 and "not found" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and "Traceback" not in missing.stderr
    hub_server.publish("acme/secret-model", tiny_dir, private=True)
    private = amdet(env, "scan", "acme/secret-model", *FAST)
    assert private.returncode == 2 and "HF_TOKEN" in private.stderr
    dead = dict(env, HF_ENDPOINT=f"http://127.0.0.1:{free_port()}")
    unreachable = amdet(dead, "scan", "acme/anything", *FAST)
    assert unreachable.returncode == 2 and "cannot download" in unreachable.stderr
    assert len(unreachable.stderr.strip().splitlines()) == 1


def test_fetch_then_offline_scan(hub_server: HubServer, published, tmp_path: Path) -> None:
    repo, sha = published
    online = hub_server.client_env(tmp_path / "hf")
    fetched = amdet(online, "fetch", repo, "--revision", "v1")
    assert fetched.returncode == 0 and sha in fetched.stdout, fetched.stderr
    offline = hub_server.client_env(tmp_path / "hf", offline=True, HF_ENDPOINT=f"http://127.0.0.1:{free_port()}")
    done = amdet(offline, "scan", repo, "--revision", "v1", *PASS, "--out", tmp_path / "out", "--no-cache")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "out" / "result.json").read_text())["model"]["resolved_sha"] == sha
    not_fetched = amdet(offline, "scan", "acme/never-fetched", *FAST)
    assert not_fetched.returncode == 2 and "amdet-gate fetch" in not_fetched.stderr


def test_lock_and_verify_refuse_changed_weights(hub_server: HubServer, published, tiny_dir: Path,
                                                tmp_path: Path) -> None:
    repo, _ = published
    env = hub_server.client_env(tmp_path / "hf")
    lock = tmp_path / "amdet.lock"
    done = amdet(env, "scan", repo, "--revision", "main", *PASS, "--lock", lock, "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert amdet(env, "verify", repo, "--lock", lock).returncode == 0
    assert amdet(env, "lock", "check", lock).returncode == 1  # locked by branch, not by commit sha
    # A new commit on main with different weights: verify at main must refuse it.
    changed = tmp_path / "changed"
    shutil.copytree(tiny_dir, changed)
    data = bytearray((changed / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (changed / "model.safetensors").write_bytes(bytes(data))
    hub_server.publish(repo, changed)
    refused = amdet(env, "verify", repo, "--lock", lock, "--revision", "main")
    assert refused.returncode == 1 and "model.safetensors" in refused.stderr
    # Without --revision, verify fetches the locked commit: the scanned weights, still deployable.
    assert amdet(env, "verify", repo, "--lock", lock).returncode == 0
