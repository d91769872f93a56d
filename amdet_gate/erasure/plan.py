"""Which inputs the edit erases, and which layers and regularisation it uses: both measured.

Probes (what the edit maps to "as if absent"):
- the typed trigger the scan's verdict rests on (real tokens a user can type), when there is one;
- the scan's pseudo-trigger, always;
- the other restarts' pseudo-triggers that fire the same backdoor;
- the real tokens the scan names near the pseudo-trigger (`Finding.candidate_tokens`), each
  on its own and the K nearest as one sequence, kept when they fire. A free vector and the
  real trigger do not share keys: an edit learnt from the pseudo-trigger alone leaves the
  real trigger working (bench/repair.py), so real tokens are what make the edit generalise.
"Fires": the attack share (measure.attack_share) towards the finding's target is above
`RepairSettings.fires`.

Layers: from the first layer whose output shows the trigger's effect on the prompt's other
tokens (`first_layer`, measured on the corruption profile), 1..max_layers of them; for each
lambda (largest first), each plan is judged on the judge prompts by clean fidelity and, when
that keeps `fidelity_floor`, by how far the probes still pull towards their target (the mean
margin S(out, target) - S(out, clean counterpart), with one copy after BOS and several copies
anywhere). The plan with the lowest margin among those keeping the floor wins, else the most
faithful.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import torch
from torch import Tensor

from amdet_gate.encoders.clip import ClipTextAdapter
from amdet_gate.engine import PromptFeatures, position_similarity
from amdet_gate.erasure.edit import (
    LayerEdit,
    Placed,
    Probe,
    applied,
    corruption,
    counterpart,
    edit_layers,
    insert_at,
    layer_states,
    place,
    trace_first,
)
from amdet_gate.erasure.findings import DetectionPath, Finding
from amdet_gate.erasure.measure import (
    Fidelity,
    Target,
    _cos,
    attack_share,
    features,
    fidelity,
    pooled,
    target_of,
)


class ProbeKind(StrEnum):
    TYPED = "typed"  # the typed trigger the scan's verdict rests on (result.confirmation)
    PSEUDO = "pseudo-trigger"  # the reported free pseudo-trigger
    TOKEN = "token"  # real tokens nearest the pseudo-trigger that fire on their own
    RESTART = "restart"  # another restart's pseudo-trigger that fires


@dataclass(frozen=True)
class RepairSettings:
    """How a repair measures and edits; the defaults are what bench/repair.py measured."""

    seed: int = 0
    edit_prompts: int = 256  # keys and the clean covariance
    judge_prompts: int = 128  # probes screened and plans chosen on these
    held_out_prompts: int = 256  # the proof: fidelity, attack shares, gates (neither edit nor choice)
    copies: tuple[int, ...] = (4,)  # extra placements: the probe this many times at random places
    lambdas: tuple[float, ...] = (3.0, 1.0, 0.3)
    max_layers: int = 2  # layers edited, from the first one the trigger's effect spreads in
    spread: float = 0.05  # prompt-token corruption (1 - cos) that marks that layer
    fires: float = 0.5  # a candidate with an attack share above this is a trigger of the backdoor
    candidates: int = 20  # nearest tokens tried
    max_probes: int = 8  # per finding
    fidelity_floor: float = 0.99  # a plan must keep at least this clean fidelity to be preferred
    chunk_size: int = 64


@dataclass(frozen=True)
class Corruption:
    """1 - cos(triggered state, clean counterpart) at one layer's output, by kind of position."""

    layer: int
    trigger_slots: float
    prompt_tokens: float
    padding: float


@dataclass(frozen=True)
class Evidence:
    """A probe and the target it pulls the suspect's outputs towards."""

    probe: Probe
    target: Target
    share_before: float  # its attack share on the model it was found on
    kind: ProbeKind
    found_in: str  # "scan" (the result given), "rescan-N" (round N's re-scan of the copy)


@dataclass(frozen=True)
class Plan:
    layers: tuple[int, ...]
    lam: float
    edits: tuple[LayerEdit, ...]
    fidelity: Fidelity
    margin: float | None  # mean over probes and prompts of S(out, target) - S(out, clean), lower is
    # better; None for a plan below the fidelity floor (never chosen on it)


