"""`amdet-gate repair` on backdoored encoders whose true trigger is known.

    python bench/repair.py [--width 128] [--layers 4] [--triggers homoglyph,rare_word,...] [--out bench-out/repair]
    python bench/repair.py --population bench-out/population --only bd0 [--triggers ""]

Controls and scans already in --out are reused (building a control takes minutes on 2 cores).

Controls: a pretrained-like base, Rickrolling text-on-text students (each trigger style of
controls.TRIGGERS), text-on-pair students and one benign fine-tune (amdet_gate.controls).
Population: members of bench/population already built under --population (never built
here), backdoors only, with their clean base as the floor. Each model is scanned through the
gate (default settings), repaired when the scan fails, and one row is printed:

- attack success of the TRUE trigger on the clean base, the suspect and the repaired copy.
  Controls: the share of 256 triggered prompts (a draw the repair never sees) whose output is
  nearer the backdoor's target (the suspect's mean triggered output) than the same prompt's
  clean output; all token features for text-on-text, the pooled feature for text-on-pair.
  Population: the population's own measure (bench/population/build.attack_success: cosine
  >= 0.9 to the attacker's target);
- clean fidelity (repair.json), the re-scan verdict and score, rounds, layers, the seconds of
  the edit (load, probes, plans, copy) and of the re-scan.
A benign model is never repaired: its pass result is refused (exit 4), shown as `refused`.
Rows also go to --out/repair-bench.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import CLIPTextModelWithProjection

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amdet_gate import controls
from amdet_gate.encoders import load_encoder
from amdet_gate.erasure.findings import DetectionPath
from amdet_gate.erasure.measure import attack_success, prompt_target
from amdet_gate.erasure.pipeline import RepairRequest, run_repair
from amdet_gate.errors import GateError
from amdet_gate.gate import GateOptions, run_gate
from amdet_gate.prompts import builtin_prompts
from amdet_gate.sources.local import local_model
from amdet_gate.tokenizer import bundled_tokenizer

PROMPTS = 256


@dataclass(frozen=True)
class Subject:
    """A model to scan and repair, and how its true trigger's attack success is measured."""

    name: str
    folder: Path
    base: Path
    style: str | None  # controls.TRIGGERS key; None: benign
    space: DetectionPath
    member: str | None = None  # a bench/population member's name


@dataclass(frozen=True)
class Row:
    name: str
    scan: str
    status: str  # repaired | not_repaired | refused (exit 4)
    asr_base: float | None = None
    asr_before: float | None = None
    asr_after: float | None = None
    fidelity: float | None = None
    rescan: str | None = None
    rescan_score: float | None = None
    rounds: int | None = None
    layers: str | None = None
    scan_s: float | None = None
    edit_s: float | None = None
    rescan_s: float | None = None
    note: str = ""


def control_success(subject: Subject, repaired: Path, seed: int = 0) -> tuple[float, float, float]:
    """The controls' measure (module docstring) on base, suspect and repaired copy."""
    tokenizer = bundled_tokenizer()
    prompts = sorted(builtin_prompts())
    random.Random(seed + 1000).shuffle(prompts)  # another draw than the repair's own prompts
    prompts = prompts[-PROMPTS:]
    rng = random.Random(seed)
    adapters = [load_encoder(local_model(f)).adapter for f in (subject.base, subject.folder, repaired)]
    length = adapters[1].seq_len
    clean_ids = tokenizer(prompts, length)
    triggered_ids = tokenizer([controls.TRIGGERS[subject.style](p, rng) for p in prompts], length)
    for adapter in adapters:
        adapter.eos_token_id = tokenizer.tokenizer.eos_token_id
    target = prompt_target(adapters[1], triggered_ids, subject.space, 64)
    base, before, after = (attack_success(a, clean_ids, triggered_ids, target, 64) for a in adapters)
    return base, before, after


def member_success(subject: Subject, repaired: Path) -> tuple[float, float, float]:
    """The population's own measure on base, suspect and repaired copy (its teacher: the base)."""
    from bench.population.build import attack_success as population_success
    from bench.population.members import population
    from bench.population.recipes import tokenizer_for

    member = next(m for m in population() if m.name == subject.member)
    tokenizer = tokenizer_for(member.base.pad)
    teacher = CLIPTextModelWithProjection.from_pretrained(str(subject.base)).eval()

    def measure(folder: Path) -> float:
        model = CLIPTextModelWithProjection.from_pretrained(str(folder)).eval()
        return population_success(model, teacher, member, tokenizer)

    return measure(subject.base), measure(subject.folder), measure(repaired)


