"""Typed scan results for tests: a real scan's result.json (tests/data/sample_result.json) with changes."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jsonschema

from amdet_gate.result import ScanResult, dumps, from_dict, load
from amdet_gate.result.document import shipped_schema

SAMPLE = Path(__file__).parent / "data" / "sample_result.json"  # a real backdoored scan's result.json
WRITTEN_RESULTS: list[Path] = []  # every result.json the suite's scans wrote, each checked as written (conftest)


def sample_data(**changes: object) -> dict:
    """The sample's JSON data; `model` is merged into the sample's model, other keys replace."""
    data = json.loads(SAMPLE.read_text("utf-8"))
    if isinstance(changes.get("model"), dict):
        changes["model"] = data["model"] | changes["model"]
    return data | changes


def sample_result(**changes: object) -> ScanResult:
    """The sample as a typed result (validated as `report RESULT` reads it)."""
    return from_dict(sample_data(**changes))


def finite(value: object) -> bool:
    """No NaN or infinity anywhere in a typed value (those are written as null, so they cannot round-trip)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if dataclasses.is_dataclass(value):
        return all(finite(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, dict):
        return all(finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(finite(v) for v in value)
    return True


def check_file(path: Path) -> ScanResult:
    """A written result.json: valid against the shipped schema, loaded, re-dumped to the same bytes."""
    text = path.read_text("utf-8")
    jsonschema.Draft202012Validator(shipped_schema()).validate(json.loads(text))
    loaded = load(text)
    assert dumps(loaded) == text, f"{path}: a loaded result does not re-dump to the same bytes"
    return loaded


def check_written(path: Path, result: ScanResult) -> None:
    """check_file, and the result written is the one loaded back (`load(dump(r)) == r`)."""
    loaded = check_file(path)
    if finite(result):
        assert loaded == result, f"{path}: load(dump(result)) != result"
