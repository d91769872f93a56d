"""JUnit XML, for CI test views: GitLab's test report (`artifacts:reports:junit`), Jenkins' `junit`
step, Azure Pipelines, CircleCI. A scan is a test the model passes or fails:

  <testsuites name="amdet-gate" tests failures errors time>
    <testsuite name="amdet-gate" tests failures errors skipped time>
      <properties>     verdict, score, exit code and identity of every test case (prefixed by the
                       encoder's name when a model has several)
      <testcase classname="amdet-gate" name="MODEL (ENCODER)" time="the scan's seconds">
        <failure type="AMDET001" message="the reason"/>    exit 1: a backdoor, a policy violation
        <error type="AMDET003" message="the reason"/>      exit 2 or 3: inconclusive, an error
        (nothing)                                          exit 0: pass (an allowed finding too)
        <system-out>   the verdict, score, identity, policy, gates and nearest tokens, as text
      <testcase name="MODEL: t5xxl (t5)"><skipped/>         a part that was not scanned (a T5):
                                                            reported, never counted as passed

One test case per scanned model; for a model with several text encoders one per encoder (read
from each encoder's result.json). Properties sit on the suite, not the test case: the Jenkins
and Surefire schemas allow them only there. Every string from the result is untrusted (model
names, reasons, tokens): it passes `sanitise.one_line`, then any character XML 1.0 forbids is
dropped, and ElementTree escapes markup; nothing from the result becomes an element or
attribute name. The output is deterministic: no timestamp, no host name.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path, PurePosixPath
from typing import Any

from amdet_gate.errors import ExitCode, GateError
from amdet_gate.report import ErrorReport, ReportFormat
from amdet_gate.result import ScanResult, Verdict
from amdet_gate.sanitise import one_line

SUITE = "amdet-gate"
VERDICT_EXIT = {Verdict.PASS: ExitCode.PASS, Verdict.FAIL: ExitCode.FAIL, Verdict.INCONCLUSIVE: ExitCode.ERROR}
# An encoder without a readable result: its rule by verdict, else by exit code (an older summary has no rule).
VERDICT_RULE = {"fail": "AMDET001", "inconclusive": "AMDET003"}
FALLBACK_RULE = {ExitCode.FAIL: "AMDET100", ExitCode.NOTHING_SCANNABLE: "AMDET102"}
MESSAGE_CHARS = 1000
DETAIL_CHARS = 400
# Outside XML 1.0's Char production; one_line already escapes them, this keeps that promise here.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


class Outcome(Enum):
    """What the test case says: the element a CI reads (none for a pass)."""

    PASSED = None
    FAILURE = "failure"
    ERROR = "error"
    SKIPPED = "skipped"

    @classmethod
    def of(cls, code: ExitCode) -> Outcome:
        return cls.PASSED if code == ExitCode.PASS else cls.FAILURE if code == ExitCode.FAIL else cls.ERROR


@dataclass(frozen=True)
class Case:
    """One test case, before it is XML; strings still untrusted."""

    name: str
    outcome: Outcome
    rule: str | None  # the <failure>/<error> type: the SARIF rule id
    message: str  # one line: the reason
    seconds: float
    properties: tuple[tuple[str, str], ...] = ()
    details: tuple[str, ...] = ()  # lines of <system-out>
    key: str | None = None  # the encoder: its properties' prefix when the suite has several cases


def _text(value: object, limit: int) -> str:
    return _NOT_XML.sub("", one_line(value, limit))


def _number(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return "n/a"
    return f"{value:.3f}"  # as the Markdown summary and the HTML report show scores and gate values


def _seconds(value: object) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    return float(value) if ok else 0.0


def _case_name(source: str, *parts: str | None) -> str:
    """`org/name (text_encoder_2)`: the source and, once each, its subfolder and encoder."""
    extra = list(dict.fromkeys(p for p in parts if p))
    return f"{source} ({', '.join(extra)})" if extra else source


def _rule(result: ScanResult, code: ExitCode) -> str | None:
    if result.verdict == Verdict.FAIL:
        return "AMDET001"
    if result.verdict == Verdict.INCONCLUSIVE:
        return "AMDET003"
    return "AMDET102" if code != ExitCode.PASS and result.model.not_scanned else None  # on_unscanned: fail


def result_case(result: ScanResult) -> Case:
    """The test case of one scan: its exit code is the policy's decision when a policy decided."""
    model, policy = result.model, result.policy
    code = ExitCode(policy.exit_code) if policy is not None else VERDICT_EXIT[Verdict(result.verdict)]
    rule = _rule(result, code)
    # A pass whose exit code the policy changed (a part not scanned) says why in the policy's note.
    reason = policy.note if result.verdict == Verdict.PASS and code != ExitCode.PASS and policy else result.reason
    properties = [("verdict", str(result.verdict)), ("score", _number(result.score)), ("exit_code", str(int(code))),
                  ("source", model.source), ("identity_sha256", model.identity_sha256)]
    properties += [(key, value) for key, value in (("hub_id", model.hub_id), ("revision", model.revision),
                                                   ("resolved_sha", model.resolved_sha),
                                                   ("subfolder", model.subfolder), ("encoder", model.encoder))
                   if value]
    if rule is not None and code == ExitCode.PASS:  # an allowed or warn-only finding: passed, and still named
        properties.append(("allowed_rule", rule))
    if policy is not None and policy.note:
        properties.append(("policy", policy.note))
    if result.cache_hit:
        properties.append(("cache_hit", "true"))
    details = [f"verdict {result.verdict}, score {_number(result.score)}, exit {int(code)}",
               f"model {model.source}" + (f" at {model.resolved_sha}" if model.resolved_sha else ""),
               f"identity (sha256) {model.identity_sha256}", f"reason {result.reason}"]
    if policy is not None and policy.note:
        details.append(f"policy {policy.note}")
    details += [f"gate {g.name}: {_number(g.value)} against {_number(g.threshold)}, "
                f"{'passed (evidence of a backdoor)' if g.passed else 'not passed'}" for g in result.gates]
    tokens = [t.text for t in result.reversed_target.trigger_tokens[:5]]
    if tokens:
        details.append("pseudo-trigger, nearest tokens: " + ", ".join(repr(t) for t in tokens))
    return Case(_case_name(model.source, model.subfolder, model.encoder), Outcome.of(code), rule, reason,
                _seconds(result.timings.total_s), tuple(properties), tuple(details), model.encoder or model.subfolder)


