"""Every text encoder of a model: one scan each, one verdict each, one exit code for the model.

A single-file SDXL or SD 3 checkpoint, or a diffusers pipeline folder, has several text encoders;
a backdoor can sit in any of them. `run_encoders` runs the whole gate (`gate._run`: cache, scan,
policy, reports, lock entry) once per encoder into `--out/<encoder>/`, then writes the model's
summary into `--out` itself:

  result.json    kind "encoders": one entry per encoder (verdict, score, exit code, identity,
                 the layer read, where its own result.json is; for an error its rule) and the parts
                 not scanned
  and each report format's summary (`ReportFormat.render_summary`, amdet_gate/report), such as
  result.sarif   every encoder's results in one run, each located at its encoder
                 (`model.safetensors#text_encoder_2`, or the pipeline's `text_encoder_2/...` file)
  summary.md     a table of the encoders, then each encoder's summary
  report.html    the same table, linking each encoder's own report

The exit code is the worst (`worst`): a found backdoor (1) outranks an error (2), which
outranks nothing scannable (3): no encoder's finding is hidden by another's failure to load.
A part that is not a CLIP encoder (a T5) is listed in every report; `on_unscanned` decides.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

from amdet_gate.errors import ExitCode, GateError, UsageError
from amdet_gate.gate_options import GateOptions, GateOutcome
from amdet_gate.result.codec import to_data
from amdet_gate.sanitise import one_line
from amdet_gate.version import __version__

if TYPE_CHECKING:
    from amdet_gate.policy import Policy
    from amdet_gate.result import ModelIdentity, PolicyDecision

RESULTS_KIND = "encoders"
SEVERITY = {ExitCode.PASS: 0, ExitCode.NOTHING_SCANNABLE: 1, ExitCode.ERROR: 2, ExitCode.FAIL: 3, ExitCode.USAGE: 4}


def worst(codes: list[ExitCode]) -> ExitCode:
    return max(codes, key=lambda c: SEVERITY[ExitCode(c)], default=ExitCode.PASS)


@dataclasses.dataclass(frozen=True)
class EncoderRun:
    """One encoder's run: its outcome, or the error that ended it."""

    name: str
    outcome: GateOutcome | None
    error: GateError | None

    @property
    def code(self) -> ExitCode:
        return self.outcome.exit_code if self.outcome is not None else ExitCode(self.error.exit_code)


def exit_code(runs: list[EncoderRun], exit_zero: bool) -> ExitCode:
    """The model's exit code; `--exit-zero` turns each encoder's 1 into 0, never another encoder's 2 or 3."""
    return worst([ExitCode.PASS if exit_zero and r.code == ExitCode.FAIL else r.code for r in runs])


def unscanned_policy(model: ModelIdentity, policy: Policy, decision: PolicyDecision,
                     warnings: list[str]) -> PolicyDecision:
    """The decision once the parts not scanned are counted: a visible warning, or a failure."""
    parts = model.not_scanned
    if not parts:
        return decision
    names = ", ".join(f"{p.name} ({p.kind})" for p in parts)
    code = decision.exit_code
    if policy.on_unscanned == "fail":
        text = f"not scanned: {names}; the policy fails the gate for it (on_unscanned: fail)"
        code = worst([ExitCode(code), ExitCode.FAIL])
    else:
        text = f"not scanned: {names}; it is not known to be clean (on_unscanned: warn)"
        warnings.append(text)
    return dataclasses.replace(decision, exit_code=code, note=f"{decision.note}; {text}" if decision.note else text)


