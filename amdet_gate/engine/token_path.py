"""The token search loop: optimise R pseudo-triggers together, check the gates as the loss drops.

`search` is the scan: it runs the token path (this loop), then the pooled path
(`pooled_path.pooled_search`), and `report` measures every gate and the landscape on the
trigger it reports. The loop's state between steps is one `SearchState`; the math it runs is
in `measures` and `gates`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from amdet_gate.engine.gates import (
    GateValues,
    HeldOutStats,
    Landscape,
    gate_values,
    held_out_stats,
    landscape,
    screened_gate_values,
)
from amdet_gate.engine.measures import (
    CleanSpread,
    Models,
    PromptFeatures,
    assimilation,
    clean_features,
    inversion_loss,
    optimisation_length,
    require_traits,
    span_mask,
    spread_of_sum,
    start_triggers,
    trigger_bound,
)
from amdet_gate.engine.pooled_path import PooledOutcome, pooled_search
from amdet_gate.engine.step import StopReason, descend
from amdet_gate.settings import SearchProgress, SearchSettings, Thresholds


@dataclass(frozen=True)
class GateCheck:
    step: int
    restart: int
    running_loss: float
    gates: GateValues


@dataclass(frozen=True)
class SearchOutcome:
    """Everything the search found; `verdict.decide` turns it into a decision."""

    triggers: Tensor  # (R, K, d) final pseudo-triggers
    best_restart: int  # the detected restart, else the one with the lowest running loss
    checks: list[GateCheck]
    detected: GateCheck | None
    final_gates: GateValues  # all gates on the reported trigger
    landscape: Landscape
    held_out: HeldOutStats  # on the reported trigger only (R=1)
    clean_assimilation: Tensor  # (N,) held-out prompts without a trigger
    loss_history: Tensor  # (steps, R)
    steps: int
    stop_reason: StopReason  # detected | max_steps | plateau | time_budget | non_finite
    seconds: float
    pooled: PooledOutcome | None = None  # the pooled path, run when the token path found nothing


@dataclass
class SearchState:
    """The token loop's state between steps: where it is in the prompts, what it has seen, found."""

    order: Tensor  # this epoch's seeded order of the optimisation prompts
    last_checked_loss: Tensor  # (R,) running loss at each restart's last check (inf before one)
    best_share: list[float]  # per restart: best same-target share at a check that passed gate 1
    cursor: int = 0  # next place in `order`
    step: int = 0
    best_loss: float = math.inf  # lowest smoothed loss of any restart, for the plateau rule
    best_step: int = 0  # the step of the last progress: a new best loss or a gained share
    history: list[Tensor] = field(default_factory=list)  # per step: the (R,) losses
    checks: list[GateCheck] = field(default_factory=list)
    detected: GateCheck | None = None
    detected_landscape: Landscape | None = None  # the detection's gate 4, reused by `report`
    stop_reason: StopReason = StopReason.MAX_STEPS


@dataclass(frozen=True)
class Reported:
    """The trigger the scan reports, and what the loops left with it: the input of `report`."""

    triggers: Tensor  # (R, K, d): the token path's, or the pooled path's when only it fired
    best: int  # the reported restart
    loss_history: Tensor  # (steps, R): the token path's
    pooled: PooledOutcome | None
    seconds: float