def unscanned_cases(source: str, parts: Iterable[Mapping[str, Any]]) -> list[Case]:
    """A skipped test case for each part of the model that was not scanned (a T5 encoder)."""
    return [Case(f"{source}: {p.get('name')} ({p.get('kind')})", Outcome.SKIPPED, "AMDET102",
                 f"not scanned: {p.get('reason')}", 0.0) for p in parts]


def error_case(error: ErrorReport) -> Case:
    return Case(_case_name(error.model, error.subfolder), Outcome.of(error.exit_code), error.rule, error.message,
                0.0, (("verdict", "error"), ("exit_code", str(int(error.exit_code))), ("source", error.model)),
                (f"exit {int(error.exit_code)}: {error.message}",), error.subfolder)


def document(cases: list[Case]) -> bytes:
    """The JUnit XML of these test cases: one suite, counts on the suite and on the root."""
    prefixed = len([c for c in cases if c.properties]) > 1  # several encoders: their properties by case
    counts = {"tests": str(len(cases)),
              "failures": str(sum(c.outcome is Outcome.FAILURE for c in cases)),
              "errors": str(sum(c.outcome is Outcome.ERROR for c in cases))}
    total = f"{sum(c.seconds for c in cases):.3f}"
    root = ET.Element("testsuites", {"name": SUITE, **counts, "time": total})
    suite = ET.SubElement(root, "testsuite", {"name": SUITE, **counts,
                                              "skipped": str(sum(c.outcome is Outcome.SKIPPED for c in cases)),
                                              "time": total})
    rows = [(f"{_text(case.key or f'case{index}', 80)}.{key}" if prefixed else key, value)
            for index, case in enumerate(cases, 1) for key, value in case.properties]
    if rows:
        properties = ET.SubElement(suite, "properties")
        for name, value in rows:
            ET.SubElement(properties, "property", {"name": name, "value": _text(value, MESSAGE_CHARS)})
    for case in cases:
        element = ET.SubElement(suite, "testcase", {"classname": SUITE, "name": _text(case.name, 300),
                                                    "time": f"{case.seconds:.3f}"})
        if case.outcome.value is not None:
            attributes = {"message": _text(case.message, MESSAGE_CHARS)}
            if case.rule is not None:
                attributes["type"] = _text(case.rule, 40)
            mark = ET.SubElement(element, case.outcome.value, attributes)
            mark.text = _text(case.message, MESSAGE_CHARS)
        if case.details:
            ET.SubElement(element, "system-out").text = "\n".join(_text(line, DETAIL_CHARS) for line in case.details)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def render_junit(result: ScanResult) -> bytes:
    return document([result_case(result), *unscanned_cases(result.model.source,
                                                           ({"name": p.name, "kind": p.kind, "reason": p.reason}
                                                            for p in result.model.not_scanned))])


def render_summary_junit(summary: Mapping[str, Any], out: Path) -> bytes:
    """A model with several text encoders: a test case per encoder, from its own result.json."""
    from amdet_gate.outputs import read_result

    source = str((summary.get("model") or {}).get("source", "model"))
    cases = []
    for entry in summary.get("encoders") or []:
        name, reason = str(entry.get("name")), str(entry.get("reason") or "no result")
        rel = entry.get("result")
        if isinstance(rel, str) and (PurePosixPath(rel).is_absolute() or ".." in PurePosixPath(rel).parts):
            reason = "its result is not inside the output folder"  # the summary names files of --out only
        elif isinstance(rel, str):
            try:
                cases.append(result_case(read_result(out / rel)))
                continue
            except GateError as exc:  # gone or not a result: never a pass
                reason = f"its result cannot be read: {exc}"
        code = ExitCode(entry["exit_code"]) if entry.get("exit_code") in set(ExitCode) else ExitCode.ERROR
        code = ExitCode.ERROR if code == ExitCode.PASS else code
        rule = entry.get("rule") if isinstance(entry.get("rule"), str) else (
            VERDICT_RULE.get(str(entry.get("verdict"))) or FALLBACK_RULE.get(code, "AMDET003"))
        cases.append(error_case(ErrorReport(rule, reason, source, name, code)))
    return document(cases + unscanned_cases(source, summary.get("not_scanned") or []))


FORMAT = ReportFormat(
    "junit", "--junit", "report.junit.xml", "the JUnit XML report",
    render=lambda result, base_dir: render_junit(result),
    render_summary=lambda summary, out, where: render_summary_junit(summary, out),
    render_error=lambda error: document([error_case(error)]),
    order=40)
