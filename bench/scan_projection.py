"""How long a whole benign scan takes, from the cost of each of its phases (pure arithmetic),
and the table rows bench/scan_speed.py prints from them.

A benign scan detects nothing, so it runs every phase `scanner.scan_model` has, at the counts
the default `SearchSettings` give (read from amdet_gate/engine/token_path.py, pooled_path.py,
scanner.py, confirm.py and token_search.py):

    total = precompute
          + S * step                      token path: S steps (max_steps = 640 without a plateau;
                                          the 40-step plateau rule ends benign controls at ~130-145)
          + C * check                     C = S // check_every (10), +1 when S = max_steps is not a
                                          multiple: a check is due at most every 10 steps, and only
                                          once the running loss is below loss_trigger (an upper bound)
          + report                        gates 1-3 of the reported trigger on every held-out prompt,
                                          and its landscape on the 25 x 25 report grid
          + P * pooled_step               P = min(pooled_steps, max_steps) = 100 (benign: no extension)
          + PC * pooled_check             PC = ceil(P / pooled_check_every) = 2 screened checks
          + pooled_final                  the pooled gates of the best start on every held-out prompt
          + natural                       16 corpus words on 32 held-out prompts (confirm.natural_steering)
          + [confirm]                     a typed-trigger search (2 starts x 24 iterations, then every
                                          held-out prompt): only when the free trigger collapsed the
                                          prompts (token_search.needs_confirmation)

The scan's deadline, `time_budget_s` (900 s) after it starts, ends either loop early: the
token loop then stops with `time_budget`, the pooled loop after one step, and everything after
the loops runs regardless. A scan either loop stopped with `time_budget` is inconclusive, never
pass (verdict.decide), as is one whose max_steps is below `min_decisive_steps` (200).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from amdet_gate.settings import SearchSettings


@dataclass(frozen=True)
class PhaseTimes:
    """Seconds per phase of one scan, as bench/scan_speed.py measures them."""

    precompute: float  # embeddings of every prompt, clean outputs of the held-out ones
    step: float  # one token-path step (4 restarts x 5 prompts, forward and backward)
    check: float  # one token-path gate check (4 restarts, the first screen of 50 held-out prompts)
    report: float  # gates 1-3 of one trigger on every held-out prompt + the 25 x 25 landscape
    pooled_step: float  # one pooled-path step (8 starts x 4 prompts)
    pooled_check: float  # one screened pooled check (8 starts x 50 prompts)
    pooled_final: float  # the pooled gates of one trigger on every held-out prompt
    natural: float  # confirm.natural_steering
    confirm: float = 0.0  # one typed-trigger confirmation (token_search.confirm_with_tokens)


@dataclass(frozen=True)
class Counts:
    token_steps: int
    token_checks: int
    pooled_steps: int
    pooled_checks: int


def benign_counts(settings: SearchSettings, token_steps: int | None = None) -> Counts:
    """Steps and checks of a benign scan whose token path runs `token_steps` (default: all max_steps)."""
    s = settings.max_steps if token_steps is None else min(token_steps, settings.max_steps)
    checks = s // settings.check_every + (1 if s == settings.max_steps and s % settings.check_every else 0)
    p = min(settings.pooled_steps, settings.max_steps)
    return Counts(s, checks, p, math.ceil(p / settings.pooled_check_every) if p else 0)


def project(times: PhaseTimes, settings: SearchSettings, token_steps: int | None = None,
            confirm: bool = False) -> float:
    """Seconds of a whole benign scan, without the time budget (the work it does)."""
    c = benign_counts(settings, token_steps)
    pooled = (c.pooled_steps * times.pooled_step + c.pooled_checks * times.pooled_check
              + times.pooled_final) if c.pooled_steps else 0.0
    return (times.precompute + c.token_steps * times.step + c.token_checks * times.check + times.report
            + pooled + times.natural + (times.confirm if confirm else 0.0))


@dataclass(frozen=True)
class Budgeted:
    seconds: float  # the scan's projected wall time under the deadline
    token_steps: int  # token steps run before the plateau, max_steps or the deadline
    cut_off: bool  # the deadline ended the token loop or the pooled one
    inconclusive: bool  # the verdict cannot be pass: cut off (verdict.decide), or short of min_decisive_steps


def project_with_budget(times: PhaseTimes, settings: SearchSettings, token_steps: int | None = None,
                        confirm: bool = False) -> Budgeted:
    """The same scan under `time_budget_s`: each loop tests the deadline after every step (the
    pooled loop runs at least one), and what follows the loops runs regardless."""
    c = benign_counts(settings, token_steps)
    elapsed, s, p = times.precompute, 0, 0
    while s < c.token_steps:
        s += 1
        elapsed += times.step + (times.check if s % settings.check_every == 0 or s == settings.max_steps else 0)
        if elapsed > settings.time_budget_s:
            break
    while p < c.pooled_steps:
        p += 1
        elapsed += times.pooled_step + (times.pooled_check if p % settings.pooled_check_every == 0
                                        or p == c.pooled_steps else 0)
        if elapsed > settings.time_budget_s:
            break
    elapsed += times.report + (times.pooled_final if c.pooled_steps else 0.0) + times.natural
    cut = s < c.token_steps or p < c.pooled_steps
    short = s == settings.max_steps < settings.min_decisive_steps
    return Budgeted(elapsed + (times.confirm if confirm else 0.0), s, cut, cut or short)


@dataclass(frozen=True)
class Shape:
    name: str
    width: int
    layers: int
    positions: int = 77
    act: str = "quick_gelu"
    prompts: int = 4000

    @property
    def size(self) -> int:  # relative compute per token
        return self.width * self.width * self.layers

    @property
    def sample(self) -> int:
        return 64 if self.size <= 512 * 512 * 8 else 16 if self.size <= 768 * 768 * 12 else 8

    @property
    def spec(self) -> str:
        return f"{self.width}x{self.layers}x{self.positions}"


def budgeted(times: PhaseTimes, settings: SearchSettings, token_steps: int) -> str:
    """Minutes under the default deadline; "cut N": the deadline stopped the loops after N token
    steps, and the verdict is inconclusive."""
    b = project_with_budget(times, settings, token_steps)
    return f"{b.seconds / 60:.1f}" + (f" (cut {b.token_steps})" if b.cut_off else "")


def row(shape: Shape, result: dict, cpu: bool = False) -> str:
    """The table row of wall times, or (`cpu`) of CPU seconds over threads: an idle machine's estimate."""
    s = SearchSettings()
    x = PhaseTimes(**result["cpu_times" if cpu else "times"])
    land_point = result["cpu_land_point" if cpu else "land_point"]
    share = "-" if result["cpu_share"] is None else f"{result['cpu_share']:.2f}"
    name = ((shape.name or "-") + (f" ({shape.prompts} prompts)" if shape.prompts != 4000 else "")
            + (" (CPU s / threads)" if cpu else ""))
    return (f"| {name} | {shape.width} | {shape.layers} | {shape.positions} | {x.precompute:.1f} | "
            f"{x.step:.2f} | {x.check:.1f} | {x.report:.1f} | {land_point:.3f} | {x.pooled_step:.2f} | "
            f"{x.natural:.1f} | {x.confirm:.0f} | {result['peak_gib']:.1f} | {project(x, s, 140) / 60:.1f} | "
            f"{project(x, s) / 60:.1f} | {project(x, s, confirm=True) / 60:.1f} | {budgeted(x, s, 140)} | "
            f"{budgeted(x, s, s.max_steps)} | {share} |")


HEADER = ("| shape | width | layers | L | precompute s | s/step | check s | report s | land/pt s | pooled s/step | "
          "natural s | confirm s | peak GiB | min @140 steps | min @640 | min @640+confirm | min @140, 900 s budget | "
          "min @640, 900 s budget | CPU share |\n" + "|---" * 19 + "|")
