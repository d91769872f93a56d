"""The rows every summary of a model with several text encoders shows (multiscan.py's result.json).

The summary's data is untrusted (a file can be named anything, a layout title quotes it): each
format escapes the rows for its own output (Markdown: `md_text`, HTML: Jinja2's autoescape).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def rows(summary: Mapping[str, Any]) -> list[dict]:
    """One row per encoder: name, verdict, score, exit code, layer, reason, its report, its identity."""
    found = []
    for entry in summary.get("encoders") or []:
        layer = entry.get("layer") or {}
        found.append({"name": str(entry.get("name")), "verdict": str(entry.get("verdict")),
                      "score": entry.get("score"), "exit_code": entry.get("exit_code"),
                      "layer": str(layer.get("scanned", "")) if isinstance(layer, dict) else "",
                      "reason": str(entry.get("reason") or ""), "report": entry.get("report"),
                      "identity": str(entry.get("identity_sha256") or "")})
    return found


def score(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) and not isinstance(value, bool) else "n/a"
