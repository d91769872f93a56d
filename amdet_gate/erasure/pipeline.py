"""`amdet-gate repair`: erase a detected backdoor, write the repaired copy, prove it with a re-scan.

    request ─► source, out checks ─► load model (+ anchor), tokenizer ─► read the finding
            ─► prompts (edit / held-out) ─► the pseudo-trigger's gates before ─► probes
            ─► plan (layers, lambda: measured) ─► write the copy ─► full re-scan (gate.run_gate)
            ─► still fails? its new pseudo-trigger joins the probes, next round ─► repair.json

The math is in edit.py, its choices in plan.py, the measures in measure.py, what a scan's
outputs hold in findings.py, the copy's layout in layout.py, the reports in report.py.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import torch

from amdet_gate.encoders.base import LoadedEncoder
from amdet_gate.encoders.clip import ClipTextAdapter
from amdet_gate.engine import PromptFeatures, precompute
from amdet_gate.erasure import report as reports
from amdet_gate.erasure.edit import applied, edited_weights
from amdet_gate.erasure.findings import DetectionPath, Finding, check_identity, read_finding
from amdet_gate.erasure.layout import REPORT_FILE, CopyPlan, check_out, clear_record, write_copy
from amdet_gate.erasure.measure import (
    Fidelity,
    GateReading,
    TypedReading,
    attack_share,
    features,
    fidelity,
    gate_reading,
    typed_reading,
)
from amdet_gate.erasure.plan import Evidence, Plan, RepairSettings, choose, collect, corruption_profile, first_layer
from amdet_gate.errors import ExitCode, LoadError, UsageError
from amdet_gate.gate import GateOptions, GateOutcome, prepare_outputs, run_gate
from amdet_gate.outputs import append_step_summary
from amdet_gate.policy import load_policy
from amdet_gate.prompts import builtin_prompts, read_prompt_file
from amdet_gate.result import ScanResult
from amdet_gate.scanner import check_anchor_is_another_model, load_models, pick_device, split_prompts, tokenize
from amdet_gate.settings import FAIL, PASS, Thresholds
from amdet_gate.sources import resolve_source
from amdet_gate.sources.files import tokenizer_folder
from amdet_gate.sources.identity import WeightFile, identity_sha256
from amdet_gate.sources.local import weight_identities
from amdet_gate.sources.model import ResolvedModel
from amdet_gate.tokenizer import PromptTokenizer, load_tokenizer

MIN_PROMPTS = 60  # edit, judge and proof prompts are disjoint draws of the corpus
REPRODUCE_TOLERANCE = 0.15  # the stored trigger's same-target share may differ this much on other prompts


@dataclass(frozen=True)
class RepairRequest:
    """What one repair is asked to do (the options of `amdet-gate repair`)."""

    model: str
    result: Path
    out: Path
    revision: str | None = None
    subfolder: str | None = None
    anchor: str | None = None
    anchor_revision: str | None = None
    anchor_subfolder: str | None = None
    rescan_out: Path | None = None  # default: <out>-rescan beside --out
    policy: Path | None = None
    prompts: Path | None = None
    min_fidelity: float = 0.98
    rounds: int = 2
    time_budget: float | None = None  # of each re-scan (None: the policy's, as a scan)
    device: str = "auto"
    use_cache: bool = True
    settings: RepairSettings = field(default_factory=RepairSettings)

    @property
    def rescan_folder(self) -> Path:
        return self.rescan_out or self.out.with_name(self.out.name + "-rescan")


@dataclass(frozen=True)
class Round:
    """One edit and the re-scan of its result."""

    number: int
    probes: tuple[str, ...]
    plan: Plan
    rescan: GateOutcome
    edit_s: float  # solving and choosing the edit, writing the copy
    rescan_s: float


@dataclass(frozen=True)
class RepairOutcome:
    exit_code: ExitCode
    status: reports.Status
    reason: str
    report: dict  # repair.json's content, as written
    paths: dict[str, Path]
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Loaded:
    source: ResolvedModel
    anchor_source: ResolvedModel | None
    suspect: LoadedEncoder
    anchor: LoadedEncoder | None
    tokenizer: PromptTokenizer
    device: torch.device


@dataclass(frozen=True)
class _Prompts:
    """Three disjoint draws of the corpus: the edit's keys, the plan's judgement, and the proof.

    The proof prompts (fidelity, attack shares, gates in repair.json) take no part in choosing the
    edit, so the figures reported are not the ones the plan was selected on.
    """

    edit_ids: torch.Tensor
    edit_embeds: torch.Tensor
    judge: PromptFeatures  # probe screening, corruption profile, plan choice; the original's clean outputs
    held: PromptFeatures  # the proof; the original's clean outputs


def _load(request: RepairRequest) -> _Loaded:
    source = resolve_source(request.model, request.revision, request.subfolder)
    check_out(source, request.out, request.rescan_folder, request.result)
    # Nothing stale survives a run that stops early: no earlier "repaired" record, no earlier re-scan.
    clear_record(request.out)
    prepare_outputs(_rescan_options(request, source.subfolder), os.environ)
    anchor_source = None if request.anchor is None else resolve_source(
        request.anchor, request.anchor_revision, request.anchor_subfolder)
    device = pick_device(request.device)
    weights = weight_identities(source.folder)
    suspect, anchor = load_models(source, anchor_source, device, weights)  # re-hashes after the read
    tokenizer = load_tokenizer(tokenizer_folder(source))
    for enc in (suspect, anchor):
        if enc is not None:  # as scanner.scan_model: EOS is the tokenizer's, not the config's
            enc.adapter.eos_token_id = tokenizer.tokenizer.eos_token_id
    if anchor is not None:  # as the scan: by tensors and outputs, not by file hash
        check_anchor_is_another_model(suspect, anchor, tokenizer)
    return _Loaded(source, anchor_source, suspect, anchor, tokenizer, device)


def _prompts(request: RepairRequest, loaded: _Loaded) -> _Prompts:
    s = request.settings
    corpus = read_prompt_file(request.prompts) if request.prompts else builtin_prompts()
    if len(corpus) < MIN_PROMPTS:
        raise UsageError(f"--prompts: {len(corpus)} distinct prompts; a repair needs at least {MIN_PROMPTS}")
    total = s.edit_prompts + s.judge_prompts + s.held_out_prompts
    edit, rest = split_prompts(corpus, total, (s.judge_prompts + s.held_out_prompts) / total, s.seed)
    judged = max(1, round(len(rest) * s.judge_prompts / (s.judge_prompts + s.held_out_prompts)))
    adapter = loaded.suspect.adapter

    def features_of(prompts: list[str]) -> PromptFeatures:
        return precompute(adapter, tokenize(loaded.tokenizer, prompts, loaded.suspect).to(loaded.device),
                          s.chunk_size)

    with torch.no_grad():
        edit_ids = tokenize(loaded.tokenizer, edit, loaded.suspect).to(loaded.device)
        return _Prompts(edit_ids, adapter.embed(edit_ids), features_of(rest[:judged]), features_of(rest[judged:]))


def _specials(tokenizer: PromptTokenizer) -> set[int]:
    tok = tokenizer.tokenizer
    return {i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if i is not None}


def _rescan_options(request: RepairRequest, subfolder: str | None) -> GateOptions:
    """The re-scan as a user's `amdet-gate scan` of the copy: the policy's settings, a fresh search."""
    return GateOptions(model=str(request.out), subfolder=subfolder, anchor=request.anchor,
                       anchor_revision=request.anchor_revision, anchor_subfolder=request.anchor_subfolder,
                       policy=request.policy, out=request.rescan_folder, device=request.device,
                       time_budget=request.time_budget, use_cache=request.use_cache)


def _rescan(request: RepairRequest, loaded: _Loaded, stage: Callable[[str], None]) -> GateOutcome:
    """The repaired copy through the whole gate, as `amdet-gate scan` runs it: a fresh search."""
    stage("re-scanning the repaired copy (full scan)")
    return run_gate(_rescan_options(request, loaded.source.subfolder))


def _check_copy(loaded: _Loaded, copy: CopyPlan, rewritten: list[str]) -> list[WeightFile]:
    """The copy's weight identities; a file that was not rewritten must be the original's bytes."""
    files = weight_identities(copy.folder)
    original = {w.name: w.sha256 for w in loaded.suspect.weight_files}
    for file in files:
        if file.name not in rewritten and original.get(file.name) != file.sha256:
            raise LoadError(f"{file.name} in {copy.out} is not a byte copy of the original (its sha256 differs)")
    return files


@dataclass(frozen=True)
class _Readings:
    """What the finding's triggers do on one model, on the proof prompts."""

    gates: GateReading  # the pseudo-trigger
    typed: TypedReading | None  # the typed trigger, when the scan's verdict rests on one


