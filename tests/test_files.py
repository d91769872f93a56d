"""The one capped reader and the atomic writer: FIFOs, devices, folders and oversize inputs are one
line and their documented exit code at every entry point, never a hang or a flood of memory."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from amdet_gate.errors import ExitCode, LoadError, OutputError, UsageError
from amdet_gate.files import read_capped, read_capped_text, write_atomic
from tests.conftest import run_cli


def _special(tmp_path: Path, kind: str) -> Path:
    """A hostile input path: a FIFO (a reader blocks forever), /dev/zero (size 0, endless), a folder."""
    if kind == "fifo":
        path = tmp_path / "input.fifo"
        os.mkfifo(path)
        return path
    if kind == "dev-zero":
        return Path("/dev/zero")
    path = tmp_path / "a-folder"
    path.mkdir()
    return path


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("amdet-gate: error:"), stderr
    return lines[0]


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "folder"])
def test_reader_refuses_what_is_not_a_regular_file(tmp_path: Path, kind: str) -> None:
    with pytest.raises(UsageError, match="not a regular file; refused"):
        read_capped(_special(tmp_path, kind), 1024, "policy", UsageError)


def test_reader_caps_size_encoding_and_names_the_file(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_bytes(b"x" * 2049)
    with pytest.raises(LoadError, match=r"config.json .*big.yaml is larger than 2 KiB"):
        read_capped(big, 2048, "config.json", LoadError)
    (tmp_path / "bin").write_bytes(b"\xff\xfe")
    with pytest.raises(UsageError, match="not UTF-8"):
        read_capped_text(tmp_path / "bin", 10, "prompt file", UsageError)
    with pytest.raises(UsageError, match=r"cannot read prompt file .*: No such file"):
        read_capped(tmp_path / "missing", 10, "prompt file", UsageError)


def test_reader_keeps_a_symlink_inside_its_folder(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "secret").write_text("outside")
    (tmp_path / "model" / "inside").write_text("inside")
    (tmp_path / "model" / "ok").symlink_to("inside")
    (tmp_path / "model" / "escape").symlink_to(tmp_path / "secret")
    assert read_capped(tmp_path / "model" / "ok", 100, "x", LoadError, inside=tmp_path / "model") == b"inside"
    with pytest.raises(LoadError, match=r"outside .*--follow-symlinks"):
        read_capped(tmp_path / "model" / "escape", 100, "x", LoadError, inside=tmp_path / "model")
    assert read_capped(tmp_path / "model" / "escape", 100, "x", LoadError) == b"outside"


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "folder"])
def test_every_input_entry_point_refuses_special_files(tmp_path: Path, kind: str, tiny_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    hostile = _special(tmp_path, kind)
    out = tmp_path / "out"
    cases = [
        ("scan", tiny_dir, "--policy", hostile, "--out", out, "-q"),
        ("policy", "validate", hostile),
        ("report", hostile, "--sarif", tmp_path / "r.sarif"),
        ("lock", "check", hostile),
        ("pins", hostile),
        ("verify", tiny_dir, "--lock", hostile),
        ("scan", tiny_dir, "--prompts", hostile, "--out", out, "-q"),
    ]
    for args in cases:
        code, _, stderr = run_cli(*args)
        assert code == ExitCode.USAGE, (args, stderr)
        assert "not a regular file" in _one_error_line(stderr), args
    monkeypatch.setenv("AMDET_POLICY", str(hostile))
    code, _, stderr = run_cli("scan", tiny_dir, "--out", out, "-q")
    assert code == ExitCode.USAGE and "policy" in _one_error_line(stderr)


def test_model_files_that_are_fifos_are_load_errors(tiny_dir: Path) -> None:
    (tiny_dir / "config.json").unlink()
    os.mkfifo(tiny_dir / "config.json")
    code, _, stderr = run_cli("scan", tiny_dir, "-q", "--out", tiny_dir.parent / "out")
    assert code == ExitCode.ERROR and "config.json" in _one_error_line(stderr)


def test_atomic_write_leaves_the_old_file_or_the_new_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "result.json"
    write_atomic(target, b'{"verdict": "pass"}')
    real_write = os.write

    def full_disk(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OutputError, match="No space left") as info:
        write_atomic(target, b"x" * 100_000)
    monkeypatch.setattr(os, "write", real_write)
    assert info.value.exit_code == ExitCode.ERROR
    assert target.read_bytes() == b'{"verdict": "pass"}'  # untouched, not truncated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]  # no temporary file left


def test_atomic_write_replaces_a_symlink_instead_of_writing_through_it(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "report.html").symlink_to(victim)
    write_atomic(tmp_path / "report.html", b"<html>")
    assert victim.read_text() == "keep me" and not (tmp_path / "report.html").is_symlink()
