"""The verification gates: whether a pseudo-trigger makes the held-out prompts collapse.

Gates 1-3 (assimilation, same target, unlike the anchor) are shares of held-out prompts past a
per-prompt threshold, measured for every trigger at once; gate 4 is the loss landscape around
one trigger and its Hessian eigenvalues; the pooled path has its own two gates on pooled
features. Everything here measures a given trigger; nothing optimises one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from amdet_gate.engine.measures import (
    Centres,
    CleanSpread,
    Models,
    PromptFeatures,
    assimilation,
    centred,
    insert_trigger,
    inversion_loss,
    pooled_with_trigger,
    position_similarity,
    position_spread,
    span_mask,
    unit,
)
from amdet_gate.settings import SearchSettings, Thresholds


class Gates:
    """A set of gates: each subclass names its measured (value, threshold) pairs."""

    def measured(self, t: Thresholds) -> dict[str, tuple[float, float]]:
        raise NotImplementedError

    def passed(self, t: Thresholds) -> dict[str, bool]:
        return {name: value > threshold for name, (value, threshold) in self.measured(t).items()}


def _measured(values: dict[str, tuple[float | None, float]]) -> dict[str, tuple[float, float]]:
    return {name: (v, th) for name, (v, th) in values.items() if v is not None}


# --- gates 1-3 ----------------------------------------------------------------------------

@dataclass
class GateValues(Gates):
    """The measured side of each gate (thresholds live in `Thresholds`)."""

    assimilation_ratio: float
    same_target_ratio: float
    anchor_difference_ratio: float | None  # None without an anchor
    landscape_positive_ratio: float | None = None  # None when not computed
    mean_assimilation: float = 0.0
    screened_on: int | None = None  # prompts behind the values when a check stopped early, else None
    # What still tells the held-out prompts apart with the trigger in (`CleanSpread.ratio`); None
    # when not computed. Scale-free: read against ordinary words' (`natural.steering`).
    variation_ratio: float | None = None

    def measured(self, t: Thresholds) -> dict[str, tuple[float, float]]:
        """Each measured gate's (value, threshold), by gate name; gates not measured are left out."""
        return _measured({
            "assimilation_ratio": (self.assimilation_ratio, t.assimilation_ratio),
            "same_target_ratio": (self.same_target_ratio, t.same_target_ratio),
            "anchor_difference_ratio": (self.anchor_difference_ratio, t.anchor_difference_ratio),
            "landscape_positive_ratio": (self.landscape_positive_ratio, t.landscape_positive_ratio),
        })


@dataclass
class HeldOutStats:
    """Per-prompt measures on the held-out set with each trigger inserted, (R, N)."""

    assimilation: Tensor
    same_target: Tensor
    anchor_similarity: Tensor | None
    mean_feature: Tensor  # (R, L, d): the recovered target feature
    first: Tensor  # (R, 1, L, d): the first prompt's output, the "same target" reference
    unit_sum: Tensor  # (R, L, d): sum of the prompts' unit (or centred unit) features, for `spread_of_sum`

    def cpu(self) -> HeldOutStats:
        """The same stats on the CPU, for a result that outlives the device."""
        return HeldOutStats(self.assimilation.cpu(), self.same_target.cpu(),
                            None if self.anchor_similarity is None else self.anchor_similarity.cpu(),
                            self.mean_feature.cpu(), self.first.cpu(), self.unit_sum.cpu())


