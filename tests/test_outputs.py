"""A run's output paths: cleared at its start, written atomically, never an input, and on any
failure (exit 2/3/4, a full disk, Ctrl-C) the error outputs instead of an earlier or partial verdict."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from amdet_gate.errors import ExitCode
from tests.conftest import run_cli

PASS = ("--max-steps", "16", "--n-prompts", "40", "--restarts", "2", "-q", "--threshold", "same_target=1")


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("amdet-gate: error:"), stderr
    return lines[0]


@pytest.fixture()
def passed_run(tiny_dir: Path, tmp_path: Path) -> dict[str, Path]:
    """A passing scan's outputs at --out and at user paths, as CI keeps them between runs."""
    paths = {"out": tmp_path / "out", "sarif": tmp_path / "ci" / "amdet.sarif", "html": tmp_path / "ci" / "r.html",
             "markdown": tmp_path / "ci" / "r.md"}
    code, _, stderr = run_cli("scan", tiny_dir, *PASS, *(a for k, v in paths.items() for a in (f"--{k}", v)))
    assert code == 0, stderr
    assert json.loads(paths["sarif"].read_text())["runs"][0]["results"] == []  # a clean log: a PASS
    return paths


def _flags(paths: dict[str, Path]) -> list[str | Path]:
    return [a for k, v in paths.items() for a in (f"--{k}", v)]


def test_a_failing_run_leaves_no_stale_pass_at_any_output_path(tiny_dir: Path, tmp_path: Path,
                                                               passed_run: dict[str, Path]) -> None:
    """--html / --sarif / --markdown kept the previous PASS when the next run failed (only --out was cleared)."""
    (tiny_dir / "config.json").write_text("{not json")  # exit 2
    code, _, stderr = run_cli("scan", tiny_dir, *PASS, *_flags(passed_run))
    assert code == ExitCode.ERROR, stderr
    assert not passed_run["html"].exists() and not (passed_run["out"] / "report.html").exists()
    assert not (passed_run["out"] / "result.json").exists()
    for sarif in (passed_run["sarif"], passed_run["out"] / "result.sarif"):
        assert json.loads(sarif.read_text())["runs"][0]["results"][0]["ruleId"] == "AMDET003"
    assert "ERROR (exit 2)" in passed_run["markdown"].read_text()


