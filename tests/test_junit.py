"""The JUnit XML report (amdet_gate/report/junit.py): the structure GitLab and Jenkins read
(testsuites > testsuite > testcase > failure | error | skipped, with tests/failures/errors counts),
one test case per scanned model or encoder, the rule as the type, escaped untrusted text, and the
error report of a run without a result."""

from __future__ import annotations

import dataclasses
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from amdet_gate.errors import ExitCode
from amdet_gate.outputs import write_result
from amdet_gate.report import ErrorReport, by_name
from amdet_gate.report.junit import document, error_case, render_junit
from amdet_gate.result import EncoderDetails, LayerInfo, PolicyRecord, ScanResult, UnscannedPart, Verdict
from tests.conftest import run_cli
from tests.results import SAMPLE, sample_result

PASS = ("--max-steps", "16", "--n-prompts", "40", "--restarts", "2", "-q", "--threshold", "same_target=1")
TIME = re.compile(r"^[0-9]+\.[0-9]{3}$")  # what the Surefire/Jenkins schema's time type accepts, and more strictly
OUTCOMES = ("failure", "error", "skipped")
HOSTILE = '<script>alert(1)</script> & "q" \x00\x1b[31m\u202e\ufffe\ud800 ]]> --> \n::error::x'
FORMAT = by_name()["junit"]


def parse(data: bytes) -> ET.Element:
    """The document, checked for what CI readers rely on; returns the one test suite."""
    assert data.startswith(b"<?xml") and b"\x00" not in data and b"\x1b" not in data
    root = ET.fromstring(data)
    assert root.tag == "testsuites" and root.get("name") == "amdet-gate"
    (suite,) = root
    assert suite.tag == "testsuite" and suite.get("name") == "amdet-gate"
    cases = suite.findall("testcase")
    assert [c.tag for c in suite if c.tag != "properties"] == ["testcase"] * len(cases)
    counts = {tag: sum(c.find(tag) is not None for c in cases) for tag in OUTCOMES}
    for element in (root, suite):
        assert element.get("tests") == str(len(cases))
        assert element.get("failures") == str(counts["failure"]) and element.get("errors") == str(counts["error"])
        assert TIME.match(element.get("time", ""))
    assert suite.get("skipped") == str(counts["skipped"])
    assert float(suite.get("time")) == pytest.approx(sum(float(c.get("time")) for c in cases), abs=0.01)
    for case in cases:
        assert case.get("name") and case.get("classname") == "amdet-gate" and TIME.match(case.get("time", ""))
        marks = [child for child in case if child.tag in OUTCOMES]
        assert len(marks) <= 1 and {child.tag for child in case} <= {*OUTCOMES, "system-out"}
        for mark in marks:
            assert mark.get("message") and (mark.tag == "skipped" or re.match(r"^AMDET\d{3}$", mark.get("type")))
    for prop in suite.iter("property"):
        assert prop.get("name") and prop.get("value") is not None
    return suite


def properties(suite: ET.Element) -> dict[str, str]:
    return {p.get("name"): p.get("value") for p in suite.iter("property")}


def with_policy(result: ScanResult, exit_code: int, note: str) -> ScanResult:
    return dataclasses.replace(result, policy=PolicyRecord(source="team.yaml", sha256="ab" * 32, exit_code=exit_code,
                                                           note=note))


def test_a_finding_is_a_failure_with_the_rule_reason_score_identity_and_time() -> None:
    result = sample_result()
    suite = parse(render_junit(result))
    (case,) = suite.findall("testcase")
    failure = case.find("failure")
    assert failure.get("type") == "AMDET001" and failure.get("message") == result.reason
    assert case.get("name") == result.model.source and case.get("time") == f"{result.timings.total_s:.3f}"
    props = properties(suite)
    assert props["verdict"] == "fail" and props["exit_code"] == "1" and float(props["score"]) == result.score
    assert props["identity_sha256"] == result.model.identity_sha256 and props["source"] == result.model.source
    assert result.model.identity_sha256 in case.find("system-out").text


@pytest.mark.parametrize(("verdict", "policy", "outcome", "rule"), [
    ("pass", None, None, None),
    ("inconclusive", None, "error", "AMDET003"),
    ("fail", (0, "AMDET001 allowed by team.yaml line 4 until 2099-01-01"), None, None),
    ("inconclusive", (0, "AMDET003 reported as a warning (on_inconclusive: warn)"), None, None),
])
def test_the_exit_code_decides_failure_error_or_nothing(verdict: str, policy: tuple | None, outcome: str | None,
                                                        rule: str | None) -> None:
    result = sample_result(verdict=verdict)
    if policy is not None:
        result = with_policy(result, *policy)
    suite = parse(render_junit(result))
    (case,) = suite.findall("testcase")
    marks = [child for child in case if child.tag in OUTCOMES]
    assert [m.tag for m in marks] == ([outcome] if outcome else [])
    if outcome:
        assert marks[0].get("type") == rule
    if policy is not None:  # passed, and the finding the policy accepted is still named
        assert properties(suite)["allowed_rule"] == ("AMDET001" if verdict == "fail" else "AMDET003")
        assert properties(suite)["policy"] == policy[1]