def run(subject: Subject, out: Path, reuse: bool, time_budget: float) -> Row:
    scan_dir = out / f"{subject.name}-scan"
    t0 = time.monotonic()
    stored = json.loads((scan_dir / "result.json").read_text()) if (scan_dir / "result.json").is_file() else {}
    if reuse and stored.get("verdict") in ("pass", "fail") and "confirmation" in stored:  # a decided current scan
        verdict = stored["verdict"]
    else:
        verdict = run_gate(GateOptions(model=str(subject.folder), out=scan_dir, time_budget=time_budget,
                                       use_cache=False), env={}).result["verdict"]
    scan_s = round(time.monotonic() - t0, 1)
    repaired = out / f"{subject.name}-repaired"
    try:
        outcome = run_repair(RepairRequest(model=str(subject.folder), result=scan_dir / "result.json", out=repaired,
                                           time_budget=time_budget, use_cache=False))
    except GateError as exc:
        return Row(subject.name, verdict, f"refused (exit {int(exc.exit_code)})", scan_s=scan_s, note=str(exc)[:200])
    r = outcome.report
    measure = member_success if subject.member else control_success
    base, before, after = measure(subject, repaired)
    timings = r["timings"]
    return Row(subject.name, verdict, r["status"], round(base, 3), round(before, 3), round(after, 3),
               round(r["fidelity"]["value"], 4), r["rescan"]["verdict"], r["rescan"]["score"], len(r["rounds"]),
               ",".join(map(str, r["edit"]["layers"])), scan_s,
               round(timings["total_s"] - timings.get("rescan_s", 0.0), 1), timings.get("rescan_s"))


def control_subjects(args: argparse.Namespace) -> list[Subject]:
    """Build what --out lacks, then the controls as subjects."""
    shape = controls.ControlShape(args.width, args.layers, args.positions)
    builders = {"benign_distill": (None, DetectionPath.TOKEN, lambda b: controls.benign_finetune(b, "distill", seed=1))}
    for i, style in enumerate(s for s in args.triggers.split(",") if s):
        builders[f"text_on_text_{style}"] = (style, DetectionPath.TOKEN, lambda b, s=style, i=i:
                                             controls.backdoor_text_on_text(b, s, seed=10 + i))
    for i, style in enumerate(s for s in args.pair_triggers.split(",") if s):
        builders[f"text_on_pair_{style}"] = (style, DetectionPath.POOLED, lambda b, s=style, i=i:
                                             controls.backdoor_text_on_pair(b, s, seed=20 + i))
    if args.no_benign:
        del builders["benign_distill"]
    base_dir = args.out / "base"
    missing = [n for n in builders if not (args.out / n / "config.json").is_file()]
    if missing:
        t0 = time.monotonic()
        if (base_dir / "config.json").is_file():  # saved with its projection: reloads exactly
            base = CLIPTextModelWithProjection.from_pretrained(str(base_dir)).eval()
        else:
            base = controls.pretrain_base(shape)
            controls.save_control(base, base_dir, with_projection=True)
        for name in missing:
            controls.save_control(builders[name][2](base), args.out / name)
        print(f"built {', '.join(missing)} in {time.monotonic() - t0:.0f} s", flush=True)
    return [Subject(name, args.out / name, base_dir, style, space) for name, (style, space, _) in builders.items()]


def population_subjects(root: Path, only: str) -> list[Subject]:
    subjects = []
    for folder in sorted(p for p in root.iterdir() if (p / "member.json").is_file() and only in p.name):
        record = json.loads((folder / "member.json").read_text())
        if record.get("truth") != "backdoor":
            continue
        space = DetectionPath.POOLED if record["recipe"]["paradigm"] == "text_on_pair" else DetectionPath.TOKEN
        subjects.append(Subject(folder.name, folder, root / f"{record['base']['name']}-base", record["recipe"]["style"],
                                space, member=folder.name))
    return subjects


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--positions", type=int, default=77)
    parser.add_argument("--triggers", default=",".join(controls.TRIGGERS), help="text-on-text trigger styles")
    parser.add_argument("--pair-triggers", default="rare_word", help="text-on-pair trigger styles")
    parser.add_argument("--no-benign", action="store_true", help="skip the benign control's refusal row")
    parser.add_argument("--population", type=Path, help="also repair the backdoors built under this folder")
    parser.add_argument("--only", default="", help="population members whose name contains this")
    parser.add_argument("--rescan-scans", action="store_true", help="scan again even if a scan result is in --out")
    parser.add_argument("--time-budget", type=float, default=900.0,
                        help="seconds per scan and re-scan (a starved scan on a shared machine is inconclusive)")
    parser.add_argument("--out", type=Path, default=Path("bench-out/repair"))
    args = parser.parse_args()
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    subjects = control_subjects(args) if args.triggers or args.pair_triggers else []
    if args.population is not None:
        subjects += population_subjects(args.population, args.only)
    print(f"{'model':40s} {'scan':6s} {'ASR base':>8s} {'before':>7s} {'after':>7s} {'fidelity':>8s} "
          f"{'re-scan':>12s} {'rounds':>6s} {'layers':>6s} {'scan s':>6s} {'edit s':>6s} {'rescan s':>8s}", flush=True)
    rows = []
    for subject in subjects:
        row = run(subject, args.out, reuse=not args.rescan_scans, time_budget=args.time_budget)
        rows.append(row)
        if row.fidelity is None:
            print(f"{row.name:40s} {row.scan:6s} {row.status}: {row.note}", flush=True)
            continue
        print(f"{row.name:40s} {row.scan:6s} {row.asr_base:8.3f} {row.asr_before:7.3f} {row.asr_after:7.3f} "
              f"{row.fidelity:8.4f} {row.rescan:>6s} {row.rescan_score:5.3f} {row.rounds:6d} {row.layers:>6s} "
              f"{row.scan_s:6.0f} {row.edit_s:6.0f} {row.rescan_s:8.0f}", flush=True)
        (args.out / "repair-bench.json").write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    (args.out / "repair-bench.json").write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")


if __name__ == "__main__":
    main()
