"""Detection quality on the built-in controls: verdict, score, gates and time per control.

    python bench/detection.py [--positions 77] [--width 128] [--layers 4] [--out bench-out]

Builds a pretrained-like base of the given shape, benign fine-tunes and backdoored students
(every text-on-text trigger style, and the pooled text-on-pair attack), scans each with the
default settings and prints one row per control, then the AUROC of the score.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from amdet_gate import controls
from amdet_gate.scanner import ScanRequest, scan_model


def auroc(positives: list[float], negatives: list[float]) -> float:
    pairs = [(p > n) + 0.5 * (p == n) for p in positives for n in negatives]
    return sum(pairs) / len(pairs) if pairs else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--positions", type=int, default=77)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args()
    shape = controls.ControlShape(args.width, args.layers, args.positions)
    t0 = time.monotonic()
    base = controls.pretrain_base(shape)
    print(f"base {shape} built in {time.monotonic() - t0:.0f} s")
    built = {("benign", f"finetune_{kind}"): controls.benign_finetune(base, kind, seed=i)
             for i, kind in enumerate(("distill", "contrastive"))}
    for i, trigger in enumerate(controls.TRIGGERS):
        built[("backdoor", f"text_on_text_{trigger}")] = controls.backdoor_text_on_text(base, trigger, seed=10 + i)
    for i, trigger in enumerate(controls.TRIGGERS):
        built[("backdoor", f"text_on_pair_{trigger}")] = controls.backdoor_text_on_pair(base, trigger, seed=20 + i)
    scores: dict[str, list[float]] = {"benign": [], "backdoor": []}
    print(f"{'control':34s} {'truth':8s} {'verdict':12s} {'score':>6s} {'assim':>6s} {'same':>6s} "
          f"{'land':>6s} {'pooled':>6s} {'steps':>5s} {'time s':>6s}")
    for (truth, name), model in built.items():
        folder = controls.save_control(model, args.out / name)
        r = scan_model(ScanRequest(model=folder)).result
        g = {k: v["value"] for k, v in r.gates.items() if isinstance(v, dict)}
        scores[truth].append(r.score)
        print(f"{name:34s} {truth:8s} {r.verdict:12s} {r.score:6.3f} {g['assimilation_ratio']:6.3f} "
              f"{g['same_target_ratio']:6.3f} {g['landscape_positive_ratio']:6.3f} "
              f"{g.get('pooled_same_target_ratio', float('nan')):6.3f} {r.search['steps']:5d} "
              f"{r.timings['total_s']:6.1f}", flush=True)
    print(f"AUROC of the score: {auroc(scores['backdoor'], scores['benign']):.3f}")


if __name__ == "__main__":
    main()