def test_untrusted_strings_are_escaped_and_xml_safe() -> None:
    result = sample_result(model={"source": HOSTILE}, reason=HOSTILE)
    target = result.reversed_target
    tokens = tuple(dataclasses.replace(t, text=HOSTILE) for t in target.trigger_tokens)
    result = dataclasses.replace(result, reversed_target=dataclasses.replace(target, trigger_tokens=tokens))
    data = render_junit(result)
    suite = parse(data)
    (case,) = suite.findall("testcase")
    for text in (case.get("name"), case.find("failure").get("message"), properties(suite)["source"]):
        assert "<script>alert(1)</script>" in text and "\n" not in text  # text, on one line, never markup
        assert "\\u202e" in text and "\\x00" not in text and "\\u0000" in text  # hidden characters shown
    assert b"<script>" not in data and b"\n::error::" not in data
    assert ET.fromstring(data).find(".//script") is None


def test_a_model_part_that_was_not_scanned_is_a_skipped_case() -> None:
    result = sample_result()
    details = EncoderDetails(encoder="text_encoder", layout="sd3", layout_title="SD 3", key_prefix="te.", naming=None,
                             consumer=None, layer=LayerInfo(scanned="final", chosen_by="default"),
                             encoders_in_model=("text_encoder", "text_encoder_2"),
                             not_scanned=(UnscannedPart("text_encoder_3", "t5", "te3.", "not a CLIP encoder"),))
    result = with_policy(dataclasses.replace(result, verdict=Verdict.PASS, model=dataclasses.replace(result.model,
                                                                                            details=details)),
                         1, "not scanned: text_encoder_3 (t5); the policy fails the gate for it (on_unscanned: fail)")
    suite = parse(render_junit(result))
    scanned, t5 = suite.findall("testcase")
    assert scanned.get("name") == f"{result.model.source} (text_encoder)"
    assert scanned.find("failure").get("type") == "AMDET102" and "on_unscanned: fail" in scanned.find(
        "failure").get("message")
    assert t5.find("skipped") is not None and "text_encoder_3" in t5.get("name")


@pytest.mark.parametrize(("code", "tag"), [(ExitCode.ERROR, "error"), (ExitCode.NOTHING_SCANNABLE, "error"),
                                           (ExitCode.FAIL, "failure")])
def test_a_run_without_a_result_is_one_error_or_failure(code: ExitCode, tag: str) -> None:
    rule = {ExitCode.ERROR: "AMDET003", ExitCode.NOTHING_SCANNABLE: "AMDET101", ExitCode.FAIL: "AMDET100"}[code]
    error = ErrorReport(rule, f"cannot scan {HOSTILE}", "org/model", "text_encoder", code)
    suite = parse(FORMAT.render_error(error))
    (case,) = suite.findall("testcase")
    assert case.get("name") == "org/model (text_encoder)" and case.find(tag).get("type") == rule
    assert properties(suite)["exit_code"] == str(int(code))


def test_several_encoders_are_one_case_each_with_their_properties(tmp_path: Path) -> None:
    out = tmp_path / "out"
    base = sample_result()
    clean = dataclasses.replace(base, verdict=Verdict.PASS,
                                model=dataclasses.replace(base.model, subfolder="text_encoder"))
    write_result(out / "text_encoder" / "result.json", clean)
    summary = {"model": {"source": "pipe"}, "encoders": [
        {"name": "text_encoder", "result": "text_encoder/result.json", "exit_code": 0},
        {"name": "text_encoder_2", "verdict": "error", "result": None, "exit_code": 3, "rule": "AMDET101",
         "reason": "pickle weights refused"},
        {"name": "text_encoder_4", "verdict": "fail", "result": "text_encoder_4/result.json", "exit_code": 1},
        {"name": "text_encoder_5", "verdict": "pass", "result": "../../etc/passwd", "exit_code": 0}],
        "not_scanned": [{"name": "text_encoder_3", "kind": "t5", "reason": "not a CLIP encoder"}]}
    suite = parse(FORMAT.render_summary(summary, out, out))
    first, second, missing, unreadable, t5 = suite.findall("testcase")
    assert [child.tag for child in first] == ["system-out"]  # a pass
    assert second.get("name") == "pipe (text_encoder_2)" and second.find("error").get("type") == "AMDET101"
    assert missing.find("failure").get("type") == "AMDET001"  # its result is gone: still the entry's failure
    assert "cannot be read" in missing.find("failure").get("message")
    assert unreadable.find("error").get("type") == "AMDET003"  # a pass without its result is no pass
    assert "not inside the output folder" in unreadable.find("error").get("message")
    assert t5.find("skipped") is not None
    props = properties(suite)
    assert props["text_encoder.verdict"] == "pass" and props["text_encoder_2.exit_code"] == "3"


