"""Scan time per phase, peak memory and the projected whole benign scan, per encoder shape.

    python bench/scan_speed.py [--shapes small|real|all] [--steps 2] [--device auto] [--json F]
    python bench/scan_speed.py --from-json F          # the table again, from saved measurements
    python bench/scan_speed.py --whole --shape 768x12x77 [--device cpu]

Each row is a randomly initialised CLIPTextModel of the shape (timing only), measured in its own
process (so that its peak memory is its own) by running the engine's own functions:
precompute (the held-out prompts' clean outputs, embeddings of all), one token-path step
(4 restarts x 5 prompts, cut after EOS), one token-path gate check (4 restarts on the first
screen of 50 held-out prompts: a benign check fails the same-target gate there and stops),
the report (one trigger on every held-out prompt + the 25 x 25 landscape; "land/pt" is one
landscape point), one pooled-path step (8 starts x 4 prompts), the natural-steering words and
one typed-trigger confirmation. Phases over many prompts are timed on `--sample` of them
and scaled linearly, so that even bigG rows take minutes, not hours, on a CPU. On a CPU each
shape gets a second row, "CPU s / threads": on a shared machine, an idle one's estimate.

The projection (bench/scan_projection.py, where the formula is) adds them up at the counts a
benign scan runs with the default settings: "@640" when the token path never plateaus, "@140"
where the benign controls plateau; "900 s budget" is the same scan under the default deadline
("cut N": the deadline stopped a loop after N token steps, and the verdict is inconclusive).
"+confirm" adds a typed confirmation, which a benign scan runs only when its free trigger
collapsed the prompts. `--whole` runs `scanner.scan_model` with the default settings on one
shape and prints its real wall time and phases (random weights: not the benign path).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/scan_speed.py` from the root

from amdet_gate.confirm import natural_steering
from amdet_gate.encoders.clip import ClipTextAdapter
from amdet_gate.engine import (
    Centres,
    CleanSpread,
    Models,
    SearchSettings,
    Thresholds,
    clean_pooled,
    descend,
    eos_positions,
    held_out_stats,
    landscape,
    pooled_gates,
    pooled_loss,
    precompute,
    screened_gate_values,
    start_triggers,
    trigger_bound,
)
from amdet_gate.engine.token_path import SearchState, _batch_loss
from amdet_gate.prompts import builtin_prompts
from amdet_gate.scanner import ScanRequest, pick_device, scan_model, split_prompts
from amdet_gate.token_search import Objective, TokenSearchSettings, token_search
from amdet_gate.tokenizer import bundled_tokenizer
from bench.scan_projection import HEADER, PhaseTimes, Shape, row

SMALL = [Shape("", 128, 4), Shape("", 256, 4), Shape("", 256, 6), Shape("", 256, 6, prompts=1000),
         Shape("", 128, 4, 248), Shape("", 512, 8)]
REAL = [Shape("CLIP-B", 512, 12), Shape("CLIP-L", 768, 12), Shape("LongCLIP-L", 768, 12, 248),
        Shape("OpenCLIP-H", 1024, 24, act="gelu"), Shape("bigG", 1280, 32, act="gelu")]


def build(shape: Shape) -> CLIPTextModel:
    """The real family's sizes (amdet_gate/data/text-config-*.json), 64-wide heads, random weights."""
    config = CLIPTextConfig(vocab_size=49408, hidden_size=shape.width, intermediate_size=4 * shape.width,
                            num_hidden_layers=shape.layers, num_attention_heads=max(2, shape.width // 64),
                            max_position_embeddings=shape.positions, hidden_act=shape.act, eos_token_id=49407)
    torch.manual_seed(0)
    return CLIPTextModel(config)


@dataclass(frozen=True)
class Seconds:
    """Wall seconds, and the process's CPU seconds over its threads: on a shared machine the second
    is what an idle runner with those cores would take (roughly: threads never scale perfectly)."""

    wall: float
    cpu: float

    def _pair(self, other: Seconds | float) -> tuple[float, float]:
        return (other.wall, other.cpu) if isinstance(other, Seconds) else (other, other)

    def __add__(self, other: Seconds | float) -> Seconds:
        w, c = self._pair(other)
        return Seconds(self.wall + w, self.cpu + c)

    __radd__ = __add__

    def __sub__(self, other: Seconds) -> Seconds:
        return Seconds(self.wall - other.wall, self.cpu - other.cpu)

    def __mul__(self, factor: float) -> Seconds:
        return Seconds(self.wall * factor, self.cpu * factor)

    __rmul__ = __mul__

    def __truediv__(self, divisor: float) -> Seconds:
        return Seconds(self.wall / divisor, self.cpu / divisor)


def timed(device: torch.device, fn, *args, **kwargs) -> Seconds:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    fn(*args, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return Seconds(time.perf_counter() - t0, (time.process_time() - c0) / torch.get_num_threads())


def measure(shape: Shape, device: torch.device, steps: int, sample: int) -> dict:
    """Seconds of every phase of one benign scan of `shape` (PhaseTimes), and the peak memory."""
    s, t = SearchSettings(), Thresholds()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    enc = ClipTextAdapter(build(shape), 49407).to(device)
    models, tok = Models(enc), bundled_tokenizer()
    opt_prompts, held_prompts = split_prompts(builtin_prompts(), shape.prompts, 0.2, s.seed)
    n_held, m = len(held_prompts), min(sample, len(held_prompts))
    opt_ids, held_ids = tok(opt_prompts, shape.positions).to(device), tok(held_prompts[:m], shape.positions).to(device)
    with torch.no_grad():
        embed_s = timed(device, precompute, enc, opt_ids, s.chunk_size, clean=False)
        held_s = timed(device, precompute, enc, held_ids, s.chunk_size)
        opt = precompute(enc, opt_ids, s.chunk_size, clean=False)
        held = precompute(enc, held_ids, s.chunk_size)
    gen = torch.Generator().manual_seed(0)
    bound = trigger_bound(enc, s.trigger_vectors)

    # Token path: `steps` steps after one warm-up, the engine's own batch loss and optimiser step.
    triggers, scale = start_triggers(s, s.restarts, shape.width, bound, gen, device)
    adam = torch.optim.Adam([triggers], lr=s.lr * scale, weight_decay=s.weight_decay)
    state = SearchState(torch.randperm(len(opt), generator=gen), torch.zeros(s.restarts), [0.0] * s.restarts)

    def token_step() -> None:
        descend(adam, _batch_loss(models, opt, triggers, s, state, gen), triggers, state.history, bound)

    warm = shape.size <= 768 * 768 * 12  # a bigger shape's first step is timed: allocation is small against it
    if warm:
        token_step()
    step_s = sum(timed(device, token_step) for _ in range(steps)) / steps
    trig = triggers.detach()
    screen = min(s.screen_prompts, n_held)
    check_s = timed(device, screened_gate_values, models, held, trig, t, s.chunk_size, s.screen_prompts) * screen / m
    reference = CleanSpread.of(held.clean, s.chunk_size)
    stats_s = timed(device, held_out_stats, models, held, trig[:1], s.chunk_size, reference=reference) * n_held / m
    q = 4  # landscape points per side measured; the report's grid is 25 x 25
    land = replace(s, landscape_points=q)
    land_s = timed(device, landscape, models, held.embeds[:1], held.clean[:1], trig[0], land,
                   torch.Generator().manual_seed(0)) / q**2

    # Pooled path: 8 starts on the shorter half of the prompts.
    shift = s.trigger_vectors
    opt_eos = eos_positions(opt.ids, enc.eos_token_id, shift)
    held_eos = eos_positions(held.ids, enc.eos_token_id, shift)
    centres = Centres.of(models, held)
    pooled, pscale = start_triggers(s, 2 * s.restarts, shape.width, bound, gen, device)
    padam = torch.optim.Adam([pooled], lr=s.pooled_lr * pscale, weight_decay=s.weight_decay)
    short, history = opt_eos.argsort(stable=True)[: len(opt) // 2], []

    def pooled_step() -> None:
        batch = short[torch.randint(len(short), (s.pooled_batch_size,), generator=gen).to(device)]
        clean = clean_pooled(enc, opt.embeds[batch], opt.ids[batch])
        loss = pooled_loss(models, opt.embeds[batch], opt_eos[batch], clean, centres, pooled, s.beta, s.gamma)
        descend(padam, loss, pooled, history, bound)

    if warm:
        pooled_step()
    pstep_s = sum(timed(device, pooled_step) for _ in range(steps)) / steps
    ptrig = pooled.detach()
    with torch.no_grad():
        pcheck_s = timed(device, pooled_gates, models, held, held_eos, centres, ptrig, t, s.chunk_size) * screen / m
        pfinal_s = timed(device, pooled_gates, models, held, held_eos, centres, ptrig[:1], t, s.chunk_size) * n_held / m
    words, on = 2, min(32, m)  # of 16 words on 32 prompts
    natural_s = timed(device, natural_steering, models, held, t, {49406, 49407}, s.chunk_size, words, on) * 8 * 32 / on

    # A typed confirmation: 2 starts x (1 evaluation + 24 iterations of a gradient and 48 candidates),
    # each on 16 prompts: timed on fewer and scaled.
    ts, allowed = TokenSearchSettings.of(s), torch.ones(49408, dtype=torch.bool, device=device)
    per = ts.prompts / max(2, m // 4)
    ts = replace(ts, prompts=max(2, m // 4))
    ids16 = opt.ids[: ts.prompts]

    def typed(iterations: int) -> float:
        return timed(device, token_search, enc, ids16, (320, 321), allowed, Objective.TOKENS,
                     replace(ts, iterations=iterations))

    start_s = typed(0)
    iteration_s = typed(1) - start_s
    confirm_s = 2 * (start_s + ts.iterations * iteration_s) * per + stats_s

    times = (embed_s + held_s * n_held / m, step_s, check_s, stats_s + land_s * s.report_landscape_points**2,
             pstep_s, pcheck_s, pfinal_s, natural_s, confirm_s)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    share = (time.process_time() - cpu0) / ((time.perf_counter() - wall0) * torch.get_num_threads())
    return {"times": asdict(PhaseTimes(*(v.wall for v in times))), "land_point": land_s.wall,
            "cpu_times": asdict(PhaseTimes(*(v.cpu for v in times))), "cpu_land_point": land_s.cpu,
            "peak_gib": peak / 2**30,
            "cpu_share": share if device.type == "cpu" else None, "sample": m, "row_s": time.perf_counter() - wall0}


def find_shape(spec: str, prompts: int = 4000) -> Shape:
    for shape in REAL + SMALL:
        if shape.spec == spec and shape.prompts == prompts:
            return shape
    width, layers, positions = (int(v) for v in spec.split("x"))
    return Shape("", width, layers, positions, prompts=prompts)


def whole(shape: Shape, device: str) -> None:
    """One entire default scan (`scan_model`, default settings) of a saved random encoder."""
    with tempfile.TemporaryDirectory() as tmp:
        build(shape).save_pretrained(tmp)
        t0 = time.perf_counter()
        scan = scan_model(ScanRequest(model=Path(tmp), n_prompts=shape.prompts, device=device))
        wall = time.perf_counter() - t0
    r = scan.result
    peak = (torch.cuda.max_memory_allocated() if r.environment.device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps({"shape": shape.spec, "name": shape.name, "wall_s": round(wall, 1), "verdict": str(r.verdict),
                      "score": r.score, "token_steps": r.search.steps, "stop_reason": str(r.search.stop_reason),
                      "checks": len(r.search.checks), "pooled_steps": r.pooled.steps if r.pooled else 0,
                      "confirmations": len(r.confirmation or ()),
                      "confirm_s": round(sum(c.seconds for c in r.confirmation or ()), 1),
                      "pooled_s": r.pooled.seconds if r.pooled else 0.0, "timings": asdict(r.timings),
                      "device": r.environment.device, "threads": r.environment.threads,
                      "peak_gib": round(peak / 2**30, 2)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=["small", "real", "all"], default="real")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per loop (after one warm-up)")
    parser.add_argument("--sample", type=int, help="held-out prompts the per-prompt phases run on "
                        "(default: 64 for the small shapes, 16 for the real ones)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--whole", action="store_true", help="run one entire default scan of --shape")
    parser.add_argument("--shape", default="768x12x77", help="WIDTHxLAYERSxPOSITIONS (--whole, --row)")
    parser.add_argument("--prompts", type=int, default=4000, help="prompts of --shape (optimisation + held-out)")
    parser.add_argument("--row", action="store_true", help=argparse.SUPPRESS)  # one row, as JSON (a child)
    parser.add_argument("--json", type=Path, help="also write the rows' measurements here")
    parser.add_argument("--from-json", type=Path, help="print the table of measurements --json wrote; measure nothing")
    args = parser.parse_args()
    if args.whole:
        return whole(find_shape(args.shape, args.prompts), args.device)
    if args.row:
        shape = find_shape(args.shape, args.prompts)
        print(json.dumps(measure(shape, pick_device(args.device), args.steps, args.sample or shape.sample)))
        return
    if args.from_json:
        print(HEADER)
        for saved in json.loads(args.from_json.read_text()):
            shape = Shape(**saved["shape"])
            print(row(shape, saved) + ("\n" + row(shape, saved, cpu=True) if saved["cpu_share"] is not None else ""))
        return
    shapes = {"small": SMALL, "real": REAL, "all": SMALL + REAL}[args.shapes]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {pick_device(args.device)}, "
          f"{args.steps} timed steps, sample {args.sample or 'per shape'}\n\n{HEADER}", flush=True)
    rows = []
    for shape in shapes:
        child = subprocess.run([sys.executable, __file__, "--row", "--shape", shape.spec, "--steps", str(args.steps),
                                "--sample", str(args.sample or shape.sample), "--device", args.device,
                                "--prompts", str(shape.prompts)],
                               capture_output=True, text=True, check=False)
        if child.returncode != 0:
            print(f"| {shape.name or shape.spec} | failed: {child.stderr.strip().splitlines()[-1:]} |", flush=True)
            continue
        result = json.loads(child.stdout.strip().splitlines()[-1])
        rows.append({"shape": asdict(shape)} | result)
        print(row(shape, result), flush=True)
        if result["cpu_share"] is not None:
            print(row(shape, result, cpu=True), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
