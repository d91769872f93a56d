"""The AMDet scan: invert a pseudo-trigger that makes token features assimilate, then verify.

Read top to bottom: the two measures (assimilation A, position-wise similarity S), the
trigger insertion, the inversion loss, the four verification gates, and the search loop.
Shapes: R restarts, K trigger vectors, B prompts, L positions, d width. Everything is
batched; nothing loops over single prompts. See docs/method.md for the method this implements.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from amdet_gate.encoder import TextEncoderAdapter
from amdet_gate.settings import SearchProgress, SearchSettings, Thresholds

# --- measures ---------------------------------------------------------------------------

def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def assimilation(features: Tensor, mask: Tensor | None = None) -> Tensor:
    """A(F): mean of the L x L token cosine matrix, (..., L, d) -> (...).

    mean_ij cos(F_i, F_j) = |sum_i F_i/|F_i||^2 / L^2, which avoids building the matrix.
    With a mask (..., L) (broadcast against the features), only the masked positions count.
    """
    unit = _unit(features)
    if mask is None:
        summed = unit.sum(dim=-2)
        return (summed * summed).sum(dim=-1) / features.shape[-2] ** 2
    weight = mask.to(unit.dtype)
    summed = (unit * weight[..., None]).sum(dim=-2)
    return (summed * summed).sum(dim=-1) / weight.sum(dim=-1).clamp_min(1) ** 2


def position_similarity(a: Tensor, b: Tensor, mask: Tensor | None = None) -> Tensor:
    """S(F, G): mean position-wise cosine similarity, (..., L, d) x (..., L, d) -> (...);
    over the masked positions (..., L) only when a mask is given."""
    cosine = (_unit(a) * _unit(b)).sum(dim=-1)
    if mask is None:
        return cosine.mean(dim=-1)
    weight = mask.to(cosine.dtype)
    return (cosine * weight).sum(dim=-1) / weight.sum(dim=-1).clamp_min(1)


def position_spread(unit: Tensor) -> Tensor:
    """1 - the mean cosine between different prompts' features at each position: (..., N, L, d)
    unit features -> (..., L). 0: every prompt has the same feature there."""
    return spread_of_sum(unit.sum(dim=-3), unit.shape[-3])


def spread_of_sum(summed: Tensor, n: int) -> Tensor:
    """`position_spread` from the sum of N prompts' unit features, (..., L, d) -> (..., L):
    sum_{p != q} cos(F_p, F_q) = |sum_p F_p|^2 - N, so the prompts can be run in chunks."""
    return 1 - ((summed * summed).sum(dim=-1) - n) / max(n * (n - 1), 1)


@dataclass(frozen=True)
class CleanSpread:
    """What tells the clean prompts apart at each position: the reference of a variation ratio.

    Features are compared after removing each position's mean clean direction (`centre`):
    encoders whose outputs share a large common direction (every prompt at cosine 0.9 to every
    other) would otherwise look collapsed whatever a trigger does. Positions weigh what clean
    prompts differ there before centring (`weight`), so padding that is alike across prompts or
    position-specific weighs nothing, and a position that carries the prompt weighs what it carries.
    """

    centre: Tensor  # (L, d): mean unit clean feature per position
    weight: Tensor  # (L,): `position_spread` of the clean features
    spread: Tensor  # (L,): `position_spread` of the centred clean features

    @classmethod
    def of(cls, clean: Tensor, chunk_size: int = 256) -> CleanSpread:
        """From clean features (N, L, d)."""
        n = clean.shape[0]
        unit_sum = sum(_unit(c).sum(dim=0) for c in clean.split(chunk_size))
        centre = unit_sum / n
        centred_sum = sum(_unit(_unit(c) - centre).sum(dim=0) for c in clean.split(chunk_size))
        return cls(centre, spread_of_sum(unit_sum, n), spread_of_sum(centred_sum, n))

    def shifted_centre(self, shift: int, length: int) -> Tensor:
        """The centre of triggered features (length, d): slot l > shift holds clean position l - shift."""
        return torch.cat([self.centre[:1].expand(shift + 1, -1), self.centre[1 : length - shift]])

    def centred_sum(self, features: Tensor, shift: int) -> Tensor:
        """Sum over prompts of the centred unit triggered features, (..., N, L, d) -> (..., L, d)."""
        return _unit(_unit(features) - self.shifted_centre(shift, features.shape[-2])).sum(dim=-3)

    def ratio(self, spread: Tensor, shift: int) -> Tensor:
        """How much of what tells prompts apart is left with a trigger of `shift` vectors in:
        `spread` (..., L) is the triggered prompts' centred spread. 1: as varied as clean
        prompts; 0: one output whatever the prompt."""
        length = spread.shape[-1]
        weight = self.weight[1 : length - shift]
        clean = (self.spread[1 : length - shift] * weight).sum().clamp_min(1e-8)
        return (spread[..., shift + 1 :] * weight).sum(dim=-1) / clean


def span_mask(ids: Tensor, eos_token_id: int, shift: int, length: int | None = None) -> Tensor:
    """The positions a prompt occupies after a trigger of `shift` vectors, (B, L) booleans:
    from the first token after the trigger to the prompt's (shifted) EOS.

    BOS and the trigger's slots are left out: under a causal mask their features do not
    depend on the prompt. So is the padding: an encoder may keep it position-specific
    (LongCLIP-style), alike across prompts, or anything between, and at 248 positions it would
    outweigh the 10-20 positions that carry the prompt.
    """
    length = ids.shape[-1] if length is None else length
    positions = torch.arange(length, device=ids.device)
    eos = eos_positions(ids, eos_token_id, shift)
    return (positions[None] > shift) & (positions[None] <= eos[:, None])


def insert_trigger(embeds: Tensor, triggers: Tensor) -> Tensor:
    """H' = [H_0, v_1 .. v_K, H_1 .. H_{L-1-K}] for every trigger and prompt: (B,L,d) x (R,K,d) -> (R,B,L,d).

    Tokens shift right K slots but keep their own position embedding (it is inside H);
    the trigger vectors get none; the last K slots fall off. method.md inserts one vector
    (K = 1); amdet-gate uses two by default, because a trigger of several tokens (a phrase, a
    homoglyph split into byte tokens) is not reached by one vector on deeper encoders.
    """
    (r, k, _), (b, length, d) = triggers.shape, embeds.shape
    head = embeds[None, :, :1].expand(r, b, 1, d)
    tail = embeds[None, :, 1 : length - k].expand(r, b, length - 1 - k, d)
    trig = triggers[:, None].expand(r, b, k, d)
    return torch.cat([head, trig, tail], dim=2)


def eos_positions(ids: Tensor, eos_token_id: int, shift: int) -> Tensor:
    """Index of each prompt's first EOS after inserting a trigger of `shift` vectors, (B,)."""
    return ((ids == eos_token_id).int().argmax(dim=-1) + shift).clamp(max=ids.shape[-1] - 1)


