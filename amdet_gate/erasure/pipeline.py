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

from amdet_gate.encoder import LoadedEncoder
from amdet_gate.engine import PromptFeatures, precompute
from amdet_gate.erasure import report as reports
from amdet_gate.erasure.edit import applied, edited_weights
from amdet_gate.erasure.findings import DetectionPath, Finding, check_identity, read_finding
from amdet_gate.erasure.layout import REPORT_FILE, CopyPlan, check_out, write_copy
from amdet_gate.erasure.measure import Fidelity, GateReading, attack_share, features, fidelity, gate_reading
from amdet_gate.erasure.plan import Evidence, Plan, RepairSettings, choose, collect, corruption_profile, first_layer
from amdet_gate.errors import ExitCode, UsageError
from amdet_gate.gate import GateOptions, GateOutcome, run_gate
from amdet_gate.policy import load_policy
from amdet_gate.prompts import builtin_prompts, read_prompt_file
from amdet_gate.scanner import load_models, pick_device, split_prompts, tokenize
from amdet_gate.settings import FAIL, PASS, Thresholds
from amdet_gate.source import ModelSource, identity_sha256, resolve_source, tokenizer_folder, weight_identities
from amdet_gate.tokenizer import PromptTokenizer, load_tokenizer

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
    seconds: float


@dataclass(frozen=True)
class RepairOutcome:
    exit_code: ExitCode
    status: reports.Status
    reason: str
    report: dict  # repair.json's content, as written
    paths: dict[str, Path]


@dataclass(frozen=True)
class _Loaded:
    source: ModelSource
    anchor_source: ModelSource | None
    suspect: LoadedEncoder
    anchor: LoadedEncoder | None
    tokenizer: PromptTokenizer
    device: torch.device


@dataclass(frozen=True)
class _Prompts:
    edit_ids: torch.Tensor
    edit_embeds: torch.Tensor
    held: PromptFeatures  # with the original model's clean outputs


def _load(request: RepairRequest) -> _Loaded:
    source = resolve_source(request.model, request.revision, request.subfolder)
    check_out(source, request.out, request.rescan_folder)
    anchor_source = None if request.anchor is None else resolve_source(
        request.anchor, request.anchor_revision, request.anchor_subfolder)
    device = pick_device(request.device)
    weights = weight_identities(source.folder)
    suspect, anchor = load_models(source, anchor_source, device, weights)  # re-hashes after the read
    if anchor is not None and identity_sha256(anchor.weight_files) == identity_sha256(weights):
        raise UsageError("the anchor has the same weights as the model; give a clean reference encoder")
    tokenizer = load_tokenizer(tokenizer_folder(source))
    for enc in (suspect, anchor):
        if enc is not None:  # as scanner.scan_model: EOS is the tokenizer's, not the config's
            enc.adapter.eos_token_id = tokenizer.tokenizer.eos_token_id
    return _Loaded(source, anchor_source, suspect, anchor, tokenizer, device)


def _prompts(request: RepairRequest, loaded: _Loaded) -> _Prompts:
    s = request.settings
    corpus = read_prompt_file(request.prompts) if request.prompts else builtin_prompts()
    total = s.edit_prompts + s.held_out_prompts
    edit, held = split_prompts(corpus, total, s.held_out_prompts / total, s.seed)
    adapter = loaded.suspect.adapter
    with torch.no_grad():
        edit_ids = tokenize(loaded.tokenizer, edit, loaded.suspect).to(loaded.device)
        held_features = precompute(adapter, tokenize(loaded.tokenizer, held, loaded.suspect), s.chunk_size)
        return _Prompts(edit_ids, adapter.embed(edit_ids), held_features)


def _specials(tokenizer: PromptTokenizer) -> set[int]:
    tok = tokenizer.tokenizer
    return {i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if i is not None}


def _rescan(request: RepairRequest, loaded: _Loaded, stage: Callable[[str], None]) -> GateOutcome:
    """The repaired copy through the whole gate, as `amdet-gate scan` runs it: a fresh search."""
    stage("re-scanning the repaired copy (full scan)")
    options = GateOptions(model=str(request.out), subfolder=loaded.source.subfolder, anchor=request.anchor,
                          anchor_revision=request.anchor_revision, anchor_subfolder=request.anchor_subfolder,
                          policy=request.policy, out=request.rescan_folder, device=request.device,
                          use_cache=request.use_cache)
    return run_gate(options)


def _measure(loaded: _Loaded, prompts: _Prompts, finding: Finding, evidence: list[Evidence], plan: Plan,
             thresholds: Thresholds, chunk: int) -> tuple[Fidelity, GateReading, list[float]]:
    """Fidelity, the pseudo-trigger's gates and every probe's attack share with the plan applied."""
    adapter, held = loaded.suspect.adapter, prompts.held
    with applied(adapter, list(plan.edits)):
        after = features(adapter, held.embeds, chunk)
        fid = fidelity(held.clean, after, held.ids, adapter.eos_token_id)
        gates = gate_reading(adapter, held, finding.trigger, thresholds, chunk)
        shares = [attack_share(adapter, held, after, e.probe.vectors, e.target, chunk) for e in evidence]
    return fid, gates, shares


