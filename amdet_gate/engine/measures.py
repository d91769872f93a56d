"""The scan's math: the two measures, the trigger's insertion, the two losses, the trigger's range.

Read top to bottom: assimilation A and position-wise similarity S (and the spread that tells
prompts apart), how a pseudo-trigger is put into the input embeddings, the token loss and the
pooled loss it is optimised on, the prompts' features computed once, and the ball the trigger
is kept in. Gates live in `gates`, the optimisation loops in `token_path` and `pooled_path`.
Shapes: R restarts, K trigger vectors, B prompts, L positions, d width. Everything is
batched; nothing loops over single prompts or over optimisation steps. See docs/method.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from amdet_gate.encoders.base import AdapterTraits, EncoderAdapter, Pooling
from amdet_gate.errors import UnsupportedModel
from amdet_gate.settings import SearchSettings

# What this engine's math is written for: a causal encoder (features before the trigger do not depend
# on it, and sequences are cut after the last EOS), the trigger inserted right after BOS (insert_trigger,
# span_mask, eos_positions' shift, trigger_bound's slots, Centres.expected, and confirm.py and
# token_search.py, which insert typed tokens there too), the pooled feature read at the first EOS
# (pooled_with_trigger). A family whose adapter says otherwise is refused (`require_traits`) rather than
# scanned under a wrong assumption; serving it means taking these from the adapter's traits instead.
ENGINE_TRAITS = AdapterTraits(causal=True, trigger_slot=1, pooling=Pooling.FIRST_EOS)


def require_traits(encoder: EncoderAdapter) -> None:
    """UnsupportedModel (exit 3, nothing scannable) for an encoder the engine's math does not fit."""
    traits = encoder.traits
    if traits != ENGINE_TRAITS:
        raise UnsupportedModel(
            f"the scan engine reads causal encoders with the trigger after BOS (slot 1) and the pooled feature at "
            f"the first EOS; this encoder is {'causal' if traits.causal else 'not causal'}, trigger slot "
            f"{traits.trigger_slot}, pooling {traits.pooling.value}: not supported")


# --- measures ---------------------------------------------------------------------------

