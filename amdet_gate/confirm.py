"""Real-token confirmation: do vocabulary tokens near the pseudo-trigger reproduce its collapse?

A pseudo-trigger is a free vector; a backdoor is fired by tokens a user can type. The tokens
nearest each trigger vector (as real inputs at that slot: token + position embedding) are
inserted after BOS as ordinary ids, alone and in combinations, and the same gates are
measured. A finding that real tokens reproduce is far stronger evidence than one that only a
free vector reaches, and it tells the reviewer the likely trigger.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from amdet_gate.engine import (
    Centres,
    CleanSpread,
    Models,
    PromptFeatures,
    assimilation,
    centred,
    eos_positions,
    position_similarity,
    position_spread,
    span_mask,
    spread_of_sum,
)
from amdet_gate.engine import unit as _unit
from amdet_gate.settings import Thresholds


@dataclass(frozen=True)
class TokenTrigger:
    ids: tuple[int, ...]  # inserted after BOS, in this order
    same_target_ratio: float  # token path: share of prompts at S > t.same_target to the first prompt's output
    assimilation_ratio: float
    variation_ratio: float  # token path: `engine.CleanSpread.ratio` against the same prompts' clean outputs
    pooled_same_target_ratio: float  # pooled path: share at centred cosine > t.pooled_same_target
    pooled_variation_ratio: float  # pooled path: centred spread over the clean one
    screened_on: int  # held-out prompts behind these shares


def insert_tokens(ids: Tensor, tokens: tuple[int, ...]) -> Tensor:
    """[BOS, t_1 .. t_j, ids_1 .. ids_{L-1-j}]: real tokens after BOS, each with its own position embedding."""
    j = len(tokens)
    inserted = torch.tensor(tokens, dtype=ids.dtype, device=ids.device).expand(ids.shape[0], j)
    return torch.cat([ids[:, :1], inserted, ids[:, 1 : ids.shape[1] - j]], dim=1)


def candidate_tokens(trigger: Tensor, models: Models, excluded: set[int], per_slot: int) -> list[list[int]]:
    """Each trigger vector's `per_slot` nearest tokens, as real inputs at its slot (cosine)."""
    encoder = models.suspect
    tokens = encoder.token_embedding.detach()
    keep = torch.ones(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    keep[[i for i in excluded if 0 <= i < tokens.shape[0]]] = False
    out = []
    for slot, vector in enumerate(trigger.to(tokens.device), start=1):
        inputs = tokens + encoder.position_embedding.detach()[slot]
        cosine = _unit(inputs) @ _unit(vector)
        cosine[~keep] = -2.0
        out.append(cosine.topk(per_slot).indices.tolist())
    return out


def combinations(candidates: list[list[int]], pairs_from: int) -> list[tuple[int, ...]]:
    """Single tokens of every slot, then the slots' tokens in order (top `pairs_from` of each)."""
    singles = [(t,) for slot in candidates for t in slot]
    joint = list(itertools.product(*[slot[:pairs_from] for slot in candidates])) if len(candidates) > 1 else []
    return list(dict.fromkeys(singles + joint))


@torch.no_grad()
def measure(models: Models, held: PromptFeatures, centres: Centres, tokens: tuple[int, ...], t: Thresholds,
            chunk_size: int, span: bool = False) -> TokenTrigger:
    """The token-path and pooled measures with these real tokens inserted into every held-out
    prompt, read as the search reads a pseudo-trigger's (`span`: `SearchSettings.span_measures`)."""
    encoder = models.suspect
    eos_token, shift = encoder.eos_token_id, len(tokens)
    same, assim, pooled, pooled_all_units = [], [], [], []
    first = first_pooled = unit_sum = None
    reference = CleanSpread.of(held.clean, chunk_size)
    for ids in held.ids.split(chunk_size):
        features = encoder.encode(encoder.embed(insert_tokens(ids, tokens)))
        mask = span_mask(ids, eos_token, shift) if span else None
        first = features[:1] if first is None else first
        same.append(position_similarity(first, features, mask))
        assim.append(assimilation(features, mask))
        summed = reference.centred_sum(features, shift)
        unit_sum = summed if unit_sum is None else unit_sum + summed
        eos = eos_positions(ids, eos_token, shift)
        pooled_now = centred(encoder.project(features[torch.arange(len(ids)), eos]), centres.suspect)
        first_pooled = pooled_now[:1] if first_pooled is None else first_pooled
        pooled.append((pooled_now * first_pooled).sum(dim=-1))
        pooled_all_units.append(pooled_now)
    same_all, assim_all, pooled_all = torch.cat(same), torch.cat(assim), torch.cat(pooled)
    n = len(same_all)
    token_variation = reference.ratio(spread_of_sum(unit_sum, n), shift)
    pooled_spread = position_spread(torch.cat(pooled_all_units)[:, None])[0] / max(centres.clean_spread, 1e-8)
    return TokenTrigger(tokens, int((same_all > t.same_target).sum()) / n, int((assim_all > t.assimilation).sum()) / n,
                        float(token_variation), int((pooled_all > t.pooled_same_target).sum()) / n,
                        float(pooled_spread), n)


def confirm(models: Models, held: PromptFeatures, trigger: Tensor, t: Thresholds, excluded: set[int],
            chunk_size: int, screen: int = 50, per_slot: int = 8, pairs_from: int = 4,
            keep: int = 3) -> list[TokenTrigger]:
    """The best real-token triggers near `trigger` (K, d), strongest first, measured on every
    held-out prompt; candidates are screened on the first `screen` prompts."""
    centres = Centres.of(models, held)
    options = combinations(candidate_tokens(trigger, models, excluded, per_slot), pairs_from)
    first = held.subset(0, min(screen, len(held)))
    screened = [measure(models, first, centres, tokens, t, chunk_size) for tokens in options]
    screened.sort(key=lambda m: -max(m.same_target_ratio, m.pooled_same_target_ratio))
    return [measure(models, held, centres, m.ids, t, chunk_size) for m in screened[:keep]]


def corpus_tokens(held: PromptFeatures, excluded: set[int], count: int, seed: int) -> list[int]:
    """`count` distinct content tokens of the prompt corpus, drawn with a seed: ordinary words."""
    present = sorted(set(held.ids.flatten().tolist()) - excluded)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(present), generator=generator)[:count].tolist()
    return [present[i] for i in order]


