"""The Markdown summary of a scan: for pull-request comments and GitHub's job summary.

Model names, tokens and prompts are untrusted. GitHub renders Markdown and an HTML subset
in job summaries, so every untrusted string goes through `sanitise.md_text`: one line, HTML
characters as entities, Markdown punctuation backslash-escaped. A token such as
`![x](https://tracker.example/p.png)` shows as text and fetches nothing.

Three summaries: one scan's (`render_markdown`), a model with several text encoders'
(`render_summary_markdown`: a table of the encoders, then each encoder's own summary) and a run
that ended without a result (`render_error_markdown`), which the job summary gets too.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from amdet_gate.checkpoints.summary import encoder_markdown
from amdet_gate.errors import ExitCode
from amdet_gate.report import ErrorReport, ReportFormat
from amdet_gate.result import ScanResult
from amdet_gate.sanitise import md_text

VERDICT_MARK = {"pass": "✅ PASS", "fail": "❌ FAIL", "inconclusive": "⚠️ INCONCLUSIVE", "error": "⚠️ ERROR"}
MAX_ENCODER_SUMMARY_BYTES = 1024 * 1024  # an encoder's own summary.md, read back for the model's summary


def _num(value: float | None, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}"


def render_markdown(result: ScanResult) -> str:
    """The summary: verdict, identity, gates against thresholds, reversed target, policy."""
    model = result.model
    lines = [
        f"## amdet-gate: {VERDICT_MARK[result.verdict]} (score {_num(result.score)})",
        "",
        f"**Model** {md_text(model.source)}"
        + (f" at `{md_text(model.resolved_sha)}`" if model.resolved_sha else "")
        + (f", subfolder {md_text(model.subfolder)}" if model.subfolder else ""),
        "",
        *encoder_markdown(model),  # which encoder and layer; what was not scanned (amdet_gate/checkpoints)
        f"**Identity (sha256)** `{md_text(model.identity_sha256)}`",
        "",
        f"**Reason** {md_text(result.reason)}",
        "",
    ]
    if result.policy is not None and result.policy.note:
        lines += [f"**Policy** {md_text(result.policy.note)}", ""]
    if result.gates.rows:
        # A passed gate is evidence of a backdoor: the column says whether the gate's condition held.
        lines += ["| gate | value | threshold | gate passed (evidence of a backdoor) |", "|---|---|---|---|"]
        for gate in result.gates:
            mark = "**yes**" if gate.passed else "no"
            lines.append(f"| {md_text(gate.name)} | {_num(gate.value)} | {_num(gate.threshold)} | {mark} |")
        lines.append("")
    target = result.reversed_target
    trigger = [md_text(t.text, 40) for t in target.trigger_tokens[:5]]
    targets = [md_text(t.text, 40) for t in target.target_tokens[:5]]
    if trigger:
        lines += [f"**Pseudo-trigger, nearest tokens** {', '.join(trigger)}", ""]
    if targets:
        lines += [f"**Reversed target, nearest tokens** {', '.join(targets)}", ""]
    lines.append(f"<sub>amdet-gate {md_text(result.tool.version)}, scan {_num(result.timings.total_s, 1)} s"
                 f"{', from the verdict cache' if result.cache_hit else ''}. "
                 "The HTML report has the evidence.</sub>")
    return "\n".join(lines) + "\n"


def render_summary_markdown(summary: Mapping[str, Any], out: Path) -> str:
    """A model with several text encoders: the table of encoders, the parts not scanned, each encoder's summary."""
    from amdet_gate.errors import GateError
    from amdet_gate.files import read_capped_text
    from amdet_gate.report._summary import rows, score

    model = summary.get("model") or {}
    verdict = str(summary.get("verdict"))
    lines = [f"## amdet-gate: {VERDICT_MARK.get(verdict, md_text(verdict))}: {len(summary.get('encoders') or [])} "
             f"text encoders (exit {summary.get('exit_code')})", "",
             f"**Model** {md_text(model.get('source', '?'))}"
             + (f" ({md_text(model['layout_title'])})" if model.get("layout_title") else ""), "",
             "| encoder | verdict | score | layer | reason |", "|---|---|---|---|---|"]
    for row in rows(summary):
        lines.append(f"| {md_text(row['name'])} | {VERDICT_MARK.get(row['verdict'], md_text(row['verdict']))} | "
                     f"{score(row['score'])} | {md_text(row['layer'])} | {md_text(row['reason'], 200)} |")
    lines.append("")
    for part in summary.get("not_scanned") or []:
        lines += [f"**Not scanned** {md_text(part.get('name'))} ({md_text(part.get('kind'))}): "
                  f"{md_text(part.get('reason'), 300)}", ""]
    for row in rows(summary):
        text = None
        with contextlib.suppress(GateError, OSError):  # an encoder that wrote no summary is in the table only
            text = read_capped_text(out / row["name"] / FORMAT.file_name, MAX_ENCODER_SUMMARY_BYTES,
                                    FORMAT.file_name, GateError)
        if text:
            lines += ["<details><summary>" + md_text(row["name"]) + "</summary>", "", text.replace("## ", "### ", 1),
                      "</details>", ""]
    return "\n".join(lines) + "\n"


def render_error_markdown(error: ErrorReport) -> str:
    """A run without a result: the exit code, the model and the error's rule and message."""
    word = "FAIL" if error.exit_code == ExitCode.FAIL else "ERROR"
    return (f"## amdet-gate: ❌ {word} (exit {int(error.exit_code)})\n\n**Model** {md_text(error.model)}\n\n"
            f"**{error.rule}** {md_text(error.message, 500)}\n")


FORMAT = ReportFormat(
    "markdown", "--markdown", "summary.md", "the Markdown summary",
    render=lambda result, base_dir: render_markdown(result).encode("utf-8"),
    render_summary=lambda summary, out, where: render_summary_markdown(summary, out).encode("utf-8"),
    render_error=lambda error: render_error_markdown(error).encode("utf-8"),
    order=30)