@pytest.mark.parametrize("failure", ["policy", "threshold"])
def test_a_usage_error_also_clears_the_earlier_verdict(tiny_dir: Path, tmp_path: Path, failure: str,
                                                       passed_run: dict[str, Path]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 2\n")
    args = ("--policy", bad) if failure == "policy" else ("--threshold", "nope=1")
    code, _, stderr = run_cli("scan", tiny_dir, *PASS, *args, *_flags(passed_run))
    assert code == ExitCode.USAGE, stderr
    _one_error_line(stderr)
    leftovers = [p for p in (passed_run["sarif"], passed_run["html"], passed_run["markdown"],
                             passed_run["out"] / "result.json", passed_run["out"] / "result.sarif") if p.exists()]
    assert leftovers == []


def test_a_full_disk_is_exit_2_with_the_error_sarif_and_no_verdict(tiny_dir: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk while writing exited 4 and left a complete result.json (pass) and a truncated report."""
    import amdet_gate.files as files

    real_write = os.write

    def disk_full_for_reports(fd: int, data) -> int:
        target = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
        if ".report.html." in target:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(files.os, "write", disk_full_for_reports)
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("scan", tiny_dir, *PASS, "--out", out)
    monkeypatch.setattr(files.os, "write", real_write)
    assert code == ExitCode.ERROR, stderr
    assert "No space left on device" in _one_error_line(stderr) and "PASS" not in stdout
    assert not (out / "result.json").exists() and not (out / "report.html").exists()
    assert json.loads((out / "result.sarif").read_text())["runs"][0]["results"][0]["ruleId"] == "AMDET003"
    assert not [p for p in out.rglob("*.tmp")]  # no temporary file left behind


def test_ctrl_c_is_exit_2_one_line_and_the_error_outputs(tiny_dir: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import amdet_gate.scanner as scanner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(scanner, "scan_model", interrupted)
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    out = tmp_path / "out"
    code, _, stderr = run_cli("scan", tiny_dir, *PASS, "--no-cache", "--out", out, "--sarif", tmp_path / "a.sarif")
    assert code == ExitCode.ERROR
    assert "interrupted" in _one_error_line(stderr)
    sarif = json.loads((tmp_path / "a.sarif").read_text())
    assert "interrupted" in sarif["runs"][0]["results"][0]["message"]["text"]
    assert "interrupted" in summary.read_text() and not (out / "result.json").exists()


@pytest.mark.parametrize("sent", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_real_signal_during_the_scan(tiny_dir: Path, tmp_path: Path, sent: int) -> None:
    """Ctrl-C exited 130 with nothing on stderr and no error SARIF; SIGTERM (a cancelled job) ends it the same way."""
    out = tmp_path / "out"
    env = {**os.environ, "AMDET_CACHE_DIR": str(tmp_path / "c")}
    # The default 4,000 prompts: the search and its gate checks take long enough for the signal to land in them.
    # preexec: a suite run in the background (nohup) has SIGINT ignored; the command must get a real Ctrl-C.
    proc = subprocess.Popen([str(Path(sys.executable).parent / "amdet-gate"), "scan", str(tiny_dir), "--out", str(out),
                             "--no-cache"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # wait for the search to start, then interrupt it
        line = proc.stderr.readline()
        lines.append(line)
        if "searching" in line or not line:
            break
    proc.send_signal(sent)
    stdout, rest = proc.communicate(timeout=120)
    assert "PASS" not in stdout and "FAIL" not in stdout
    stderr = "".join(lines) + rest
    errors = [line for line in stderr.splitlines() if "error" in line]
    assert proc.returncode == ExitCode.ERROR, stderr
    assert len(errors) == 1 and "interrupted" in errors[0] and "Traceback" not in stderr
    assert json.loads((out / "result.sarif").read_text())["runs"][0]["results"][0]["ruleId"] == "AMDET003"


@pytest.mark.parametrize("where", ["sarif-is-config", "html-is-result-json", "out-is-model", "out-inside-model",
                                   "markdown-is-sarif", "lock-in-model", "sarif-is-policy", "html-link-to-config",
                                   "out-is-a-file", "out-under-a-file"])
def test_outputs_that_would_overwrite_inputs_or_each_other_are_refused_before_scanning(
        tiny_dir: Path, tmp_path: Path, where: str) -> None:
    out = tmp_path / "out"
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\n")
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "link.html").symlink_to(tiny_dir / "config.json")
    args = {
        "sarif-is-config": ("--sarif", tiny_dir / "config.json"),
        "html-is-result-json": ("--html", out / "result.json"),
        "out-is-model": ("--out", tiny_dir),
        "out-inside-model": ("--out", tiny_dir / "amdet-out"),
        "markdown-is-sarif": ("--markdown", tmp_path / "x", "--sarif", tmp_path / "x"),
        "lock-in-model": ("--lock", tiny_dir / "amdet.lock"),
        "sarif-is-policy": ("--policy", policy, "--sarif", policy),
        "html-link-to-config": ("--html", tmp_path / "link.html"),
        "out-is-a-file": ("--out", tmp_path / "a-file"),
        "out-under-a-file": ("--out", tmp_path / "a-file" / "sub"),
    }[where]
    before, policy_text = _digest(tiny_dir), policy.read_text()
    code, stdout, stderr = run_cli("scan", tiny_dir, *PASS, "--out", out, *args)
    assert code == ExitCode.USAGE, stderr
    _one_error_line(stderr)
    assert "loading model" not in stderr and stdout == ""  # refused before anything was read
    assert _digest(tiny_dir) == before and policy.read_text() == policy_text
    assert (tmp_path / "a-file").read_text() == "x" and (tmp_path / "link.html").is_symlink()


def test_report_never_overwrites_the_result_it_reads(tmp_path: Path) -> None:
    result = Path(__file__).parent / "data" / "sample_result.json"
    copy = tmp_path / "result.json"
    copy.write_bytes(result.read_bytes())
    code, _, stderr = run_cli("report", copy, "--html", copy)
    assert code == ExitCode.USAGE and copy.read_bytes() == result.read_bytes()
    code, _, stderr = run_cli("report", copy, "--html", tmp_path / "x", "--sarif", tmp_path / "x")
    assert code == ExitCode.USAGE and "its own path" in _one_error_line(stderr)


@pytest.mark.parametrize("target", ["fifo", "folder", "device"])
def test_an_output_path_that_is_not_a_file_is_refused_before_scanning(tiny_dir: Path, tmp_path: Path,
                                                                     target: str) -> None:
    """Renaming a report over /dev/null (as root) would replace the device; a FIFO or folder cannot hold it."""
    path = {"fifo": tmp_path / "r.sarif", "folder": tmp_path / "r.sarif", "device": Path("/dev/null")}[target]
    if target == "fifo":
        os.mkfifo(path)
    elif target == "folder":
        path.mkdir()
    code, _, stderr = run_cli("scan", tiny_dir, *PASS, "--out", tmp_path / "out", "--sarif", path)
    assert code == ExitCode.USAGE and "an output must be a file" in _one_error_line(stderr)
    assert "loading model" not in stderr
    assert Path("/dev/null").is_char_device()


def test_a_job_summary_that_is_a_fifo_is_a_warning_not_a_hang(tiny_dir: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    summary = tmp_path / "summary"
    os.mkfifo(summary)
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    code, _, stderr = run_cli("scan", tiny_dir, "-q", "--out", tmp_path / "out", "--policy", "/dev/zero")
    assert code == ExitCode.USAGE  # a usage error appends nothing: no summary write to hang on
    (tiny_dir / "config.json").write_text("{x")
    code, _, stderr = run_cli("scan", tiny_dir, "-q", "--out", tmp_path / "out")
    assert code == ExitCode.ERROR and len(stderr.strip().splitlines()) == 1  # returned, did not block