@torch.no_grad()
def corruption_profile(adapter: ClipTextAdapter, held: PromptFeatures, trigger: Tensor,
                       chunk: int) -> list[Corruption]:
    """Which positions the pseudo-trigger corrupts, layer by layer: its own slots, the prompt's
    tokens after it, and the padding after EOS (held-out prompts, trigger after BOS)."""
    probe = Probe("pseudo-trigger", trigger.to(held.embeds))
    k = trigger.shape[0]
    eos = int((held.ids == adapter.eos_token_id).int().argmax(dim=-1).float().mean())  # mean prompt length
    rows = []
    for layer in range(len(adapter.model.encoder.layers)):
        _, clean_out = layer_states(adapter, held.embeds, layer, chunk)
        per_position = corruption(adapter, held.embeds, probe, clean_out, layer, chunk)
        rows.append(Corruption(layer, float(per_position[1 : 1 + k].mean()),
                               float(per_position[1 + k : k + max(eos, 2)].mean()),
                               float(per_position[1 + k + eos :].mean())))
    return rows


def first_layer(profile: list[Corruption], settings: RepairSettings) -> int:
    """The first layer whose output shows the trigger's effect on the prompt's other tokens.

    That is where attention has read the trigger and begun to overwrite the prompt: a mechanism
    every input that fires the backdoor shares (the pseudo-trigger, the real trigger, and what
    a fresh search finds), whereas the trigger's own slot at an earlier layer is specific to
    each input. Edited from layer 0, the fresh re-scan of the rare-word control found a new
    pseudo-trigger at step 40; edited from layer 1 (where prompt tokens are corrupted by 0.20
    against 0.015 at layer 0), its search converged without one (docs/repair.md).
    """
    spread = [c.layer for c in profile if c.prompt_tokens > settings.spread]
    return spread[0] if spread else 0


def cut(prompts: PromptFeatures, eos_token_id: int, extra: int, pad: int = 8) -> PromptFeatures:
    """The prompts up to their last EOS, plus the slots an insertion adds and `pad` padding positions.

    The mask is causal, so every kept position is exactly what the full sequence computes there;
    what is left out is padding, whose states follow the last ones kept (as engine.optimisation_length).
    Prompts are ~20 tokens of 77: the plan's traces and judgements cost about a third.
    """
    last = int((prompts.ids == eos_token_id).int().argmax(dim=-1).max())
    n = min(prompts.ids.shape[1], last + 1 + extra + pad)
    return PromptFeatures(prompts.ids[:, :n], prompts.embeds[:, :n], None if prompts.clean is None
                          else prompts.clean[:, :n])


def token_vectors(adapter: ClipTextAdapter, ids: list[int]) -> Tensor:
    """Real tokens as they would sit in slots 1..K: token plus position embedding, (K, d)."""
    emb = adapter.model.embeddings
    return (emb.token_embedding.weight[ids] + emb.position_embedding.weight[1 : 1 + len(ids)]).detach()


@torch.no_grad()
def collect(adapter: ClipTextAdapter, held: PromptFeatures, clean: Tensor, finding: Finding,
            settings: RepairSettings, specials: set[int], found_in: str) -> list[Evidence]:
    """The probes of one finding, measured on `adapter` (the model the finding was made on): the
    typed trigger, the pseudo-trigger, then the real tokens that fire, then the other restarts that
    fire, at most `max_probes`. Shares are measured on the judge prompts `held`.

    Typed and token probes are judged against the typed trigger's target when the scan found one
    (the backdoor's own), free vectors against the pseudo-trigger's.
    """
    chunk = settings.chunk_size
    trigger = finding.trigger.to(held.embeds)
    pseudo_target = target_of(adapter, held, trigger, finding.path, chunk)
    typed = token_vectors(adapter, list(finding.typed)) if finding.typed else None
    target = pseudo_target if typed is None else target_of(adapter, held, typed, finding.path, chunk)
    screen = cut(PromptFeatures(held.ids, held.embeds, clean), adapter.eos_token_id,
                 max(finding.vectors, len(finding.typed)))

    def share(vectors: Tensor, goal: Target) -> float:
        return attack_share(adapter, screen, screen.clean, vectors, goal, chunk)

    found = []
    if typed is not None:
        name = f"{found_in}:typed-{'-'.join(map(str, finding.typed))}"
        found.append(Evidence(Probe(name, typed), target, share(typed, target), ProbeKind.TYPED, found_in))
    found.append(Evidence(Probe(f"{found_in}:pseudo-trigger", trigger), pseudo_target, share(trigger, pseudo_target),
                          ProbeKind.PSEUDO, found_in))
    tokens = [i for i in finding.candidate_tokens[: settings.candidates] if i not in specials]
    tried = [[i] for i in tokens]
    if len(tokens) >= finding.vectors > 1:
        tried.append(tokens[: finding.vectors])  # the nearest of each vector, as one sequence
    for ids in tried:
        if tuple(ids) == finding.typed:
            continue
        vectors = token_vectors(adapter, ids)
        if (fired := share(vectors, target)) > settings.fires:
            found.append(Evidence(Probe(f"{found_in}:tokens-{'-'.join(map(str, ids))}", vectors), target, fired,
                                  ProbeKind.TOKEN, found_in))
    for r, restart in enumerate(finding.restarts.to(held.embeds)):
        if not torch.equal(restart, trigger) and (fired := share(restart, pseudo_target)) > settings.fires:
            found.append(Evidence(Probe(f"{found_in}:restart-{r}", restart), pseudo_target, fired, ProbeKind.RESTART,
                                  found_in))
    return found[: settings.max_probes]


