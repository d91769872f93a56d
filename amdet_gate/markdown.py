"""The Markdown summary of a scan: for pull-request comments and GitHub's job summary.

Model names, tokens and prompts are untrusted. GitHub renders Markdown and an HTML subset
in job summaries, so every untrusted string goes through `sanitise.md_text`: one line, HTML
characters as entities, Markdown punctuation backslash-escaped. A token such as
`![x](https://tracker.example/p.png)` shows as text and fetches nothing.
"""

from __future__ import annotations

import math

from amdet_gate.checkpoints.summary import encoder_markdown
from amdet_gate.result import ScanResult
from amdet_gate.sanitise import md_text

VERDICT_MARK = {"pass": "✅ PASS", "fail": "❌ FAIL", "inconclusive": "⚠️ INCONCLUSIVE"}


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