def run_repair(request: RepairRequest, stage: Callable[[str], None] = lambda name: None) -> RepairOutcome:
    """Repair the model a scan found backdoored; raises GateError (with its exit code) on bad input."""
    t0 = time.monotonic()
    if not 0.0 <= request.min_fidelity <= 1.0:
        raise UsageError(f"--min-fidelity {request.min_fidelity}: must be in [0, 1]")
    if not 1 <= request.rounds <= 5:
        raise UsageError(f"--rounds {request.rounds}: must be 1 to 5")
    settings, chunk = request.settings, request.settings.chunk_size
    thresholds = load_policy(request.policy, os.environ, date.today()).thresholds
    stage("loading the model and the scan result")
    loaded = _load(request)
    adapter = loaded.suspect.adapter
    finding = read_finding(request.result, adapter.hidden_size, int(loaded.suspect.config["vocab_size"]))
    check_identity(finding, loaded.suspect.weight_files, request.model)
    prompts = _prompts(request, loaded)
    anchor = loaded.anchor.adapter if loaded.anchor else None

    stage("measuring what the pseudo-trigger does")
    held = prompts.held
    before = gate_reading(adapter, held, finding.trigger, thresholds, chunk)
    reproduced = before.pooled_same_target_ratio if finding.path is DetectionPath.POOLED else before.same_target_ratio
    if reproduced < finding.share - REPRODUCE_TOLERANCE:
        raise UsageError(f"{finding.result_path}: its pseudo-trigger does not reproduce the finding on "
                         f"{request.model} (same-target share {reproduced:.2f}, the result says {finding.share:.2f}); "
                         "a tampered result, or one of another model")
    profile = corruption_profile(adapter, held, finding.trigger, chunk)
    first = first_layer(profile, settings)
    evidence = collect(adapter, held, held.clean, finding, settings, _specials(loaded.tokenizer), "scan")

    rounds: list[Round] = []
    tried: list[Plan] = []
    while True:
        t_round = time.monotonic()
        stage(f"round {len(rounds) + 1}: solving the edit ({len(evidence)} probes)")
        plan, candidates = choose(adapter, evidence, prompts.edit_ids, prompts.edit_embeds, held, held.clean,
                                  settings, first, anchor)
        tried += candidates
        stage(f"writing the repaired copy (layers {', '.join(map(str, plan.layers))})")
        rewritten = write_copy(CopyPlan(loaded.source, request.out), edited_weights(adapter, list(plan.edits)),
                               provenance=f"repair of sha256 {finding.model_sha256}; repaired, re-verify before use")
        rescan = _rescan(request, loaded, stage)
        rounds.append(Round(len(rounds) + 1, tuple(e.probe.name for e in evidence), plan, rescan,
                            time.monotonic() - t_round))
        if rescan.result["verdict"] != FAIL or len(rounds) >= request.rounds:
            break
        # The fresh search found another pseudo-trigger on the repaired copy: erase it too, in a
        # new edit solved from the original weights with every probe so far.
        found = read_finding(request.rescan_folder / "result.json", adapter.hidden_size,
                             int(loaded.suspect.config["vocab_size"]))
        check_identity(found, weight_identities(CopyPlan(loaded.source, request.out).folder), str(request.out))
        with applied(adapter, list(plan.edits)):
            repaired_clean = features(adapter, held.embeds, chunk)
            evidence += collect(adapter, held, repaired_clean, found, settings, _specials(loaded.tokenizer),
                                f"rescan-{len(rounds)}")

    fid, after, shares = _measure(loaded, prompts, finding, evidence, plan, thresholds, chunk)
    verdict = rescan.result["verdict"]
    if verdict != PASS:
        status, reason = reports.Status.NOT_REPAIRED, (
            f"the re-scan of the repaired copy is still {verdict} after {len(rounds)} round(s): "
            f"{rescan.result['reason']}")
    elif fid.value < request.min_fidelity:
        status, reason = reports.Status.NOT_REPAIRED, (
            f"clean fidelity {fid.value:.4f} is below --min-fidelity {request.min_fidelity}")
    else:
        status, reason = reports.Status.REPAIRED, (
            f"the re-scan passes and clean fidelity is {fid.value:.4f} (>= {request.min_fidelity})")
    code = ExitCode.PASS if status is reports.Status.REPAIRED else ExitCode.FAIL
    repaired_files = weight_identities(CopyPlan(loaded.source, request.out).folder)
    record = reports.RepairRecord(
        status=status, exit_code=int(code), reason=reason, model=request.model, subfolder=loaded.source.subfolder,
        original=tuple(loaded.suspect.weight_files), repaired=tuple(repaired_files), rewritten=tuple(rewritten),
        out=request.out, finding=finding, plan=plan, tried=tuple(tried), evidence=tuple(evidence),
        shares_after=tuple(shares), corruption=tuple(profile), fidelity=fid, min_fidelity=request.min_fidelity,
        gates_before=before, gates_after=after, thresholds=thresholds,
        rounds=tuple(reports.RoundRecord(r.number, r.probes, r.plan.layers, r.plan.lam, r.rescan.result["verdict"],
                                         float(r.rescan.result["score"]), r.rescan.result["reason"],
                                         round(r.seconds, 3)) for r in rounds),
        rescan_folder=request.rescan_folder, anchor=request.anchor, settings=settings,
        seconds=round(time.monotonic() - t0, 3))
    paths = reports.write_reports(record, request.out / REPORT_FILE)
    return RepairOutcome(code, status, reason, reports.to_json(record), paths)
