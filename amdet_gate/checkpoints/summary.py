"""The reports of a model with several text encoders (multiscan.py), and the lines every report adds
about which encoder was scanned and what was not.

Every string from result.json is untrusted (a file can be named anything, a layout title quotes
it): Markdown goes through `md_text`, HTML through Jinja2's autoescape, SARIF through sarif.py.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import os
from pathlib import Path

import jinja2

from amdet_gate.result import ModelIdentity
from amdet_gate.sanitise import md_text, uri_path, visible

VERDICT_MARK = {"pass": "✅ PASS", "fail": "❌ FAIL", "inconclusive": "⚠️ INCONCLUSIVE", "error": "⚠️ ERROR"}


def encoder_lines(model: ModelIdentity) -> list[tuple[str, str]]:
    """(label, text) rows for one encoder's report: which encoder, which layer, which config, the LoRA,
    and every part of the model that was not scanned. Empty for a plain encoder folder."""
    details = model.details
    if details is None:
        return []
    rows = []
    if details.encoder or details.layout:
        where = details.layout_title or details.layout or ""
        rows.append(("Encoder", f"{details.encoder or 'the model'}" + (f" ({where})" if where else "")))
    layer = details.layer
    scanned = "the final layer (after the final LayerNorm)" if layer.scanned == "final" else \
        f"hidden_states[{layer.scanned}] (no final LayerNorm)"
    by, reads = layer.chosen_by, layer.consumer_reads
    why = "set by --layer" if by == "--layer" else "the default" if by == "default" else f"what {by} reads"
    rows.append(("Layer", f"{scanned}, {why}" + (f" (the pipeline reads {reads}; --layer consumer scans it)"
                                                  if reads is not None else "")
                 + (f"; {details.consumer}" if details.consumer else "")))
    if details.config_source is not None and details.config_source.note:
        rows.append(("Config", details.config_source.note))
    lora = details.lora
    if lora is not None:
        rows.append(("LoRA", f"{lora.file} ({lora.format}, scale {lora.scale}, "
                     f"{lora.modules_merged} layers merged into this encoder)"))
    rows += [("Not scanned", f"{part.name} ({part.kind}): {part.reason}") for part in details.not_scanned]
    return rows


def encoder_markdown(model: ModelIdentity) -> list[str]:
    return [line for label, text in encoder_lines(model) for line in (f"**{label}** {md_text(text, 400)}", "")]


def _rows(summary: dict) -> list[dict]:
    rows = []
    for entry in summary.get("encoders") or []:
        layer = entry.get("layer") or {}
        rows.append({"name": str(entry.get("name")), "verdict": str(entry.get("verdict")),
                     "score": entry.get("score"), "exit_code": entry.get("exit_code"),
                     "layer": str(layer.get("scanned", "")) if isinstance(layer, dict) else "",
                     "reason": str(entry.get("reason") or ""), "report": entry.get("report"),
                     "identity": str(entry.get("identity_sha256") or "")})
    return rows


def _score(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) and not isinstance(value, bool) else "n/a"


def render_markdown(summary: dict, out: Path) -> str:
    model = summary.get("model") or {}
    verdict = str(summary.get("verdict"))
    lines = [f"## amdet-gate: {VERDICT_MARK.get(verdict, md_text(verdict))}: {len(summary.get('encoders') or [])} "
             f"text encoders (exit {summary.get('exit_code')})", "",
             f"**Model** {md_text(model.get('source', '?'))}"
             + (f" ({md_text(model['layout_title'])})" if model.get("layout_title") else ""), "",
             "| encoder | verdict | score | layer | reason |", "|---|---|---|---|---|"]
    for row in _rows(summary):
        lines.append(f"| {md_text(row['name'])} | {VERDICT_MARK.get(row['verdict'], md_text(row['verdict']))} | "
                     f"{_score(row['score'])} | {md_text(row['layer'])} | {md_text(row['reason'], 200)} |")
    lines.append("")
    for part in summary.get("not_scanned") or []:
        lines += [f"**Not scanned** {md_text(part.get('name'))} ({md_text(part.get('kind'))}): "
                  f"{md_text(part.get('reason'), 300)}", ""]
    for row in _rows(summary):
        text = None
        with contextlib.suppress(OSError, UnicodeDecodeError):
            text = (out / row["name"] / "summary.md").read_text("utf-8")
        if text:
            lines += ["<details><summary>" + md_text(row["name"]) + "</summary>", "", text.replace("## ", "### ", 1),
                      "</details>", ""]
    return "\n".join(lines) + "\n"


def _template() -> jinja2.Template:
    source = importlib.resources.files("amdet_gate.templates").joinpath("encoders.html.j2").read_text("utf-8")
    return jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string(source)



def render_html(summary: dict, out: Path, where: Path) -> str:
    """The model's page; links to each encoder's report are relative to `where`, the page's folder."""
    model = summary.get("model") or {}
    rows = []
    for row in _rows(summary):
        link = None
        if row["report"] and (out / row["report"]).is_file():
            link = uri_path(Path(os.path.relpath((out / row["report"]).resolve(), where.resolve())).as_posix())
        rows.append({**{k: visible(str(v)) for k, v in row.items()}, "score": _score(row["score"]), "link": link})
    parts = [{k: visible(str(p.get(k))) for k in ("name", "kind", "reason")} for p in summary.get("not_scanned") or []]
    return _template().render(verdict=str(summary.get("verdict")), exit_code=summary.get("exit_code"),
                        source=visible(str(model.get("source", "?"))), title=visible(str(model.get("layout_title")))
                        if model.get("layout_title") else None, rows=rows, not_scanned=parts,
                        version=(summary.get("tool") or {}).get("version", "?"))


def summary_sarif(summary: dict, out: Path) -> dict:
    """One SARIF run with every encoder's results, each located at its encoder; the not-scanned notes once."""
    from amdet_gate.sarif import _log, _model_name

    results, seen = [], set()
    model = summary.get("model") or {}
    for row in _rows(summary):
        log = None
        with contextlib.suppress(OSError, ValueError):
            log = json.loads((out / row["name"] / "result.sarif").read_text("utf-8"))
        for result in ((log or {}).get("runs") or [{}])[0].get("results") or []:
            fingerprint = (result.get("ruleId"), json.dumps(result.get("partialFingerprints"), sort_keys=True))
            if fingerprint in seen:
                continue
            seen.add(fingerprint)
            _locate(result, row["name"], model)
            results.append(result)
    return _log(_model_name(str(model.get("source", "model"))), results)


def _locate(result: dict, name: str, model: dict) -> None:
    """An error result of an encoder of a checkpoint file names the file; it should name the encoder."""
    for location in result.get("locations") or []:
        artifact = location.get("physicalLocation", {}).get("artifactLocation", {})
        uri = artifact.get("uri", "")
        if model.get("layout") not in (None, "pipeline") and "#" not in uri:
            artifact["uri"] = f"{uri}#{uri_path(name)}"
