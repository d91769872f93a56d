"""The `amdet-gate` command line: a thin layer over `gate.run_gate` (and a few torch-free checks).

Every error becomes one line on stderr and its documented exit code (docs: conventions).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup
from typer.exceptions import TyperException

from amdet_gate.cli_output import Display, print_outcome, say, say_error, terminate_as_interrupt
from amdet_gate.cli_reports import Verb, report_options
from amdet_gate.errors import ExitCode, GateError, UsageError
from amdet_gate.sanitise import one_line
from amdet_gate.settings import SearchSettings, Thresholds
from amdet_gate.version import __version__


class _ExitCodeGroup(TyperGroup):
    """Click exits 2 on bad flags; our contract says 4 (2 means error or inconclusive)."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):  # type: ignore[override]
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except TyperException as exc:  # bad flags, missing arguments, unknown options
            message = one_line(exc.format_message(), 500)  # it quotes the flag's (untrusted) value
            if message:  # empty when help was shown for a bare `amdet-gate`
                say_error(message)
            sys.exit(int(ExitCode.USAGE))
        except (typer.Abort, KeyboardInterrupt):  # Ctrl-C outside a scan: no outputs to write
            say_error("interrupted")
            sys.exit(int(ExitCode.ERROR))
        except GateError as exc:
            say_error(str(exc))
            sys.exit(int(exc.exit_code))
        except Exception as exc:  # never a traceback, never a silent pass: fail closed with exit 2
            say_error(f"internal error: {type(exc).__name__}: {one_line(exc, 300)}")
            sys.exit(int(ExitCode.ERROR))
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(cls=_ExitCodeGroup, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Find injected backdoors in CLIP-style text encoders before they ship (AMDet).")

def parse_thresholds(items: list[str]) -> dict[str, float]:
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
    return values


def _fail(exc: GateError) -> typer.Exit:
    say_error(str(exc))  # one line, never wrapped
    return typer.Exit(int(exc.exit_code))


@app.command()
@report_options(Verb.ALSO)
def scan(
    model: Annotated[str, typer.Argument(help="Model folder (Hugging Face layout) or Hub id org/name.")],
    revision: Annotated[str | None, typer.Option(help="Hub branch, tag or commit sha (recorded as the sha).")] = None,
    subfolder: Annotated[str | None, typer.Option(help="Subfolder, e.g. text_encoder of a diffusers pipeline.")] = None,
    anchor: Annotated[str | None, typer.Option(help="Clean reference encoder (folder or Hub id), same "
                                               "architecture.")] = None,
    anchor_revision: Annotated[str | None, typer.Option(help="Revision of a Hub anchor.")] = None,
    anchor_subfolder: Annotated[str | None, typer.Option(help="Subfolder of the anchor.")] = None,
    policy: Annotated[Path | None, typer.Option(help="Policy YAML (default: as policies/default.yaml).")] = None,
    prompts: Annotated[Path | None, typer.Option(help="Prompt file, one per line (default: built-in corpus).")] = None,
    n_prompts: Annotated[int | None, typer.Option(min=20, help="Prompts used (80% optimisation). [4000]")] = None,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("amdet-out"),
    reports: dict[str, Path] | None = None,  # --sarif, --html, ...: one option per report format (cli_reports.py)
    render: Annotated[str, typer.Option(help="Reversed-target images: auto, diffusion, clip-vision, tokens "
                                        "or none.")] = "auto",
    pipeline: Annotated[str | None, typer.Option(help="Stable Diffusion pipeline (folder or Hub id) for "
                                                 "--render diffusion.")] = None,
    pipeline_revision: Annotated[str | None, typer.Option(help="Revision of a Hub pipeline.")] = None,
    render_steps: Annotated[int | None, typer.Option(min=1, max=2000, help="Renderer steps (diffusion 25, "
                                                     "clip-vision 200 on GPU, 25 on CPU).")] = None,
    vision: Annotated[Path | None, typer.Option(help="CLIP checkpoint with a vision tower for --render "
                                                "clip-vision.")] = None,
    lock: Annotated[Path | None, typer.Option(help="Record the scanned model in this lock file "
                                              "(amdet.lock).")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Verdict cache folder. [~/.cache/amdet-gate]")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Scan even if the verdict is cached.")] = False,
    follow_symlinks: Annotated[bool, typer.Option("--follow-symlinks", help="Read model files that resolve "
                                                  "outside the model folder (refused by default).")] = False,
    seed: Annotated[int | None, typer.Option(min=0, help="Random seed. [0]")] = None,
    restarts: Annotated[int | None, typer.Option(min=1, max=64, help="Random starts optimised together. [4]")] = None,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Optimisation steps at most. [640]")] = None,
    time_budget: Annotated[float | None, typer.Option(min=1.0, help="Seconds before giving up. [900]")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda[:N]. [auto]")] = None,
    threshold: Annotated[list[str] | None, typer.Option(help="Gate threshold NAME=VALUE (repeatable).")] = None,
    exit_zero: Annotated[bool, typer.Option("--exit-zero", help="Exit 0 on a finding (report-only).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    # Single-file checkpoints, several encoders, LoRA (docs/sources.md)
    encoder: Annotated[str | None, typer.Option(help="Scan only this text encoder (text_encoder_2, clip_g, ...). "
                                                "[every one]")] = None,
    layer: Annotated[str | None, typer.Option(help="Features scanned: final, consumer (what the model's pipeline "
                                              "reads) or a hidden-states index such as -2. [final]")] = None,
    config: Annotated[Path | None, typer.Option(help="config.json of the encoder in a single-file checkpoint "
                                                "(default: shipped or inferred from the shapes).")] = None,
    tokenizer: Annotated[Path | None, typer.Option(help="Tokenizer folder (default: the model's, else the "
                                                   "bundled CLIP BPE).")] = None,
    lora: Annotated[Path | None, typer.Option(help="LoRA adapter (.safetensors) merged into the model's text "
                                              "encoders before the scan.")] = None,
    lora_scale: Annotated[float | None, typer.Option(help="LoRA multiplier. [1.0]")] = None,
) -> None:
    """Scan a text encoder; exit 0 pass, 1 backdoor found, 2 error/inconclusive, 3 nothing scannable, 4 usage.

    MODEL may be a single-file checkpoint (SD 1.x/2.x, SDXL, SD 3, Flux), a ComfyUI or OpenCLIP text-encoder
    file, or a diffusers pipeline folder: each CLIP text encoder is scanned, the exit code is the worst."""
    from amdet_gate.gate import INTERRUPTED, GateOptions, prepare_outputs, run_gate

    options = GateOptions(
        model=model, revision=revision, subfolder=subfolder, anchor=anchor, anchor_revision=anchor_revision,
        anchor_subfolder=anchor_subfolder, policy=policy, prompts=prompts, n_prompts=n_prompts, out=out,
        reports=reports or {}, seed=seed, restarts=restarts, max_steps=max_steps,
        time_budget=time_budget, device=device, render=render, pipeline=pipeline, pipeline_revision=pipeline_revision,
        render_steps=render_steps, vision=vision, lock=lock,
        use_cache=not no_cache, cache_dir=cache_dir, follow_symlinks=follow_symlinks,
        encoder=encoder, layer=layer, text_config=config, tokenizer=tokenizer, lora=lora, lora_scale=lora_scale)
    try:
        options.thresholds = parse_thresholds(threshold or [])
    except UsageError as exc:
        with contextlib.suppress(GateError):
            prepare_outputs(options, os.environ)  # exit 4 too leaves no earlier verdict at the output paths
        raise _fail(exc) from None
    try:
        with Display(quiet, max_steps or SearchSettings.max_steps) as display, terminate_as_interrupt():
            outcome = run_gate(options, progress=display.hooks(), stage=display.stage)
    except GateError as exc:  # run_gate has written the error SARIF and summary (and cleared stale ones)
        say_error(str(exc))
        code = exc.exit_code
    except KeyboardInterrupt:  # Ctrl-C: exit 2 and one line, never 130 and silence (the error outputs exist)
        say_error(INTERRUPTED)
        code = ExitCode.ERROR
    else:
        print_outcome(outcome)
        code = outcome.exit_code
        if outcome.encoder_runs:  # several encoders: --exit-zero turns each one's 1 into 0, never another's 2
            from amdet_gate.multiscan import exit_code

            code = exit_code(outcome.encoder_runs, exit_zero)
    if exit_zero and code == ExitCode.FAIL:  # report-only; never hides 2, 3 or 4
        code = ExitCode.PASS
    raise typer.Exit(int(code))


@app.command()
def repair(
    model: Annotated[str, typer.Argument(help="The model the scan found backdoored (folder or Hub id).")],
    out: Annotated[Path, typer.Option(help="Folder for the repaired copy (new, empty, or an earlier repair).")],
    result: Annotated[Path, typer.Option(help="The scan's result.json (its pseudo_trigger.safetensors beside "
                                         "it).")] = Path("amdet-out/result.json"),
    revision: Annotated[str | None, typer.Option(help="Hub branch, tag or commit sha.")] = None,
    subfolder: Annotated[str | None, typer.Option(help="Subfolder, e.g. text_encoder of a diffusers pipeline.")] = None,
    anchor: Annotated[str | None, typer.Option(help="Clean reference encoder: its states are the edit's values, "
                                               "and the re-scan uses it.")] = None,
    anchor_revision: Annotated[str | None, typer.Option(help="Revision of a Hub anchor.")] = None,
    anchor_subfolder: Annotated[str | None, typer.Option(help="Subfolder of the anchor.")] = None,
    rescan_out: Annotated[Path | None, typer.Option(help="Output folder of the re-scan. [<out>-rescan]")] = None,
    policy: Annotated[Path | None, typer.Option(help="Policy YAML for the re-scan and the gates.")] = None,
    prompts: Annotated[Path | None, typer.Option(help="Prompt file, one per line (default: built-in corpus).")] = None,
    min_fidelity: Annotated[float, typer.Option(min=0.0, max=1.0, help="Clean fidelity the copy must keep "
                                                "to exit 0.")] = 0.98,
    rounds: Annotated[int, typer.Option(min=1, max=5, help="Edit / re-scan rounds at most.")] = 2,
    time_budget: Annotated[float | None, typer.Option(min=1.0, help="Seconds each re-scan may take. "
                                                      "[the policy's, 900]")] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the repair's prompt split and placements.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Re-scan even if the verdict is cached.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Erase a detected backdoor and re-scan the copy: exit 0 repaired (re-scan passes, fidelity kept), 1 not
    repaired, 2 error, 3 nothing scannable, 4 bad input (result of another model, not a fail, malformed)."""
    from amdet_gate.erasure.pipeline import RepairRequest, run_repair
    from amdet_gate.erasure.plan import RepairSettings
    from amdet_gate.erasure.report import console_lines

    request = RepairRequest(model=model, result=result, out=out, revision=revision, subfolder=subfolder,
                            anchor=anchor, anchor_revision=anchor_revision, anchor_subfolder=anchor_subfolder,
                            rescan_out=rescan_out, policy=policy, prompts=prompts, min_fidelity=min_fidelity,
                            rounds=rounds, time_budget=time_budget, device=device, use_cache=not no_cache,
                            settings=RepairSettings(seed=seed))
    try:
        with Display(quiet, 1) as display, terminate_as_interrupt():
            outcome = run_repair(request, stage=display.stage)
    except GateError as exc:
        raise _fail(exc) from None
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: one line, exit 2 (the output folder is left incomplete)
        raise _fail(GateError("interrupted")) from None
    for warning in outcome.warnings:
        say(f"amdet-gate: warning: {one_line(warning)}", err=True)
    for line in console_lines(outcome.report):
        say(line)
    raise typer.Exit(int(outcome.exit_code))


policy_app = typer.Typer(help="Validate or create a policy file.", no_args_is_help=True)
app.add_typer(policy_app, name="policy")


@policy_app.command("validate")
def policy_validate(files: Annotated[list[Path], typer.Argument(help="Policy YAML files to check.")]) -> None:
    """Exit 0 if every FILE is a valid policy, else 4 with the line and key of the first problem."""
    from amdet_gate.policy import load_policy

    failed = None
    for file in files:
        try:
            pol = load_policy(file, {}, date.today())
        except GateError as exc:
            say_error(str(exc))
            failed = exc
            continue
        # The file name is untrusted (pre-commit passes the repository's file names): never first on the line.
        say(f"amdet-gate: {one_line(file)}: valid policy ({len(pol.allow)} allow entries, sha256 {pol.sha256[:12]})")
    if failed is not None:
        raise typer.Exit(int(failed.exit_code))


@policy_app.command("init")
def policy_init(
    file: Annotated[Path, typer.Argument(help="Where to write the starter policy.")] = Path(".amdet.yaml"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented starter policy."""
    from amdet_gate.files import write_atomic
    from amdet_gate.policy import STARTER_POLICY

    if file.exists() and not force:
        raise _fail(UsageError(f"{file} exists; use --force to overwrite"))
    try:
        write_atomic(file, STARTER_POLICY.encode("utf-8"))
    except GateError as exc:
        raise _fail(exc) from None
    say(f"wrote {one_line(file)}")


@app.command()
@report_options(Verb.ONLY)
def report(
    result: Annotated[Path, typer.Argument(help="A stored result.json.")],
    reports: dict[str, Path] | None = None,  # --sarif, --html, ...: one option per report format (cli_reports.py)
) -> None:
    """Re-render the reports from a stored result.json, without scanning again."""
    from amdet_gate.outpaths import prepare_report_targets
    from amdet_gate.outputs import read_result, write_reports
    from amdet_gate.report import formats, options_list

    asked = [(f, reports[f.name]) for f in formats() if (reports or {}).get(f.name) is not None]
    if not asked:
        raise _fail(UsageError(f"nothing to write: give {options_list()}"))
    try:
        prepare_report_targets(result, {f.option: path for f, path in asked})
        write_reports(read_result(result), result.parent, {f.name: path for f, path in asked})
    except GateError as exc:
        raise _fail(exc) from None
    for _, path in asked:
        say(f"wrote {one_line(path)}")


@app.command()
def fetch(
    model: Annotated[str, typer.Argument(help="Hub id org/name.")],
    revision: Annotated[str | None, typer.Option(help="Branch, tag or commit sha.")] = None,
    subfolder: Annotated[str | None, typer.Option(help="Subfolder, e.g. text_encoder.")] = None,
    anchor: Annotated[str | None, typer.Option(help="Also fetch this anchor (Hub id).")] = None,
    anchor_revision: Annotated[str | None, typer.Option(help="Revision of the anchor.")] = None,
    anchor_subfolder: Annotated[str | None, typer.Option(help="Subfolder of the anchor.")] = None,
) -> None:
    """Download what a scan needs into the Hugging Face cache (HF_HOME), for air-gapped scans."""
    from amdet_gate.sources import resolve_source
    from amdet_gate.sources.hub import is_hub_id

    try:
        for spec, rev, sub in ((model, revision, subfolder), (anchor, anchor_revision, anchor_subfolder)):
            if spec is None:
                continue
            if not is_hub_id(spec):
                raise UsageError(f"{spec!r} is not a Hub id (org/name); local folders need no fetch")
            source = resolve_source(spec, rev, sub)
            say(f"fetched {one_line(spec)}@{one_line(rev or 'main')} -> {source.resolved_sha}  "
                f"({one_line(source.folder)})")
    except GateError as exc:
        raise _fail(exc) from None


@app.command()
def verify(
    model: Annotated[str, typer.Argument(help="Model folder or Hub id, as it will be deployed.")],
    lock: Annotated[Path, typer.Option(help="Lock file written by `scan --lock`.")] = Path("amdet.lock"),
    revision: Annotated[str | None, typer.Option(help="Hub revision (default: the locked commit).")] = None,
    subfolder: Annotated[str | None, typer.Option(help="Subfolder, e.g. text_encoder.")] = None,
    follow_symlinks: Annotated[bool, typer.Option("--follow-symlinks", help="Read weight files that resolve "
                                                  "outside the model folder.")] = False,
    require_signed: Annotated[bool, typer.Option("--require-signed", help="Refuse a lock without a valid "
                                                 "AMDET_LOCK_KEY signature (<lock>.sig).")] = False,
) -> None:
    """Refuse a model whose weights changed since they were scanned: exit 0 same weights and a pass, else 1."""
    from amdet_gate.gate import verify_model

    try:
        problems = verify_model(model, lock, revision, subfolder, follow_symlinks, require_signed)
    except GateError as exc:
        raise _fail(exc) from None
    for problem in problems:
        say(f"amdet-gate: {one_line(problem)}", err=True)
    if problems:
        raise typer.Exit(int(ExitCode.FAIL))
    say(f"amdet-gate: {one_line(model)}: weights match {one_line(lock)} (scanned, verdict pass)")


lock_app = typer.Typer(help="Check lock files (amdet.lock).", no_args_is_help=True)
app.add_typer(lock_app, name="lock")


@lock_app.command("check")
def lock_check(
    files: Annotated[list[Path], typer.Argument(help="Lock files to check.")],
    require_signed: Annotated[bool, typer.Option("--require-signed", help="Refuse a lock without a valid "
                                                 "AMDET_LOCK_KEY signature (<lock>.sig).")] = False,
) -> None:
    """Exit 0 if every lock file is valid, pinned, signed if asked and records a pass; 1 if not; 4 if unreadable."""
    from amdet_gate.lock import Problem, check_lock
    from amdet_gate.lock_sign import read_signed_lock

    def problems(file: Path) -> list:
        signed = read_signed_lock(file, os.environ, require_signed)
        if signed.problem is not None:  # nothing an untrusted lock says is worth checking
            return [Problem(str(file), None, signed.problem)]
        return check_lock(signed.lock)

    _check_files(files, problems)


@lock_app.command("sign")
def lock_sign(files: Annotated[list[Path], typer.Argument(help="Lock files to sign (after reviewing them).")]) -> None:
    """Sign reviewed lock files with AMDET_LOCK_KEY (writes <lock>.sig); exit 4 without the key or a valid lock."""
    from amdet_gate.lock_sign import lock_key, read_signed_lock, sign_lock

    try:
        key = lock_key(os.environ)
        if key is None:
            raise UsageError("AMDET_LOCK_KEY is not set: there is no key to sign with")
        for file in files:
            lock = read_signed_lock(file, {})  # valid JSON and schema; the old signature is not consulted
            sign_lock(file, key, lock.data)
            say(f"amdet-gate: signed {one_line(file)} ({len(lock.lock.models)} entries)")
    except GateError as exc:
        raise _fail(exc) from None


def _check_files(files: list[Path], problems_of: Callable[[Path], list]) -> None:
    """Print every file's problems (one line each; they name file and line); exit 1 if any, 4 if unreadable."""
    bad = False
    for file in files:
        try:
            problems = problems_of(file)
        except GateError as exc:
            raise _fail(exc) from None
        for problem in problems:
            say(f"amdet-gate: {one_line(problem)}", err=True)
        bad = bad or bool(problems)
    raise typer.Exit(int(ExitCode.FAIL) if bad else 0)


@app.command()
def pins(files: Annotated[list[Path], typer.Argument(help="Policy, lock or workflow files.")]) -> None:
    """Exit 1 if a Hub model in FILES is not pinned to a 40-hex commit sha."""
    from amdet_gate.pins import pin_problems

    _check_files(files, pin_problems)


cache_app = typer.Typer(help="Inspect or empty the verdict cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("list")
def cache_list(cache_dir: Annotated[Path | None, typer.Option(help="Verdict cache folder.")] = None) -> None:
    """List cached verdicts."""
    from amdet_gate.cache import open_cache

    try:
        cache = open_cache(os.environ, cache_dir)
        entries = cache.entries()
    except GateError as exc:
        raise _fail(exc) from None
    for entry in entries:
        say(one_line(entry.row()))  # the digest comes first: the source is further along the line
    say(f"{len(entries)} entries in {one_line(cache.root)}")


@cache_app.command("clear")
def cache_clear(cache_dir: Annotated[Path | None, typer.Option(help="Verdict cache folder.")] = None) -> None:
    """Delete every cached verdict."""
    from amdet_gate.cache import open_cache

    try:
        cache = open_cache(os.environ, cache_dir)
        removed = cache.clear()
    except GateError as exc:
        raise _fail(exc) from None
    say(f"removed {removed} entries from {one_line(cache.root)}")


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

