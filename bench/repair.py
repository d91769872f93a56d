"""`amdet-gate repair` on backdoored controls whose true trigger is known.

    python bench/repair.py [--width 128] [--layers 4] [--triggers homoglyph,rare_word,...] [--out bench-repair]

Controls already saved in --out are reused (building one takes minutes on 2 cores).

Builds a pretrained-like base, Rickrolling text-on-text students (each trigger style of
controls.TRIGGERS) and text-on-pair students, and one benign fine-tune; scans each through
the gate, repairs every one the scan fails, and prints per control:

- attack success of the TRUE trigger (controls.TRIGGERS applied to 256 held-out prompts):
  the share of prompts whose triggered output is nearer the backdoor's target (the
  suspect's mean triggered output) than the same prompt's clean output; all token features
  for text-on-text, the pooled feature for text-on-pair. For the clean base, the suspect
  and the repaired copy;
- clean fidelity (repair.json), the re-scan verdict and score, rounds, layers and seconds.
A benign model is never repaired: its pass result is refused (exit 4), shown as `refused`.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from amdet_gate import controls
from amdet_gate.encoder import load_encoder
from amdet_gate.erasure.findings import DetectionPath
from amdet_gate.erasure.measure import attack_success, prompt_target
from amdet_gate.erasure.pipeline import RepairRequest, run_repair
from amdet_gate.errors import GateError
from amdet_gate.gate import GateOptions, run_gate
from amdet_gate.prompts import builtin_prompts
from amdet_gate.tokenizer import bundled_tokenizer

PROMPTS = 256


def true_trigger_success(folders: dict[str, Path], style: str, space: DetectionPath, seed: int) -> dict[str, float]:
    """Attack success of the known trigger on each model, towards the suspect's target."""
    tokenizer = bundled_tokenizer()
    prompts = sorted(builtin_prompts())
    random.Random(seed + 1000).shuffle(prompts)  # another draw than the repair's own prompts
    prompts = prompts[-PROMPTS:]
    rng = random.Random(seed)
    length = load_encoder(folders["suspect"]).adapter.seq_len
    clean_ids = tokenizer(prompts, length)
    triggered_ids = tokenizer([controls.TRIGGERS[style](p, rng) for p in prompts], length)
    adapters = {name: load_encoder(folder).adapter for name, folder in folders.items()}
    for adapter in adapters.values():
        adapter.eos_token_id = tokenizer.tokenizer.eos_token_id
    target = prompt_target(adapters["suspect"], triggered_ids, space, 64)
    return {name: attack_success(a, clean_ids, triggered_ids, target, 64) for name, a in adapters.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--positions", type=int, default=77)
    parser.add_argument("--triggers", default=",".join(controls.TRIGGERS))
    parser.add_argument("--pair-triggers", default="rare_word", help="text-on-pair trigger styles")
    parser.add_argument("--out", type=Path, default=Path("bench-repair"))
    args = parser.parse_args()
    torch.manual_seed(0)
    shape = controls.ControlShape(args.width, args.layers, args.positions)
    builders: dict[str, tuple[str | None, DetectionPath, object]] = {
        "benign_distill": (None, DetectionPath.TOKEN, lambda base: controls.benign_finetune(base, "distill", seed=1))}
    for i, style in enumerate(s for s in args.triggers.split(",") if s):
        builders[f"text_on_text_{style}"] = (style, DetectionPath.TOKEN, lambda base, s=style, i=i:
                                             controls.backdoor_text_on_text(base, s, seed=10 + i))
    for i, style in enumerate(s for s in args.pair_triggers.split(",") if s):
        builders[f"text_on_pair_{style}"] = (style, DetectionPath.POOLED, lambda base, s=style, i=i:
                                             controls.backdoor_text_on_pair(base, s, seed=20 + i))
    # Controls already in --out (config.json present) are reused: building them costs minutes each.
    base_dir = args.out / "base"
    missing = [n for n in ("base", *builders) if not (args.out / n / "config.json").is_file()]
    if missing:
        t0 = time.monotonic()
        base = controls.pretrain_base(shape)
        controls.save_control(base, base_dir)
        for name in missing[1:] if missing[0] == "base" else missing:
            controls.save_control(builders[name][2](base), args.out / name)
        print(f"built {', '.join(missing)} in {time.monotonic() - t0:.0f} s", flush=True)
    built = {name: (style, space) for name, (style, space, _) in builders.items()}
    print(f"{'control':26s} {'scan':6s} {'ASR base':>8s} {'before':>7s} {'after':>7s} {'fidelity':>8s} "
          f"{'re-scan':>14s} {'rounds':>6s} {'layers':>7s} {'scan s':>6s} {'repair s':>8s}", flush=True)
    for name, (style, space) in built.items():
        folder = args.out / name
        t_scan = time.monotonic()
        scanned = run_gate(GateOptions(model=str(folder), out=args.out / f"{name}-scan", use_cache=False), env={})
        scan_s = time.monotonic() - t_scan
        t_repair = time.monotonic()
        try:
            repaired = run_repair(RepairRequest(model=str(folder), result=args.out / f"{name}-scan" / "result.json",
                                                out=args.out / f"{name}-repaired", use_cache=False))
        except GateError as exc:
            print(f"{name:26s} {scanned.result['verdict']:6s} refused (exit {int(exc.exit_code)}): {exc}", flush=True)
            continue
        repair_s = time.monotonic() - t_repair
        r = repaired.report
        asr = true_trigger_success({"base": base_dir, "suspect": folder, "repaired": args.out / f"{name}-repaired"},
                                   style or "rare_word", space, seed=0)
        rescan = f"{r['rescan']['verdict']} {r['rescan']['score']:.3f}"
        print(f"{name:26s} {scanned.result['verdict']:6s} {asr['base']:8.3f} {asr['suspect']:7.3f} "
              f"{asr['repaired']:7.3f} {r['fidelity']['value']:8.4f} {rescan:>14s} {len(r['rounds']):6d} "
              f"{','.join(map(str, r['edit']['layers'])):>7s} {scan_s:6.0f} {repair_s:8.0f}", flush=True)


if __name__ == "__main__":
    main()
