"""result.json as one typed value: `ScanResult`, written by `dump` and read back (validated) by `load`.

A stored result.json is untrusted input (a pull request can bring one): `load` checks its size, parses
it without NaN constants or duplicate keys, validates it against `schemas/result.schema.json` and then
builds the typed value; anything that does not fit is a `ResultError` (exit 4) of one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import jsonschema

from amdet_gate.result.codec import ResultError, from_data, omit, schema_of, to_data
from amdet_gate.result.enums import Verdict
from amdet_gate.result.identity import ModelIdentity, Tool
from amdet_gate.result.measures import (
    Confirmation,
    Distributions,
    Environment,
    GateTable,
    Landscape,
    Natural,
    PooledSearch,
    Prompts,
    Search,
    Settings,
    Timings,
)
from amdet_gate.result.policy import PolicyRecord
from amdet_gate.result.target import ReversedTarget

# 1.1: the pooled path (`pooled`, pooled_* gates). 1.2: pseudo-triggers of K vectors
# (reversed_target.trigger_vectors, a `position` on every nearest token). 1.3: the policy's typed
# decision (`policy.allowed`, `policy.warn_only`), and schemas/result.schema.json.
SCHEMA_VERSION = "1.3"
SCHEMA_FILE = "schemas/result.schema.json"
SCHEMA_ID = "https://amdet-gate.invalid/schemas/result-1.json"
REQUIRED = ("schema_version", "model", "verdict", "score", "gates", "reversed_target")


@dataclass(frozen=True, kw_only=True)
class ScanResult:
    """Everything result.json holds for one scanned text encoder."""

    schema_version: str
    tool: Tool
    model: ModelIdentity
    anchor: ModelIdentity | None = None
    settings: Settings
    prompts: Prompts
    verdict: Verdict
    score: float
    reason: str
    gates: GateTable
    search: Search
    reversed_target: ReversedTarget
    distributions: Distributions
    landscape: Landscape
    timings: Timings
    environment: Environment
    pooled: PooledSearch | None = None  # the pooled path's search, when it ran
    natural: Natural | None = None  # how far ordinary words steer the model
    confirmation: tuple[Confirmation, ...] | None = None  # the typed-trigger searches that ran
    policy: PolicyRecord | None = None  # set by the caller that applies a policy
    artifacts: dict[str, str] | None = omit()  # output name -> path relative to the result's folder
    cache_hit: bool | None = omit()  # true when the result came from the verdict cache


def dump(result: ScanResult) -> dict[str, Any]:
    """The result as JSON data (what result.json holds)."""
    return to_data(result)


def dumps(result: ScanResult) -> str:
    """result.json's text."""
    return json.dumps(dump(result), indent=1, allow_nan=False) + "\n"


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ResultError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


def _refuse_constant(name: str) -> Any:
    raise ResultError(f"{name} is not JSON")


def parse(text: str) -> Any:
    """JSON text -> data, refusing NaN/Infinity constants and duplicate keys (ResultError)."""
    try:
        return json.loads(text, object_pairs_hook=_refuse_duplicates, parse_constant=_refuse_constant)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ResultError(f"not JSON: {type(exc).__name__}") from None


def load(text: str) -> ScanResult:
    """result.json's text -> the typed result; ResultError (exit 4, one line) when it is not one."""
    return from_dict(parse(text))


def from_dict(data: Any) -> ScanResult:
    """Plain result data (untrusted) -> the typed result, validated against the shipped schema."""
    if not isinstance(data, dict) or any(k not in data for k in REQUIRED):
        raise ResultError(f"not an amdet-gate result.json (missing {', '.join(REQUIRED)})")
    version = data["schema_version"]
    if not isinstance(version, str) or not version.startswith("1."):
        raise ResultError(f"result schema {version!r}; this version reads 1.x")
    error = jsonschema.exceptions.best_match(validator().iter_errors(data))
    if error is not None:
        where = ".".join(map(str, error.absolute_path)) or "(top level)"
        raise ResultError(f"not a well-formed amdet-gate result.json: {where}: {error.message[:200]}")
    try:
        return from_data(ScanResult, data)
    except ResultError as exc:
        raise ResultError(f"not a well-formed amdet-gate result.json: {exc}") from None


def result_schema() -> dict[str, Any]:
    """The JSON Schema of result.json, as generated from the types (the shipped file must equal it)."""
    defs: dict[str, Any] = {}
    schema_of(ScanResult, defs)
    top = defs.pop("ScanResult")
    top["properties"]["schema_version"] = {"type": "string", "pattern": r"^1\.[0-9]+$"}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID,
            "title": f"amdet-gate scan result (result.json), schema {SCHEMA_VERSION}",
            **top, "$defs": dict(sorted(defs.items()))}


@cache
def shipped_schema() -> dict[str, Any]:
    return json.loads(resources.files("amdet_gate").joinpath(SCHEMA_FILE).read_text("utf-8"))


@cache
def validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(shipped_schema())