@torch.no_grad()
def held_out_stats(models: Models, held: PromptFeatures, triggers: Tensor, chunk_size: int,
                   first: Tensor | None = None, span: bool = False,
                   reference: CleanSpread | None = None) -> HeldOutStats:
    """Gates 1-3 inputs for every trigger at once, in chunks of prompts.

    `first` is the reference output for the same-target gate; by default the first prompt's.
    `span`: the measures read only the positions each prompt occupies (`span_mask`).
    `reference`: `unit_sum` holds the features centred on it (`CleanSpread.centred_sum`).
    """
    per_chunk = max(1, chunk_size // triggers.shape[0])
    assim, same, anchor_sim = [], [], []
    feature_sum = torch.zeros(triggers.shape[0], *held.embeds.shape[1:], device=triggers.device)
    unit_sum = torch.zeros_like(feature_sum)
    eos_token, shift = models.suspect.eos_token_id, triggers.shape[1]
    for embeds, ids in zip(held.embeds.split(per_chunk), held.ids.split(per_chunk), strict=True):
        inserted = insert_trigger(embeds, triggers)
        triggered = models.suspect.encode(inserted)
        mask = span_mask(ids, eos_token, shift) if span else None
        if first is None:
            first = triggered[:, :1]
        assim.append(assimilation(triggered, mask))
        same.append(position_similarity(first, triggered, mask))
        feature_sum += triggered.sum(dim=1)
        unit_sum += (unit(triggered).sum(dim=1) if reference is None
                     else reference.centred_sum(triggered, shift))
        if models.anchor is not None:
            anchor_sim.append(position_similarity(models.anchor.encode(inserted), triggered, mask))
    return HeldOutStats(
        assimilation=torch.cat(assim, dim=1),
        same_target=torch.cat(same, dim=1),
        anchor_similarity=torch.cat(anchor_sim, dim=1) if anchor_sim else None,
        mean_feature=feature_sum / len(held),
        first=first,
        unit_sum=unit_sum,
    )


def _hits(stats: HeldOutStats, t: Thresholds) -> dict[str, Tensor]:
    """Per-prompt hits of gates 1-3, (R, N) booleans."""
    hits = {"assimilation_ratio": stats.assimilation > t.assimilation,
            "same_target_ratio": stats.same_target > t.same_target}
    if stats.anchor_similarity is not None:
        hits["anchor_difference_ratio"] = stats.anchor_similarity < 0
    return hits


def _gate_values(hits: dict[str, Tensor], ran: Tensor, assimilation_sum: Tensor, total: int) -> list[GateValues]:
    """Shares from per-trigger hit counts over the `ran` prompts each trigger ran, (R,) tensors.

    Exact counts, not float32 means: 796/800 must not round past 0.995.
    """
    shares = {name: [int(h) / int(n) for h, n in zip(count, ran, strict=True)] for name, count in hits.items()}
    anchor = shares.get("anchor_difference_ratio")
    return [GateValues(shares["assimilation_ratio"][i], shares["same_target_ratio"][i],
                       None if anchor is None else anchor[i], mean_assimilation=float(assimilation_sum[i]) / int(n),
                       screened_on=None if int(n) == total else int(n))
            for i, n in enumerate(ran)]


def gate_values(stats: HeldOutStats, t: Thresholds) -> list[GateValues]:
    """Gates 1-3 per trigger: shares of held-out prompts beyond each per-prompt threshold."""
    r, n = stats.assimilation.shape
    hits = {name: gate_hits.sum(dim=1).cpu() for name, gate_hits in _hits(stats, t).items()}
    return _gate_values(hits, torch.full((r,), n), stats.assimilation.sum(dim=1).cpu(), n)


def screened_gate_values(models: Models, held: PromptFeatures, triggers: Tensor, t: Thresholds,
                         chunk_size: int, screen: int, span: bool = False) -> list[GateValues]:
    """Gates 1-3, stopping early for triggers that can no longer pass.

    A gate passes when hits / N exceed its threshold, so (1 - threshold) * N misses already
    fail it, whatever the other prompts hold. The prompts are run `screen` at a time, and a
    trigger is dropped as soon as it has that many misses of any gate; its values are the
    shares among the prompts it ran (`screened_on`). This is exact for the decision and saves
    most of the cost of checks that fail: a same-target share of 0.97 is out after ~130 of 800.
    """
    total, r = len(held), triggers.shape[0]
    if screen >= total:
        return gate_values(held_out_stats(models, held, triggers, chunk_size, span=span), t)
    hits: dict[str, Tensor] = {}  # per gate, per trigger: prompts that hit it so far
    ran, assimilation_sum = torch.zeros(r, dtype=torch.long), torch.zeros(r)
    alive, first = torch.arange(r), None
    for start in range(0, total, screen):
        part = held_out_stats(models, held.subset(start, start + screen), triggers[alive.to(triggers.device)],
                              chunk_size, None if first is None else first[alive.to(first.device)], span)
        first = part.first if first is None else first  # the first prompt's output, for every trigger
        for name, gate_hits in _hits(part, t).items():
            hits.setdefault(name, torch.zeros(r, dtype=torch.long))[alive] += gate_hits.sum(dim=1).cpu()
        ran[alive] += part.assimilation.shape[1]
        assimilation_sum[alive] += part.assimilation.sum(dim=1).cpu()
        hopeless = torch.zeros(r, dtype=torch.bool)
        for name, count in hits.items():  # gate names are the Thresholds field names
            hopeless |= (ran - count) >= (1 - getattr(t, name)) * total
        alive = alive[~hopeless[alive]]
        if len(alive) == 0:
            break
    return _gate_values(hits, ran, assimilation_sum, total)


# --- gate 4: the landscape ----------------------------------------------------------------

@dataclass
class Landscape:
    """Gate 4: the loss surface around a trigger and the Hessian eigenvalues on it."""

    offsets: Tensor  # (P,) grid coordinates along both directions
    loss: Tensor  # (P, P), rows along d1 (negative gradient), columns along d2
    eigenvalues: Tensor  # (2 * (P-2)^2,)

    def positive_ratio(self, floor: float) -> float:
        return int((self.eigenvalues > floor).sum()) / self.eigenvalues.numel()


def landscape(models: Models, embeds: Tensor, clean: Tensor, trigger: Tensor,
              settings: SearchSettings, generator: torch.Generator, mask: Tensor | None = None) -> Landscape:
    """L(v + a*d1 + b*d2) on a P x P grid for one prompt, then the finite-difference Hessians.

    The trigger's K vectors are one point of a K*d space here: d1 and d2 span all of them.
    """

    def loss_at(points: Tensor) -> Tensor:  # (P, K*d) -> (P,)
        return inversion_loss(models, embeds, clean, points.view(-1, *trigger.shape), settings.beta,
                              settings.gamma, mask)[:, 0]

    flat = trigger.detach().flatten()
    point = flat.clone()[None].requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(loss_at(point).sum(), point)
    d1 = unit(-grad[0])
    d2 = torch.randn(flat.shape, generator=generator).to(flat)
    d2 = unit(d2 - (d2 @ d1) * d1)
    p = settings.landscape_points
    radius = settings.landscape_radius * max(float(flat.norm()), 1e-3)
    offsets = torch.linspace(-radius, radius, p, device=flat.device)
    a, b = torch.meshgrid(offsets, offsets, indexing="ij")
    points = flat[None] + a.reshape(-1, 1) * d1 + b.reshape(-1, 1) * d2
    with torch.no_grad():
        surface = torch.cat([loss_at(c) for c in points.split(settings.chunk_size)]).reshape(p, p)
    return Landscape(offsets.cpu(), surface.cpu(), hessian_eigenvalues(surface.cpu(), 2 * radius / (p - 1)))


def hessian_eigenvalues(surface: Tensor, spacing: float) -> Tensor:
    """Eigenvalues of the 2 x 2 central-difference Hessian at every interior grid point."""
    f = surface.double()
    faa = (f[2:, 1:-1] - 2 * f[1:-1, 1:-1] + f[:-2, 1:-1]) / spacing**2
    fbb = (f[1:-1, 2:] - 2 * f[1:-1, 1:-1] + f[1:-1, :-2]) / spacing**2
    fab = (f[2:, 2:] - f[2:, :-2] - f[:-2, 2:] + f[:-2, :-2]) / (4 * spacing**2)
    hessians = torch.stack([torch.stack([faa, fab], -1), torch.stack([fab, fbb], -1)], -2)
    return torch.linalg.eigvalsh(hessians).reshape(-1).float()


# --- the pooled path's gates ----------------------------------------------------------------

@dataclass
class PooledGates(Gates):
    """The pooled path's gates: one pooled target for most prompts, unlike the anchor's."""

    same_target_ratio: float  # share of held-out prompts at centred cosine > t.pooled_same_target to the first's
    # Share of prompts at which the anchor, given the same trigger, does *not* land on its first
    # prompt's pooled feature: the collapse is the suspect's, not a natural one of the base.
    anchor_difference_ratio: float | None  # None without an anchor
    # The triggered prompts' centred pooled spread over the clean ones': 0, one output for all.
    variation_ratio: float | None = None

    def measured(self, t: Thresholds) -> dict[str, tuple[float, float]]:
        """Each measured gate's (value, threshold), by gate name; gates not measured are left out."""
        return _measured({
            "pooled_same_target_ratio": (self.same_target_ratio, t.pooled_same_target_ratio),
            "pooled_anchor_difference_ratio": (self.anchor_difference_ratio, t.anchor_difference_ratio),
        })


@torch.no_grad()
def pooled_gates(models: Models, held: PromptFeatures, eos: Tensor, centres: Centres, triggers: Tensor,
                 t: Thresholds, chunk_size: int) -> tuple[list[PooledGates], Tensor]:
    """Pooled gates for every trigger, and the per-prompt similarity to each target, (R, N)."""
    per_chunk = max(1, chunk_size // triggers.shape[0])
    # Chunks of prompts of similar length: each chunk is cut after its longest prompt's EOS.
    order = eos.argsort(stable=True)
    pooled, anchored = [], []
    for index in order.split(per_chunk):
        embeds, where = held.embeds[index], eos[index]
        pooled.append(centred(pooled_with_trigger(models.suspect, embeds, where, triggers), centres.suspect))
        if models.anchor is not None and centres.anchor is not None:
            anchored.append(centred(pooled_with_trigger(models.anchor, embeds, where, triggers), centres.anchor))
    unsort = order.argsort()
    features = torch.cat(pooled, dim=1)[:, unsort]
    similarity = (features * features[:, :1]).sum(dim=-1)  # as gate 2: the first prompt's is the target
    same = (similarity > t.pooled_same_target).sum(dim=1).tolist()
    differ = None
    if anchored:
        anchor_features = torch.cat(anchored, dim=1)[:, unsort]
        anchor_similarity = (anchor_features * anchor_features[:, :1]).sum(dim=-1)
        differ = (anchor_similarity <= t.pooled_same_target).sum(dim=1).tolist()
    n = len(held)
    spread = position_spread(features[:, :, None])[:, 0] / max(centres.clean_spread, 1e-8)
    gates = [PooledGates(same[r] / n, None if differ is None else differ[r] / n, float(spread[r]))
             for r in range(len(same))]
    return gates, similarity