def test_readers_of_junit_see_the_cases() -> None:
    """junitparser reads the report as CI tools do (installed with the [test] extra)."""
    junitparser = pytest.importorskip("junitparser")
    data = document([error_case(ErrorReport("AMDET003", "time budget", "m", None, ExitCode.ERROR))])
    xml = junitparser.JUnitXml.fromstring(data.decode("utf-8"))
    (suite,) = list(xml)
    assert (suite.tests, suite.failures, suite.errors) == (1, 0, 1)
    (case,) = list(suite)
    (outcome,) = case.result
    assert isinstance(outcome, junitparser.Error) and outcome.type == "AMDET003" and outcome.message == "time budget"


def test_scan_writes_the_junit_report_and_its_copy_and_report_rerenders_it(tiny_dir: Path, tmp_path: Path) -> None:
    out, copy = tmp_path / "out", tmp_path / "ci" / "amdet.xml"
    code, _, stderr = run_cli("scan", tiny_dir, *PASS, "--out", out, "--junit", copy)
    assert code == ExitCode.PASS, stderr
    assert copy.read_bytes() == (out / "report.junit.xml").read_bytes()
    assert [c.tag for c in parse(copy.read_bytes()).find("testcase")] == ["system-out"]
    assert json.loads((out / "result.json").read_text())["artifacts"]["junit"] == "report.junit.xml"
    code, stdout, stderr = run_cli("report", SAMPLE, "--junit", tmp_path / "r.xml")
    assert code == 0 and "wrote" in stdout, stderr
    assert parse((tmp_path / "r.xml").read_bytes()).find("testcase/failure").get("type") == "AMDET001"


@pytest.mark.parametrize(("broken", "code", "tag"), [("config", ExitCode.ERROR, "error"),
                                                     ("weights", ExitCode.NOTHING_SCANNABLE, "error")])
def test_a_failed_run_writes_the_error_junit_like_the_error_sarif(tiny_dir: Path, tmp_path: Path, broken: str,
                                                                   code: ExitCode, tag: str) -> None:
    if broken == "config":
        (tiny_dir / "config.json").write_text("{not json")
    else:
        (tiny_dir / "model.safetensors").unlink()
    out, copy = tmp_path / "out", tmp_path / "amdet.xml"
    copy.write_text("<testsuites/>")  # a stale report must not survive
    assert run_cli("scan", tiny_dir, *PASS, "--out", out, "--junit", copy)[0] == code
    sarif = json.loads((out / "result.sarif").read_text())["runs"][0]["results"][0]
    for path in (copy, out / "report.junit.xml"):
        (case,) = parse(path.read_bytes()).findall("testcase")
        assert case.find(tag).get("type") == sarif["ruleId"]
        assert case.find(tag).get("message") == sarif["message"]["text"]


def test_a_checkpoint_with_several_encoders_gets_a_case_per_encoder_and_its_t5(tmp_path: Path) -> None:
    """The several-encoders summary through the whole gate: an SDXL-style file with one unreadable encoder, and a T5."""
    import torch

    from tests import tiny_checkpoints as tc

    clip_l, clip_g = tc.tiny_encoder(64, 2, seed=0), tc.tiny_encoder(128, 2, seed=1)
    path = tc.sd3_file(tmp_path / "sd3.safetensors", clip_l, clip_g)
    out, copy, html = tmp_path / "out", tmp_path / "ci" / "amdet.xml", tmp_path / "ci" / "amdet.html"
    code, _, stderr = run_cli("scan", path, *PASS, "--out", out, "--junit", copy, "--html", html)
    assert code == ExitCode.PASS, stderr
    assert copy.read_bytes() == (out / "report.junit.xml").read_bytes()
    suite = parse(copy.read_bytes())
    cases = suite.findall("testcase")
    assert cases[0].get("name").endswith("(text_encoder)") and cases[1].get("name").endswith("(text_encoder_2)")
    assert "text_encoder_3" in cases[2].get("name")
    assert [c.find("skipped") is not None for c in cases] == [False, False, True]
    assert properties(suite)["text_encoder_2.encoder"] == "text_encoder_2"
    for name in ("text_encoder", "text_encoder_2"):  # each encoder's own report too
        (case,) = [c for c in parse((out / name / "report.junit.xml").read_bytes()).findall("testcase")
                   if c.find("skipped") is None]
        assert case.get("name").endswith(f"({name})")
    assert 'href="../out/text_encoder_2/report.html"' in html.read_text()  # the copy links from where it lies
    assert 'href="text_encoder_2/report.html"' in (out / "report.html").read_text()

    tensors = {**tc.to_transformers(clip_l, "conditioner.embedders.0.transformer."),
               **tc.to_open_clip(clip_g, "conditioner.embedders.1.model.")}
    tensors["conditioner.embedders.1.model.ln_final.weight"] = torch.full((128,), float("nan"))
    broken = tc.save(tensors, tmp_path / "sdxl.safetensors")
    code, _, stderr = run_cli("scan", broken, *PASS, "--out", tmp_path / "b")
    assert code == ExitCode.ERROR, stderr
    good, bad = parse((tmp_path / "b" / "report.junit.xml").read_bytes()).findall("testcase")
    assert [child.tag for child in good] == ["system-out"]
    assert bad.find("error").get("type") == "AMDET003" and bad.get("name").endswith("(text_encoder_2)")
