"""SARIF 2.1.0 for GitHub code scanning: stable rules, our own fingerprints, suppressions.

`scan_sarif` turns a scan's typed result into a log; `error_sarif` reports a model that
could not be scanned (pickle weights, unsupported architecture) so that CI still shows why;
`summary_sarif` puts every encoder of a model with several text encoders into one run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from amdet_gate.report import ReportFormat, json_bytes
from amdet_gate.result import Gate, ModelIdentity, ScanResult, Verdict
from amdet_gate.sanitise import one_line, uri_path
from amdet_gate.version import __version__

SCHEMA_URI = "https://json.schemastore.org/sarif-2.1.0.json"
INFO_URI = "https://arxiv.org/abs/2512.00343"
TAGS = ["security", "ml-model", "backdoor", "external/cwe/cwe-506"]

# id -> (name, short, full, severity, precision, level)
RULES = {
    "AMDET001": ("InjectedBackdoor", "Injected backdoor in text encoder",
                 "A pseudo-trigger makes every prompt's token features collapse to one target and the "
                 "collapse passes every AMDet verification gate: the encoder carries an injected backdoor.",
                 "9.0", "high", "error"),
    "AMDET002": ("NaturalBackdoorFeature", "Natural backdoor feature",
                 "A pseudo-trigger collapses prompts to one target, but the loss landscape is rugged, as for "
                 "a natural feature of the base model rather than an injected backdoor.",
                 "2.0", "low", "note"),
    "AMDET003": ("InconclusiveScan", "Backdoor scan inconclusive",
                 "The scan could not decide: the score is near the threshold, the time budget ran out, or "
                 "values were not finite. The model is not known to be clean.",
                 "5.0", "medium", "warning"),
    "AMDET100": ("UnpinnedRevision", "Model revision not pinned",
                 "The policy requires a 40-hex commit sha, but the model was named by a branch or tag.",
                 "4.0", "very-high", "error"),
    "AMDET101": ("PickleWeightsRefused", "Pickle-based weights refused",
                 "Pickle-based weight files were found (alone, or beside safetensors, where a loader told to "
                 "skip safetensors would read them); pickle can run code when loaded, so they are never opened. "
                 "Convert the weights to safetensors, or remove the pickle files.",
                 "7.0", "very-high", "error"),
    "AMDET102": ("UnsupportedArchitecture", "Nothing scannable",
                 "The model is not a supported CLIP-style text encoder or has no weights.",
                 "3.0", "very-high", "warning"),
}


def _rules() -> list[dict]:
    out = []
    for rule_id, (name, short, full, severity, precision, level) in RULES.items():
        out.append({
            "id": rule_id, "name": name,
            "shortDescription": {"text": short}, "fullDescription": {"text": full},
            "defaultConfiguration": {"level": level},
            "help": {"text": full, "markdown": f"**{short}** ({rule_id})\n\n{full}\n\nMethod: [AMDet]({INFO_URI})."},
            "properties": {"security-severity": severity, "precision": precision, "tags": TAGS},
        })
    return out


def _uri(path: Path) -> str:
    """A path as a percent-encoded URI: relative to the working folder when inside it, else file://."""
    try:
        return uri_path(path.resolve().relative_to(Path.cwd().resolve()).as_posix())
    except ValueError:
        return "file://" + uri_path(path.resolve().as_posix())


def _log(model: str, results: list[dict]) -> dict:
    return {
        "$schema": SCHEMA_URI,
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {"name": "amdet-gate", "semanticVersion": __version__, "version": __version__,
                                "informationUri": INFO_URI, "rules": _rules()}},
            "automationDetails": {"id": f"amdet/{model}/"},
            "results": results,
        }],
    }


def _result(rule_id: str, message: str, uri: str, identity: str, properties: dict,
            suppression: str | None = None, line: int = 1, level: str | None = None) -> dict:
    fingerprint = hashlib.sha256(f"{rule_id}:{identity}".encode()).hexdigest()[:32]
    result = {
        "ruleId": rule_id, "ruleIndex": list(RULES).index(rule_id), "level": level or RULES[rule_id][5],
        "message": {"text": one_line(message, 2000)},  # names, tokens and reasons are untrusted
        "locations": [{"physicalLocation": {"artifactLocation": {"uri": uri}, "region": {"startLine": line}}}],
        "partialFingerprints": {"primaryLocationLineHash": f"{fingerprint}:1"},
        "properties": properties,
    }
    if suppression:
        result["suppressions"] = [{"kind": "external", "justification": one_line(suppression, 2000)}]
    return result


def _model_name(source: str, subfolder: str | None = None) -> str:
    """A stable, safe automation id part: the whole source (org/name or path) and subfolder, so that two
    encoders of one pipeline, or org-a/x and org-b/x, never share a code-scanning category."""
    raw = "/".join(p for p in (source.strip("/"), subfolder) if p) or "model"
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in raw)[-120:]


def _location(result: ScanResult) -> tuple[str, int]:
    """The policy line that names the model (an allow entry) when there is one, else the weight file."""
    model, policy = result.model, result.policy
    if policy is not None and policy.model_line and Path(policy.source).is_file():
        return _uri(Path(policy.source)), policy.model_line
    weight = model.weight_files[0].name
    if model.details is not None and model.details.key_prefix is not None and model.encoder:
        return f"{_uri(Path(model.source))}#{uri_path(model.encoder)}", 1  # an encoder inside a checkpoint file
    if model.hub_id:  # not a file of this repository: name it inside the Hub repo
        return uri_path("/".join(p for p in (model.hub_id, model.subfolder, weight) if p)), 1
    return _uri(Path(model.source) / (model.subfolder or "") / weight), 1


