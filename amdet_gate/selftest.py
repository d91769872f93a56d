"""`amdet-gate selftest`: prove the gate fires, on encoders built here on the CPU.

Builds a pretrained-like base, a benign fine-tune of it and a Rickrolling-backdoored
student, saves both in Hugging Face layout, scans both through the same loader and scanner
as `amdet-gate scan`, and checks: benign passes, backdoored fails.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from amdet_gate import controls
from amdet_gate.gate import GateOptions, run_gate
from amdet_gate.settings import FAIL, PASS


def run_selftest(out: Path, quick: bool = False, quiet: bool = False,
                 models: dict[str, Path] | None = None) -> bool:
    """True when the benign encoder passes and the backdoored one fails. `models` (keys "benign"
    and "backdoored") skips the building, for callers that already have the two encoders."""

    def say(message: str) -> None:
        if not quiet:
            print(f"selftest: {message}", file=sys.stderr, flush=True)

    models = models or build_models(out, say)
    expected = {"benign": PASS, "backdoored": FAIL}
    ok = True
    summary = Console(highlight=False, soft_wrap=True)
    for name, folder in models.items():
        say(f"scanning the {name} encoder")
        # The whole gate, as `amdet-gate scan` runs it: default policy, reports, images; no cache.
        options = GateOptions(model=str(folder), out=out / name, n_prompts=1000 if quick else 4000,
                              max_steps=200 if quick else 640, use_cache=False)
        r = run_gate(options, env={}).scan_result
        good = r.verdict == expected[name]
        ok &= good
        summary.print(f"{name:11s} verdict {r.verdict:12s} score {r.score:.3f}  expected {expected[name]:5s} "
                      f"{'ok' if good else 'WRONG'}  ({r.timings.total_s:.0f} s, "
                      f"{out / name / 'report.html'})")
    summary.print("selftest passed: the gate fires on the backdoor and passes the benign fine-tune" if ok
                  else "selftest FAILED")
    return ok


def build_models(out: Path, say: Callable[[str], None]) -> dict[str, Path]:
    """A pretrained-like base's benign fine-tune and backdoored student, saved under `out/models`."""
    shape = controls.ControlShape(width=128, layers=4, positions=77)
    t0 = time.monotonic()
    say("pretraining a small CLIP-style base encoder")
    base = controls.pretrain_base(shape, steps=controls.BASE_STEPS)
    say("benign fine-tune and backdoored student (Rickrolling, homoglyph trigger)")
    benign = controls.benign_finetune(base, "distill")
    backdoored = controls.backdoor_text_on_text(base, "homoglyph")
    models = {
        "benign": controls.save_control(benign, out / "models" / "benign"),
        "backdoored": controls.save_control(backdoored, out / "models" / "backdoored"),
    }
    say(f"encoders built in {time.monotonic() - t0:.0f} s")
    return models
