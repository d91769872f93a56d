"""Typed scan results for tests: a real scan's result.json (tests/data/sample_result.json) with changes."""

from __future__ import annotations

import json
from pathlib import Path

from amdet_gate.result import ScanResult, from_dict

SAMPLE = Path(__file__).parent / "data" / "sample_result.json"  # a real backdoored scan's result.json


def sample_data(**changes: object) -> dict:
    """The sample's JSON data; `model` is merged into the sample's model, other keys replace."""
    data = json.loads(SAMPLE.read_text("utf-8"))
    if isinstance(changes.get("model"), dict):
        changes["model"] = data["model"] | changes["model"]
    return data | changes


def sample_result(**changes: object) -> ScanResult:
    """The sample as a typed result (validated as `report RESULT` reads it)."""
    return from_dict(sample_data(**changes))
