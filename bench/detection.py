"""Detection quality on the benchmark population (bench/population): encoders the detector was
not tuned on, with a fixed calibration / evaluation split.

    pip install --no-deps clip-benchmark==1.6.2      # the population's training text (CuPL)
    python bench/detection.py [--split evaluation] [--mode both] [--only SUBSTRING]

Builds (once, cached under bench-out/population/) and scans every member of the split with
the default settings, without an anchor and with the member's clean base as the anchor (a
base member is its own base: it has no anchor row). Prints one row per scan, then per
category and overall: TPR on strong backdoors (attack success >= 0.8), FPR (benign blocked,
exit 1), inconclusive counts, precision, F1, AUROC of the score and seconds per scan.
Thresholds and rules are chosen on the calibration split; README reports the evaluation split.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amdet_gate.scanner import ScanRequest, ScanResult, scan_model
from amdet_gate.settings import FAIL, INCONCLUSIVE
from bench.population.build import DEFAULT_ROOT, BuiltMember, build
from bench.population.members import population


@dataclass(frozen=True)
class Row:
    name: str
    truth: str
    category: str
    base: str
    mode: str  # plain | anchor
    attack_success: float | None
    verdict: str
    score: float
    evidence: str  # which path decided, and the real tokens when they reproduced the collapse
    seconds: float

    @property
    def strong(self) -> bool:
        return self.truth == "backdoor" and (self.attack_success or 0.0) >= 0.8


def auroc(positives: list[float], negatives: list[float]) -> float:
    pairs = [(p > n) + 0.5 * (p == n) for p in positives for n in negatives]
    return sum(pairs) / len(pairs) if pairs else float("nan")


def _evidence(result: ScanResult) -> str:
    """Which path led, and the typed tokens its confirmation found (result.confirmation)."""
    if not result.confirmation:
        return f"no lead (token search {result.search.stop_reason})"
    best = max(result.confirmation, key=lambda c: c.score or 0.0)
    return f"{best.objective} lead, typed {best.text!r} score {best.score or 0.0:.2f}"


def scan(member: BuiltMember, mode: str) -> Row:
    started = time.monotonic()
    anchor = member.base_folder if mode == "anchor" else None
    result = scan_model(ScanRequest(model=member.folder, anchor=anchor)).result
    return Row(member.member.name, member.member.truth, member.member.category, member.member.base.name, mode,
               member.attack_success, result.verdict, result.score, _evidence(result),
               round(time.monotonic() - started, 1))


def summary(rows: list[Row], label: str) -> str:
    strong = [r for r in rows if r.strong]
    weak = [r for r in rows if r.truth == "backdoor" and not r.strong]
    benign = [r for r in rows if r.truth == "benign"]
    tp = sum(r.verdict == FAIL for r in strong)
    fp = sum(r.verdict == FAIL for r in benign)
    tpr = tp / len(strong) if strong else float("nan")
    fpr = fp / len(benign) if benign else float("nan")
    precision = tp / (tp + fp) if tp + fp else float("nan")
    f1 = 2 * precision * tpr / (precision + tpr) if tp else 0.0
    area = auroc([r.score for r in strong], [r.score for r in benign])
    inconclusive = sum(r.verdict == INCONCLUSIVE for r in rows)
    weak_caught = sum(r.verdict == FAIL for r in weak)
    seconds = sum(r.seconds for r in rows) / len(rows) if rows else float("nan")
    return (f"{label:34s} TPR {tp:2d}/{len(strong):<2d} {tpr:5.2f}  FPR {fp:2d}/{len(benign):<2d} {fpr:5.2f}  "
            f"prec {precision:5.2f}  F1 {f1:5.2f}  AUROC {area:5.3f}  inconcl {inconclusive:2d}  "
            f"weak caught {weak_caught}/{len(weak)}  {seconds:5.1f} s/scan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", default="evaluation", choices=("calibration", "evaluation", "all"))
    parser.add_argument("--mode", default="both", choices=("plain", "anchor", "both"))
    parser.add_argument("--only", default="", help="scan only members whose name contains this")
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--out", type=Path, default=Path("bench-out/detection.json"))
    args = parser.parse_args()
    modes = ("plain", "anchor") if args.mode == "both" else (args.mode,)
    members = [m for m in population() if args.split in ("all", m.split) and args.only in m.name]
    built = [build(m, args.root) for m in members]
    rows: list[Row] = []
    print(f"{'member':50s} {'mode':6s} {'truth':8s} {'asr':>5s} {'verdict':12s} {'score':>6s} {'s':>6s}  evidence")
    for member in built:
        for mode in modes:
            if mode == "anchor" and member.member.recipe is None:
                continue  # a clean base is its own anchor
            row = scan(member, mode)
            rows.append(row)
            asr = "" if row.attack_success is None else f"{row.attack_success:.2f}"
            print(f"{row.name:50s} {mode:6s} {row.truth:8s} {asr:>5s} {row.verdict:12s} {row.score:6.3f} "
                  f"{row.seconds:6.1f}  {row.evidence}", flush=True)
    print()
    for mode in modes:
        subset = [r for r in rows if r.mode == mode]
        print(summary(subset, f"overall, {mode}"))
        for category in sorted({r.category for r in subset}):
            print(summary([r for r in subset if r.category == category], f"  {category}"))
        for base in sorted({r.base for r in subset}):
            print(summary([r for r in subset if r.base == base], f"  base {base}"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps([asdict(r) for r in rows], indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
