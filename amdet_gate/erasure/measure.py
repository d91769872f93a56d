"""What a repair is judged by: clean fidelity, what a trigger still does, the scan's own gates.

- Clean fidelity: held-out prompts' features before / after, as the mean position-wise cosine
  of the last hidden states (method.md's S) and the cosine of the pooled EOS features; the
  smaller of the two is the figure `--min-fidelity` is held to.
- Attack share of an inserted trigger: the share of prompts whose triggered output is nearer
  the trigger's target (its mean triggered output on the suspect) than the prompt's own clean
  output (shifted as the insertion shifts it). Measured over all token features for a
  token-path finding and on the pooled feature for a pooled-path one (a text-on-pair backdoor
  moves only the pooled feature). A clean base model scores near zero.
- The gates: the engine's own gate values with the pseudo-trigger inserted, and the scan's
  typed-trigger measures (confirm.measure) with the typed trigger put in front (same prompts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from amdet_gate.confirm import measure as measure_typed
from amdet_gate.encoders.clip import ClipTextAdapter
from amdet_gate.engine import (
    Centres,
    Models,
    PromptFeatures,
    eos_positions,
    gate_values,
    held_out_stats,
    pooled_gates,
    position_similarity,
)
from amdet_gate.engine import unit as _unit
from amdet_gate.erasure.edit import counterpart, insert_at
from amdet_gate.erasure.findings import DetectionPath
from amdet_gate.settings import Thresholds


@dataclass(frozen=True)
class Fidelity:
    tokens: float  # mean over prompts of S(F_before, F_after)
    pooled: float  # mean cosine of the pooled features
    worst_prompt: float  # the lowest per-prompt S

    @property
    def value(self) -> float:
        return min(self.tokens, self.pooled)


@dataclass(frozen=True)
class GateReading:
    """The scan's gate values with one trigger inserted, on the repair's held-out prompts."""

    assimilation_ratio: float
    same_target_ratio: float
    pooled_same_target_ratio: float
    mean_assimilation: float

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 6) for k, v in vars(self).items()}


@dataclass(frozen=True)
class Target:
    """What a trigger makes the suspect produce, in the space its attack is measured in."""

    space: DetectionPath
    feature: Tensor  # (L, d) for tokens, (d,) pooled


@torch.no_grad()
def features(adapter: ClipTextAdapter, embeds: Tensor, chunk: int) -> Tensor:
    return torch.cat([adapter.encode(part) for part in embeds.split(chunk)])


def pooled(adapter: ClipTextAdapter, feats: Tensor, ids: Tensor, shift: int = 0) -> Tensor:
    """The feature at each prompt's EOS, which an insertion of `shift` slots moves right."""
    eos = eos_positions(ids, adapter.eos_token_id, shift)
    return feats[torch.arange(feats.shape[0], device=feats.device), eos]


def _cos(a: Tensor, b: Tensor) -> Tensor:
    return (_unit(a) * _unit(b)).sum(dim=-1)


@torch.no_grad()
def fidelity(before: Tensor, after: Tensor, ids: Tensor, eos_token_id: int) -> Fidelity:
    """Clean features of the original (before) and repaired (after) model, (B, L, d) each."""
    per_prompt = position_similarity(before, after)
    eos = eos_positions(ids, eos_token_id, 0)
    rows = torch.arange(before.shape[0], device=before.device)
    return Fidelity(float(per_prompt.mean()), float(_cos(before[rows, eos], after[rows, eos]).mean()),
                    float(per_prompt.min()))


@torch.no_grad()
def triggered(adapter: ClipTextAdapter, embeds: Tensor, vectors: Tensor, chunk: int) -> Tensor:
    """Outputs with `vectors` (K, d) inserted after BOS, (B, L, d)."""
    at = torch.ones(embeds.shape[0], 1, dtype=torch.long, device=embeds.device)
    return features(adapter, insert_at(embeds, vectors.to(embeds), at), chunk)


@torch.no_grad()
def target_of(adapter: ClipTextAdapter, held: PromptFeatures, vectors: Tensor, space: DetectionPath,
              chunk: int) -> Target:
    out = triggered(adapter, held.embeds, vectors, chunk)
    if space is DetectionPath.POOLED:
        return Target(space, _unit(pooled(adapter, out, held.ids, vectors.shape[0])).mean(dim=0))
    return Target(space, out.mean(dim=0))