def search(models: Models, opt: PromptFeatures, held: PromptFeatures, settings: SearchSettings,
           thresholds: Thresholds, progress: SearchProgress | None = None,
           deadline: float | None = None) -> SearchOutcome:
    """Optimise R pseudo-triggers together, check gates as the loss drops, stop when certain."""
    for encoder in (models.suspect, models.anchor):
        if encoder is not None:
            require_traits(encoder)
    progress = progress or SearchProgress()
    start = time.monotonic()
    deadline = deadline if deadline is not None else start + settings.time_budget_s
    device = opt.embeds.device
    gen = torch.Generator().manual_seed(settings.seed)
    bound = trigger_bound(models.suspect, settings.trigger_vectors) if settings.bounded_triggers else None
    triggers, scale = start_triggers(settings, settings.restarts, opt.embeds.shape[-1], bound, gen, device)
    optimiser = torch.optim.Adam([triggers], lr=settings.lr * scale, weight_decay=settings.weight_decay)
    # Drawn after the starting triggers, from the same generator: the seed fixes both.
    state = SearchState(order=torch.randperm(len(opt), generator=gen),
                        last_checked_loss=torch.full((settings.restarts,), math.inf),
                        best_share=[0.0] * settings.restarts)
    while state.step < settings.max_steps:
        loss = _batch_loss(models, opt, triggers, settings, state, gen)
        state.step += 1
        if not descend(optimiser, loss, triggers, state.history, bound):
            state.stop_reason = StopReason.NON_FINITE
            break
        running = torch.stack(state.history[-settings.running_window :]).mean(dim=0)
        progress.on_step(state.step, float(running.min()))
        if state.step % settings.check_every == 0 or state.step == settings.max_steps:
            _check(models, held, triggers.detach(), running, settings, thresholds, state, progress)
            if state.detected is not None:
                state.stop_reason = StopReason.DETECTED
                break
        stop = _stop_without_detection(state, settings, deadline)
        if stop is not None:
            state.stop_reason = stop
            break

    final = triggers.detach()
    loss_history = torch.stack(state.history) if state.history else torch.zeros(0, settings.restarts)
    if state.detected is not None:
        best = state.detected.restart
    else:
        running = loss_history[-settings.running_window :].mean(dim=0) if state.history else torch.zeros(1)
        best = int(torch.nan_to_num(running, nan=math.inf).argmin())
    pooled = None
    # The pooled path runs even after a token-path detection: a free vector's collapse is only
    # a lead until typed tokens confirm it (token_search), and the pooled lead may be the real one.
    if state.stop_reason != StopReason.NON_FINITE and settings.pooled_steps > 0:
        pooled = pooled_search(models, opt, held, settings, thresholds, deadline)
        if state.detected is None and pooled.detected_at_step is not None:  # report the trigger that fired
            final, best = pooled.triggers.to(device), pooled.best_restart
    return report(models, held, state, Reported(final, best, loss_history, pooled, time.monotonic() - start),
                  settings, thresholds)


def _batch_loss(models: Models, opt: PromptFeatures, triggers: Tensor, settings: SearchSettings,
                state: SearchState, gen: torch.Generator) -> Tensor:
    """The (R,) token loss on the next batch of the epoch's order; a new seeded order once it runs out."""
    if state.cursor + settings.batch_size > len(opt):
        state.order, state.cursor = torch.randperm(len(opt), generator=gen), 0
    batch = state.order[state.cursor : state.cursor + settings.batch_size].to(opt.embeds.device)
    state.cursor += settings.batch_size
    eos_token, shift = models.suspect.eos_token_id, settings.trigger_vectors
    length = optimisation_length(opt.ids[batch], eos_token, settings)
    mask = span_mask(opt.ids[batch], eos_token, shift, length) if settings.span_measures else None
    return inversion_loss(models, opt.embeds[batch, :length], clean_features(models.suspect, opt, batch, length),
                          triggers, settings.beta, settings.gamma, mask).mean(dim=1)


