"""The Markdown summary of a scan: for pull-request comments and GitHub's job summary.

Model names, tokens and prompts are untrusted. GitHub renders Markdown and an HTML subset
in job summaries, so every untrusted string goes through `sanitise.md_text`: one line, HTML
characters as entities, Markdown punctuation backslash-escaped. A token such as
`![x](https://tracker.example/p.png)` shows as text and fetches nothing.
"""

from __future__ import annotations

import math

from amdet_gate.checkpoints.summary import encoder_markdown
from amdet_gate.sanitise import md_text

VERDICT_MARK = {"pass": "✅ PASS", "fail": "❌ FAIL", "inconclusive": "⚠️ INCONCLUSIVE"}


def _num(value: object, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}"


def render_markdown(result: dict) -> str:
    """The summary: verdict, identity, gates against thresholds, reversed target, policy."""
    model = result.get("model") or {}
    verdict = str(result.get("verdict", "inconclusive"))
    lines = [
        f"## amdet-gate: {VERDICT_MARK.get(verdict, md_text(verdict))} (score {_num(result.get('score'))})",
        "",
        f"**Model** {md_text(model.get('source', '?'))}"
        + (f" at `{md_text(model['resolved_sha'])}`" if model.get("resolved_sha") else "")
        + (f", subfolder {md_text(model['subfolder'])}" if model.get("subfolder") else ""),
        "",
        *encoder_markdown(model),  # which encoder and layer; what was not scanned (amdet_gate/checkpoints)
        f"**Identity (sha256)** `{md_text(model.get('identity_sha256', '?'))}`",
        "",
        f"**Reason** {md_text(result.get('reason', ''))}",
        "",
    ]
    policy = result.get("policy") or {}
    if policy.get("note"):
        lines += [f"**Policy** {md_text(policy['note'])}", ""]
    gates = {k: v for k, v in (result.get("gates") or {}).items() if isinstance(v, dict)}
    if gates:
        # A passed gate is evidence of a backdoor: the column says whether the gate's condition held.
        lines += ["| gate | value | threshold | gate passed (evidence of a backdoor) |", "|---|---|---|---|"]
        for name, gate in gates.items():
            mark = "**yes**" if gate.get("passed") else "no"
            lines.append(f"| {md_text(name)} | {_num(gate.get('value'))} | {_num(gate.get('threshold'))} | {mark} |")
        lines.append("")
    reversed_target = result.get("reversed_target") or {}
    trigger = [md_text(t.get("text", ""), 40) for t in (reversed_target.get("trigger_tokens") or [])[:5]]
    target = [md_text(t.get("text", ""), 40) for t in (reversed_target.get("target_tokens") or [])[:5]]
    if trigger:
        lines += [f"**Pseudo-trigger, nearest tokens** {', '.join(trigger)}", ""]
    if target:
        lines += [f"**Reversed target, nearest tokens** {', '.join(target)}", ""]
    timings = result.get("timings") or {}
    tool = result.get("tool") or {}
    lines.append(f"<sub>amdet-gate {md_text(tool.get('version', '?'))}, scan {_num(timings.get('total_s'), 1)} s"
                 f"{', from the verdict cache' if result.get('cache_hit') else ''}. "
                 "The HTML report has the evidence.</sub>")
    return "\n".join(lines) + "\n"