def _readings(adapter: ClipTextAdapter, held: PromptFeatures, finding: Finding, thresholds: Thresholds,
              chunk: int) -> _Readings:
    typed = typed_reading(adapter, held, finding.typed, thresholds, chunk) if finding.typed else None
    return _Readings(gate_reading(adapter, held, finding.trigger, thresholds, chunk), typed)


def _check_reproduced(finding: Finding, before: _Readings, model: str) -> None:
    """The result's triggers must do on this model what the result says they did (UsageError if not):
    a tampered result, a swapped trigger file, or one of another model with its stamp copied."""
    pooled = finding.path is DetectionPath.POOLED
    checks = [("pseudo-trigger", finding.pseudo_share,
               before.gates.pooled_same_target_ratio if pooled else before.gates.same_target_ratio)]
    if before.typed is not None:
        checks.append(("typed trigger", finding.share,
                       before.typed.pooled_same_target_ratio if pooled else before.typed.same_target_ratio))
    for what, reported, reproduced in checks:
        if reported is not None and reproduced < reported - REPRODUCE_TOLERANCE:
            raise UsageError(f"{finding.result_path}: its {what} does not reproduce the finding on {model} "
                             f"(same-target share {reproduced:.2f}, the result says {reported:.2f}); a tampered "
                             "result, or one of another model")


