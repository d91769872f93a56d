"""Scan time against width, depth and number of prompts (CPU or GPU).

    python bench/scan_speed.py [--steps 100] [--device auto]

Each row saves a randomly initialised CLIPTextModel of the given shape, then runs the full
scan (`scan_model`) with a fixed number of steps, so rows compare like for like: the
precomputation, the per-step cost of the search, one batched gate check over the held-out
prompts, and the 2,500-point landscape grid; then the pooled path (its own column: it runs
when the token path finds nothing, as on these random models). A real scan's step count
depends on when it stops (detection, convergence); multiply `s/step` by it for an estimate.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from amdet_gate.encoder import load_encoder
from amdet_gate.engine import Models, SearchSettings, held_out_stats, landscape, precompute
from amdet_gate.prompts import builtin_prompts
from amdet_gate.scanner import ScanRequest, scan_model
from amdet_gate.tokenizer import bundled_tokenizer

SHAPES = [  # (width, layers, positions, prompts)
    (128, 4, 77, 4000),
    (256, 4, 77, 4000),
    (256, 6, 77, 4000),
    (256, 6, 77, 1000),
    (128, 4, 248, 4000),
    (512, 8, 77, 4000),
]


def build(folder: Path, width: int, layers: int, positions: int) -> None:
    config = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=4 * width,
                            num_hidden_layers=layers, num_attention_heads=max(2, width // 64),
                            max_position_embeddings=positions, hidden_act="quick_gelu")
    torch.manual_seed(0)
    CLIPTextModel(config).save_pretrained(str(folder))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    settings = SearchSettings(max_steps=args.steps, patience=10**9, loss_trigger=-2.0)  # never stop early
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, "
          f"{args.steps} steps, 4 restarts")
    print(f"{'width':>5} {'layers':>6} {'L':>4} {'prompts':>7} {'total s':>8} {'precomp s':>9} "
          f"{'s/step':>7} {'gates s':>8} {'landscape s':>11} {'pooled s':>8}   (gates: one check of 4 restarts)")
    tokenizer = bundled_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        for width, layers, positions, n in SHAPES:
            folder = Path(tmp) / f"w{width}l{layers}p{positions}"
            build(folder, width, layers, positions)
            request = ScanRequest(model=folder, n_prompts=n, device=args.device, settings=settings)
            scan = scan_model(request)
            t = scan.result.timings
            steps = max(scan.result.search.steps, 1)
            # One gate check and one landscape grid on their own, for the breakdown.
            enc = load_encoder(folder).adapter.to(scan.result.environment.device)
            ids = tokenizer(builtin_prompts()[: n // 5], positions).to(enc.device)
            held = precompute(enc, ids, settings.chunk_size)
            trig = torch.randn(settings.restarts, settings.trigger_vectors, width, device=enc.device)
            t0 = time.perf_counter()
            held_out_stats(Models(enc), held, trig, settings.chunk_size)
            t1 = time.perf_counter()
            landscape(Models(enc), held.embeds[:1], held.clean[:1], trig[0], replace(settings),
                      torch.Generator().manual_seed(0))
            t2 = time.perf_counter()
            # search_s also holds the final report: one trigger's gates on every held-out prompt and,
            # gates 1-3 failing on these random models, the landscape on the report's coarser grid.
            pooled_s = scan.result.pooled.seconds if scan.result.pooled else 0.0
            report_grid = (settings.report_landscape_points / settings.landscape_points) ** 2
            report_s = (t1 - t0) / settings.restarts + (t2 - t1) * report_grid
            per_step = max(t.search_s - pooled_s - report_s, 0.0) / steps
            print(f"{width:>5} {layers:>6} {positions:>4} {n:>7} {t.total_s:>8.1f} {t.precompute_s:>9.1f} "
                  f"{per_step:>7.3f} {t1 - t0:>8.2f} {t2 - t1:>11.2f} {pooled_s:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
