"""Where a run writes, decided and checked before anything is read or scanned (docs/supply-chain.md).

A run's outputs: the files in `--out` (result.json, the artifacts, each report format's file --
result.sarif, report.html, summary.md, ... -- and images/), the user's copies of the reports
(`--sarif`, `--html`, ...: one option per format of the registry, amdet_gate/report), the lock (and
its signature) and the job summary. Before the scan:

  * refused (UsageError, exit 4): an output inside, or equal to, an input -- the model or anchor
    folder, the diffusion pipeline, the vision checkpoint, the policy, the prompt file, the
    verdict cache, the Hugging Face cache (`--sarif MODEL/config.json`, `--out MODEL`); two
    outputs at one path (`--html OUT/result.json`, `--sarif X --markdown X`); an `--out` that is
    a file, or a folder that cannot be written (checked by creating and removing a file in it);
  * cleared: every output this run may write is removed at its start, so a run that ends with
    exit 2, 3 or 4 never leaves the previous run's PASS behind at any path. When the plan is
    refused, the outputs that are not inputs are cleared and nothing else is touched.

When the run fails after that (`write_error_outputs`): what it wrote so far is removed again,
then every format that has an error rendering (SARIF, the Markdown summary, JUnit) is written to
`--out` and to the user's copy, and the job summary gets the error (not for usage errors: nothing
about the model to report).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from amdet_gate.errors import ExitCode, GateError, UsageError
from amdet_gate.files import refuse_special, write_atomic
from amdet_gate.report import JOB_SUMMARY_FORMAT, ErrorReport, ReportFormat, by_name, formats
from amdet_gate.sanitise import one_line

IMAGE_PATTERNS = ("tokens.png", "diffusion_*.png", "clip_vision_*.png")


class Role(str, Enum):
    """What an output path that is not a report copy is for (a copy is named by its format's option)."""

    OUT = "--out"
    LOCK = "--lock"
    LOCK_SIGNATURE = "the lock's signature"
    JOB_SUMMARY = "GITHUB_STEP_SUMMARY"


@dataclass(frozen=True)
class OutputPlan:
    """Every path a run may write. `reports`: the user's copies (format name -> path: --sarif, --html, ...)."""

    out: Path
    reports: Mapping[str, Path] = field(default_factory=dict)
    lock: Path | None = None

    def out_files(self) -> list[Path]:
        """The files this tool writes into --out (and only those: --out may hold other files)."""
        from amdet_gate.outputs import output_paths

        images = [p for pattern in IMAGE_PATTERNS for p in (self.out / "images").glob(pattern)]
        return [*output_paths(self.out).values(), *images]

    def copies(self) -> list[tuple[ReportFormat, Path]]:
        """The user's copies, in the registry's order; a name no format has is a usage error (the API's typo)."""
        unknown = sorted(set(self.reports) - set(by_name()))
        if unknown:
            raise UsageError(f"no report format {', '.join(map(repr, unknown))}; "
                             f"the formats are {', '.join(f.name for f in formats())}")
        return [(f, self.reports[f.name]) for f in formats() if self.reports.get(f.name) is not None]

    def reports_to_clear(self) -> list[Path]:
        """What `clear` removes: the --out files and the user copies (never the lock: it is also an input)."""
        return [*self.out_files(), *(path for _, path in self.copies())]


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or path.is_relative_to(folder)


def check_plan(plan: OutputPlan, input_files: Mapping[str, Path], input_folders: Mapping[str, Path],
               job_summary: Path | None = None) -> None:
    """UsageError (exit 4) if an output is, or is inside, an input, or two outputs share a path."""
    from amdet_gate.lock import signature_path

    outputs: list[tuple[str, Path]] = [(f"--out {one_line(plan.out)}", plan.out)]
    outputs += [(f"{Role.OUT.value} file {p.name}", p) for p in plan.out_files()]
    outputs += [(fmt.option, path) for fmt, path in plan.copies()]
    if plan.lock is not None:
        outputs += [(Role.LOCK.value, plan.lock), (Role.LOCK_SIGNATURE.value, signature_path(plan.lock))]
    folders = {name: _real(p) for name, p in input_folders.items()}
    files = {name: _real(p) for name, p in input_files.items()}
    for label, path in outputs:
        real = _real(path)
        for name, folder in folders.items():
            if _inside(real, folder):
                raise UsageError(f"{label} ({one_line(path)}) is inside {name} ({one_line(folder)}); "
                                 "outputs may not overwrite inputs: write them elsewhere")
        for name, file in files.items():
            if real == file:
                raise UsageError(f"{label} ({one_line(path)}) is {name}; outputs may not overwrite inputs")
    if plan.out.exists() and not plan.out.is_dir():
        raise UsageError(f"--out {one_line(plan.out)} exists and is not a folder")
    for label, path in outputs[1:]:  # an existing output must be a file (or a link): not a folder, FIFO, device
        try:
            refuse_special(path, label)
        except GateError as exc:
            raise UsageError(str(exc)) from None
    seen: dict[Path, str] = {}
    in_out = {_real(p): p.name for p in plan.out_files()}
    # (label, path, the file in --out it may coincide with: a user copy of a report is that report's content)
    singles: list[tuple[str, Path, str | None]] = [(fmt.option, path, fmt.file_name) for fmt, path in plan.copies()]
    if plan.lock is not None:
        singles += [(Role.LOCK.value, plan.lock, None), (Role.LOCK_SIGNATURE.value, signature_path(plan.lock), None)]
    if job_summary is not None:
        singles.append((Role.JOB_SUMMARY.value, job_summary, None))
    for label, path, same_content in singles:
        real = _real(path)
        if real in in_out and in_out[real] != same_content:
            raise UsageError(f"{label} ({one_line(path)}) is {in_out[real]} in --out; give each output its own path")
        if real in seen:
            raise UsageError(f"{label} and {seen[real]} are the same file ({one_line(path)}); "
                             "give each output its own path")
        seen[real] = label


def check_writable(plan: OutputPlan) -> None:
    """Create --out and the copies' folders and a file in each (then remove it): UsageError if not writable."""
    folders = [("--out", plan.out)] + [(fmt.option, path.parent) for fmt, path in plan.copies()]
    if plan.lock is not None:
        folders.append((Role.LOCK.value, plan.lock.parent))
    for label, folder in folders:
        probe = folder / f".amdet-write-test-{secrets.token_hex(6)}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.unlink(probe)
        except OSError as exc:
            raise UsageError(f"{label}: cannot write into {one_line(folder)} ({exc.strerror or type(exc).__name__})"
                             ) from None


def clear(plan: OutputPlan, keep: Mapping[str, Path] | None = None) -> None:
    """Remove every report this run may write (not the lock), so no earlier verdict outlives this run.

    `keep`: input folders and files a refused plan collided with; nothing inside them is touched.
    """
    protected = [_real(p) for p in (keep or {}).values()]
    for path in plan.reports_to_clear():
        real = _real(path)
        if any(_inside(real, p) for p in protected):
            continue
        try:
            if path.is_symlink() or path.is_file():
                path.unlink()  # a symlink is removed itself, never what it points at
        except OSError as exc:
            raise UsageError(f"cannot clear the old output {one_line(path)}: {exc.strerror}") from None


def write_error_outputs(plan: OutputPlan, exc: GateError, model: str, subfolder: str | None,
                        env: Mapping[str, str]) -> None:
    """When a run ends without a result: clear what it wrote, then each format's error report (CI
    learns why: SARIF, the summary, JUnit) in --out and the user's copy, and the job summary. Best
    effort: the error is on its way out."""
    from amdet_gate.outputs import append_step_summary

    with contextlib.suppress(GateError):
        clear(plan)
    if exc.exit_code == ExitCode.USAGE:
        return  # a mistake in the invocation: nothing about the model to report
    # AMDET003 when the error names no rule: could not decide (load or download failure, interrupted, internal error)
    error = ErrorReport(exc.rule_id or "AMDET003", str(exc), model, subfolder, ExitCode(exc.exit_code))
    copies = {fmt.name: path for fmt, path in _known_copies(plan)}
    summary = None
    for fmt in formats():
        if fmt.render_error is None:
            continue
        data = fmt.render_error(error)
        if fmt.name == JOB_SUMMARY_FORMAT:
            summary = data.decode("utf-8")
        with contextlib.suppress(GateError):
            for path in (copies.get(fmt.name), plan.out / fmt.file_name):
                if path is not None:
                    write_atomic(path, data)
    if summary is not None:
        append_step_summary(env, summary)


def _known_copies(plan: OutputPlan) -> list[tuple[ReportFormat, Path]]:
    with contextlib.suppress(UsageError):
        return plan.copies()
    return []  # a plan naming an unknown format was refused before anything ran; nothing to write there


def prepare_report_targets(result: Path, targets: Mapping[str, Path]) -> None:
    """`amdet-gate report`: no target (option -> path) may be the result it reads or another target; then clear them."""
    seen: dict[Path, str] = {_real(result): f"the result {one_line(result)}"}
    for label, path in targets.items():
        real = _real(path)
        if real in seen:
            raise UsageError(f"{label} ({one_line(path)}) is {seen[real]}; give each output its own path")
        seen[real] = label
    for path in targets.values():
        try:
            if path.is_symlink() or path.is_file():
                path.unlink()
        except OSError as exc:
            raise UsageError(f"cannot clear the old output {one_line(path)}: {exc.strerror}") from None