def unit(x: Tensor) -> Tensor:
    """x scaled to unit norm along the last dimension (zero vectors stay near zero, not NaN)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def assimilation(features: Tensor, mask: Tensor | None = None) -> Tensor:
    """A(F): mean of the L x L token cosine matrix, (..., L, d) -> (...).

    mean_ij cos(F_i, F_j) = |sum_i F_i/|F_i||^2 / L^2, which avoids building the matrix.
    With a mask (..., L) (broadcast against the features), only the masked positions count.
    """
    unit_features = unit(features)
    if mask is None:
        summed = unit_features.sum(dim=-2)
        return (summed * summed).sum(dim=-1) / features.shape[-2] ** 2
    weight = mask.to(unit_features.dtype)
    summed = (unit_features * weight[..., None]).sum(dim=-2)
    return (summed * summed).sum(dim=-1) / weight.sum(dim=-1).clamp_min(1) ** 2


def position_similarity(a: Tensor, b: Tensor, mask: Tensor | None = None) -> Tensor:
    """S(F, G): mean position-wise cosine similarity, (..., L, d) x (..., L, d) -> (...);
    over the masked positions (..., L) only when a mask is given."""
    cosine = (unit(a) * unit(b)).sum(dim=-1)
    if mask is None:
        return cosine.mean(dim=-1)
    weight = mask.to(cosine.dtype)
    return (cosine * weight).sum(dim=-1) / weight.sum(dim=-1).clamp_min(1)


def position_spread(unit_features: Tensor) -> Tensor:
    """1 - the mean cosine between different prompts' features at each position: (..., N, L, d)
    unit features -> (..., L). 0: every prompt has the same feature there."""
    return spread_of_sum(unit_features.sum(dim=-3), unit_features.shape[-3])


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
        unit_sum = sum(unit(c).sum(dim=0) for c in clean.split(chunk_size))
        centre = unit_sum / n
        centred_sum = sum(unit(unit(c) - centre).sum(dim=0) for c in clean.split(chunk_size))
        return cls(centre, spread_of_sum(unit_sum, n), spread_of_sum(centred_sum, n))

    def shifted_centre(self, shift: int, length: int) -> Tensor:
        """The centre of triggered features (length, d): slot l > shift holds clean position l - shift."""
        return torch.cat([self.centre[:1].expand(shift + 1, -1), self.centre[1 : length - shift]])

    def centred_sum(self, features: Tensor, shift: int) -> Tensor:
        """Sum over prompts of the centred unit triggered features, (..., N, L, d) -> (..., L, d)."""
        return unit(unit(features) - self.shifted_centre(shift, features.shape[-2])).sum(dim=-3)

    def ratio(self, spread: Tensor, shift: int) -> Tensor:
        """How much of what tells prompts apart is left with a trigger of `shift` vectors in:
        `spread` (..., L) is the triggered prompts' centred spread. 1: as varied as clean
        prompts; 0: one output whatever the prompt."""
        length = spread.shape[-1]
        weight = self.weight[1 : length - shift]
        clean = (self.spread[1 : length - shift] * weight).sum().clamp_min(1e-8)
        return (spread[..., shift + 1 :] * weight).sum(dim=-1) / clean


# --- the trigger's insertion ------------------------------------------------------------

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


# --- the token loss -----------------------------------------------------------------------

@dataclass
class Models:
    """The encoder under scan, and the base it should differ from (None: no anchor term, no anchor gate)."""

    suspect: EncoderAdapter
    anchor: EncoderAdapter | None = None


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
def precompute(encoder: EncoderAdapter, ids: Tensor, chunk_size: int, clean: bool = True) -> PromptFeatures:
    ids = ids.to(encoder.device)
    embeds = torch.cat([encoder.embed(c) for c in ids.split(chunk_size)])
    if not clean:
        return PromptFeatures(ids, embeds, None)
    return PromptFeatures(ids, embeds, torch.cat([encoder.encode(c) for c in embeds.split(chunk_size)]))


@torch.no_grad()
def clean_features(encoder: EncoderAdapter, prompts: PromptFeatures, index: Tensor, length: int) -> Tensor:
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


# --- the pooled loss: backdoors that move only the pooled (EOS) feature -------------------
# A text-on-pair backdoor is trained through the pooled EOS embedding alone: triggered
# prompts' EOS (and padding) features go to the target while their content tokens stay as
# they were, so gates 1-2 stay low. The pooled path inverts a trigger that makes the *pooled*
# features of all prompts agree instead. CLIP's pooled features share a large common
# direction, which would count as agreement on any model, so they are measured after
# removing the clean prompts' mean direction (`centre`); the beta and gamma terms are the
# same as in the token loss. Its trigger has as many vectors as the token path's: with two,
# phrase and homoglyph text-on-pair backdoors of 6-layer encoders are found in 75-100 steps
# (none with one), and benign encoders stay at shares of 0.01-0.11 (bench/detection.py).

def pooled_with_trigger(encoder: EncoderAdapter, embeds: Tensor, eos: Tensor, triggers: Tensor) -> Tensor:
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
    return unit(unit(pooled) - centre)


@torch.no_grad()
def clean_pooled(encoder: EncoderAdapter, embeds: Tensor, ids: Tensor) -> Tensor:
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
        anchor = None if models.anchor is None else unit(clean_pooled(models.anchor, embeds, ids)).mean(dim=0)
        centre = unit(suspect).mean(dim=0)
        spread = float(position_spread(centred(suspect, centre)[:, None])[0])
        return cls(centre, anchor, spread)


def pooled_loss(models: Models, embeds: Tensor, eos: Tensor, clean_pooled: Tensor, centres: Centres,
                triggers: Tensor, beta: float, gamma: float) -> Tensor:
    """-agreement of the centred pooled features across the batch + beta * S(clean) + gamma * S(anchor), (R,)."""
    pooled = pooled_with_trigger(models.suspect, embeds, eos, triggers)
    suspect = centred(pooled, centres.suspect)
    summed = suspect.sum(dim=1)
    agreement = (summed * summed).sum(dim=-1) / pooled.shape[1] ** 2
    loss = -agreement + beta * (unit(pooled) * unit(clean_pooled)[None]).sum(dim=-1).mean(dim=1)
    if models.anchor is not None and centres.anchor is not None and gamma:
        anchored = centred(pooled_with_trigger(models.anchor, embeds, eos, triggers), centres.anchor)
        loss = loss + gamma * (anchored * suspect).sum(dim=-1).mean(dim=1)
    return loss


# --- the pseudo-trigger's range -----------------------------------------------------------

def trigger_bound(encoder: EncoderAdapter, vectors: int) -> float:
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
