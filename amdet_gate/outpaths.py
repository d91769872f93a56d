"""Where a run writes, decided and checked before anything is read or scanned (docs/supply-chain.md).

A run's outputs: the files in `--out` (result.json, the artifacts, result.sarif, report.html,
summary.md, images/), the copies at `--sarif`, `--html` and `--markdown`, the lock (and its
signature) and the job summary. Before the scan:

  * refused (UsageError, exit 4): an output inside, or equal to, an input -- the model or anchor
    folder, the diffusion pipeline, the vision checkpoint, the policy, the prompt file, the
    verdict cache, the Hugging Face cache (`--sarif MODEL/config.json`, `--out MODEL`); two
    outputs at one path (`--html OUT/result.json`, `--sarif X --markdown X`); an `--out` that is
    a file, or a folder that cannot be written (checked by creating and removing a file in it);
  * cleared: every output this run may write is removed at its start, so a run that ends with
    exit 2, 3 or 4 never leaves the previous run's PASS behind at any path. When the plan is
    refused, the outputs that are not inputs are cleared and nothing else is touched.

When the run fails after that (`write_error_outputs`): what it wrote so far is removed again,
then the error SARIF and summary are written to `--out`, `--sarif` and `--markdown` and the job
summary gets the error (not for usage errors: nothing about the model to report).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from amdet_gate.errors import ExitCode, GateError, UsageError
from amdet_gate.files import refuse_special
from amdet_gate.sanitise import one_line

IMAGE_PATTERNS = ("tokens.png", "diffusion_*.png", "clip_vision_*.png")


class Role(str, Enum):
    """What an output path is for; a user copy may coincide with the same report in --out."""

    OUT = "--out"
    SARIF = "--sarif"
    HTML = "--html"
    MARKDOWN = "--markdown"
    LOCK = "--lock"
    LOCK_SIGNATURE = "the lock's signature"
    JOB_SUMMARY = "GITHUB_STEP_SUMMARY"


# A user copy (--sarif) may be the very file the run writes in --out (result.sarif): same content.
_SAME_CONTENT = {Role.SARIF: "result.sarif", Role.HTML: "report.html", Role.MARKDOWN: "summary.md"}


@dataclass(frozen=True)
class OutputPlan:
    """Every path a run may write. `copies` are the user's --sarif/--html/--markdown."""

    out: Path
    sarif: Path | None = None
    html: Path | None = None
    markdown: Path | None = None
    lock: Path | None = None

    def out_files(self) -> list[Path]:
        """The files this tool writes into --out (and only those: --out may hold other files)."""
        from amdet_gate.outputs import output_paths

        images = [p for pattern in IMAGE_PATTERNS for p in (self.out / "images").glob(pattern)]
        return [*output_paths(self.out).values(), *images]

    def copies(self) -> dict[Role, Path]:
        found = {Role.SARIF: self.sarif, Role.HTML: self.html, Role.MARKDOWN: self.markdown}
        return {role: path for role, path in found.items() if path is not None}

    def reports(self) -> list[Path]:
        """What `clear` removes: the --out files and the user copies (never the lock: it is also an input)."""
        return [*self.out_files(), *self.copies().values()]


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
    outputs += [(role.value, path) for role, path in plan.copies().items()]
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
    singles = [(role.value, path) for role, path in plan.copies().items()]
    if plan.lock is not None:
        singles += [(Role.LOCK.value, plan.lock), (Role.LOCK_SIGNATURE.value, signature_path(plan.lock))]
    if job_summary is not None:
        singles.append((Role.JOB_SUMMARY.value, job_summary))
    for label, path in singles:
        real = _real(path)
        same_report = next((r for r in _SAME_CONTENT if r.value == label), None)
        if real in in_out and not (same_report and in_out[real] == _SAME_CONTENT[same_report]):
            raise UsageError(f"{label} ({one_line(path)}) is {in_out[real]} in --out; give each output its own path")
        if real in seen:
            raise UsageError(f"{label} and {seen[real]} are the same file ({one_line(path)}); "
                             "give each output its own path")
        seen[real] = label


def check_writable(plan: OutputPlan) -> None:
    """Create --out and the copies' folders and a file in each (then remove it): UsageError if not writable."""
    folders = [("--out", plan.out)] + [(role.value, path.parent) for role, path in plan.copies().items()]
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
    for path in plan.reports():
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
    """When a run ends without a result: clear what it wrote, then a SARIF log (CI learns why) and a
    summary in --out and the copies, and the job summary. Best effort: the error is on its way out."""
    from amdet_gate.outputs import append_step_summary, write_json, write_text
    from amdet_gate.sanitise import md_text
    from amdet_gate.sarif import error_sarif

    with contextlib.suppress(GateError):
        clear(plan)
    if exc.exit_code == ExitCode.USAGE:
        return  # a mistake in the invocation: nothing about the model to report
    rule = exc.rule_id or "AMDET003"  # could not decide: load or download failure, interrupted, internal error
    log = error_sarif(rule, str(exc), Path(model), subfolder)
    word = "FAIL" if exc.exit_code == ExitCode.FAIL else "ERROR"
    text = (f"## amdet-gate: ❌ {word} (exit {int(exc.exit_code)})\n\n**Model** {md_text(model)}\n\n"
            f"**{rule}** {md_text(str(exc), 500)}\n")
    with contextlib.suppress(GateError):
        for path in (plan.sarif, plan.out / "result.sarif"):
            if path is not None:
                write_json(path, log)
        for path in (plan.markdown, plan.out / "summary.md"):
            if path is not None:
                write_text(path, text)
    append_step_summary(env, text)


def prepare_report_targets(result: Path, targets: Mapping[Role, Path]) -> None:
    """`amdet-gate report`: no target may be the result it reads or another target; then clear them."""
    seen: dict[Path, str] = {_real(result): f"the result {one_line(result)}"}
    for role, path in targets.items():
        real = _real(path)
        if real in seen:
            raise UsageError(f"{role.value} ({one_line(path)}) is {seen[real]}; give each output its own path")
        seen[real] = role.value
    for path in targets.values():
        try:
            if path.is_symlink() or path.is_file():
                path.unlink()
        except OSError as exc:
            raise UsageError(f"cannot clear the old output {one_line(path)}: {exc.strerror}") from None