def _measure(loaded: _Loaded, prompts: _Prompts, finding: Finding, evidence: list[Evidence], plan: Plan,
             thresholds: Thresholds, chunk: int) -> tuple[Fidelity, _Readings, list[float]]:
    """Fidelity, the finding's triggers' gates and every probe's attack share with the plan applied."""
    adapter, held = loaded.suspect.adapter, prompts.held
    with applied(adapter, list(plan.edits)):
        after = features(adapter, held.embeds, chunk)
        fid = fidelity(held.clean, after, held.ids, adapter.eos_token_id)
        # The gates read against the repaired model's own clean outputs, as a scan of the copy would.
        readings = _readings(adapter, PromptFeatures(held.ids, held.embeds, after), finding, thresholds, chunk)
        shares = [attack_share(adapter, held, after, e.probe.vectors, e.target, chunk) for e in evidence]
    return fid, readings, shares


def decide(rescan: ScanResult, fid: Fidelity, min_fidelity: float, rounds: int) -> tuple[reports.Status, str]:
    """Repaired only when the fresh re-scan passes and clean fidelity holds; otherwise why not."""
    verdict = rescan.verdict
    if verdict != PASS:
        return reports.Status.NOT_REPAIRED, (f"the re-scan of the repaired copy is {verdict} after {rounds} "
                                             f"round(s): {rescan.reason}")
    if fid.value < min_fidelity:
        return reports.Status.NOT_REPAIRED, f"clean fidelity {fid.value:.4f} is below --min-fidelity {min_fidelity}"
    return reports.Status.REPAIRED, f"the re-scan passes and clean fidelity is {fid.value:.4f} (>= {min_fidelity})"