@dataclass
class Models:
    suspect: TextEncoderAdapter
    anchor: TextEncoderAdapter | None = None


def inversion_loss(models: Models, embeds: Tensor, clean: Tensor, triggers: Tensor,
                   beta: float, gamma: float, mask: Tensor | None = None) -> Tensor:
    """L(v) = -A(F_s) + beta * S(F_orig, F_s) + gamma * S(F_anchor, F_s), per (restart, prompt).

    With a span mask (B, L) the measures read only the positions the prompts occupy.
    """
    inserted = insert_trigger(embeds, triggers)
    triggered = models.suspect.encode(inserted)
    shifted_clean = clean[None]
    loss = -assimilation(triggered, mask) + beta * position_similarity(shifted_clean, triggered, mask)
    if models.anchor is not None and gamma:
        loss = loss + gamma * position_similarity(models.anchor.encode(inserted), triggered, mask)
    return loss


# --- prompt features, computed once -----------------------------------------------------

@dataclass
class PromptFeatures:
    """Input embeddings H and clean outputs F_orig of a prompt set, kept in memory.

    `clean` is None for the optimisation prompts: a search draws fewer than half of them, so
    their clean outputs are computed batch by batch (`clean_features`) instead of all up front.
    """

    ids: Tensor
    embeds: Tensor
    clean: Tensor | None

    def __len__(self) -> int:
        return self.ids.shape[0]

    def subset(self, start: int, stop: int) -> PromptFeatures:
        clean = None if self.clean is None else self.clean[start:stop]
        return PromptFeatures(self.ids[start:stop], self.embeds[start:stop], clean)


