"""The pooled search loop: optimise pseudo-triggers that make every prompt's pooled feature agree.

A text-on-pair backdoor moves only the pooled (EOS) feature, which the token path's gates 1-2
do not see (`measures`, the pooled loss). This loop optimises R such triggers together on the
pooled loss and checks the pooled gates every `pooled_check_every` steps; the math it runs is
in `measures` and `gates`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from amdet_gate.engine.gates import PooledGates, pooled_gates
from amdet_gate.engine.measures import (
    Centres,
    Models,
    PromptFeatures,
    clean_pooled,
    eos_positions,
    pooled_loss,
    start_triggers,
    trigger_bound,
)
from amdet_gate.engine.step import StopReason, descend
from amdet_gate.settings import SearchSettings, Thresholds


@dataclass(frozen=True)
class PooledOutcome:
    triggers: Tensor  # (R, K, d)
    best_restart: int
    gates: PooledGates  # on the best restart
    similarity: Tensor  # (N,) centred cosine of each held-out prompt's pooled feature to the first prompt's
    loss_history: Tensor  # (steps, R)
    steps: int
    detected_at_step: int | None
    stop_reason: StopReason  # detected | max_steps | time_budget | non_finite
    seconds: float


@dataclass(frozen=True)
class PooledCheck:
    """What one check of the pooled gates found."""

    best: int  # the restart with the highest screened share (the detected one, when one passed)
    best_share: float  # its screened share
    found: tuple[list[PooledGates], Tensor] | None  # a detected trigger's gates on every held-out prompt


def _check(models: Models, held: PromptFeatures, screen: PromptFeatures, held_eos: Tensor, centres: Centres,
           triggers: Tensor, thresholds: Thresholds, settings: SearchSettings) -> PooledCheck:
    """Screened first, as the token path's checks: only a trigger whose share among the first
    prompts already looks promising is run on every held-out prompt."""
    screened, _ = pooled_gates(models, screen, held_eos[: len(screen)], centres, triggers, thresholds,
                               settings.chunk_size)
    shares = [g.same_target_ratio for g in screened]
    best = max(range(len(shares)), key=shares.__getitem__)
    for r in (r for r in range(len(shares)) if shares[r] > settings.pooled_promising):
        full = pooled_gates(models, held, held_eos, centres, triggers[r : r + 1], thresholds, settings.chunk_size)
        if all(full[0][0].passed(thresholds).values()):
            return PooledCheck(r, shares[r], full)
    return PooledCheck(best, shares[best], None)


def pooled_search(models: Models, opt: PromptFeatures, held: PromptFeatures, settings: SearchSettings,
                  thresholds: Thresholds, deadline: float) -> PooledOutcome:
    """Optimise R pooled pseudo-triggers together; check the gates every `pooled_check_every` steps."""
    start = time.monotonic()
    device = opt.embeds.device
    eos_token = models.suspect.eos_token_id
    shift = settings.trigger_vectors
    opt_eos, held_eos = eos_positions(opt.ids, eos_token, shift), eos_positions(held.ids, eos_token, shift)
    centres = Centres.of(models, held)
    gen = torch.Generator().manual_seed(settings.seed)
    restarts = 2 * settings.restarts
    bound = trigger_bound(models.suspect, shift) if settings.bounded_triggers else None
    triggers, scale = start_triggers(settings, restarts, opt.embeds.shape[-1], bound, gen, device)
    optimiser = torch.optim.Adam([triggers], lr=settings.pooled_lr * scale, weight_decay=settings.weight_decay)
    history: list[Tensor] = []
    stop_reason, detected_at, best = StopReason.MAX_STEPS, None, 0
    found = None  # the detected trigger's gates on every held-out prompt
    step = 0
    screen = held.subset(0, min(settings.screen_prompts, len(held)))
    # A trigger fires whatever the prompt's length, and a pooled feature costs as many positions
    # as its prompt has tokens: optimise on the shorter half of the prompts.
    short = opt_eos.argsort(stable=True)[: max(len(opt) // 2, settings.pooled_batch_size)]
    budget = min(settings.pooled_steps, settings.max_steps)
    while step < budget:
        batch = short[torch.randint(len(short), (settings.pooled_batch_size,), generator=gen).to(device)]
        clean = clean_pooled(models.suspect, opt.embeds[batch], opt.ids[batch])
        loss = pooled_loss(models, opt.embeds[batch], opt_eos[batch], clean, centres, triggers,
                           settings.beta, settings.gamma)
        step += 1
        if not descend(optimiser, loss, triggers, history, bound):
            stop_reason = StopReason.NON_FINITE
            break
        if step % settings.pooled_check_every == 0 or step == budget:
            check = _check(models, held, screen, held_eos, centres, triggers.detach(), thresholds, settings)
            best = check.best
            if check.found is not None:
                stop_reason, detected_at, found = StopReason.DETECTED, step, check.found
                break
            # A start converging on a backdoor's basin can still be short of the gate when the
            # budget ends (benign encoders stay far below): give it up to twice as long again.
            longest = min(3 * settings.pooled_steps, settings.max_steps)
            if step == budget and check.best_share > settings.pooled_promising and budget < longest:
                budget = min(budget + settings.pooled_steps, longest)
        if time.monotonic() > deadline:
            stop_reason = StopReason.TIME_BUDGET
            break
    gates, similarity = found or pooled_gates(models, held, held_eos, centres, triggers.detach()[best : best + 1],
                                              thresholds, settings.chunk_size)
    return PooledOutcome(triggers.detach().cpu(), best, gates[0], similarity[0].cpu(),
                         torch.stack(history) if history else torch.zeros(0, restarts),
                         step, detected_at, stop_reason, time.monotonic() - start)