@torch.no_grad()
def attack_share(adapter: ClipTextAdapter, held: PromptFeatures, clean: Tensor, vectors: Tensor,
                 target: Target, chunk: int) -> float:
    """Share of prompts whose output with `vectors` inserted is nearer `target` than their own clean
    output (the module docstring); `clean` is the same model's clean output on `held`."""
    out = triggered(adapter, held.embeds, vectors, chunk)
    k = vectors.shape[0]
    if target.space is DetectionPath.POOLED:
        p = pooled(adapter, out, held.ids, k)
        hits = _cos(p, target.feature) > _cos(p, pooled(adapter, clean, held.ids))
    else:
        at = torch.ones(out.shape[0], 1, dtype=torch.long, device=out.device)
        hits = position_similarity(out, target.feature[None, : out.shape[1]]) > position_similarity(
            out, counterpart(clean, k, at))
    return float(hits.float().mean())


@torch.no_grad()
def gate_reading(adapter: ClipTextAdapter, held: PromptFeatures, trigger: Tensor, thresholds: Thresholds,
                 chunk: int) -> GateReading:
    """Gates 1-2 and the pooled gate of the scan (engine), for one trigger (K, d), no anchor;
    `held.clean` must be this model's own clean outputs."""
    models = Models(adapter)
    trigger = trigger.to(held.embeds)[None]
    token = gate_values(held_out_stats(models, held, trigger, chunk), thresholds)[0]
    eos = eos_positions(held.ids, adapter.eos_token_id, trigger.shape[1])
    pooled_gate, _ = pooled_gates(models, held, eos, Centres.of(models, held), trigger, thresholds, chunk)
    return GateReading(token.assimilation_ratio, token.same_target_ratio, pooled_gate[0].same_target_ratio,
                       token.mean_assimilation)


@dataclass(frozen=True)
class TypedReading:
    """The scan's typed-trigger measures (confirm.measure) for real tokens put after BOS."""

    tokens: tuple[int, ...]
    same_target_ratio: float
    assimilation_ratio: float
    variation_ratio: float
    pooled_same_target_ratio: float

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 6) for k, v in vars(self).items() if k != "tokens"}


@torch.no_grad()
def typed_reading(adapter: ClipTextAdapter, held: PromptFeatures, tokens: tuple[int, ...], thresholds: Thresholds,
                  chunk: int) -> TypedReading:
    """As the scan confirms a typed trigger; `held.clean` must be this model's own clean outputs."""
    models = Models(adapter)
    m = measure_typed(models, held, Centres.of(models, held), tokens, thresholds, chunk)
    return TypedReading(tokens, m.same_target_ratio, m.assimilation_ratio, m.variation_ratio,
                        m.pooled_same_target_ratio)


@torch.no_grad()
def prompt_target(adapter: ClipTextAdapter, triggered_ids: Tensor, space: DetectionPath, chunk: int) -> Target:
    """A real trigger's target: the mean output of prompts that carry it (the suspect's)."""
    out = features(adapter, adapter.embed(triggered_ids), chunk)
    if space is DetectionPath.POOLED:
        return Target(space, _unit(pooled(adapter, out, triggered_ids)).mean(dim=0))
    return Target(space, out.mean(dim=0))


@torch.no_grad()
def attack_success(adapter: ClipTextAdapter, clean_ids: Tensor, triggered_ids: Tensor, target: Target,
                   chunk: int) -> float:
    """Share of prompts whose triggered version (real text, e.g. with the attacker's trigger) is
    nearer `target` than the same prompt without it, as attack_share for an inserted trigger."""
    clean = features(adapter, adapter.embed(clean_ids), chunk)
    out = features(adapter, adapter.embed(triggered_ids), chunk)
    if target.space is DetectionPath.POOLED:
        p = pooled(adapter, out, triggered_ids)
        hits = _cos(p, target.feature) > _cos(p, pooled(adapter, clean, clean_ids))
    else:
        hits = position_similarity(out, target.feature[None]) > position_similarity(out, clean)
    return float(hits.float().mean())