@torch.no_grad()
def precompute(encoder: TextEncoderAdapter, ids: Tensor, chunk_size: int, clean: bool = True) -> PromptFeatures:
    ids = ids.to(encoder.device)
    embeds = torch.cat([encoder.embed(c) for c in ids.split(chunk_size)])
    if not clean:
        return PromptFeatures(ids, embeds, None)
    return PromptFeatures(ids, embeds, torch.cat([encoder.encode(c) for c in embeds.split(chunk_size)]))


@torch.no_grad()
def clean_features(encoder: TextEncoderAdapter, prompts: PromptFeatures, index: Tensor, length: int) -> Tensor:
    """F_orig of the indexed prompts' first `length` positions: the stored ones, else computed now."""
    if prompts.clean is not None:
        return prompts.clean[index, :length]
    return encoder.encode(prompts.embeds[index, :length])


def optimisation_length(ids: Tensor, eos_token_id: int, settings: SearchSettings) -> int:
    """Positions a token-path step runs for these prompts: up to the last EOS after the trigger's
    shift, plus `pad_positions` of padding (all of them when that is negative).

    The mask is causal, so the kept positions are exactly what the full sequences would give.
    Prompts are ~20 tokens of 77 (or 248): the steps cost a third (a tenth) as much. What is
    left out is padding, whose features follow the prompt's; the gates and the landscape see
    every position.
    """
    length = ids.shape[-1]
    if settings.pad_positions < 0:
        return length
    last_eos = int(eos_positions(ids, eos_token_id, settings.trigger_vectors).max())
    return min(length, last_eos + 1 + settings.pad_positions)


# --- verification gates -----------------------------------------------------------------

class Gates:
    """A set of gates: each subclass names its measured (value, threshold) pairs."""

    def measured(self, t: Thresholds) -> dict[str, tuple[float, float]]:
        raise NotImplementedError

    def passed(self, t: Thresholds) -> dict[str, bool]:
        return {name: value > threshold for name, (value, threshold) in self.measured(t).items()}


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


def _measured(values: dict[str, tuple[float | None, float]]) -> dict[str, tuple[float, float]]:
    return {name: (v, th) for name, (v, th) in values.items() if v is not None}


