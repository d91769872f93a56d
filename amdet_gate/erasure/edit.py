"""The repair's math: trace MLP keys, measure what a trigger corrupts, solve the closed-form edit.

A pre-LN CLIP layer l computes   x = h + Attn(LN1(h)),   k = act(fc1(LN2(x))),   h' = x + W k + b.
With a trigger's K vectors inserted after BOS (engine.insert_trigger: tokens shift right and
keep their position embeddings), position j+K holds the prompt's token j, whose clean
counterpart is position j of the prompt without the trigger; the trigger's own slots are given
the clean state of the token they stand before, so that the prompt reads as if nothing had
been inserted. The edit W' = W + D of one layer's MLP output minimises (ROME / MEMIT)

    mean_t |D k_t - r_t|^2  +  lam * mean_c |D k_c|^2,      r_t = h'_clean(t) - h'_triggered(t)

over triggered keys k_t (every position of every probe, on the edit prompts) and clean keys
k_c (every position of the clean edit prompts): D = R K^T (K K^T + lam C)^-1 with the means
R K^T, K K^T and C = E[k_c k_c^T]. Layers are edited one after another, each traced on the
model with the earlier edits applied, so a later layer mends what an earlier one left.
Everything runs in float64 for the solve, float32 otherwise; nothing is random.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from amdet_gate.encoders.clip import ClipTextAdapter

SUM_ROWS = 4096  # keys per float32 product block (Moments.add)
RIDGE = 1e-6  # relative to the mean eigenvalue: keeps the solve defined when a neuron never fires


@dataclass(frozen=True)
class Probe:
    """K vectors inserted after BOS whose effect the edit removes: a pseudo-trigger, or real
    token embeddings (token + position embedding of slots 1..K) of a candidate trigger."""

    name: str
    vectors: Tensor  # (K, d)


@dataclass(frozen=True)
class LayerEdit:
    layer: int
    delta: Tensor  # (d, f): added to encoder.layers[layer].mlp.fc2.weight
    keys: int  # triggered keys behind it
    residual_before: float  # RMS |r| at this layer's output before the edit (triggered positions)
    residual_after: float  # the same with the edit applied to the traced keys


@contextmanager
def _traced(adapter: ClipTextAdapter, layer: int) -> Iterator[dict[str, Tensor]]:
    """Capture layer `layer`'s MLP keys (the inputs of fc2)."""
    block = adapter.model.encoder.layers[layer]
    seen: dict[str, Tensor] = {}

    def keys(module, args):
        seen["keys"] = args[0]

    handles = [block.mlp.fc2.register_forward_pre_hook(keys)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def layer_states(adapter: ClipTextAdapter, embeds: Tensor, layer: int, chunk: int) -> tuple[Tensor, Tensor]:
    """Keys (B, L, f) and outputs (B, L, d) of one layer for input embeddings (B, L, d)."""
    keys, outs = [], []
    with _traced(adapter, layer) as seen:
        for part in embeds.split(chunk):
            outs.append(adapter.residual(part, layer + 1))  # the layers after this one are not needed
            keys.append(seen["keys"])
    return torch.cat(keys), torch.cat(outs)


def _layout(at: Tensor, k: int, length: int) -> tuple[Tensor, Tensor]:
    """Where things land when K slots are inserted before original positions at[b, i] (sorted):
    for every position of the triggered sequence, the original position it holds or, for a
    slot, the original position the slot's copy stands before (B, L); and which of the K
    vectors a slot holds (-1 for a token)."""
    b, n = at.shape
    pos = torch.arange(length, device=at.device)
    # Original token j moves right by K for every insertion point at or before it.
    moved = pos[None] + k * (at[:, None, :] <= pos[None, :, None]).sum(dim=-1)  # (B, L)
    source = torch.zeros(b, length, dtype=torch.long, device=at.device)
    slot = torch.full((b, length), -1, dtype=torch.long, device=at.device)
    rows = torch.arange(b, device=at.device)[:, None]
    keep = moved < length
    source[rows.expand(b, length)[keep], moved[keep]] = pos[None].expand(b, length)[keep]
    starts = at + k * torch.arange(n, device=at.device)[None]  # (B, n): where each copy begins
    for i in range(k):
        where = starts + i
        ok = where < length
        slot[rows.expand(b, n)[ok], where[ok]] = i
        source[rows.expand(b, n)[ok], where[ok]] = at.clamp(max=length - 1)[ok]
    return source, slot


def insert_at(embeds: Tensor, vectors: Tensor, at: Tensor) -> Tensor:
    """K vectors inserted before position at[b, i] of each sequence (n copies), -> (B, L, d).

    As engine.insert_trigger (one copy at 1): the tokens shift right and keep their position
    embeddings, the last ones fall off.
    """
    b, length, d = embeds.shape
    source, slot = _layout(at, vectors.shape[0], length)
    out = embeds.gather(1, source[..., None].expand(b, length, d))
    filler = vectors.to(out.dtype)[slot.clamp(min=0)]
    return torch.where((slot >= 0)[..., None], filler, out)


def counterpart(clean: Tensor, k: int, at: Tensor) -> Tensor:
    """What each position of a triggered sequence should hold, (B, L, d): the clean state of the
    same token, and for an inserted slot the clean state of the token its copy stands before.

    A slot that repeats its neighbour reads as the prompt without the insertion; measured
    against BOS's state (an extra attention sink) on the homoglyph control, six copies of the
    trigger token fire for 6 % of prompts after the edit instead of 17 % (docs/repair.md).
    """
    b, length, d = clean.shape
    source, _ = _layout(at, k, length)
    return clean.gather(1, source[..., None].expand(b, length, d))


@torch.no_grad()
def corruption(adapter: ClipTextAdapter, embeds: Tensor, probe: Probe, clean_out: Tensor, layer: int,
               chunk: int) -> Tensor:
    """Per position, 1 - cos(triggered state, its clean counterpart) at one layer's output, (L,),
    for the probe inserted after BOS. Shows which positions the trigger corrupts (its slots,
    the tokens after it, the padding)."""
    at = torch.ones(embeds.shape[0], 1, dtype=torch.long, device=embeds.device)
    _, out = layer_states(adapter, insert_at(embeds, probe.vectors.to(embeds), at), layer, chunk)
    target = counterpart(clean_out, probe.vectors.shape[0], at)
    return 1 - torch.nn.functional.cosine_similarity(out, target, dim=-1).mean(dim=0)


@dataclass(frozen=True)
class Placed:
    """A probe placed in the edit prompts: inserted at position at[b] of prompt b."""

    probe: Probe
    at: Tensor  # (B, n): sorted insertion points, n copies of the probe per prompt


def place(probes: list[Probe], ids: Tensor, eos_token_id: int, copies: tuple[int, ...], seed: int) -> list[Placed]:
    """Each probe after BOS (where the scan's pseudo-trigger sits), then for every n in `copies`
    n times at seeded random places inside each prompt (1 .. its EOS). A real trigger can
    stand anywhere and more than once (a homoglyph replaces every "o"): an edit learnt from one
    copy after BOS leaves several copies, each a little weaker, adding up."""
    b = ids.shape[0]
    first = torch.ones(b, 1, dtype=torch.long, device=ids.device)
    placed = [Placed(p, first) for p in probes]
    gen = torch.Generator().manual_seed(seed)
    eos = (ids == eos_token_id).int().argmax(dim=-1).cpu().clamp(min=1)
    for n in copies:
        for probe in probes:
            at = 1 + (torch.rand(b, n, generator=gen) * eos[:, None]).long()
            placed.append(Placed(probe, at.sort(dim=1).values.to(ids.device)))
    return placed


class Moments:
    """Running sums over keys k and residuals r: k k^T, r k^T, |r|^2 (float64), and the count."""

    def __init__(self, f: int, d: int, device: torch.device) -> None:
        self.kk = torch.zeros(f, f, dtype=torch.float64, device=device)
        self.rk = torch.zeros(d, f, dtype=torch.float64, device=device)
        self.rr = 0.0
        self.n = 0

    def add(self, keys: Tensor, residual: Tensor) -> None:
        k, r = keys.reshape(-1, keys.shape[-1]).float(), residual.reshape(-1, residual.shape[-1]).float()
        # float32 products over blocks of rows, summed in float64: half the time of float64 matmuls,
        # and a block's rounding (~1e-6 relative) is far below the ridge the solve adds.
        for part_k, part_r in zip(k.split(SUM_ROWS), r.split(SUM_ROWS), strict=True):
            self.kk += (part_k.T @ part_k).double()
            self.rk += (part_r.T @ part_k).double()
        self.rr += float((r.double() * r.double()).sum())
        self.n += k.shape[0]

    def rms(self, delta: Tensor | None = None) -> float:
        """sqrt(mean |r - D k|^2), from the sums alone (no key is kept in memory)."""
        if delta is None:
            return (self.rr / max(self.n, 1)) ** 0.5
        dd = delta.double()
        sq = self.rr - 2 * float((dd * self.rk).sum()) + float(((dd @ self.kk) * dd).sum())
        return (max(sq, 0.0) / max(self.n, 1)) ** 0.5


@dataclass(frozen=True)
class Traced:
    """One layer's sums for the triggered keys and for the clean keys."""

    layer: int
    triggered: Moments
    clean: Moments


@torch.no_grad()
def trace(adapter: ClipTextAdapter, layer: int, placed: list[Placed], edit_embeds: Tensor, clean_targets: Tensor,
          chunk: int, anchor: ClipTextAdapter | None = None) -> Traced:
    """Keys and residuals of one layer, summed (see the module docstring).

    `clean_targets`: the ORIGINAL model's output of this layer on `edit_embeds` (B, L, d): what the
    repaired layer should produce for every clean position and every shifted token. Positions
    before a probe's slot are the clean prompt's own (causal mask) and are counted as clean.
    The clean residual is zero at the first edited layer; at a later one it holds what the
    earlier edits changed, which this layer then also mends. With an `anchor` (a clean reference
    encoder of the same architecture, e.g. the declared base model), a triggered position's
    value is what the anchor's layer produces for the same triggered input instead.
    """
    weight = adapter.model.encoder.layers[layer].mlp.fc2.weight
    d, f = weight.shape
    device = weight.device
    triggered, clean = Moments(f, d, device), Moments(f, d, device)
    clean_keys, clean_out = layer_states(adapter, edit_embeds, layer, chunk)
    clean.add(clean_keys, clean_targets - clean_out)
    for item in placed:
        inserted = insert_at(edit_embeds, item.probe.vectors.to(edit_embeds), item.at)
        keys, out = layer_states(adapter, inserted, layer, chunk)
        wanted = (counterpart(clean_targets, item.probe.vectors.shape[0], item.at) if anchor is None
                  else layer_states(anchor, inserted, layer, chunk)[1])
        after = torch.arange(keys.shape[1], device=device)[None] >= item.at[:, :1]  # (B, L)
        triggered.add(keys[after], (wanted - out)[after])
    return Traced(layer, triggered, clean)


def solve(traced: Traced, lam: float) -> LayerEdit:
    """D = (R_t K_t^T + lam R_c K_c^T) (K_t K_t^T + lam K_c K_c^T)^-1, every sum as a mean."""
    t, c = traced.triggered, traced.clean
    gram = t.kk / t.n + lam * c.kk / c.n
    gram += RIDGE * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    cross = t.rk / t.n + lam * c.rk / c.n
    delta = torch.linalg.solve(gram, cross.T).T  # a linear solve, not an inverse
    return LayerEdit(traced.layer, delta.float(), t.n, t.rms(), t.rms(delta))


@contextmanager
def applied(adapter: ClipTextAdapter, edits: list[LayerEdit]) -> Iterator[ClipTextAdapter]:
    """The adapter with `edits` added to its fc2 weights, restored afterwards."""
    originals = []
    try:
        for edit in edits:
            weight = adapter.model.encoder.layers[edit.layer].mlp.fc2.weight
            originals.append((weight, weight.detach().clone()))
            weight.data += edit.delta.to(weight.device, weight.dtype)
        yield adapter
    finally:
        for weight, original in originals:
            weight.data.copy_(original)


@dataclass(frozen=True)
class Traces:
    """What every lambda's edit of `layers` shares: the original model's clean states of each layer
    on the edit prompts (the values), and the first layer's sums (traced on the unedited model)."""

    layers: tuple[int, ...]
    targets: dict[int, Tensor]
    first: Traced


@torch.no_grad()
def trace_first(adapter: ClipTextAdapter, layers: list[int], placed: list[Placed], edit_embeds: Tensor,
                chunk: int, anchor: ClipTextAdapter | None = None) -> Traces:
    layers = sorted(layers)
    targets = {layer: layer_states(adapter, edit_embeds, layer, chunk)[1] for layer in layers}
    return Traces(tuple(layers), targets, trace(adapter, layers[0], placed, edit_embeds, targets[layers[0]], chunk,
                                                anchor))


@torch.no_grad()
def edit_layers(adapter: ClipTextAdapter, traces: Traces, placed: list[Placed], edit_embeds: Tensor, lam: float,
                chunk: int, anchor: ClipTextAdapter | None = None) -> list[LayerEdit]:
    """Edit `traces.layers` in order, each layer solved on the model with the previous edits applied.

    The targets are always the original model's clean states, so a later layer also mends what
    an earlier edit left unfixed (and what it cost the clean prompts).
    """
    edits = [solve(traces.first, lam)]
    for layer in traces.layers[1:]:
        with applied(adapter, edits):
            edits.append(solve(trace(adapter, layer, placed, edit_embeds, traces.targets[layer], chunk, anchor), lam))
    return edits


def edited_weights(adapter: ClipTextAdapter, edits: list[LayerEdit]) -> dict[str, Tensor]:
    """The new fc2 weights by CLIPTextModel parameter name, for the repaired copy (CPU, float32)."""
    out = {}
    for edit in edits:
        weight = adapter.model.encoder.layers[edit.layer].mlp.fc2.weight
        out[f"encoder.layers.{edit.layer}.mlp.fc2.weight"] = (weight.detach().float().cpu() + edit.delta.cpu())
    return out
