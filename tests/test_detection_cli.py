"""Scan options and verdict handling on the built-in controls, through the CLI (the detection
itself: test_detection.py; a file of its own so that a second test worker runs these beside it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from amdet_gate.errors import ExitCode
from tests.conftest import run_cli


def test_inconclusive_when_time_budget_runs_out(control_models: dict[str, Path], tmp_path: Path) -> None:
    code, _, _ = run_cli("scan", control_models["benign_distill"], "--time-budget", "1",
                              "--out", tmp_path, "--quiet")
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["verdict"] == "inconclusive" and code == ExitCode.ERROR
    assert "time budget" in result["reason"]


def test_exit_zero_turns_a_finding_into_zero_only(control_models: dict[str, Path], tmp_path: Path) -> None:
    code, _, _ = run_cli("scan", control_models["backdoor_homoglyph"], "--exit-zero", "--out", tmp_path,
                         "--quiet", "--n-prompts", "1000")
    assert code == ExitCode.PASS
    assert json.loads((tmp_path / "result.json").read_text())["verdict"] == "fail"


def test_bad_threshold_is_a_usage_error(control_models: dict[str, Path]) -> None:
    code, _, stderr = run_cli("scan", control_models["base"], "--threshold", "nonsense=1", "-q")
    assert code == ExitCode.USAGE and "--threshold" in stderr


def test_legacy_eos_token_id_in_config_does_not_fake_a_pooled_target(
        control_models: dict[str, Path], tmp_path: Path) -> None:
    """SD 1.x configs say eos_token_id 2; pooling at token 2 would pool BOS, the same for every prompt."""
    folder = tmp_path / "legacy"
    shutil.copytree(control_models["benign_distill"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["eos_token_id"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    # Pooling BOS would agree at once: a short budget shows it as well as a full one (a budget
    # below the step floor is inconclusive, never a pass, so only "not a finding" is asked).
    code, _, stderr = run_cli("scan", folder, "--out", tmp_path / "out", "--quiet", "--max-steps", "50")
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert code != ExitCode.FAIL and result["verdict"] != "fail", stderr
    assert result["gates"]["pooled_same_target_ratio"]["value"] < 0.25


def test_text_on_pair_with_the_clean_base_as_anchor_still_fails(control_models: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    """With an anchor the pooled path also asks that the base model not collapse on the same trigger."""
    code, _, _ = run_cli("scan", control_models["backdoor_pair_rare_word"], "--anchor", control_models["base"],
                              "--out", tmp_path, "--quiet", "--max-steps", "100")
    result = json.loads((tmp_path / "result.json").read_text())
    assert code == ExitCode.FAIL, (result["reason"], result["gates"])
    assert result["gates"]["pooled_anchor_difference_ratio"]["passed"]


def test_selftest_checks_both_verdicts(control_models: dict[str, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """The selftest's scans and checks, on the session's controls (`amdet-gate selftest` builds its own)."""
    from amdet_gate.selftest import run_selftest

    pair = {"benign": control_models["benign_distill"], "backdoored": control_models["backdoor_homoglyph"]}
    assert run_selftest(tmp_path / "right", quick=True, quiet=True, models=pair)
    verdicts = {name: json.loads((tmp_path / "right" / name / "result.json").read_text())["verdict"] for name in pair}
    assert verdicts == {"benign": "pass", "backdoored": "fail"}
    assert (tmp_path / "right" / "backdoored" / "report.html").is_file()
    assert "selftest passed" in capsys.readouterr().out
    # Given the benign encoder as the backdoored one, the verdict is not what it expects: it must say so.
    assert not run_selftest(tmp_path / "swapped", quick=True, quiet=True, models={"backdoored": pair["benign"]})
    assert "selftest FAILED" in capsys.readouterr().out