def _check(models: Models, held: PromptFeatures, triggers: Tensor, running: Tensor, settings: SearchSettings,
           thresholds: Thresholds, state: SearchState, progress: SearchProgress) -> None:
    """Gates 1-3 on every restart whose running loss is low and has dropped since its last check;
    gate 4 on those that pass them. Records the checks, and the first detection, in `state`."""
    due = (running < settings.loss_trigger) & (running < state.last_checked_loss - settings.min_improvement)
    if not due.any():
        return
    candidates = due.nonzero().flatten().tolist()
    values = screened_gate_values(models, held, triggers[candidates], thresholds, settings.chunk_size,
                                  settings.screen_prompts, settings.span_measures)
    for r, gates in zip(candidates, values, strict=True):
        state.last_checked_loss[r] = running[r]
        # A restart whose prompts all collapse and that comes nearer one target is still
        # converging, however slowly its loss moves: that is progress for the plateau rule.
        if (gates.passed(thresholds)["assimilation_ratio"]
                and gates.same_target_ratio >= state.best_share[r] + settings.min_share_gain):
            state.best_share[r], state.best_step = gates.same_target_ratio, state.step
        land = None
        if all(gates.passed(thresholds).values()):  # gate 4 only when 1-3 pass: it is costly
            land = _landscape(models, held, triggers[r], settings, state.step)
            gates = replace(gates, landscape_positive_ratio=land.positive_ratio(thresholds.eigenvalue_floor))
        check = GateCheck(state.step, r, float(running[r]), gates)
        if land is not None and gates.passed(thresholds)["landscape_positive_ratio"]:
            state.detected, state.detected_landscape = check, land
        state.checks.append(check)
        progress.on_check(check)
        if state.detected is not None:
            return


def _stop_without_detection(state: SearchState, settings: SearchSettings, deadline: float) -> StopReason | None:
    """Plateau or time budget, after a step that detected nothing; None: go on."""
    # Convergence is judged on a longer mean than the gate trigger: mini-batch noise
    # alone would otherwise keep producing new bests.
    current = float(torch.stack(state.history[-settings.plateau_window :]).mean(dim=0).min())
    if current < state.best_loss - settings.min_improvement:
        state.best_loss, state.best_step = current, state.step
    elif state.step - state.best_step >= settings.patience:
        return StopReason.PLATEAU  # no restart has improved for `patience` steps: more will not help
    if time.monotonic() > deadline:
        return StopReason.TIME_BUDGET
    return None


def _landscape(models: Models, held: PromptFeatures, trigger: Tensor, settings: SearchSettings,
               step: int) -> Landscape:
    """Gate 4 on the first held-out prompt, with the direction seed of `step`: a check and the
    report at the same step draw the same grid."""
    mask = span_mask(held.ids[:1], models.suspect.eos_token_id, trigger.shape[0]) if settings.span_measures else None
    return landscape(models, held.embeds[:1], held.clean[:1], trigger, settings,
                     torch.Generator().manual_seed(settings.seed + step), mask)


def report(models: Models, held: PromptFeatures, state: SearchState, reported: Reported,
           settings: SearchSettings, thresholds: Thresholds) -> SearchOutcome:
    """All four gates and the landscape on the reported trigger, for the result and the report.

    A detection's landscape was just computed for this trigger at this step: it is reused.
    When gates 1-3 fail on the trigger, gate 4 cannot make the verdict `fail`: its landscape is
    drawn for the report on the coarser `report_landscape_points` grid (a quarter of the cost).
    """
    trigger = reported.triggers[reported.best]
    span = settings.span_measures
    reference = CleanSpread.of(held.clean, settings.chunk_size)
    stats = held_out_stats(models, held, trigger[None], settings.chunk_size, span=span, reference=reference)
    gates = gate_values(stats, thresholds)[0]
    land = state.detected_landscape
    if land is None:
        grid = settings if all(gates.passed(thresholds).values()) else \
            replace(settings, landscape_points=min(settings.report_landscape_points, settings.landscape_points))
        land = _landscape(models, held, trigger, grid, state.step)
    final_gates = replace(
        gates, landscape_positive_ratio=land.positive_ratio(thresholds.eigenvalue_floor),
        variation_ratio=float(reference.ratio(spread_of_sum(stats.unit_sum[0], len(held)), trigger.shape[0])))
    return SearchOutcome(
        triggers=reported.triggers.cpu(), best_restart=reported.best, checks=state.checks, detected=state.detected,
        final_gates=final_gates, landscape=land, held_out=stats.cpu(),
        clean_assimilation=assimilation(held.clean, span_mask(held.ids, models.suspect.eos_token_id, 0)
                                        if span else None).cpu(),
        loss_history=reported.loss_history, steps=state.step, stop_reason=state.stop_reason,
        seconds=reported.seconds, pooled=reported.pooled,
    )
