"""Scan settings and gate thresholds: plain values, no torch.

Kept apart from the engine so that the policy, the cache and the CLI's fast paths (a cache
hit, `policy validate`, `lock check`) never pay for importing torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from amdet_gate.result.enums import Verdict

PASS, FAIL, INCONCLUSIVE = Verdict.PASS, Verdict.FAIL, Verdict.INCONCLUSIVE


@dataclass(frozen=True)
class Thresholds:
    """Gate thresholds, named as in docs/method.md section 3."""

    assimilation: float = 0.8
    assimilation_ratio: float = 0.8
    same_target: float = 0.92
    same_target_ratio: float = 0.995
    anchor_difference_ratio: float = 0.95
    landscape_positive_ratio: float = 0.8
    eigenvalue_floor: float = 1e-6
    # The pooled path (engine.pooled_path): centred cosine to the pooled target, and the
    # share of prompts above it. Benign controls reach at most ~0.1, text-on-pair backdoors 0.9-1.
    pooled_same_target: float = 0.98
    pooled_same_target_ratio: float = 0.5
    # A typed trigger (token_search): the same-target share it must reach with gate 1 (typed
    # tokens put in front reach 0.99-1.0 on backdoors, at most 0.03 on benign encoders), the
    # variation ratio at or below which its token features count as collapsed where gates 1-2
    # cannot read it, and the pooled share and pooled variation a typed trigger must reach for
    # a pooled finding (bench/detection.py, calibration).
    typed_same_target_ratio: float = 0.9
    typed_variation: float = 0.1
    typed_pooled_same_target_ratio: float = 0.9
    typed_pooled_variation: float = 0.007


@dataclass(frozen=True)
class SearchSettings:
    seed: int = 0
    restarts: int = 4
    # Vectors in the pseudo-trigger (method.md: one). Two reach triggers of several tokens
    # (phrases, homoglyphs split into byte tokens) that one vector misses on 6-layer encoders,
    # while benign encoders stay as far from the same-target gate (bench/detection.py).
    trigger_vectors: int = 2
    # Keep every pseudo-trigger vector within the norm of a real input (token + position
    # embedding): engine.trigger_bound. False: free vectors, as the reference.
    bounded_triggers: bool = True
    # Token-path measures over the positions each prompt occupies (engine.span_mask), not all L.
    span_measures: bool = False
    # The typed-trigger search (token_search) that confirms a free pseudo-trigger's collapse:
    # greedy coordinate steps, swaps tried per step, the prompts it compares them on.
    confirm_iterations: int = 24
    confirm_candidates: int = 48
    confirm_prompts: int = 16
    confirm_top_k: int = 32
    max_steps: int = 640
    # A search that stops at `max_steps` before this many steps (or two epochs over the
    # optimisation prompts, when fewer: scanner.decisive_steps), without a detection or a
    # plateau, has not ruled a backdoor out: the verdict is inconclusive, never pass. The
    # policy schema refuses `scan.max_steps` below 200.
    min_decisive_steps: int = 200
    batch_size: int = 5
    # Padding positions a token-path step keeps after its prompts' last EOS (-1: every position);
    # the gates and the landscape always run every position (engine.optimisation_length).
    pad_positions: int = 8
    lr: float = 0.08
    weight_decay: float = 1e-5
    beta: float = 0.1  # push away from the prompt's clean meaning
    gamma: float = 0.1  # push away from the anchor (dropped without one)
    loss_trigger: float = -0.76  # run the gates once the running loss is below this
    check_every: int = 10
    running_window: int = 10
    patience: int = 40  # stop once no restart's smoothed loss has improved for this many steps
    plateau_window: int = 30  # steps averaged for that test
    min_improvement: float = 0.01
    # A check that passes gate 1 with a same-target share this much above the restart's best also
    # counts as improvement: a multi-token backdoor's share can climb 0.1 -> 0.97 over 70 steps
    # while its loss moves by less than min_improvement per patience.
    min_share_gain: float = 0.05
    landscape_points: int = 50
    # Grid half-width as a fraction of |v|. The reference's +-10 was set for CLIP-L, whose
    # triggers start at N(0, 1) scale, |v| ~ sqrt(768); 10 / sqrt(768) ~ 0.36 keeps that
    # geometry for any width and embedding scale.
    landscape_radius: float = 0.36
    report_landscape_points: int = 25  # the report's grid when gates 1-3 already fail (engine.token_path.report)
    time_budget_s: float = 900.0
    chunk_size: int = 64  # sequences per no-grad forward
    screen_prompts: int = 50  # a check runs held-out prompts this many at a time, dropping hopeless triggers
    # The pooled path's budget (0 turns the path off), capped by max_steps. It runs twice as many
    # starts as the token path: a multi-token trigger's pooled basin is found by about one start
    # in three, and its sequences, cut after EOS, keep the starts cheap.
    pooled_steps: int = 100
    pooled_batch_size: int = 4
    # Its own step size: a pooled basin is reached in about a third of the steps at 0.3 as at
    # the token path's 0.08, and benign encoders stay as far from the gate (bench/detection.py).
    pooled_lr: float = 0.3
    pooled_check_every: int = 50
    pooled_promising: float = 0.2  # a pooled share above this extends the budget (benign controls: < 0.1)


@dataclass
class SearchProgress:
    """Callback hooks so the CLI can show progress without the engine knowing about rich.

    on_check receives the engine's GateCheck (typed Any here to keep this module torch-free).
    """

    on_step: Callable[[int, float], None] = lambda step, best_loss: None
    on_check: Callable[[Any], None] = lambda check: None
