"""What the CLI prints: one function per kind of line, every untrusted part through the sanitiser.

`say` is the only way a line reaches stdout or stderr; `Display` shows progress (a rich bar on a
terminal, plain stage lines in a CI log); `print_outcome` writes the verdict line and its details.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from amdet_gate.sanitise import one_line, visible
from amdet_gate.settings import FAIL, INCONCLUSIVE, PASS, SearchProgress

if TYPE_CHECKING:
    from amdet_gate.engine import GateCheck
    from amdet_gate.gate import GateOutcome


def say(line: str, err: bool = False) -> None:
    """Print one line we composed. Its untrusted parts went through `one_line` already; `visible`
    is the belt to those braces: no raw control character ever reaches a terminal or CI log."""
    print(visible(line), file=sys.stderr if err else sys.stdout, flush=err)


def say_error(message: str) -> None:
    say(f"amdet-gate: error: {one_line(message)}", err=True)


VERDICT_STYLE = {PASS: "bold green", FAIL: "bold red", INCONCLUSIVE: "bold yellow"}


class Display:
    """Progress on stderr: a rich bar on a terminal, plain stage lines otherwise, nothing if quiet."""

    def __init__(self, quiet: bool, max_steps: int) -> None:
        self.console = Console(stderr=True)
        self.quiet = quiet
        self.bar = None
        if not quiet and self.console.is_terminal:
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                                TimeElapsedColumn(), console=self.console, transient=True)
            self.task = self.bar.add_task("scan", total=max_steps, info="")

    def stage(self, name: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=name)
        elif not self.quiet:
            say(f"amdet-gate: {name}", err=True)

    def hooks(self) -> SearchProgress:
        def on_step(step: int, loss: float) -> None:
            if self.bar is not None:
                self.bar.update(self.task, completed=step, info=f"loss {loss:.3f}")

        def on_check(check: GateCheck) -> None:
            if not self.quiet and self.bar is None:
                g = check.gates
                say(f"amdet-gate: gates at step {check.step} (restart {check.restart}): assimilation "
                    f"{g.assimilation_ratio:.3f}, same target {g.same_target_ratio:.3f}", err=True)

        return SearchProgress(on_step, on_check)

    def __enter__(self) -> Display:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


@contextlib.contextmanager
def terminate_as_interrupt():
    """SIGTERM (a CI job cancelled, `timeout`, a container stop) ends a scan like Ctrl-C: exit 2, one
    line and the error outputs, instead of dying without a word. The CLI owns its process; the
    Python API leaves signal handling to its caller."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave it
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def print_outcome(outcome: GateOutcome) -> None:
    """The verdict line and its details. The model's name, reason, tokens, policy note and paths are
    untrusted (a folder can be named `x\\n::error::y`): each goes through `one_line`."""
    from rich.text import Text

    if outcome.encoder_runs:  # a model with several text encoders: each one's lines, then the model's
        print_encoders(outcome)
        return
    r = outcome.scan_result
    for warning in outcome.warnings:
        say(f"amdet-gate: warning: {one_line(warning)}", err=True)
    cached = "  (verdict cache)" if outcome.cache_hit else ""
    verdict = str(r.verdict)
    line = Text(visible(verdict.upper()), style=VERDICT_STYLE.get(verdict, "bold"))  # Text: no markup parsing
    line.append(visible(f" score {r.score:.3f}  {one_line(r.model.source)}  ({one_line(r.reason)})"
                        f"{cached}"))
    Console(highlight=False, soft_wrap=True).print(line)
    for gate in r.gates:
        if gate.value is not None:
            mark = "pass" if gate.passed else "fail"
            say(f"  {one_line(gate.name, 26):26s} {gate.value:.3f} > {gate.threshold}  {mark}")
    tokens = ", ".join(repr(one_line(t.text, 40)) for t in r.reversed_target.trigger_tokens[:5])
    say(f"  pseudo-trigger nearest tokens: {tokens}")
    if outcome.note:  # carries the allow entry's statement: untrusted text
        say(f"  policy: {one_line(outcome.note)}")
    say(f"  report: {one_line(outcome.paths['html'])}")


def print_encoders(outcome: GateOutcome) -> None:
    """One block per text encoder (its verdict line, or the error that ended its scan), then the model's line."""
    from dataclasses import replace

    for run in outcome.encoder_runs:
        say(f"text encoder {one_line(run.name)}:")
        if run.outcome is not None:
            print_outcome(replace(run.outcome, warnings=[]))
        else:
            say(f"  ERROR (exit {int(run.code)}): {one_line(run.error)}")
    for warning in outcome.warnings:
        say(f"amdet-gate: warning: {one_line(warning)}", err=True)
    r = outcome.result
    say(f"{visible(str(r['verdict']).upper())}: {len(outcome.encoder_runs)} text encoders of "
        f"{one_line(r['model'].get('source'))}, exit {r['exit_code']}  (summary: {one_line(outcome.paths['html'])})")