@dataclass(frozen=True)
class NaturalSteering:
    """How far ordinary words steer this encoder, the reference a pseudo-trigger is read against.

    An encoder whose pooled output is a classifier's (class-contrastive fine-tunes) sends every
    prompt to the class of a word put in front of it: there a pooled collapse is the encoder's
    nature, not evidence of a backdoor. Free vectors reach further than words; how much
    further is what `verdict.decide` weighs.
    """

    words: tuple[TokenTrigger, ...]  # every word measured, in draw order

    @property
    def token_variation(self) -> float:
        """The lowest token-path `variation_ratio` an ordinary word reached (1.0 when none measured)."""
        return min((w.variation_ratio for w in self.words), default=1.0)

    @property
    def pooled_share(self) -> float:
        return max((w.pooled_same_target_ratio for w in self.words), default=0.0)

    @property
    def pooled_variation(self) -> float:
        return min((w.pooled_variation_ratio for w in self.words), default=1.0)


@torch.no_grad()
def natural_steering(models: Models, held: PromptFeatures, t: Thresholds, excluded: set[int], chunk_size: int,
                     tokens: int = 16, prompts: int = 32, seed: int = 0, span: bool = False) -> NaturalSteering:
    """Each of `tokens` corpus words, inserted twice after BOS (the trigger's two slots), measured
    on the first `prompts` held-out prompts."""
    centres = Centres.of(models, held)  # the pooled search's centre
    first = held.subset(0, min(prompts, len(held)))
    return NaturalSteering(tuple(measure(models, first, centres, (token, token), t, chunk_size, span)
                                 for token in corpus_tokens(held, excluded, tokens, seed)))