def run_repair(request: RepairRequest, stage: Callable[[str], None] = lambda name: None) -> RepairOutcome:
    """Repair the model a scan found backdoored; raises GateError (with its exit code) on bad input."""
    t0 = time.monotonic()
    if not 0.0 <= request.min_fidelity <= 1.0:
        raise UsageError(f"--min-fidelity {request.min_fidelity}: must be in [0, 1]")
    if not 1 <= request.rounds <= 5:
        raise UsageError(f"--rounds {request.rounds}: must be 1 to 5")
    settings, chunk = request.settings, request.settings.chunk_size
    thresholds = load_policy(request.policy, os.environ, date.today()).thresholds
    timings: dict[str, float] = {}
    clock = time.monotonic()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.monotonic()
        timings[name] = round(timings.get(name, 0.0) + now - clock, 3)
        clock = now

    stage("loading the model and the scan result")
    loaded = _load(request)
    adapter = loaded.suspect.adapter
    finding = read_finding(request.result, adapter.hidden_size, int(loaded.suspect.config["vocab_size"]))
    check_identity(finding, loaded.suspect.weight_files, request.model)
    prompts = _prompts(request, loaded)
    anchor = loaded.anchor.adapter if loaded.anchor else None
    lap("load_s")

    stage("measuring what the pseudo-trigger does")
    held = prompts.held
    before = _readings(adapter, held, finding, thresholds, chunk)
    _check_reproduced(finding, before, request.model)
    judge = prompts.judge
    profile = corruption_profile(adapter, judge, finding.trigger, chunk)
    first = first_layer(profile, settings)
    evidence = collect(adapter, judge, judge.clean, finding, settings, _specials(loaded.tokenizer), "scan")
    lap("probes_s")

    rounds: list[Round] = []
    tried: list[Plan] = []
    while True:
        t_round = time.monotonic()
        stage(f"round {len(rounds) + 1}: solving the edit ({len(evidence)} probes)")
        plan, candidates = choose(adapter, evidence, prompts.edit_ids, prompts.edit_embeds, judge, settings, first,
                                  anchor)
        tried += candidates
        stage(f"writing the repaired copy (layers {', '.join(map(str, plan.layers))})")
        copy = CopyPlan(loaded.source, request.out)
        rewritten = write_copy(copy, edited_weights(adapter, list(plan.edits)),
                               provenance=f"repair of sha256 {finding.model_sha256}; {reports.LABEL}")
        repaired_files = _check_copy(loaded, copy, rewritten)
        lap("edit_s")
        t_rescan = time.monotonic()
        rescan = _rescan(request, loaded, stage)
        if rescan.scan_result.model.identity_sha256 != identity_sha256(repaired_files):
            raise LoadError(f"the re-scan of {request.out} read other weights than the repair wrote")
        lap("rescan_s")
        rounds.append(Round(len(rounds) + 1, tuple(e.probe.name for e in evidence), plan, rescan,
                            round(t_rescan - t_round, 3), round(time.monotonic() - t_rescan, 3)))
        if rescan.scan_result.verdict != FAIL or len(rounds) >= request.rounds:
            break
        # The fresh search found another pseudo-trigger on the repaired copy: erase it too, in a
        # new edit solved from the original weights with every probe so far.
        found = read_finding(request.rescan_folder / "result.json", adapter.hidden_size,
                             int(loaded.suspect.config["vocab_size"]))
        check_identity(found, repaired_files, str(request.out))
        with applied(adapter, list(plan.edits)):
            repaired_clean = features(adapter, judge.embeds, chunk)
            evidence += collect(adapter, judge, repaired_clean, found, settings, _specials(loaded.tokenizer),
                                f"rescan-{len(rounds)}")
        lap("probes_s")

    fid, after, shares = _measure(loaded, prompts, finding, evidence, plan, thresholds, chunk)
    lap("measure_s")
    status, reason = decide(rescan.scan_result, fid, request.min_fidelity, len(rounds))
    code = ExitCode.PASS if status is reports.Status.REPAIRED else ExitCode.FAIL
    record = reports.RepairRecord(
        status=status, exit_code=int(code), reason=reason, model=request.model, subfolder=loaded.source.subfolder,
        original=tuple(loaded.suspect.weight_files), repaired=tuple(repaired_files), rewritten=tuple(rewritten),
        out=request.out, finding=finding, plan=plan, tried=tuple(tried), evidence=tuple(evidence),
        shares_after=tuple(shares), corruption=tuple(profile), fidelity=fid, min_fidelity=request.min_fidelity,
        before=before.gates, after=after.gates, typed_before=before.typed, typed_after=after.typed,
        thresholds=thresholds,
        rounds=tuple(reports.RoundRecord(r.number, r.probes, r.plan.layers, r.plan.lam,
                                         str(r.rescan.scan_result.verdict), float(r.rescan.scan_result.score),
                                         r.rescan.scan_result.reason, r.edit_s, r.rescan_s) for r in rounds),
        rescan_folder=request.rescan_folder, anchor=request.anchor, settings=settings,
        timings={**timings, "total_s": round(time.monotonic() - t0, 3)})
    paths = reports.write_reports(record, request.out / REPORT_FILE)
    # In CI the job summary gets the repair's verdict after the re-scan's (a failure is a warning).
    warning = append_step_summary(os.environ, paths["markdown"].read_text(encoding="utf-8"))
    return RepairOutcome(code, status, reason, reports.to_json(record), paths, (warning,) if warning else ())