@torch.no_grad()
def margin(adapter: ClipTextAdapter, held: PromptFeatures, clean: Tensor, evidence: list[Evidence],
           placements: list[list[Placed]], chunk: int) -> float:
    """Mean pull towards the targets left: S(out, target) - S(out, clean counterpart)."""
    total, count = 0.0, 0
    for item, placed in zip(evidence, placements, strict=True):
        for where in placed:
            k = item.probe.vectors.shape[0]
            out = features(adapter, insert_at(held.embeds, item.probe.vectors.to(held.embeds), where.at), chunk)
            if item.target.space is DetectionPath.POOLED:
                shift = k * where.at.shape[1]
                p = pooled(adapter, out, held.ids, shift)
                pull = _cos(p, item.target.feature) - _cos(p, pooled(adapter, clean, held.ids))
            else:
                pull = position_similarity(out, item.target.feature[None, : out.shape[1]]) - position_similarity(
                    out, counterpart(clean, k, where.at))
            total += float(pull.sum())
            count += pull.numel()
    return total / max(count, 1)


@torch.no_grad()
def choose(adapter: ClipTextAdapter, evidence: list[Evidence], edit_ids: Tensor, edit_embeds: Tensor,
           judge: PromptFeatures, settings: RepairSettings, first: int,
           anchor: ClipTextAdapter | None = None) -> tuple[Plan, list[Plan]]:
    """Every (layers from `first`, lambda) plan, measured on the judge prompts (with the original's
    clean outputs); the chosen one, and all that were tried."""
    probes = [e.probe for e in evidence]
    eos = adapter.eos_token_id
    extra = max(p.vectors.shape[0] for p in probes) * max(1, *settings.copies)
    edit = cut(PromptFeatures(edit_ids, edit_embeds, None), eos, extra)
    edit_ids, edit_embeds = edit.ids, edit.embeds
    held = cut(judge, eos, extra)
    clean = held.clean
    placed = place(probes, edit_ids, adapter.eos_token_id, settings.copies, settings.seed)
    # The same placements on the held-out prompts, per probe, to judge every plan alike.
    judged = place(probes, held.ids, adapter.eos_token_id, settings.copies, settings.seed + 1)
    per_probe = [[p for p in judged if p.probe is probe] for probe in probes]
    tried: list[Plan] = []
    span = list(range(first, min(first + settings.max_layers, len(adapter.model.encoder.layers))))
    traces = trace_first(adapter, span, placed, edit_embeds, settings.chunk_size, anchor)
    # Largest lambda first: a smaller one trades clean fidelity for a lower margin. Once no plan of a
    # lambda keeps the floor, the smaller ones cannot either, and are not traced; a plan below the
    # floor is never chosen on its margin, so its margin is not measured (None).
    for lam in sorted(settings.lambdas, reverse=True):
        edits = edit_layers(adapter, traces, placed, edit_embeds, lam, settings.chunk_size, anchor)
        kept = False
        for m in range(1, len(edits) + 1):  # layers first..first+m-1: the first m edits are that plan's
            with applied(adapter, edits[:m]):
                after = features(adapter, held.embeds, settings.chunk_size)
                fid = fidelity(clean, after, held.ids, adapter.eos_token_id)
                faithful = fid.value >= settings.fidelity_floor
                pull = margin(adapter, held, after, evidence, per_probe, settings.chunk_size) if faithful else None
            tried.append(Plan(tuple(span[:m]), lam, tuple(edits[:m]), fid, pull))
            kept = kept or faithful
        if not kept:
            break
    faithful_plans = [p for p in tried if p.margin is not None]
    best = (min(faithful_plans, key=lambda p: p.margin) if faithful_plans
            else max(tried, key=lambda p: p.fidelity.value))
    return best, tried
