"""A search over real tokens: is there a sequence a user can type that collapses the prompts?

The pseudo-trigger search (engine.search) optimises free vectors; on small or classifier-like
encoders a vector within a real token's norm can collapse any prompt, backdoor or not. A
backdoor is fired by tokens, so the decisive question is asked in the vocabulary itself: a
greedy coordinate search (the GCG family: the gradient with respect to each slot's one-hot
token ranks candidate swaps, the best of a sampled batch of swaps is kept) for K tokens put
after BOS that make the prompts' outputs alike. It starts from the pseudo-trigger's nearest
tokens and from ordinary words, and its result is measured like any trigger
(`confirm.measure`) and read against what ordinary words do (`confirm.natural_steering`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from amdet_gate.confirm import NaturalSteering, TokenTrigger, candidate_tokens, corpus_tokens, insert_tokens, measure
from amdet_gate.encoders.base import EncoderAdapter
from amdet_gate.engine import (
    Centres,
    CleanSpread,
    Models,
    PromptFeatures,
    SearchOutcome,
    centred,
    eos_positions,
    spread_of_sum,
)
from amdet_gate.engine import unit as _unit
from amdet_gate.result.enums import Objective
from amdet_gate.settings import SearchSettings, Thresholds


@dataclass(frozen=True)
class TokenSearchSettings:
    iterations: int = 24
    prompts: int = 16  # a fixed batch: the search compares candidates, the held-out set judges them
    top_k: int = 32  # swaps ranked by gradient, per slot
    candidates: int = 48  # swaps evaluated per iteration
    seed: int = 0

    @classmethod
    def of(cls, settings: SearchSettings) -> TokenSearchSettings:
        return cls(settings.confirm_iterations, settings.confirm_prompts, settings.confirm_top_k,
                   settings.confirm_candidates, settings.seed)


@dataclass(frozen=True)
class TokenSearchResult:
    ids: tuple[int, ...]
    loss: float  # the objective on the search batch at the end (lower: more alike)
    start_loss: float


def _cut(ids: Tensor, eos_token_id: int, shift: int) -> int:
    return int(eos_positions(ids, eos_token_id, shift).max()) + 1


def _loss(encoder: EncoderAdapter, embeds: Tensor, ids: Tensor, reference: CleanSpread, shift: int,
          objective: Objective, centre: Tensor | None) -> Tensor:
    """The objective per candidate for embeds (C, B, L, d) of the inserted prompts, (C,)."""
    c, b, length, d = embeds.shape
    features = encoder.encode(embeds.reshape(c * b, length, d)).reshape(c, b, length, -1)
    if objective is Objective.TOKENS:
        return reference.ratio(spread_of_sum(reference.centred_sum(features, shift), b), shift)
    eos = eos_positions(ids, encoder.eos_token_id, shift)
    pooled = encoder.project(features[:, torch.arange(b), eos])
    unit = centred(pooled, centre)
    summed = unit.sum(dim=1)
    return -((summed * summed).sum(dim=-1) - b) / (b * (b - 1))


def token_search(encoder: EncoderAdapter, ids: Tensor, start: tuple[int, ...], allowed: Tensor,
                 objective: Objective, settings: TokenSearchSettings) -> TokenSearchResult:
    """Greedy coordinate search for `len(start)` tokens after BOS; `allowed` (V,) booleans."""
    generator = torch.Generator().manual_seed(settings.seed)
    batch = ids[: settings.prompts]
    shift = len(start)
    length = _cut(batch, encoder.eos_token_id, shift)
    with torch.no_grad():
        clean = encoder.encode(encoder.embed(batch[:, : _cut(batch, encoder.eos_token_id, 0)]))
        reference = CleanSpread.of(clean)  # covers the length - shift clean positions the triggered ones hold
        centre = None
        if objective is Objective.POOLED:
            eos = eos_positions(batch, encoder.eos_token_id, 0)
            centre = _unit(encoder.project(clean[torch.arange(len(batch)), eos])).mean(dim=0)
    table = encoder.token_embedding.detach()
    slots = torch.arange(1, shift + 1, device=ids.device)

    def evaluate(options: list[tuple[int, ...]]) -> Tensor:
        with torch.no_grad():
            embeds = torch.stack([encoder.embed(insert_tokens(batch, o)[:, :length]) for o in options])
            return _loss(encoder, embeds, batch, reference, shift, objective, centre)

    def ranked_swaps(current: tuple[int, ...]) -> Tensor:
        """(shift, top_k) tokens per slot, the most negative gradient of the objective first."""
        one_hot = torch.zeros(shift, table.shape[0], device=table.device)
        one_hot[torch.arange(shift), torch.tensor(current, device=table.device)] = 1.0
        one_hot.requires_grad_(True)
        base = encoder.embed(insert_tokens(batch, current)[:, :length])
        typed = one_hot @ table + encoder.position_embedding.detach()[slots]
        embeds = torch.cat([base[:, :1], typed[None].expand(len(batch), -1, -1), base[:, shift + 1 :]], dim=1)
        loss = _loss(encoder, embeds[None], batch, reference, shift, objective, centre)[0]
        (grad,) = torch.autograd.grad(loss, one_hot)
        return (-grad.masked_fill(~allowed[None], float("inf"))).topk(settings.top_k, dim=1).indices

    def swap(current: tuple[int, ...], slot: int, token: int) -> tuple[int, ...]:
        return tuple(token if i == slot else t for i, t in enumerate(current))

    current = start
    current_loss = float(evaluate([current])[0])
    start_loss = current_loss
    ranked, tried = ranked_swaps(current), set()  # swaps of `current` already evaluated
    for _ in range(settings.iterations):
        drawn = []
        for _ in range(settings.candidates):
            slot = int(torch.randint(shift, (1,), generator=generator))
            drawn.append(swap(current, slot, int(ranked[slot, int(torch.randint(settings.top_k, (1,),
                                                                                  generator=generator))])))
        options = list(dict.fromkeys(o for o in drawn if o != current and o not in tried))
        if options:
            losses = evaluate(options)
            best = int(losses.argmin())
            if float(losses[best]) < current_loss:
                current, current_loss = options[best], float(losses[best])
                ranked, tried = ranked_swaps(current), set()
                continue
            tried.update(options)
        # While `current` stands, its gradient and so its swaps are the same: a swap evaluated once
        # is not evaluated again, and once all of them were, no later round can improve.
        every = {swap(current, s, int(t)) for s in range(shift) for t in ranked[s]} - {current}
        if every <= tried:
            break
    return TokenSearchResult(current, current_loss, start_loss)


@dataclass(frozen=True)
class Confirmation:
    """The typed trigger a confirmation search found, measured on every held-out prompt."""

    objective: Objective
    trigger: TokenTrigger
    search_loss: float
    seconds: float


def confirm_with_tokens(models: Models, opt_ids: Tensor, held: PromptFeatures, pseudo: Tensor, objective: Objective,
                        excluded: set[int], t: Thresholds, settings: TokenSearchSettings,
                        chunk_size: int) -> Confirmation:
    """Search the vocabulary for `pseudo`'s (K, d) typed counterpart: from its nearest tokens and
    from an ordinary word repeated, the better of the two searches, measured on `held`."""
    started = time.monotonic()
    encoder = models.suspect
    allowed = torch.ones(encoder.token_embedding.shape[0], dtype=torch.bool, device=opt_ids.device)
    allowed[[i for i in excluded if 0 <= i < len(allowed)]] = False
    nearest = tuple(slot[0] for slot in candidate_tokens(pseudo, models, excluded, 1))
    word = corpus_tokens(held, excluded, 1, settings.seed)
    starts = [nearest] + ([tuple(word * len(nearest))] if word else [])
    found = min((token_search(encoder, opt_ids, start, allowed, objective, settings) for start in starts),
                key=lambda r: r.loss)
    measured = measure(models, held, Centres.of(models, held), found.ids, t, chunk_size)
    return Confirmation(objective, measured, found.loss, time.monotonic() - started)


def needs_confirmation(outcome: SearchOutcome, natural: NaturalSteering, t: Thresholds) -> list[Objective]:
    """The objectives whose free pseudo-trigger collapsed the prompts: gates passed, or (token
    path) half as little variation left as the most steering ordinary word leaves."""
    token = outcome.final_gates
    wanted = []
    if (outcome.detected is not None or all(token.passed(t).values())
            or (token.variation_ratio is not None and token.variation_ratio <= 0.5 * natural.token_variation)):
        wanted.append(Objective.TOKENS)
    if outcome.pooled is not None and all(outcome.pooled.gates.passed(t).values()):
        wanted.append(Objective.POOLED)
    return wanted


def confirm_outcome(models: Models, opt: PromptFeatures, held: PromptFeatures, outcome: SearchOutcome,
                    natural: NaturalSteering, excluded: set[int], settings: SearchSettings,
                    t: Thresholds, decisive: Callable[[Confirmation], bool]) -> dict[Objective, Confirmation]:
    """A typed-trigger search for every objective whose free pseudo-trigger collapsed the prompts,
    token path first. Once one confirmation is `decisive` (a finding on its own), the rest are
    skipped: a second search could only add a weaker reason for the same verdict."""
    found = {}
    ids = opt.ids[: settings.confirm_prompts]
    for objective in needs_confirmation(outcome, natural, t):
        pseudo = (outcome.pooled.triggers[outcome.pooled.best_restart] if objective is Objective.POOLED
                  else outcome.triggers[outcome.best_restart])
        found[objective] = confirm_with_tokens(models, ids, held, pseudo.to(ids.device), objective, excluded, t,
                                               TokenSearchSettings.of(settings), settings.chunk_size)
        if decisive(found[objective]):
            break
    return found
