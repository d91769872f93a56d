"""The CLI around the scan: outputs, progress behaviour, usage errors (fast, on a tiny encoder)."""

from __future__ import annotations

import json
from pathlib import Path

from amdet_gate.errors import ExitCode
from tests.conftest import run_cli

FAST = ("--max-steps", "16", "--n-prompts", "40", "--restarts", "2")


def test_scan_writes_result_and_artifacts(tiny_dir: Path, tmp_path: Path) -> None:
    code, stdout, stderr = run_cli("scan", tiny_dir, *FAST, "--out", tmp_path / "out")
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert code in (ExitCode.PASS, ExitCode.FAIL, ExitCode.ERROR)
    assert code == {"pass": 0, "fail": 1, "inconclusive": 2}[result["verdict"]]
    assert result["verdict"].upper() in stdout
    assert result["search"]["steps"] <= 16 and result["prompts"]["held_out"] == 10
    for name in ("pseudo_trigger.safetensors", "target_feature.safetensors", "landscape.safetensors",
                 "textual_inversion/learned_embeds.safetensors"):
        assert (tmp_path / "out" / name).is_file()
    # Not a terminal: plain stage lines, no progress bar control characters.
    assert "amdet-gate: loading model" in stderr and "\x1b[" not in stderr


def test_quiet_prints_nothing_on_stderr(tiny_dir: Path, tmp_path: Path) -> None:
    _, _, stderr = run_cli("scan", tiny_dir, *FAST, "--out", tmp_path, "--quiet")
    assert stderr.strip() == ""


def test_same_seed_same_result(tiny_dir: Path, tmp_path: Path) -> None:
    results = []
    for run in ("a", "b", "c"):
        seed = "1" if run == "c" else "0"
        run_cli("scan", tiny_dir, *FAST, "--seed", seed, "--out", tmp_path / run, "-q", "--no-cache")
        results.append(json.loads((tmp_path / run / "result.json").read_text()))
    assert results[0]["search"]["loss_history"] == results[1]["search"]["loss_history"]
    assert results[0]["landscape"] == results[1]["landscape"]
    assert results[0]["search"]["loss_history"] != results[2]["search"]["loss_history"]


def test_usage_errors_exit_4(tiny_dir: Path) -> None:
    assert run_cli("scan", tiny_dir, "--threshold", "same_target=2")[0] == ExitCode.USAGE
    assert run_cli("scan", tiny_dir, "--threshold", "same_target")[0] == ExitCode.USAGE
    assert run_cli("scan", tiny_dir, "--restarts", "0")[0] == ExitCode.USAGE
    assert run_cli("scan", tiny_dir, "--device", "tpu", "-q")[0] == ExitCode.USAGE
    assert run_cli("scan")[0] == ExitCode.USAGE


def test_anchor_must_share_the_architecture(tiny_dir: Path, tmp_path: Path) -> None:
    from transformers import CLIPTextModel

    from tests.conftest import tiny_config

    CLIPTextModel(tiny_config(hidden_size=64)).save_pretrained(str(tmp_path / "anchor"))
    code, _, stderr = run_cli("scan", tiny_dir, "--anchor", tmp_path / "anchor", *FAST, "-q")
    assert code == ExitCode.USAGE and "anchor" in stderr


def test_anchor_enables_gate_three(tiny_dir: Path, tmp_path: Path) -> None:
    import torch
    from transformers import CLIPTextModel

    from tests.conftest import tiny_config

    torch.manual_seed(1)
    CLIPTextModel(tiny_config()).save_pretrained(str(tmp_path / "anchor"))
    run_cli("scan", tiny_dir, "--anchor", tmp_path / "anchor", *FAST, "--out", tmp_path / "o", "-q")
    result = json.loads((tmp_path / "o" / "result.json").read_text())
    assert "anchor_difference_ratio" in result["gates"]
    assert result["anchor"]["identity_sha256"] != result["model"]["identity_sha256"]


def test_the_model_is_not_its_own_anchor(tiny_dir: Path, tmp_path: Path) -> None:
    """Its own weights as anchor fail gate 3 for every trigger: that would pass any backdoor."""
    code, _, stderr = run_cli("scan", tiny_dir, "--anchor", tiny_dir, *FAST, "--out", tmp_path, "-q")
    assert code == ExitCode.USAGE and "same weights" in stderr
