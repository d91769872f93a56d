"""Probe: can a pooled-only (text-on-pair) backdoor be told apart by a *pooled* same-target inversion?

    python bench/pooled_probe.py [--steps 300] [--out bench-out/pooled]

The AMDet gates look at all L token features; a text-on-pair backdoor trained through the
pooled EOS embedding collapses EOS and padding but not the content tokens, so those gates do
not fire (README, Known limits). This probe builds the controls (two benign fine-tunes, the
text-on-pair and a text-on-text backdoor), inverts a pseudo-trigger that makes the triggered
prompts' pooled features agree across prompts, and prints, per control, the mean pairwise
cosine of the held-out pooled features and the share of prompts matching the first prompt's
above several similarity thresholds. It is a measurement for a future gate, not part of the scan.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from torch import Tensor

from amdet_gate import controls
from amdet_gate.encoder import TextEncoderAdapter, load_encoder
from amdet_gate.engine import _unit, insert_trigger
from amdet_gate.prompts import builtin_prompts
from amdet_gate.tokenizer import load_tokenizer

THRESHOLDS = (0.92, 0.95, 0.98, 0.99)


def pooled_with_trigger(adapter: TextEncoderAdapter, ids: Tensor, triggers: Tensor) -> Tensor:
    """EOS features of the prompts with each trigger inserted after BOS: (R, B, d)."""
    features = adapter.encode(insert_trigger(adapter.embed(ids), triggers))
    eos = ((ids == adapter.eos_token_id).int().argmax(dim=-1) + 1).clamp(max=ids.shape[1] - 1)  # shifted one slot
    index = eos[None, :, None, None].expand(features.shape[0], -1, 1, features.shape[-1])
    return features.gather(2, index).squeeze(2)


def agreement(pooled: Tensor) -> Tensor:
    """Mean pairwise cosine across prompts, |sum of unit vectors|^2 / B^2, per restart."""
    summed = _unit(pooled).sum(dim=-2)
    return (summed * summed).sum(dim=-1) / pooled.shape[-2] ** 2


def probe(folder: Path, opt: list[str], held: list[str], steps: int, restarts: int = 4) -> dict:
    adapter, tokenizer = load_encoder(folder).adapter, load_tokenizer(folder)
    ids_opt, ids_held = tokenizer(opt, adapter.seq_len), tokenizer(held, adapter.seq_len)
    gen = torch.Generator().manual_seed(0)
    triggers = torch.randn(restarts, adapter.hidden_size, generator=gen).requires_grad_(True)
    optimiser = torch.optim.Adam([triggers], lr=0.08, weight_decay=1e-5)
    for _ in range(steps):
        batch = ids_opt[torch.randint(0, len(opt), (16,), generator=gen)]
        with torch.no_grad():
            clean = adapter.pooled(adapter.encode(adapter.embed(batch)), batch)
        pooled = pooled_with_trigger(adapter, batch, triggers)
        away = (_unit(pooled) * _unit(clean)[None]).sum(dim=-1).mean(dim=-1)  # as AMDet's beta term
        loss = (-agreement(pooled) + 0.1 * away).sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        pooled = _unit(pooled_with_trigger(adapter, ids_held, triggers.detach()))
        same = (pooled * pooled[:, :1]).sum(dim=-1)
        clean = adapter.pooled(adapter.encode(adapter.embed(ids_held)), ids_held)
    best = int(agreement(pooled).argmax())
    return {"clean": float(agreement(clean)), "inverted": float(agreement(pooled)[best]),
            **{t: float((same[best] > t).float().mean()) for t in THRESHOLDS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("bench-out/pooled"))
    args = parser.parse_args()
    t0 = time.monotonic()
    base = controls.pretrain_base(controls.ControlShape(128, 4, 77))
    built = {
        ("benign", "finetune_distill"): controls.benign_finetune(base, "distill", seed=1),
        ("benign", "finetune_contrastive"): controls.benign_finetune(base, "contrastive", seed=2),
        ("backdoor", "text_on_pair_rare_word"): controls.backdoor_text_on_pair(base, "rare_word", seed=20),
        ("backdoor", "text_on_text_rare_word"): controls.backdoor_text_on_text(base, "rare_word", seed=4),
    }
    print(f"controls built in {time.monotonic() - t0:.0f} s")
    prompts = builtin_prompts()
    random.Random(0).shuffle(prompts)
    opt, held = prompts[:2000], prompts[2000:2400]
    print(f"{'control':26s} {'truth':8s} {'clean':>6s} {'invert':>6s} "
          + " ".join(f"{'>' + str(t):>6s}" for t in THRESHOLDS))
    for (truth, name), model in built.items():
        row = probe(controls.save_control(model, args.out / name), opt, held, args.steps)
        print(f"{name:26s} {truth:8s} {row['clean']:6.3f} {row['inverted']:6.3f} "
              + " ".join(f"{row[t]:6.3f}" for t in THRESHOLDS), flush=True)


if __name__ == "__main__":
    main()
