"""SARIF 2.1.0 for GitHub code scanning: stable rules, our own fingerprints, suppressions.

`scan_sarif` turns a scan's result.json data into a log; `error_sarif` reports a model that
could not be scanned (pickle weights, unsupported architecture) so that CI still shows why.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from amdet_gate import __version__
from amdet_gate.sanitise import one_line, uri_path

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


def _location(result: dict) -> tuple[str, int]:
    """The policy line that names the model (an allow entry) when there is one, else the weight file."""
    model, policy = result["model"], result.get("policy") or {}
    if policy.get("model_line") and Path(policy.get("source", "")).is_file():
        return _uri(Path(policy["source"])), int(policy["model_line"])
    weight = model["weight_files"][0]["name"]
    if model.get("key_prefix") is not None and model.get("encoder"):  # an encoder inside a checkpoint file
        return f"{_uri(Path(model['source']))}#{uri_path(model['encoder'])}", 1
    if model.get("hub_id"):  # not a file of this repository: name it inside the Hub repo
        return uri_path("/".join(p for p in (model["hub_id"], model.get("subfolder"), weight) if p)), 1
    return _uri(Path(model["source"]) / (model.get("subfolder") or "") / weight), 1


def scan_sarif(result: dict) -> dict:
    """SARIF log for one scan (result.json data, with the `policy` block when a policy decided)."""
    model = result["model"]
    uri, line = _location(result)
    identity = model["identity_sha256"]
    gates = {k: v for k, v in result["gates"].items() if isinstance(v, dict)}
    props = {"score": result["score"], "verdict": result["verdict"], "sha256": identity,
             "gates": {k: v["value"] for k, v in gates.items()}}
    note = (result.get("policy") or {}).get("note", "")
    results = []
    tokens = ", ".join(t["text"] for t in result["reversed_target"]["trigger_tokens"][:5])
    results += _unscanned(result, uri, line)
    if result["verdict"] == "fail":
        pooled = [k for k in gates if k.startswith("pooled_")]
        which = ("every pooled-path gate passed (the pooled embedding of all prompts goes to one target)"
                 if pooled and all(gates[k]["passed"] for k in pooled) else "every AMDet gate passed")
        message = (f"Injected backdoor in {_named(model)} (score {result['score']:.3f}): {which}. "
                   f"Pseudo-trigger's nearest tokens: {tokens}.")
        results.append(_result("AMDET001", message, uri, identity, props,
                               note if "allowed by" in note else None, line))
    elif result["verdict"] == "inconclusive":
        results.append(_result("AMDET003", f"Backdoor scan of {_named(model)} inconclusive: {result['reason']}",
                               uri, identity, props, note if "allowed by" in note else None, line))
    elif {"assimilation_ratio", "same_target_ratio"} <= gates.keys() and all(
            gates[k]["passed"] for k in gates if k != "landscape_positive_ratio" and not k.startswith("pooled_")) and \
            not gates.get("landscape_positive_ratio", {"passed": True})["passed"]:
        results.append(_result("AMDET002", f"Natural backdoor feature in {_named(model)}: prompts collapse "
                               "to one target, but the loss landscape is not a smooth bowl.", uri, identity, props,
                               line=line))
    return _log(_model_name(model["source"], model.get("subfolder") or model.get("encoder")), results)


def _named(model: dict) -> str:
    """The model, and which of its text encoders, as a finding names it."""
    encoder = model.get("encoder")
    return f"{model['source']} ({encoder})" if encoder else model["source"]


def _unscanned(result: dict, uri: str, line: int) -> list[dict]:
    """AMDET102 for each model part that was not scanned (a T5): an error when the policy fails the gate for it."""
    model, policy = result["model"], result.get("policy") or {}
    level = "error" if policy.get("on_unscanned") == "fail" else "warning"
    base = uri.split("#", 1)[0]
    return [_result("AMDET102", f"{part['name']} ({part['kind']}) of {model['source']} was not scanned: "
                    f"{part['reason']}", f"{base}#{uri_path(part['name'])}" if "#" in uri else base,
                    f"{model['source']}#{part['name']}", {"component": part["name"]}, line=line, level=level)
            for part in model.get("not_scanned") or [] if isinstance(part, dict)]


def error_sarif(rule_id: str, message: str, model: Path, subfolder: str | None = None) -> dict:
    """SARIF log for a model that could not be scanned at all."""
    return _log(_model_name(str(model), subfolder), [_result(rule_id, message, _uri(model), str(model), {})])
