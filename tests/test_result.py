"""The typed result: frozen types, one dump and one validating load, and the shipped JSON Schema.

Every result.json the suite's scans write is also checked as it is written (conftest:
`written_results_are_valid`): valid against schemas/result.schema.json, loaded back to the same typed
result, re-dumped to the same bytes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jsonschema
import pytest

import amdet_gate
from amdet_gate.errors import ExitCode
from amdet_gate.report.sarif import scan_sarif
from amdet_gate.result import (
    SCHEMA_VERSION,
    AllowedBy,
    GateTable,
    PolicyRecord,
    ResultError,
    ScanResult,
    StopReason,
    Verdict,
    dump,
    dumps,
    from_dict,
    load,
    result_schema,
)
from amdet_gate.result.document import shipped_schema
from tests.conftest import run_cli
from tests.results import SAMPLE, WRITTEN_RESULTS, sample_data, sample_result

PASS = ("--max-steps", "16", "--n-prompts", "40", "--restarts", "2", "-q", "--threshold", "same_target=1")


# --- the schema ----------------------------------------------------------------------------------

def test_the_shipped_schema_is_the_one_the_types_describe() -> None:
    """schemas/result.schema.json is generated from the types (codec.schema_of); after a change to them,
    regenerate it: `python -m amdet_gate.result > amdet_gate/schemas/result.schema.json`."""
    assert shipped_schema() == result_schema()
    jsonschema.Draft202012Validator.check_schema(shipped_schema())
    assert shipped_schema()["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_the_version_is_1_3_and_documented() -> None:
    assert SCHEMA_VERSION == "1.3"
    reports = (Path(__file__).parents[1] / "docs" / "reports.md").read_text("utf-8")
    assert "schema 1.3" in reports and "result.schema.json" in reports


# --- real scans ----------------------------------------------------------------------------------

def test_a_real_scan_round_trips(tiny_dir: Path, tmp_path: Path) -> None:
    before = len(WRITTEN_RESULTS)
    outcome = amdet_gate.scan(str(tiny_dir), out=tmp_path / "o", use_cache=False, max_steps=16, n_prompts=40,
                              restarts=2, thresholds={"same_target": 1.0})
    assert len(WRITTEN_RESULTS) == before + 1  # checked as written (conftest)
    text = (tmp_path / "o" / "result.json").read_text("utf-8")
    typed = load(text)
    assert typed == outcome.scan_result and load(dumps(typed)) == typed and dumps(typed) == text
    assert outcome.result == dump(typed) == json.loads(text)  # the public API's dict is result.json's data
    assert outcome.result["verdict"] == typed.verdict == "pass" and typed.verdict is Verdict.PASS
    assert typed.schema_version == "1.3" and typed.search.stop_reason is StopReason.MAX_STEPS
    assert typed.policy is not None and typed.policy.allowed is None and not typed.policy.warn_only
    assert outcome.decision is not None and outcome.decision.exit_code == outcome.exit_code == ExitCode.PASS
    # mean_assimilation is a measure of the check, not a gate: typed beside the table, in JSON inside it.
    assert "mean_assimilation" not in typed.gates.names and typed.gates.mean_assimilation is not None
    assert json.loads(text)["gates"]["mean_assimilation"] == typed.gates.mean_assimilation
    with pytest.raises(dataclasses.FrozenInstanceError):
        typed.verdict = Verdict.FAIL  # type: ignore[misc]
    # A cache hit reads the stored result back through the same load.
    hit = amdet_gate.scan(str(tiny_dir), out=tmp_path / "again", max_steps=16, n_prompts=40, restarts=2,
                          thresholds={"same_target": 1.0})
    miss_then_hit = amdet_gate.scan(str(tiny_dir), out=tmp_path / "third", max_steps=16, n_prompts=40, restarts=2,
                                    thresholds={"same_target": 1.0})
    assert not hit.cache_hit and miss_then_hit.cache_hit and miss_then_hit.scan_result.cache_hit is True
    assert dataclasses.replace(miss_then_hit.scan_result, cache_hit=None, model=hit.scan_result.model) == \
        hit.scan_result


def test_the_sample_of_schema_1_0_still_loads() -> None:
    typed = load(SAMPLE.read_text("utf-8"))
    assert typed.schema_version == "1.0" and typed.verdict is Verdict.FAIL and typed.pooled is None
    assert typed.gates.names == ("assimilation_ratio", "same_target_ratio", "landscape_positive_ratio")
    assert typed.reversed_target.trigger_vectors is None and typed.reversed_target.vectors == 1
    assert load(dumps(typed)) == typed


# --- hostile input -------------------------------------------------------------------------------

def _refused(text: str, message: str) -> None:
    with pytest.raises(ResultError) as info:
        load(text)
    assert info.value.exit_code == ExitCode.USAGE and "\n" not in str(info.value) and message in str(info.value)


def test_load_refuses_what_is_not_a_result() -> None:
    sample = sample_data()
    _refused("[]", "not an amdet-gate result.json")
    _refused("{", "not JSON")
    _refused('{"a": NaN}', "NaN is not JSON")
    _refused('{"a": 1, "a": 2}', "duplicate key 'a'")
    _refused("[" * 100_000 + "]" * 100_000, "not JSON")
    _refused(json.dumps(sample | {"schema_version": "2.0"}), "this version reads 1.x")
    _refused(json.dumps(sample | {"verdict": "maybe"}), "well-formed")
    _refused(json.dumps(sample | {"score": "1"}), "score")
    _refused(json.dumps(sample | {"extra": 1}), "well-formed")
    _refused(json.dumps(sample | {"search": sample["search"] | {"stop_reason": "bored"}}), "stop_reason")
    _refused(json.dumps(sample | {"gates": {"g": 1.0}}), "gates")
    _refused(json.dumps(sample | {"model": sample["model"] | {"weight_files": [{"name": 1}]}}), "weight_files")
    nested = sample | {"model": sample["model"] | {"config": {"x": json.loads("[" * 40 + "1" + "]" * 40)}}}
    assert from_dict(nested).model.config["x"]  # opaque config is kept as read


def test_report_of_a_hostile_result_is_exit_4_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "result.json"
    bad.write_text(json.dumps(sample_data(verdict="pass\n::error::forged")))
    code, _, stderr = run_cli("report", bad, "--markdown", tmp_path / "s.md")
    assert code == ExitCode.USAGE and "well-formed" in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s.md").exists()


# --- the policy's decision -----------------------------------------------------------------------

def _with_policy(**record: object) -> ScanResult:
    base = {"source": "policy.yaml", "sha256": "ab" * 32, "exit_code": 0, "note": "", "model_line": None,
            "on_unscanned": "warn"}
    return dataclasses.replace(sample_result(), policy=PolicyRecord(**(base | record)))


def test_sarif_suppressions_come_from_the_decision_not_the_note() -> None:
    allowed = AllowedBy("AMDET001", "policy.yaml", 3, "2099-01-01", "red team, accepted by security")
    cases = {
        "allowed": _with_policy(allowed=allowed, note=allowed.justification()),
        "note only": _with_policy(note="AMDET001 allowed by a note someone wrote"),  # no allow entry: no suppression
        "warn only": _with_policy(warn_only=True, note="AMDET001 reported as a warning (on_finding: warn)"),
        "no policy": dataclasses.replace(sample_result(), policy=None),
    }
    suppressions = {name: scan_sarif(r)["runs"][0]["results"][0].get("suppressions") for name, r in cases.items()}
    assert suppressions["allowed"] == [{"kind": "external", "justification":
                                        "AMDET001 allowed by policy.yaml line 3 until 2099-01-01: red team, "
                                        "accepted by security"}]
    assert suppressions["note only"] is None and suppressions["warn only"] is None and suppressions["no policy"] is None
    assert load(dumps(cases["allowed"])) == cases["allowed"]


def test_the_gate_table_is_typed() -> None:
    gates = sample_result().gates
    assert isinstance(gates, GateTable) and gates["same_target_ratio"].passed is True
    assert gates.get("pooled_same_target_ratio") is None and len(gates) == 3
    assert list(dump(sample_result())["gates"]) == [*gates.names, "mean_assimilation"]