@dataclass
class HeldOutStats:
    """Per-prompt measures on the held-out set with each trigger inserted, (R, N)."""

    assimilation: Tensor
    same_target: Tensor
    anchor_similarity: Tensor | None
    mean_feature: Tensor  # (R, L, d): the recovered target feature
    first: Tensor  # (R, 1, L, d): the first prompt's output, the "same target" reference
    unit_sum: Tensor  # (R, L, d): sum of the prompts' unit (or centred unit) features, for `spread_of_sum`


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
        unit_sum += (_unit(triggered).sum(dim=1) if reference is None
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
    d1 = _unit(-grad[0])
    d2 = torch.randn(flat.shape, generator=generator).to(flat)
    d2 = _unit(d2 - (d2 @ d1) * d1)
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


# --- the pseudo-trigger's range -----------------------------------------------------------

def trigger_bound(encoder: TextEncoderAdapter, vectors: int) -> float:
    """The largest norm of any real input at the trigger's slots: a token's embedding plus the
    position embedding of slot 1 .. K. No prompt a user types reaches a vector beyond it, and a
    free vector tens of times larger can steer any causal encoder's output where it likes."""
    tokens = encoder.token_embedding.detach()
    slots = encoder.position_embedding.detach()[1 : vectors + 1]
    squared = (tokens * tokens).sum(dim=1)[None] + 2 * slots @ tokens.T + (slots * slots).sum(dim=1)[:, None]
    return float(squared.max().clamp_min(0).sqrt())


def start_triggers(settings: SearchSettings, restarts: int, width: int, bound: float | None,
                   generator: torch.Generator, device: torch.device) -> tuple[Tensor, float]:
    """Seeded starting triggers (R, K, d) and the scale of their coordinates.

    Free triggers start at N(0, 1) as in the reference; bounded ones at the same spread scaled
    to the bound, and the optimiser's step is scaled alike, so one learning rate serves both.
    """
    scale = 1.0 if bound is None else bound / math.sqrt(width)
    triggers = torch.randn(restarts, settings.trigger_vectors, width, generator=generator) * scale
    if bound is not None:
        clip_triggers(triggers, bound)
    return triggers.to(device).requires_grad_(True), scale


@torch.no_grad()
def clip_triggers(triggers: Tensor, bound: float | None) -> None:
    """Project every trigger vector back into the ball of radius `bound` (in place)."""
    if bound is not None:
        norms = triggers.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        triggers.mul_((bound / norms).clamp(max=1.0))


# --- one optimiser step, shared by both searches ---------------------------------------

def descend(optimiser: torch.optim.Optimizer, loss: Tensor, triggers: Tensor, history: list[Tensor],
            bound: float | None = None) -> bool:
    """One step on the per-restart losses (R,); records them. False once a loss or trigger is non-finite."""
    optimiser.zero_grad(set_to_none=True)
    loss.sum().backward()  # restarts are independent: each v only moves its own loss
    optimiser.step()
    clip_triggers(triggers, bound)
    history.append(loss.detach().cpu())
    return bool(torch.isfinite(history[-1]).all() and torch.isfinite(triggers).all())


# --- the pooled path: backdoors that move only the pooled (EOS) feature -----------------
# A text-on-pair backdoor is trained through the pooled EOS embedding alone: triggered
# prompts' EOS (and padding) features go to the target while their content tokens stay as
# they were, so gates 1-2 stay low. This path inverts a trigger that makes the *pooled*
# features of all prompts agree instead. CLIP's pooled features share a large common
# direction, which would count as agreement on any model, so they are measured after
# removing the clean prompts' mean direction (`centre`); the beta and gamma terms are the
# same as in the token loss. Its trigger has as many vectors as the token path's: with two,
# phrase and homoglyph text-on-pair backdoors of 6-layer encoders are found in 75-100 steps
# (none with one), and benign encoders stay at shares of 0.01-0.11 (bench/detection.py).

def pooled_with_trigger(encoder: TextEncoderAdapter, embeds: Tensor, eos: Tensor, triggers: Tensor) -> Tensor:
    """Pooled features with each trigger inserted, (R, B, d).

    The mask is causal, so nothing after the last EOS can change a pooled feature: the
    sequences are cut there, which makes this path several times cheaper than the token one.
    """
    cut = int(eos.max()) + 1
    features = encoder.encode(insert_trigger(embeds[:, :cut], triggers))
    index = eos[None, :, None, None].expand(features.shape[0], -1, 1, features.shape[-1])
    return encoder.project(features.gather(2, index).squeeze(2))


def centred(pooled: Tensor, centre: Tensor) -> Tensor:
    """Unit pooled features with the clean mean direction removed, unit again."""
    return _unit(_unit(pooled) - centre)


@torch.no_grad()
def clean_pooled(encoder: TextEncoderAdapter, embeds: Tensor, ids: Tensor) -> Tensor:
    """Pooled features without a trigger, (B, d), cut after the last EOS as above."""
    cut = int(eos_positions(ids, encoder.eos_token_id, shift=0).max()) + 1
    return encoder.pooled(encoder.encode(embeds[:, :cut]), ids[:, :cut])


@dataclass
class Centres:
    """Mean direction of the clean prompts' unit pooled features, per model."""

    suspect: Tensor
    anchor: Tensor | None  # the anchor's, fed the suspect's input embeddings as in the token loss
    clean_spread: float = 1.0  # `position_spread` of the sample's centred clean pooled features

    @classmethod
    def of(cls, models: Models, prompts: PromptFeatures, sample: int = 512) -> Centres:
        ids, embeds = prompts.ids[:sample], prompts.embeds[:sample]
        suspect = (clean_pooled(models.suspect, embeds, ids) if prompts.clean is None
                   else models.suspect.pooled(prompts.clean[:sample], ids))  # stored: no forward again
        anchor = None if models.anchor is None else _unit(clean_pooled(models.anchor, embeds, ids)).mean(dim=0)
        centre = _unit(suspect).mean(dim=0)
        spread = float(position_spread(centred(suspect, centre)[:, None])[0])
        return cls(centre, anchor, spread)


def pooled_loss(models: Models, embeds: Tensor, eos: Tensor, clean_pooled: Tensor, centres: Centres,
                triggers: Tensor, beta: float, gamma: float) -> Tensor:
    """-agreement of the centred pooled features across the batch + beta * S(clean) + gamma * S(anchor), (R,)."""
    pooled = pooled_with_trigger(models.suspect, embeds, eos, triggers)
    suspect = centred(pooled, centres.suspect)
    summed = suspect.sum(dim=1)
    agreement = (summed * summed).sum(dim=-1) / pooled.shape[1] ** 2
    loss = -agreement + beta * (_unit(pooled) * _unit(clean_pooled)[None]).sum(dim=-1).mean(dim=1)
    if models.anchor is not None and centres.anchor is not None and gamma:
        anchored = centred(pooled_with_trigger(models.anchor, embeds, eos, triggers), centres.anchor)
        loss = loss + gamma * (anchored * suspect).sum(dim=-1).mean(dim=1)
    return loss


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


@dataclass
class PooledOutcome:
    triggers: Tensor  # (R, K, d)
    best_restart: int
    gates: PooledGates  # on the best restart
    similarity: Tensor  # (N,) centred cosine of each held-out prompt's pooled feature to the first prompt's
    loss_history: Tensor  # (steps, R)
    steps: int
    detected_at_step: int | None
    stop_reason: str  # detected | max_steps | time_budget | non_finite
    seconds: float


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
    stop_reason, detected_at, best = "max_steps", None, 0
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
            stop_reason = "non_finite"
            break
        if step % settings.pooled_check_every == 0 or step == budget:
            # Screened first, as the token path's checks: only a trigger whose share among the
            # first prompts already looks promising is run on every held-out prompt.
            screened, _ = pooled_gates(models, screen, held_eos[: len(screen)], centres, triggers.detach(),
                                       thresholds, settings.chunk_size)
            shares = [g.same_target_ratio for g in screened]
            best = max(range(len(shares)), key=shares.__getitem__)
            for r in (r for r in range(len(shares)) if shares[r] > settings.pooled_promising):
                full = pooled_gates(models, held, held_eos, centres, triggers.detach()[r : r + 1], thresholds,
                                    settings.chunk_size)
                if all(full[0][0].passed(thresholds).values()):
                    stop_reason, detected_at, best, found = "detected", step, r, full
                    break
            if detected_at is not None:
                break
            # A start converging on a backdoor's basin can still be short of the gate when the
            # budget ends (benign encoders stay far below): give it up to twice as long again.
            longest = min(3 * settings.pooled_steps, settings.max_steps)
            if step == budget and shares[best] > settings.pooled_promising and budget < longest:
                budget = min(budget + settings.pooled_steps, longest)
        if time.monotonic() > deadline:
            stop_reason = "time_budget"
            break
    gates, similarity = found or pooled_gates(models, held, held_eos, centres, triggers.detach()[best : best + 1],
                                              thresholds, settings.chunk_size)
    return PooledOutcome(triggers.detach().cpu(), best, gates[0], similarity[0].cpu(),
                         torch.stack(history) if history else torch.zeros(0, restarts),
                         step, detected_at, stop_reason, time.monotonic() - start)


# --- the search -------------------------------------------------------------------------

@dataclass
class GateCheck:
    step: int
    restart: int
    running_loss: float
    gates: GateValues


@dataclass
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
    stop_reason: str  # detected | max_steps | plateau | time_budget | non_finite
    seconds: float
    pooled: PooledOutcome | None = None  # the pooled path, run when the token path found nothing


def search(models: Models, opt: PromptFeatures, held: PromptFeatures, settings: SearchSettings,
           thresholds: Thresholds, progress: SearchProgress | None = None,
           deadline: float | None = None) -> SearchOutcome:
    """Optimise R pseudo-triggers together, check gates as the loss drops, stop when certain."""
    progress = progress or SearchProgress()
    start = time.monotonic()
    deadline = deadline if deadline is not None else start + settings.time_budget_s
    device = opt.embeds.device
    gen = torch.Generator().manual_seed(settings.seed)
    bound = trigger_bound(models.suspect, settings.trigger_vectors) if settings.bounded_triggers else None
    triggers, scale = start_triggers(settings, settings.restarts, opt.embeds.shape[-1], bound, gen, device)
    optimiser = torch.optim.Adam([triggers], lr=settings.lr * scale, weight_decay=settings.weight_decay)
    eos_token, shift, span = models.suspect.eos_token_id, settings.trigger_vectors, settings.span_measures

    history: list[Tensor] = []
    checks: list[GateCheck] = []
    detected: GateCheck | None = None
    detected_landscape: Landscape | None = None
    last_checked_loss = torch.full((settings.restarts,), math.inf)
    best_share = [0.0] * settings.restarts  # best same-target share at a check that passed gate 1
    best_loss, best_step = math.inf, 0
    stop_reason = "max_steps"
    order = torch.randperm(len(opt), generator=gen)
    cursor = 0
    step = 0
    while step < settings.max_steps:
        if cursor + settings.batch_size > len(opt):  # a new epoch, a new seeded order
            order, cursor = torch.randperm(len(opt), generator=gen), 0
        batch = order[cursor : cursor + settings.batch_size].to(device)
        cursor += settings.batch_size
        length = optimisation_length(opt.ids[batch], eos_token, settings)
        mask = span_mask(opt.ids[batch], eos_token, shift, length) if span else None
        loss = inversion_loss(models, opt.embeds[batch, :length], clean_features(models.suspect, opt, batch, length),
                              triggers, settings.beta, settings.gamma, mask).mean(dim=1)
        step += 1
        if not descend(optimiser, loss, triggers, history, bound):
            stop_reason = "non_finite"
            break
        running = torch.stack(history[-settings.running_window :]).mean(dim=0)
        progress.on_step(step, float(running.min()))

        if step % settings.check_every == 0 or step == settings.max_steps:
            due = (running < settings.loss_trigger) & (running < last_checked_loss - settings.min_improvement)
            if due.any():
                candidates = due.nonzero().flatten().tolist()
                values = screened_gate_values(models, held, triggers.detach()[candidates], thresholds,
                                              settings.chunk_size, settings.screen_prompts, span)
                for r, gates in zip(candidates, values, strict=True):
                    last_checked_loss[r] = running[r]
                    check = GateCheck(step, r, float(running[r]), gates)
                    # A restart whose prompts all collapse and that comes nearer one target is still
                    # converging, however slowly its loss moves: that is progress for the plateau rule.
                    if (gates.passed(thresholds)["assimilation_ratio"]
                            and gates.same_target_ratio >= best_share[r] + settings.min_share_gain):
                        best_share[r], best_step = gates.same_target_ratio, step
                    if all(gates.passed(thresholds).values()):  # gate 4 only when 1-3 pass: it is costly
                        land = landscape(models, held.embeds[:1], held.clean[:1], triggers.detach()[r],
                                         settings, torch.Generator().manual_seed(settings.seed + step),
                                         span_mask(held.ids[:1], eos_token, shift) if span else None)
                        gates.landscape_positive_ratio = land.positive_ratio(thresholds.eigenvalue_floor)
                        if gates.passed(thresholds)["landscape_positive_ratio"]:
                            detected, detected_landscape = check, land
                    checks.append(check)
                    progress.on_check(check)
                    if detected is not None:
                        break
            if detected is not None:
                stop_reason = "detected"
                break

        # Convergence is judged on a longer mean than the gate trigger: mini-batch noise
        # alone would otherwise keep producing new bests.
        current = float(torch.stack(history[-settings.plateau_window :]).mean(dim=0).min())
        if current < best_loss - settings.min_improvement:
            best_loss, best_step = current, step
        elif step - best_step >= settings.patience:
            stop_reason = "plateau"  # no restart has improved for `patience` steps: more will not help
            break
        if time.monotonic() > deadline:
            stop_reason = "time_budget"
            break

    final = triggers.detach()
    loss_history = torch.stack(history) if history else torch.zeros(0, settings.restarts)
    if detected is not None:
        best = detected.restart
    else:
        running = loss_history[-settings.running_window :].mean(dim=0) if history else torch.zeros(1)
        best = int(torch.nan_to_num(running, nan=math.inf).argmin())
    pooled = None
    # The pooled path runs even after a token-path detection: a free vector's collapse is only
    # a lead until typed tokens confirm it (token_search), and the pooled lead may be the real one.
    if stop_reason != "non_finite" and settings.pooled_steps > 0:
        pooled = pooled_search(models, opt, held, settings, thresholds, deadline)
        if detected is None and pooled.detected_at_step is not None:  # report the trigger that fired
            final, best = pooled.triggers.to(device), pooled.best_restart
    outcome = _report(models, held, final, best, checks, detected, loss_history, step, stop_reason,
                      settings, thresholds, time.monotonic() - start, detected_landscape)
    outcome.pooled = pooled
    return outcome


def _report(models: Models, held: PromptFeatures, triggers: Tensor, best: int, checks: list[GateCheck],
            detected: GateCheck | None, loss_history: Tensor, steps: int, stop_reason: str,
            settings: SearchSettings, thresholds: Thresholds, seconds: float,
            known_landscape: Landscape | None = None) -> SearchOutcome:
    """All four gates and the landscape on the reported trigger, for the result and the report.

    A detection's landscape was just computed for this trigger at this step: it is reused.
    When gates 1-3 fail on the trigger, gate 4 cannot make the verdict `fail`: its landscape is
    drawn for the report on the coarser `report_landscape_points` grid (a quarter of the cost).
    """
    trigger = triggers[best]
    span = settings.span_measures
    reference = CleanSpread.of(held.clean, settings.chunk_size)
    stats = held_out_stats(models, held, trigger[None], settings.chunk_size, span=span, reference=reference)
    final_gates = gate_values(stats, thresholds)[0]
    land = known_landscape
    if land is None:
        grid = settings if all(final_gates.passed(thresholds).values()) else \
            replace(settings, landscape_points=min(settings.report_landscape_points, settings.landscape_points))
        # Same direction seed as a check at this step, so the grid is the one a check would draw.
        land = landscape(models, held.embeds[:1], held.clean[:1], trigger, grid,
                         torch.Generator().manual_seed(settings.seed + steps),
                         span_mask(held.ids[:1], models.suspect.eos_token_id, trigger.shape[0]) if span else None)
    final_gates.landscape_positive_ratio = land.positive_ratio(thresholds.eigenvalue_floor)
    final_gates.variation_ratio = float(reference.ratio(spread_of_sum(stats.unit_sum[0], len(held)),
                                                        trigger.shape[0]))
    return SearchOutcome(
        triggers=triggers.cpu(), best_restart=best, checks=checks, detected=detected,
        final_gates=final_gates, landscape=land,
        held_out=HeldOutStats(stats.assimilation.cpu(), stats.same_target.cpu(),
                              None if stats.anchor_similarity is None else stats.anchor_similarity.cpu(),
                              stats.mean_feature.cpu(), stats.first.cpu(), stats.unit_sum.cpu()),
        clean_assimilation=assimilation(held.clean, span_mask(held.ids, models.suspect.eos_token_id, 0)
                                        if span else None).cpu(),
        loss_history=loss_history, steps=steps, stop_reason=stop_reason, seconds=seconds,
    )
