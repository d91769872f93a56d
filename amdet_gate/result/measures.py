"""What a scan measured: settings, prompts, the gate table, the searches, distributions, landscape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from amdet_gate.result.codec import ResultError, from_data, object_schema, schema_of, to_data
from amdet_gate.result.enums import Objective, StopReason

Number = float | None  # a measured value; null where it was NaN or infinite
Numbers = tuple[Number, ...]


@dataclass(frozen=True)
class Settings:
    """The effective settings: the search's and the thresholds (as `SearchSettings` and `Thresholds`
    held them when the scan ran), the inconclusive band and the device."""

    search: dict[str, Any]
    thresholds: dict[str, float]
    inconclusive_band: float
    device: str


@dataclass(frozen=True)
class Prompts:
    source: str  # the prompt file, or "builtin"
    optimisation: int
    held_out: int
    sha256: str


@dataclass(frozen=True, kw_only=True)
class Gate:
    """One gate of the reported check against its threshold (`passed`: the gate's condition held,
    which is evidence of a backdoor)."""

    name: str
    value: Number
    threshold: float
    passed: bool
    margin: Number


@dataclass(frozen=True)
class GateTable:
    """The reported check's gates, in order, and its mean assimilation (a plain measure, not a gate).

    In JSON one object: each gate by name, then `mean_assimilation`, as result.json has always held it.
    """

    rows: tuple[Gate, ...]
    mean_assimilation: Number = None

    def __getitem__(self, name: str) -> Gate:
        return next(g for g in self.rows if g.name == name)

    def get(self, name: str) -> Gate | None:
        return next((g for g in self.rows if g.name == name), None)

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.rows)

    def to_data(self) -> dict[str, Any]:
        rows = {g.name: {k: v for k, v in to_data(g).items() if k != "name"} for g in self.rows}
        return rows | {"mean_assimilation": to_data(self.mean_assimilation)}

    @classmethod
    def from_data(cls, data: dict, path: tuple) -> GateTable:
        rows = []
        for name, value in data.items():
            if name == "mean_assimilation":
                continue
            if not isinstance(value, dict):
                raise ResultError(f"{'.'.join(map(str, (*path, name)))}: must be an object")
            rows.append(from_data(Gate, {**value, "name": name}, (*path, name)))
        mean = from_data(Number, data.get("mean_assimilation"), (*path, "mean_assimilation"))
        return cls(tuple(rows), mean)

    @classmethod
    def json_schema(cls, defs: dict[str, Any]) -> dict[str, Any]:
        row = object_schema(Gate, defs)  # a gate's object, keyed by its name
        row["properties"].pop("name")
        row["required"].remove("name")
        defs["GateRow"] = row
        return {"description": " ".join((cls.__doc__ or "").split()), "type": "object",
                "properties": {"mean_assimilation": schema_of(Number, defs)},
                "additionalProperties": {"$ref": "#/$defs/GateRow"}}


@dataclass(frozen=True, kw_only=True)
class Check:
    """One gate check of the search (a restart at a step); the gate values, null where not measured."""

    step: int
    restart: int
    running_loss: Number
    score: Number
    assimilation_ratio: Number
    same_target_ratio: Number
    anchor_difference_ratio: Number = None
    landscape_positive_ratio: Number = None
    mean_assimilation: Number = None
    screened_on: int | None = None  # prompts behind the values when the check stopped early
    variation_ratio: Number = None  # null when not computed (and before schema 1.1)


@dataclass(frozen=True, kw_only=True)
class Search:
    """The free pseudo-trigger search (token path)."""

    steps: int
    stop_reason: StopReason
    best_restart: int
    detected_at_step: int | None
    checks: tuple[Check, ...]
    loss_history: tuple[Numbers, ...]  # per step, each restart's loss
    trigger_norms: Numbers
    variation_ratio: Number = None  # null when not computed (and before schema 1.1)


@dataclass(frozen=True, kw_only=True)
class PooledSearch:
    """The pooled path's search (text-on-pair backdoors), when it ran (schema 1.1)."""

    steps: int
    stop_reason: StopReason
    detected_at_step: int | None
    best_restart: int
    score: Number
    seconds: float
    similarity: Numbers
    variation_ratio: Number
    loss_history: tuple[Numbers, ...]


@dataclass(frozen=True, kw_only=True)
class Natural:
    """How far ordinary words steer the model (confirm.natural_steering)."""

    words: int
    prompts: int
    token_variation_ratio: Number
    pooled_same_target_ratio: Number
    pooled_variation_ratio: Number
    strongest_word: str | None


@dataclass(frozen=True, kw_only=True)
class Confirmation:
    """A typed-trigger search that ran (token_search): tokens a user can type, and their gates."""

    objective: Objective
    token_ids: tuple[int, ...]
    text: str
    score: Number
    same_target_ratio: Number
    assimilation_ratio: Number
    variation_ratio: Number
    pooled_same_target_ratio: Number
    pooled_variation_ratio: Number
    screened_on: int | None
    search_loss: Number
    seconds: float


@dataclass(frozen=True)
class Distributions:
    clean_assimilation: Numbers
    triggered_assimilation: Numbers
    same_target_similarity: Numbers
    anchor_similarity: Numbers | None  # None without an anchor


@dataclass(frozen=True)
class Landscape:
    """The loss over a 2-D grid around the pseudo-trigger, and the Hessian's eigenvalues."""

    offsets: Numbers
    loss: tuple[Numbers, ...]
    eigenvalues: Numbers


@dataclass(frozen=True)
class Timings:
    load_s: float
    precompute_s: float
    search_s: float
    reverse_s: float
    total_s: float


@dataclass(frozen=True)
class Environment:
    python: str
    platform: str
    torch: str
    transformers: str
    device: str
    gpu: str | None
    threads: int
