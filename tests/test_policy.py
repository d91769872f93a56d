"""Policy files: schema validation with line numbers, precedence, allow entries, CLI wiring."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import pytest

import amdet_gate
from amdet_gate.errors import ExitCode, GateError
from amdet_gate.policy import STARTER_POLICY, PolicyError, apply_policy, load_policy
from amdet_gate.result import PolicyDecision, Verdict
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
TODAY = date(2026, 11, 22)
SHA = "ab" * 32


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


def allow_entry(expires: str = "2027-03-31", statement: str = "accepted by the ML security team") -> str:
    return f"allow:\n  - rule: AMDET001\n    sha256: {SHA}\n    statement: \"{statement}\"\n    expires: {expires}\n"


def test_shipped_policies_are_valid_and_default_equals_builtin() -> None:
    default = load_policy(ROOT / "policies" / "default.yaml", {}, TODAY)
    builtin = load_policy(None, {}, TODAY)
    assert (default.scan, default.thresholds, default.on_finding) == (builtin.scan, builtin.thresholds, "fail")
    strict = load_policy(ROOT / "policies" / "strict.yaml", {}, TODAY)
    assert strict.require_pinned_revision and strict.scan.restarts == 8


@pytest.mark.parametrize(("text", "line", "needle"), [
    ("version: 1\nscan:\n  seed: 0\n  bogus: 3\n", 4, "scan.bogus"),
    ("version: 1\nthresholds:\n  same_target: high\n", 3, "thresholds.same_target"),
    ("version: 1\n" + allow_entry().replace('    statement: "accepted by the ML security team"\n', ""), 3,
     "statement"),
    ("version: 1\non_finding: fail\non_finding: warn\n", 3, "duplicate key"),
    ("version: 1\n" + allow_entry(expires="2020-01-01"), 3, "expired on 2020-01-01"),
    ("version: 1\n" + allow_entry(expires="2027-02-30"), 6, "not a date"),
    ("version: 1\non_finding: ignore\n", 2, "on_finding"),
    ("version: 1\nscan: [1, 2\n", 3, "not valid YAML"),
    ("version: 1\nx: &a [1, 2]\ny: &b [*a, *a]\nscan: [*b, *b]\n", 2, "aliases are not allowed"),
])
def test_policy_mistakes_name_line_and_key(tmp_path: Path, text: str, line: int, needle: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as err:
        load_policy(path, {}, TODAY)
    assert f"line {line}" in str(err.value) and needle in str(err.value), str(err.value)
    code, _, stderr = run_cli("policy", "validate", path)
    assert code == ExitCode.USAGE and f"line {line}" in stderr and len(stderr.strip().splitlines()) == 1


def test_precedence_env_over_file_over_default(tmp_path: Path) -> None:
    path = write(tmp_path, "version: 1\nscan:\n  seed: 3\n  restarts: 2\n")
    pol = load_policy(path, {"AMDET_SEED": "9"}, TODAY)
    assert (pol.scan.seed, pol.scan.restarts, pol.scan.max_steps) == (9, 2, 640)
    with pytest.raises(PolicyError, match="AMDET_RESTARTS"):
        load_policy(path, {"AMDET_RESTARTS": "many"}, TODAY)
    with pytest.raises(PolicyError, match="restarts"):
        load_policy(path, {"AMDET_RESTARTS": "0"}, TODAY)
    assert load_policy(None, {"AMDET_POLICY": str(path)}, TODAY).scan.seed == 3


def test_apply_policy() -> None:
    strict = load_policy(None, {}, TODAY)
    assert apply_policy("pass", SHA, strict) == PolicyDecision(ExitCode.PASS, Verdict.PASS)
    assert apply_policy("fail", SHA, strict) == PolicyDecision(ExitCode.FAIL, Verdict.FAIL)
    assert apply_policy("inconclusive", SHA, strict).exit_code == ExitCode.ERROR
    warn = load_policy(None, {"AMDET_ON_FINDING": "warn"}, TODAY)
    warned = apply_policy("fail", SHA, warn)
    assert warned.exit_code == ExitCode.PASS and warned.warn_only and warned.allowed is None
    assert "on_finding: warn" in warned.note
    assert apply_policy("inconclusive", SHA, warn).exit_code == ExitCode.ERROR


def test_allow_entry_matches_rule_and_sha(tmp_path: Path) -> None:
    pol = load_policy(write(tmp_path, "version: 1\n" + allow_entry()), {}, TODAY)
    decision = apply_policy("fail", SHA, pol)
    assert decision.exit_code == ExitCode.PASS and not decision.warn_only
    assert "ML security team" in decision.note and "line 3" in decision.note
    allowed = decision.allowed
    assert allowed is not None and (allowed.rule, allowed.file, allowed.line) == ("AMDET001", str(pol.source), 3)
    assert "ML security team" in allowed.statement and allowed.expires == pol.allow[0].expires.isoformat()
    assert apply_policy("fail", "cd" * 32, pol).exit_code == ExitCode.FAIL  # other weights: not allowed
    assert apply_policy("inconclusive", SHA, pol).exit_code == ExitCode.ERROR  # other rule: not allowed


def test_policy_init_writes_a_valid_starter(tmp_path: Path) -> None:
    target = tmp_path / ".amdet.yaml"
    assert run_cli("policy", "init", target)[0] == 0
    assert target.read_text() == STARTER_POLICY
    assert run_cli("policy", "init", target)[0] == ExitCode.USAGE  # no silent overwrite
    assert run_cli("policy", "validate", target)[0] == 0


def test_scan_uses_policy_and_flags_win(tiny_dir: Path, tmp_path: Path) -> None:
    path = write(tmp_path, "version: 1\nscan:\n  max_steps: 250\n  restarts: 2\n  n_prompts: 40\nthresholds:\n"
                 "  same_target: 0.5\n")
    code = run_cli("scan", tiny_dir, "--policy", path, "--restarts", "3", "--max-steps", "3", "--out",
                   tmp_path / "out", "-q")[0]
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["settings"]["search"]["max_steps"] == 3 and result["settings"]["search"]["restarts"] == 3
    # Three steps cannot rule a backdoor out (the floor here: two epochs over the 30
    # optimisation prompts in batches of 5, 12 steps): inconclusive (exit 2), never a pass.
    assert (code, result["verdict"]) == (ExitCode.ERROR, "inconclusive") and "below the 12" in result["reason"]
    assert result["settings"]["thresholds"]["same_target"] == 0.5
    assert result["policy"]["source"] == str(path)
    assert run_cli("scan", tiny_dir, "--policy", write(tmp_path, "version: 7\n"), "-q")[0] == ExitCode.USAGE


def test_policy_refuses_a_step_budget_below_the_floor(tmp_path: Path) -> None:
    code, out, err = run_cli("policy", "validate", write(tmp_path, "version: 1\nscan: {max_steps: 1}\n"))
    assert code == ExitCode.USAGE and "max_steps" in out + err and "200" in out + err


@pytest.mark.parametrize("text", ["thresholds: {same_target_ratio: .nan}", "thresholds: {assimilation: .NaN}",
                                  "scan: {time_budget_s: .nan}", "scan: {time_budget_s: .inf}",
                                  "thresholds: {same_target: -.inf}"])
def test_non_finite_policy_values_are_refused(tmp_path: Path, tiny_dir: Path, text: str) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(f"version: 1\n{text}\n")
    for args in (("policy", "validate", policy), ("scan", tiny_dir, "--policy", policy, "-q", "--out", tmp_path / "o")):
        code, stdout, stderr = run_cli(*args)
        assert code == ExitCode.USAGE, (args, stdout, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and "line 2" in lines[0] and ("finite" in lines[0] or "maximum" in lines[0]), stderr


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "infinity"])
def test_non_finite_settings_from_variables_and_flags_are_refused(tmp_path: Path, tiny_dir: Path, value: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "o"
    for args in (("--time-budget", value), ("--threshold", f"same_target={value}")):
        code, _, stderr = run_cli("scan", tiny_dir, *args, "-q", "--out", out)
        assert code == ExitCode.USAGE and len(stderr.strip().splitlines()) == 1, (args, stderr)
        assert "internal error" not in stderr
    monkeypatch.setenv("AMDET_TIME_BUDGET", value)
    code, _, stderr = run_cli("scan", tiny_dir, "-q", "--out", out)
    assert code == ExitCode.USAGE and "AMDET_TIME_BUDGET" in stderr and "finite" in stderr
    with pytest.raises(GateError) as info:
        amdet_gate.scan(str(tiny_dir), out=out, time_budget=float(value))
    assert info.value.exit_code == ExitCode.USAGE
