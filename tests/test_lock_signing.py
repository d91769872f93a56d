"""Signed locks: a hand-edited verdict no longer passes `lock check` or `verify` once the lock is signed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from amdet_gate.errors import ExitCode
from amdet_gate.lock import signature_path
from tests.conftest import run_cli
from tests.test_loading import _lock_for

KEY = "a-ci-secret-of-32-characters-xx"


def _flip_verdict(lock: Path, to: str) -> None:
    data = json.loads(lock.read_text())
    data["models"][0]["verdict"] = to
    lock.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@pytest.fixture()
def signed_lock(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    lock = _lock_for(tiny_dir, tmp_path / "amdet.lock")
    monkeypatch.setenv("AMDET_LOCK_KEY", KEY)
    code, stdout, stderr = run_cli("lock", "sign", lock)
    assert "signed" in stdout
    assert code == 0 and signature_path(lock).read_text().startswith("hmac-sha256:"), stderr
    return lock


def test_a_signed_lock_verifies(tiny_dir: Path, signed_lock: Path) -> None:
    assert run_cli("verify", tiny_dir, "--lock", signed_lock, "--require-signed")[0] == ExitCode.PASS
    assert run_cli("lock", "check", signed_lock, "--require-signed")[0] == ExitCode.PASS


def test_a_flipped_verdict_fails_the_signature(tiny_dir: Path, signed_lock: Path) -> None:
    """Flipping "fail" to "pass" by hand made lock check and verify exit 0."""
    _flip_verdict(signed_lock, "fail")
    from amdet_gate.lock_sign import LockKey

    signature_path(signed_lock).write_text(LockKey(KEY.encode()).sign(signed_lock.read_bytes()) + "\n")
    assert run_cli("verify", tiny_dir, "--lock", signed_lock)[0] == ExitCode.FAIL  # signed "fail": refused
    _flip_verdict(signed_lock, "pass")  # the attacker's edit, without the key
    for args in (("verify", tiny_dir, "--lock", signed_lock), ("lock", "check", signed_lock),
                 ("verify", tiny_dir, "--lock", signed_lock, "--require-signed")):
        code, _, stderr = run_cli(*args)
        assert code == ExitCode.FAIL and "signature does not match" in stderr, (args, stderr)
        assert len(stderr.strip().splitlines()) == 1


def test_require_signed_refuses_an_unsigned_lock_and_needs_the_key(tiny_dir: Path, signed_lock: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    signature_path(signed_lock).unlink()  # deleting the signature only makes the lock unsigned
    assert run_cli("verify", tiny_dir, "--lock", signed_lock)[0] == ExitCode.PASS
    code, _, stderr = run_cli("verify", tiny_dir, "--lock", signed_lock, "--require-signed")
    assert code == ExitCode.FAIL and "not signed" in stderr
    assert run_cli("lock", "check", signed_lock, "--require-signed")[0] == ExitCode.FAIL
    monkeypatch.delenv("AMDET_LOCK_KEY")
    code, _, stderr = run_cli("verify", tiny_dir, "--lock", signed_lock, "--require-signed")
    assert code == ExitCode.USAGE and "AMDET_LOCK_KEY" in stderr
    monkeypatch.setenv("AMDET_LOCK_KEY", "short")
    assert run_cli("lock", "check", signed_lock)[0] == ExitCode.USAGE


def test_a_wrong_key_does_not_verify(tiny_dir: Path, signed_lock: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMDET_LOCK_KEY", "another-secret-of-enough-length")
    assert run_cli("verify", tiny_dir, "--lock", signed_lock)[0] == ExitCode.FAIL


def test_scan_signs_its_lock_and_refuses_to_extend_a_tampered_one(tiny_dir: Path, tmp_path: Path,
                                                                  signed_lock: Path) -> None:
    fast = ("--max-steps", "16", "--n-prompts", "40", "--restarts", "2", "-q", "--threshold", "same_target=1")
    code, _, stderr = run_cli("scan", tiny_dir, *fast, "--out", tmp_path / "o", "--lock", signed_lock)
    assert code == 0, stderr
    assert run_cli("lock", "check", signed_lock, "--require-signed")[0] == ExitCode.PASS  # re-signed
    _flip_verdict(signed_lock, "fail")  # any edit without the key
    before = signed_lock.read_bytes()
    code, stdout, stderr = run_cli("scan", tiny_dir, *fast, "--out", tmp_path / "o2", "--lock", signed_lock)
    assert code == ExitCode.ERROR and "will not add" in stderr and len(stderr.strip().splitlines()) == 1
    assert signed_lock.read_bytes() == before and "loading model" not in stderr and stdout == ""
