"""The AMDet scan: invert a pseudo-trigger that makes token features assimilate, then verify.

Read in this order:
  measures     the two measures (assimilation A, position-wise similarity S), the trigger's
               insertion, the token and pooled losses, prompt features, the trigger's range
  gates        the verification gates: 1-3 on held-out prompts, 4 the loss landscape, and
               the pooled path's two
  step         one optimiser step and the reasons a loop stops, shared by both loops
  pooled_path  the pooled search loop
  token_path   the token search loop, `search` (both paths) and `report`
Only the loops iterate over optimisation steps; the math is batched and loops over no single
prompt. See docs/method.md for the method this implements.

Every name other modules use is importable from here: `from amdet_gate.engine import search`.
The engine imports nothing above it (scanner, gate, cli, verdict).
"""

from amdet_gate.engine.gates import (
    Gates,
    GateValues,
    HeldOutStats,
    Landscape,
    PooledGates,
    gate_values,
    held_out_stats,
    hessian_eigenvalues,
    landscape,
    pooled_gates,
    screened_gate_values,
)
from amdet_gate.engine.measures import (
    ENGINE_TRAITS,
    Centres,
    CleanSpread,
    Models,
    PromptFeatures,
    assimilation,
    centred,
    clean_features,
    clean_pooled,
    clip_triggers,
    eos_positions,
    insert_trigger,
    inversion_loss,
    optimisation_length,
    pooled_loss,
    pooled_with_trigger,
    position_similarity,
    position_spread,
    precompute,
    require_traits,
    span_mask,
    spread_of_sum,
    start_triggers,
    trigger_bound,
    unit,
)
from amdet_gate.engine.pooled_path import PooledCheck, PooledOutcome, pooled_search
from amdet_gate.engine.step import StopReason, descend
from amdet_gate.engine.token_path import GateCheck, Reported, SearchOutcome, SearchState, report, search
from amdet_gate.settings import SearchProgress, SearchSettings, Thresholds  # re-exported, as engine.py did

__all__ = [
    "ENGINE_TRAITS",
    "Centres",
    "CleanSpread",
    "GateCheck",
    "GateValues",
    "Gates",
    "HeldOutStats",
    "Landscape",
    "Models",
    "PooledCheck",
    "PooledGates",
    "PooledOutcome",
    "PromptFeatures",
    "Reported",
    "SearchOutcome",
    "SearchProgress",
    "SearchSettings",
    "SearchState",
    "StopReason",
    "Thresholds",
    "assimilation",
    "centred",
    "clean_features",
    "clean_pooled",
    "clip_triggers",
    "descend",
    "eos_positions",
    "gate_values",
    "held_out_stats",
    "hessian_eigenvalues",
    "insert_trigger",
    "inversion_loss",
    "landscape",
    "optimisation_length",
    "pooled_gates",
    "pooled_loss",
    "pooled_search",
    "pooled_with_trigger",
    "position_similarity",
    "position_spread",
    "precompute",
    "report",
    "require_traits",
    "screened_gate_values",
    "search",
    "span_mask",
    "spread_of_sum",
    "start_triggers",
    "trigger_bound",
    "unit",
]