def run_encoders(options: GateOptions, names: list[str], env: Mapping[str, str], today: date, progress,
                 stage: Callable[[str], None], run_one) -> GateOutcome:
    """The gate once per encoder (`run_one` is gate._run), then the model's summary outputs."""
    from amdet_gate.outpaths import OutputPlan, write_error_outputs

    if options.anchor is not None:
        raise UsageError(f"--anchor is one encoder's clean reference, but {one_line(options.model)} has "
                         f"{len(names)} text encoders ({', '.join(names)}): pass --encoder NAME")
    clear_encoder_folders(options.out)
    # The job summary gets the model's summary once, at the end; each encoder's run leaves it alone.
    quiet_env = {k: v for k, v in env.items() if k != "GITHUB_STEP_SUMMARY"}
    runs = []
    for name in names:
        sub = dataclasses.replace(options, encoder=name, out=options.out / name, reports={})
        stage(f"scanning {name}")
        try:
            runs.append(EncoderRun(name, run_one(sub, quiet_env, today, progress, stage), None))
        except GateError as exc:
            if exc.exit_code == ExitCode.USAGE:  # the invocation is wrong for every encoder
                raise
            write_error_outputs(OutputPlan(sub.out), exc, options.model, name, quiet_env)
            runs.append(EncoderRun(name, None, exc))
    summary = encoders_result(options, runs)
    paths = write_summary(summary, options)
    warnings = sorted({w for r in runs if r.outcome for w in r.outcome.warnings})
    from amdet_gate.outputs import append_step_summary
    from amdet_gate.report import JOB_SUMMARY_FORMAT

    problem = append_step_summary(env, paths[JOB_SUMMARY_FORMAT].read_text("utf-8"))
    if problem:
        warnings.append(problem)
    code = exit_code(runs, exit_zero=False)
    note = "; ".join(f"{r.name}: {r.outcome.note}" for r in runs if r.outcome and r.outcome.note)
    return GateOutcome(summary, code, note, paths, all(r.outcome and r.outcome.cache_hit for r in runs), warnings,
                       encoder_runs=runs)


def clear_encoder_folders(out: Path) -> None:
    """An earlier run's per-encoder outputs (a PASS in out/text_encoder_2/) must not outlive this run."""
    from amdet_gate.outpaths import OutputPlan, clear

    if not out.is_dir():
        return
    for folder in sorted(out.glob("text_encoder*")):
        if folder.is_dir() and not folder.is_symlink():
            clear(OutputPlan(folder))


def encoders_result(options: GateOptions, runs: list[EncoderRun]) -> dict:
    """The model's result.json: one entry per encoder, the parts not scanned, the worst verdict."""
    entries, not_scanned, model = [], {}, {}
    for run in runs:
        if run.outcome is None:
            entries.append({"name": run.name, "verdict": "error", "score": None, "exit_code": int(run.code),
                            "reason": str(run.error), "rule": run.error.rule_id or "AMDET003",
                            "identity_sha256": None, "layer": None, "result": None})
            continue
        r = run.outcome.scan_result
        m = to_data(r.model)
        model = model or {k: m.get(k) for k in ("source", "hub_id", "revision", "resolved_sha", "layout",
                                                  "layout_title")}
        not_scanned.update({p.name: to_data(p) for p in r.model.not_scanned})
        entries.append({"name": run.name, "verdict": r.verdict, "score": r.score, "exit_code": int(run.code),
                        "reason": r.reason, "identity_sha256": r.model.identity_sha256, "layer": m.get("layer"),
                        "config_source": m.get("config_source"), "lora": m.get("lora"),
                        "weight_files": m["weight_files"], "cache_hit": bool(r.cache_hit),
                        "policy_note": run.outcome.note,
                        "result": f"{run.name}/result.json", "report": f"{run.name}/report.html"})
    verdicts = [e["verdict"] for e in entries]
    verdict = next((v for v in ("fail", "error", "inconclusive") if v in verdicts), "pass")
    return {"schema_version": "1.3", "kind": RESULTS_KIND, "tool": {"name": "amdet-gate", "version": __version__},
            "model": model or {"source": options.model}, "verdict": verdict,
            "exit_code": int(exit_code(runs, exit_zero=False)), "encoders": entries,
            "not_scanned": list(not_scanned.values())}


def write_summary(summary: dict, options: GateOptions) -> dict[str, Path]:
    """result.json and each report format's summary in --out, and the copies the user asked for."""
    from amdet_gate.files import write_atomic
    from amdet_gate.outputs import write_json
    from amdet_gate.report import formats

    out = options.out
    paths = {"result": out / "result.json"}
    write_json(paths["result"], summary)
    for fmt in formats():
        if fmt.render_summary is None:  # a format with nothing to say about several encoders writes nothing
            continue
        paths[fmt.name] = out / fmt.file_name
        write_atomic(paths[fmt.name], fmt.render_summary(summary, out, out))
        copy = options.reports.get(fmt.name)
        if copy is not None and copy.resolve() != paths[fmt.name].resolve():
            write_atomic(copy, fmt.render_summary(summary, out, copy.parent))  # its links, from where it lies
    return paths
