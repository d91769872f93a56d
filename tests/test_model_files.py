"""The model's files before any tensor: headers checked before hashing, hashing inside the time
budget, no file that resolves outside the model folder (or its Hub cache repository)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from amdet_gate.errors import ExitCode, LoadError
from amdet_gate.safetensors_header import check_header
from amdet_gate.sources.files import check_contained
from amdet_gate.sources.identity import BudgetExceeded, sha256_file
from amdet_gate.sources.model import ResolvedModel, SourceKindName
from tests.conftest import run_cli


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("amdet-gate: error:"), stderr
    return lines[0]


def _move_out(folder: Path, name: str, elsewhere: Path) -> None:
    """Replace folder/name by a symlink to a copy outside the folder."""
    elsewhere.mkdir(exist_ok=True)
    (folder / name).rename(elsewhere / name)
    (folder / name).symlink_to(elsewhere / name)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "vocab.json", "tokenizer.json"])
def test_files_that_resolve_outside_the_model_folder_are_refused(tiny_dir: Path, tmp_path: Path, name: str) -> None:
    """Symlinked weight (and config, tokenizer) files were followed anywhere on the machine."""
    _move_out(tiny_dir, name, tmp_path / "elsewhere")
    with pytest.raises(LoadError, match="outside"):
        check_contained(ResolvedModel(str(tiny_dir), tiny_dir))
    code, stdout, stderr = run_cli("scan", tiny_dir, "-q", "--out", tmp_path / "out")
    assert code == ExitCode.ERROR and "--follow-symlinks" in _one_error_line(stderr) and stdout == ""
    check_contained(ResolvedModel(str(tiny_dir), tiny_dir, follow_symlinks=True))  # allowed when asked for


def test_symlinks_inside_the_folder_and_follow_symlinks_are_accepted(tiny_dir: Path, tmp_path: Path) -> None:
    (tiny_dir / "blobs").mkdir()
    (tiny_dir / "vocab.json").rename(tiny_dir / "blobs" / "vocab")
    (tiny_dir / "vocab.json").symlink_to("blobs/vocab")  # as a Hub snapshot links into blobs/
    check_contained(ResolvedModel(str(tiny_dir), tiny_dir))
    hub_root = tmp_path / "hub" / "models--org--name"
    snapshot = hub_root / "snapshots" / ("c" * 40)
    snapshot.mkdir(parents=True)
    (hub_root / "blobs").mkdir()
    for name in ("config.json", "model.safetensors"):
        (tiny_dir / name).rename(hub_root / "blobs" / name)
        (snapshot / name).symlink_to(f"../../blobs/{name}")
    check_contained(ResolvedModel("org/name", snapshot, hub_id="org/name", resolved_sha="c" * 40,
                                  kind=SourceKindName.HUB, containment=hub_root))


def test_verify_follows_symlinks_only_when_asked(tiny_dir: Path, tmp_path: Path) -> None:
    from tests.test_loading import _lock_for

    lock = _lock_for(tiny_dir, tmp_path / "amdet.lock")
    _move_out(tiny_dir, "model.safetensors", tmp_path / "elsewhere")
    code, _, stderr = run_cli("verify", tiny_dir, "--lock", lock)
    assert code == ExitCode.ERROR and "--follow-symlinks" in _one_error_line(stderr)
    assert run_cli("verify", tiny_dir, "--lock", lock, "--follow-symlinks")[0] == ExitCode.PASS


def test_headers_are_checked_before_any_full_file_hash(tiny_dir: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A 10 GB sparse file took 49 s of hashing before the error."""
    import amdet_gate.sources.files as files
    import amdet_gate.sources.local as local

    def no_hash(*args, **kwargs):
        raise AssertionError("hashed before the header was checked")

    for module in (files, local):  # a folder's weights are hashed in local.py, a checkpoint file's in files.py
        monkeypatch.setattr(module, "sha256_file", no_hash)
    weights = tiny_dir / "model.safetensors"
    with weights.open("r+b") as fh:
        fh.truncate(10 * 1024**3)  # sparse: no disk used
    started = time.monotonic()
    code, _, stderr = run_cli("scan", tiny_dir, "-q", "--out", tmp_path / "out")
    assert code == ExitCode.ERROR and "model.safetensors" in _one_error_line(stderr)
    assert time.monotonic() - started < 30
    with weights.open("r+b") as fh:
        fh.truncate(0)
        fh.write((0).to_bytes(8, "little"))
    with pytest.raises(LoadError, match="not a safetensors file"):
        check_header(weights)


@pytest.mark.parametrize("header", [
    {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 15]}},  # range does not match the shape
    {"w": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}},  # unknown dtype
    {"w": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}},  # backwards
    {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
    {"w": "not an entry"},
])
def test_malformed_headers_are_load_errors(tmp_path: Path, header: dict) -> None:
    text = json.dumps(header).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"\0" * 16)
    with pytest.raises(LoadError):
        check_header(path)


def test_hashing_runs_inside_the_time_budget(tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(BudgetExceeded) as info:
        sha256_file(tiny_dir / "model.safetensors", deadline=time.monotonic() - 1)
    assert info.value.exit_code == ExitCode.ERROR
    # A valid header over 4 GB of (sparse) zeros: hashing alone outlasts a one-second budget.
    count = 1024**3
    text = json.dumps({"w": {"dtype": "F32", "shape": [count], "data_offsets": [0, 4 * count]}}).encode()
    weights = tiny_dir / "model.safetensors"
    with weights.open("wb") as fh:
        fh.write(len(text).to_bytes(8, "little") + text)
        fh.truncate(8 + len(text) + 4 * count)
    started = time.monotonic()
    code, _, stderr = run_cli("scan", tiny_dir, "-q", "--no-cache", "--time-budget", "1", "--out", tmp_path / "o")
    assert code == ExitCode.ERROR and "time budget" in _one_error_line(stderr)
    assert time.monotonic() - started < 20
    assert json.loads((tmp_path / "o" / "result.sarif").read_text())["runs"][0]["results"][0]["ruleId"] == "AMDET003"