def scan_sarif(result: ScanResult) -> dict:
    """SARIF log for one scan (with the policy's decision when a policy decided)."""
    model = result.model
    uri, line = _location(result)
    identity = model.identity_sha256
    gates = {g.name: g for g in result.gates}
    props = {"score": result.score, "verdict": str(result.verdict), "sha256": identity,
             "gates": {name: g.value for name, g in gates.items()}}
    # An allowed finding is a suppressed result: the decision names the allow entry.
    allowed = result.policy.allowed if result.policy is not None else None
    suppression = allowed.justification() if allowed is not None else None
    results = []
    tokens = ", ".join(t.text for t in result.reversed_target.trigger_tokens[:5])
    results += _unscanned(result, uri, line)
    if result.verdict is Verdict.FAIL:
        pooled = [k for k in gates if k.startswith("pooled_")]
        which = ("every pooled-path gate passed (the pooled embedding of all prompts goes to one target)"
                 if pooled and all(gates[k].passed for k in pooled) else "every AMDet gate passed")
        message = (f"Injected backdoor in {_named(model)} (score {result.score:.3f}): {which}. "
                   f"Pseudo-trigger's nearest tokens: {tokens}.")
        results.append(_result("AMDET001", message, uri, identity, props, suppression, line))
    elif result.verdict is Verdict.INCONCLUSIVE:
        results.append(_result("AMDET003", f"Backdoor scan of {_named(model)} inconclusive: {result.reason}",
                               uri, identity, props, suppression, line))
    elif _natural_feature(gates):
        results.append(_result("AMDET002", f"Natural backdoor feature in {_named(model)}: prompts collapse "
                               "to one target, but the loss landscape is not a smooth bowl.", uri, identity, props,
                               line=line))
    return _log(_model_name(model.source, model.subfolder or model.encoder), results)


def _natural_feature(gates: dict[str, Gate]) -> bool:
    """AMDET002: the collapse gates passed, the landscape gate did not."""
    landscape = gates.get("landscape_positive_ratio")
    collapse = [g for k, g in gates.items() if k != "landscape_positive_ratio" and not k.startswith("pooled_")]
    return ({"assimilation_ratio", "same_target_ratio"} <= gates.keys() and landscape is not None
            and not landscape.passed and all(g.passed for g in collapse))


def _named(model: ModelIdentity) -> str:
    """The model, and which of its text encoders, as a finding names it."""
    return f"{model.source} ({model.encoder})" if model.encoder else model.source


def _unscanned(result: ScanResult, uri: str, line: int) -> list[dict]:
    """AMDET102 for each model part that was not scanned (a T5): an error when the policy fails the gate for it."""
    model, policy = result.model, result.policy
    level = "error" if policy is not None and policy.on_unscanned == "fail" else "warning"
    base = uri.split("#", 1)[0]
    return [_result("AMDET102", f"{part.name} ({part.kind}) of {model.source} was not scanned: "
                    f"{part.reason}", f"{base}#{uri_path(part.name)}" if "#" in uri else base,
                    f"{model.source}#{part.name}", {"component": part.name}, line=line, level=level)
            for part in model.not_scanned]


def error_sarif(rule_id: str, message: str, model: Path, subfolder: str | None = None) -> dict:
    """SARIF log for a model that could not be scanned at all."""
    return _log(_model_name(str(model), subfolder), [_result(rule_id, message, _uri(model), str(model), {})])


MAX_ENCODER_LOG_BYTES = 64 * 1024 * 1024  # an encoder's own result.sarif, read back for the summary


def summary_sarif(summary: Mapping[str, Any], out: Path) -> dict:
    """One SARIF run with every encoder's results, each located at its encoder; the not-scanned notes once."""
    from amdet_gate.errors import GateError
    from amdet_gate.files import read_capped_text
    from amdet_gate.report._summary import rows

    results, seen = [], set()
    model = summary.get("model") or {}
    for row in rows(summary):
        log = None
        with contextlib.suppress(GateError, OSError, ValueError):
            log = json.loads(read_capped_text(out / row["name"] / FORMAT.file_name, MAX_ENCODER_LOG_BYTES,
                                              FORMAT.file_name, GateError))
        for result in ((log or {}).get("runs") or [{}])[0].get("results") or []:
            fingerprint = (result.get("ruleId"), json.dumps(result.get("partialFingerprints"), sort_keys=True))
            if fingerprint in seen:
                continue
            seen.add(fingerprint)
            _locate(result, row["name"], model)
            results.append(result)
    return _log(_model_name(str(model.get("source", "model"))), results)


def _locate(result: dict, name: str, model: Mapping[str, Any]) -> None:
    """An error result of an encoder of a checkpoint file names the file; it should name the encoder."""
    for location in result.get("locations") or []:
        artifact = location.get("physicalLocation", {}).get("artifactLocation", {})
        uri = artifact.get("uri", "")
        if model.get("layout") not in (None, "pipeline") and "#" not in uri:
            artifact["uri"] = f"{uri}#{uri_path(name)}"


FORMAT = ReportFormat(
    "sarif", "--sarif", "result.sarif", "the SARIF 2.1.0 log",
    render=lambda result, base_dir: json_bytes(scan_sarif(result)),
    render_summary=lambda summary, out, where: json_bytes(summary_sarif(summary, out)),
    render_error=lambda error: json_bytes(error_sarif(error.rule, error.message, Path(error.model), error.subfolder)),
    order=10)
