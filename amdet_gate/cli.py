"""The `amdet-gate` command line: a thin layer over `scan.scan_model` and `outputs.write_outputs`.

Every error becomes one line on stderr and its documented exit code (docs: conventions).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from datetime import date
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from typer.core import TyperGroup
from typer.exceptions import TyperException

from amdet_gate import __version__
from amdet_gate.engine import GateCheck, SearchProgress, SearchSettings, Thresholds
from amdet_gate.errors import ExitCode, GateError, UsageError
from amdet_gate.verdict import FAIL, INCONCLUSIVE, PASS


class _ExitCodeGroup(TyperGroup):
    """Click exits 2 on bad flags; our contract says 4 (2 means error or inconclusive)."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):  # type: ignore[override]
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except TyperException as exc:  # bad flags, missing arguments, unknown options
            message = " ".join(exc.format_message().split())
            if message:  # empty when help was shown for a bare `amdet-gate`
                print(f"amdet-gate: error: {message}", file=sys.stderr)
            sys.exit(int(ExitCode.USAGE))
        except typer.Abort:
            print("amdet-gate: error: aborted", file=sys.stderr)
            sys.exit(int(ExitCode.ERROR))
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(cls=_ExitCodeGroup, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Find injected backdoors in CLIP-style text encoders before they ship (AMDet).")

VERDICT_STYLE = {PASS: "bold green", FAIL: "bold red", INCONCLUSIVE: "bold yellow"}


def parse_thresholds(items: list[str], base: Thresholds | None = None) -> Thresholds:
    """`--threshold name=value` on top of `base`, names as in docs/method.md section 3."""
    names = {f.name for f in dataclasses.fields(Thresholds)}
    values: dict[str, float] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or name not in names:
            raise UsageError(f"--threshold {item!r}: expected NAME=VALUE with NAME one of {', '.join(sorted(names))}")
        try:
            value = float(raw)
        except ValueError:
            raise UsageError(f"--threshold {item!r}: {raw!r} is not a number") from None
        if not 0.0 <= value <= 1.0:
            raise UsageError(f"--threshold {item!r}: value must be in [0, 1]")
        values[name] = value
    return dataclasses.replace(base or Thresholds(), **values)


class _Display:
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
            print(f"amdet-gate: {name}", file=sys.stderr, flush=True)

    def hooks(self) -> SearchProgress:
        def on_step(step: int, loss: float) -> None:
            if self.bar is not None:
                self.bar.update(self.task, completed=step, info=f"loss {loss:.3f}")

        def on_check(check: GateCheck) -> None:
            if not self.quiet and self.bar is None:
                g = check.gates
                print(f"amdet-gate: gates at step {check.step} (restart {check.restart}): assimilation "
                      f"{g.assimilation_ratio:.3f}, same target {g.same_target_ratio:.3f}", file=sys.stderr)

        return SearchProgress(on_step, on_check)

    def __enter__(self) -> _Display:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


def _fail(exc: GateError) -> typer.Exit:
    print(f"amdet-gate: error: {exc}", file=sys.stderr)  # one line, never wrapped
    return typer.Exit(int(exc.exit_code))


@app.command()
def scan(
    model: Annotated[Path, typer.Argument(help="Model folder (Hugging Face layout).")],
    subfolder: Annotated[str | None, typer.Option(help="Subfolder, e.g. text_encoder of a diffusers pipeline.")] = None,
    anchor: Annotated[Path | None, typer.Option(help="Clean reference encoder of the same architecture.")] = None,
    anchor_subfolder: Annotated[str | None, typer.Option(help="Subfolder of the anchor.")] = None,
    policy: Annotated[Path | None, typer.Option(help="Policy YAML (default: as policies/default.yaml).")] = None,
    prompts: Annotated[Path | None, typer.Option(help="Prompt file, one per line (default: built-in corpus).")] = None,
    n_prompts: Annotated[int | None, typer.Option(min=20, help="Prompts used (80% optimisation). [4000]")] = None,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("amdet-out"),
    sarif: Annotated[Path | None, typer.Option(help="Also write the SARIF 2.1.0 log here.")] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="Random seed. [0]")] = None,
    restarts: Annotated[int | None, typer.Option(min=1, max=64, help="Random starts optimised together. [4]")] = None,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Optimisation steps at most. [640]")] = None,
    time_budget: Annotated[float | None, typer.Option(min=1.0, help="Seconds before giving up. [900]")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda[:N]. [auto]")] = None,
    threshold: Annotated[list[str] | None, typer.Option(help="Gate threshold NAME=VALUE (repeatable).")] = None,
    exit_zero: Annotated[bool, typer.Option("--exit-zero", help="Exit 0 on a finding (report-only).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Scan a text encoder; exit 0 pass, 1 backdoor found, 2 error/inconclusive, 3 nothing scannable, 4 usage."""
    from amdet_gate.outputs import write_json, write_outputs
    from amdet_gate.policy import apply_policy, load_policy
    from amdet_gate.sarif import error_sarif
    from amdet_gate.scan import ScanRequest, scan_model

    try:
        # Precedence: flag > AMDET_* environment (merged by load_policy) > policy file > default.
        pol = load_policy(policy, os.environ, date.today())
        steps = max_steps if max_steps is not None else pol.scan.max_steps
        settings = SearchSettings(seed=_first(seed, pol.scan.seed), restarts=_first(restarts, pol.scan.restarts),
                                  max_steps=steps, time_budget_s=_first(time_budget, pol.scan.time_budget_s))
        if anchor is None and pol.anchor:  # the policy's anchor: a local folder in this version
            anchor, anchor_subfolder = Path(pol.anchor["id"]), pol.anchor.get("subfolder")
        request = ScanRequest(model=model, subfolder=subfolder, anchor=anchor, anchor_subfolder=anchor_subfolder,
                              prompts_file=prompts, n_prompts=_first(n_prompts, pol.scan.n_prompts),
                              device=_first(device, pol.scan.device), settings=settings,
                              thresholds=parse_thresholds(threshold or [], pol.thresholds))
        with _Display(quiet, steps) as display:
            result = scan_model(request, display.hooks(), display.stage)
        r = result.result
        code, note = apply_policy(r.verdict, r.model["identity_sha256"], pol)
        r.policy = {"source": pol.source, "sha256": pol.sha256, "exit_code": int(code), "note": note}
        paths = write_outputs(result, out, sarif)
    except GateError as exc:
        if sarif is not None and exc.rule_id is not None:  # CI still learns why nothing was scanned
            write_json(sarif, error_sarif(exc.rule_id, str(exc), model))
        raise _fail(exc) from None
    except Exception as exc:
        raise _fail(GateError(f"internal error during the scan: {type(exc).__name__}: {exc}")) from None
    console = Console(highlight=False, soft_wrap=True)
    console.print(f"[{VERDICT_STYLE[r.verdict]}]{r.verdict.upper()}[/] score {r.score:.3f}  "
                  f"{escape(r.model['source'])}  ({escape(r.reason)})")
    for name, gate in r.gates.items():
        if isinstance(gate, dict):
            mark = "pass" if gate["passed"] else "fail"
            console.print(f"  {name:26s} {gate['value']:.3f} > {gate['threshold']}  {mark}", markup=False)
    tokens = ", ".join(repr(t["text"]) for t in r.reversed_target["trigger_tokens"][:5])
    console.print(f"  pseudo-trigger nearest tokens: {tokens}", markup=False)
    if note:
        console.print(f"  policy: {note}", markup=False)
    console.print(f"  result: {paths['result']}", markup=False)
    if exit_zero and code == ExitCode.FAIL:
        code = ExitCode.PASS
    raise typer.Exit(int(code))


def _first(flag, fallback):
    return flag if flag is not None else fallback


policy_app = typer.Typer(help="Validate or create a policy file.", no_args_is_help=True)
app.add_typer(policy_app, name="policy")


@policy_app.command("validate")
def policy_validate(file: Annotated[Path, typer.Argument(help="Policy YAML to check.")]) -> None:
    """Exit 0 if FILE is a valid policy, else 4 with the line and key of the first problem."""
    from amdet_gate.policy import load_policy

    try:
        pol = load_policy(file, {}, date.today())
    except GateError as exc:
        raise _fail(exc) from None
    print(f"{file}: valid policy ({len(pol.allow)} allow entries, sha256 {pol.sha256[:12]})")


@policy_app.command("init")
def policy_init(
    file: Annotated[Path, typer.Argument(help="Where to write the starter policy.")] = Path(".amdet.yaml"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented starter policy."""
    from amdet_gate.policy import STARTER_POLICY

    if file.exists() and not force:
        raise _fail(UsageError(f"{file} exists; use --force to overwrite"))
    file.write_text(STARTER_POLICY, "utf-8")
    print(f"wrote {file}")


@app.command()
def selftest(
    out: Annotated[Path, typer.Option(help="Output folder for the two scans.")] = Path("selftest-out"),
    quick: Annotated[bool, typer.Option("--quick", help="Smaller encoders and budget.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Build a clean and a backdoored encoder, scan both, and check the gate fires on the backdoor."""
    from amdet_gate.selftest import run_selftest

    try:
        ok = run_selftest(out, quick=quick, quiet=quiet)
    except GateError as exc:
        raise _fail(exc) from None
    raise typer.Exit(0 if ok else int(ExitCode.ERROR))


@app.command()
def version() -> None:
    """Print the version."""
    print(__version__)

