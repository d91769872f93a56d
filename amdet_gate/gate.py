"""The gate pipeline the CLI and the Python API share: policy -> source -> cache -> scan ->
decide -> outputs -> cache, lock.

    options ──► load_policy ──► pins ──► resolve_source (local folder or Hub download)
            ──► weight sha256s ──► verdict cache? ──hit──► stored outputs
                                              └─miss─► scan_model ► render ► write_outputs ► store
            ──► apply_policy (exit code) ──► lock file, $GITHUB_STEP_SUMMARY

Torch is imported only on a cache miss, so a cache hit answers in well under a second.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from amdet_gate.errors import ExitCode, GateError, LoadError, UsageError
from amdet_gate.gate_options import GateOptions, GateOutcome
from amdet_gate.outpaths import OutputPlan, check_plan, check_writable, clear, write_error_outputs
from amdet_gate.policy import Policy, apply_policy, load_policy, require_finite
from amdet_gate.result import ModelIdentity, PolicyDecision, PolicyRecord, RenderingRecord, ScanResult, dump
from amdet_gate.result.codec import to_data
from amdet_gate.result.document import SCHEMA_VERSION
from amdet_gate.sanitise import one_line
from amdet_gate.settings import SearchSettings, Thresholds
from amdet_gate.sources import check_pin, identify, resolve_source
from amdet_gate.sources.hub import download_pipeline, is_hub_id
from amdet_gate.sources.identity import identity_sha256
from amdet_gate.sources.model import ResolvedModel
from amdet_gate.version import __version__


@dataclass(frozen=True)
class Resolved:
    policy: Policy
    settings: SearchSettings
    thresholds: Thresholds
    n_prompts: int
    device: str
    model: ResolvedModel
    anchor: ResolvedModel | None
    pipeline: str | None  # local folder of the diffusion pipeline, when one is used


def resolve(options: GateOptions, env: Mapping[str, str], today: date) -> Resolved:
    """Policy, effective settings (flag > AMDET_* > policy file > default) and the model files."""
    policy = load_policy(options.policy, env, today)
    for flag, value in (("--time-budget", options.time_budget), *((f"--threshold {k}", v)
                                                                  for k, v in options.thresholds.items())):
        require_finite(flag, value)
    settings = SearchSettings(
        seed=_first(options.seed, policy.scan.seed), restarts=_first(options.restarts, policy.scan.restarts),
        max_steps=_first(options.max_steps, policy.scan.max_steps),
        time_budget_s=_first(options.time_budget, policy.scan.time_budget_s))
    unknown = sorted(set(options.thresholds) - {f.name for f in dataclasses.fields(Thresholds)})
    if unknown:
        raise UsageError(f"unknown threshold {unknown[0]!r}")
    for name, value in options.thresholds.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
            raise UsageError(f"threshold {name}={value!r}: must be a number in [0, 1]")
    device = _first(options.device, policy.scan.device)
    if not re.fullmatch(r"auto|cpu|cuda(:\d{1,2})?", str(device)):
        raise UsageError(f"device {device!r}: use auto, cpu or cuda[:N]")
    thresholds = dataclasses.replace(policy.thresholds, **options.thresholds)
    anchor, anchor_revision, anchor_subfolder = options.anchor, options.anchor_revision, options.anchor_subfolder
    anchor_from_policy = anchor is None and bool(policy.anchor)
    if anchor_from_policy:
        anchor = str(policy.anchor["id"])
        anchor_revision, anchor_subfolder = policy.anchor.get("revision"), policy.anchor.get("subfolder")
    if policy.require_pinned_revision:  # before any download: an unpinned model is never fetched
        check_pin(options.model, options.revision)
        if anchor is not None:
            check_pin(anchor, anchor_revision, "the anchor")
    follow = options.follow_symlinks
    model = resolve_source(options.model, options.revision, options.subfolder, follow_symlinks=follow)
    model = _attach(model, options)
    # A policy's `org/name` anchor is always the Hub's: a folder of that name added to the
    # checkout (say, by a pull request) must not become the reference (write ./path for a folder).
    anchor_source = None if anchor is None else resolve_source(anchor, anchor_revision, anchor_subfolder,
                                                               prefer_hub=anchor_from_policy, follow_symlinks=follow)
    pipeline = options.pipeline
    if pipeline is not None and not Path(pipeline).exists() and is_hub_id(pipeline):
        pipeline = str(download_pipeline(pipeline, options.pipeline_revision))
    return Resolved(policy, settings, thresholds, _first(options.n_prompts, policy.scan.n_prompts),
                    device, model, anchor_source, pipeline)


def cache_key(options: GateOptions, r: Resolved, weights: list, anchor_identity: str | None):
    """Everything that can change the result: weights, anchor, policy, tool, seed, settings."""
    from amdet_gate.cache import CacheKey
    from amdet_gate.prompts import prompts_identity

    effective = {"result_schema": SCHEMA_VERSION,  # a stored result of another schema is never restored
                 "search": dataclasses.asdict(r.settings), "thresholds": dataclasses.asdict(r.thresholds),
                 "n_prompts": r.n_prompts, "prompts": prompts_identity(options.prompts),
                 "subfolder": r.model.subfolder, "device": r.device,
                 # Same weights under another config or tokenizer are another model.
                 "model_files": _small_files_identity(r.model),
                 "encoder": _encoder_identity(r.model),
                 "anchor_files": _small_files_identity(r.anchor) if r.anchor else None,
                 "render": [options.render, r.pipeline, str(options.vision) if options.vision else None,
                            options.render_steps]}
    return CacheKey.create(weights, anchor_identity=anchor_identity, policy_sha256=r.policy.sha256,
                           tool_version=__version__, seed=r.settings.seed, settings=effective)


def _small_files_identity(source: ResolvedModel) -> dict[str, str | None]:
    """sha256 of config.json, of every file the tokenizer reads and of the other small files whose bytes
    change the result (sources.files.result_files): same weights under another config are another model."""
    from amdet_gate.files import read_capped
    from amdet_gate.sources.files import MAX_TOKENIZER_FILE_BYTES, result_files

    return {name: hashlib.sha256(read_capped(path, MAX_TOKENIZER_FILE_BYTES, name, LoadError)).hexdigest()
            if os.path.lexists(path) else None for name, path in result_files(source).items()}


def output_plan(options: GateOptions) -> OutputPlan:
    return OutputPlan(options.out, options.reports, options.lock)


def run_inputs(options: GateOptions, env: Mapping[str, str]) -> tuple[dict[str, Path], dict[str, Path]]:
    """The files and folders a run reads that exist locally, by name: no output may land in them."""
    from huggingface_hub import constants

    from amdet_gate.cache import default_cache_dir

    files: dict[str, Path] = {}
    folders: dict[str, Path] = {"the Hugging Face cache": Path(constants.HF_HUB_CACHE),
                                "the verdict cache": options.cache_dir or default_cache_dir(env)}
    for name, spec in (("the model", options.model), ("the anchor", options.anchor),
                       ("the pipeline", options.pipeline), ("the vision checkpoint", options.vision),
                       ("the LoRA", options.lora), ("the --config file", options.text_config),
                       ("the tokenizer", options.tokenizer)):
        if spec is not None and Path(spec).exists():
            (folders if Path(spec).is_dir() else files)[f"{name} {one_line(spec)}"] = Path(spec)
    policy = options.policy or (Path(env["AMDET_POLICY"]) if env.get("AMDET_POLICY") else None)
    for name, path in (("the policy", policy), ("the prompt file", options.prompts)):
        if path is not None:
            files[name] = Path(path)
    return files, folders


def prepare_outputs(options: GateOptions, env: Mapping[str, str]) -> OutputPlan:
    """Check every output path before anything is read, then clear them (docs/supply-chain.md).

    A refused plan (exit 4) still clears the outputs that are not inputs: no stale PASS survives it.
    """
    plan = output_plan(options)
    files, folders = run_inputs(options, env)
    summary = Path(env["GITHUB_STEP_SUMMARY"]) if env.get("GITHUB_STEP_SUMMARY") else None
    try:
        check_plan(plan, files, folders, summary)
        check_writable(plan)
    except UsageError:
        with contextlib.suppress(GateError):
            clear(plan, keep={**files, **folders})
        raise
    clear(plan)
    return plan


INTERRUPTED = "interrupted (Ctrl-C, SIGINT or SIGTERM) before the scan finished; no verdict"


def run_gate(options: GateOptions, env: Mapping[str, str] | None = None, today: date | None = None,
             progress=None, stage: Callable[[str], None] = lambda name: None) -> GateOutcome:
    """Run the whole gate for one model; raises GateError (with its exit code) when it cannot.

    Whatever ends the run early -- a GateError, an I/O failure, Ctrl-C (KeyboardInterrupt, re-raised),
    an unexpected exception (raised as a GateError, exit 2) -- the outputs written so far are
    removed and the error SARIF and summary take their place.
    """
    env = os.environ if env is None else env
    plan = prepare_outputs(options, env)
    try:
        targets = _targets(options)
        if len(targets) > 1:  # one scan per text encoder (multiscan.py)
            from amdet_gate.multiscan import run_encoders

            return run_encoders(options, targets, env, today or date.today(), progress, stage, _run)
        return _run(options, env, today or date.today(), progress, stage)
    except GateError as exc:
        write_error_outputs(plan, exc, options.model, options.subfolder, env)
        raise
    except KeyboardInterrupt:
        write_error_outputs(plan, GateError(INTERRUPTED), options.model, options.subfolder, env)
        raise
    except Exception as exc:  # never a traceback, never a silent pass: fail closed with exit 2
        error = GateError(f"internal error during the scan: {type(exc).__name__}: {one_line(exc, 300)}")
        write_error_outputs(plan, error, options.model, options.subfolder, env)
        raise error from exc


def _run(options: GateOptions, env: Mapping[str, str], today: date, progress,
         stage: Callable[[str], None]) -> GateOutcome:
    if options.lock is not None:  # before minutes of scanning: a lock that cannot be extended is known now
        from amdet_gate.lock import read_lock
        from amdet_gate.lock_sign import check_writable_lock

        if options.lock.exists() or options.lock.is_symlink():
            read_lock(options.lock)  # an invalid, special or oversize lock: exit 4 now, not after the scan
        check_writable_lock(options.lock, env)
    stage("resolving the model")
    r = resolve(options, env, today)
    # Hashing a 10 GB weight file takes a while: it runs inside the time budget, after the cheap checks.
    deadline = time.monotonic() + r.settings.time_budget_s
    weights = identify(r.model, deadline)
    anchor_identity = None
    if r.anchor is not None:
        anchor_identity = identity_sha256(identify(r.anchor, deadline))
    if anchor_identity is not None and anchor_identity == identity_sha256(weights):
        # The anchor gate asks "does the model differ from a clean reference?"; the model itself
        # as its own anchor fails that gate for every trigger and would pass any backdoor.
        raise UsageError("the anchor has the same weights as the model; give a clean reference encoder")
    warnings: list[str] = []
    cache = key = None
    if options.use_cache:
        from amdet_gate.cache import open_cache

        cache = open_cache(env, options.cache_dir)
        key = cache_key(options, r, weights, anchor_identity)
        hit = cache.lookup(key, options.out)
        warnings += cache.take_warnings()
        if hit is not None:
            return _cache_hit(options, r, hit, warnings, env)

    from amdet_gate.outputs import write_outputs
    from amdet_gate.render import RenderRequest, choose_renderer
    from amdet_gate.scanner import ScanRequest, scan_model

    render_request = RenderRequest(kind=options.render, pipeline=r.pipeline, vision=options.vision,
                                   seed=r.settings.seed, steps=options.render_steps, device=r.device)
    choose_renderer(render_request, r.model.root, r.model.subfolder)  # a renderer that cannot work fails now
    request = ScanRequest(model=r.model, anchor=r.anchor, prompts_file=options.prompts, n_prompts=r.n_prompts,
                          device=r.device, settings=r.settings, thresholds=r.thresholds)
    scanned = scan_model(request, progress, stage, weights=weights)
    identity = scanned.result.model.identity_sha256
    decision = _unscanned_policy(scanned.result.model, r.policy,  # the record; _finish warns
                                 apply_policy(scanned.result.verdict, identity, r.policy), [])
    scanned = dataclasses.replace(scanned, result=dataclasses.replace(
        scanned.result, policy=_policy_record(r.policy, decision, identity)))
    stage("rendering the reversed target")
    scanned = _render_images(dataclasses.replace(render_request, device=scanned.result.settings.device), scanned, r,
                             options.out, warnings)
    paths, result = write_outputs(scanned, options.out)
    if cache is not None and key is not None:
        written = [p.relative_to(options.out).as_posix() for p in paths.values() if p.is_file()]
        written += [i.path for i in result.reversed_target.images or ()]
        problem = cache.store(key, options.out, result, files=written)
        if problem:
            warnings.append(problem)
    return _finish(options, r, result, paths, warnings, env, cache_hit=False)


def _render_images(request, scanned, r: Resolved, out: Path, warnings: list[str]):
    """The scan with the reversed target's images and their notes in its result; a failing renderer is a
    warning. Images are evidence, not the verdict: a finding is never lost to a renderer.
    """
    from amdet_gate.render import render
    from amdet_gate.result import Image

    error = None
    try:
        renderings = render(request, scanned.target_feature, scanned.result.reversed_target, r.model.root,
                            r.model.subfolder, out, empty_feature=scanned.empty_feature)
    except Exception as exc:
        renderings = []
        warnings.append(f"rendering the reversed target failed: {one_line(exc, 300)}")
        error = warnings[-1]
    target = dataclasses.replace(
        scanned.result.reversed_target, render_error=error,
        images=tuple(Image(i.path, i.caption, i.renderer) for rd in renderings for i in rd.images),
        renderings=tuple(RenderingRecord(rd.renderer, rd.text, tuple(rd.notes), to_data(rd.metrics))
                         for rd in renderings),
        # What the report shows under the images: every renderer's notes, and its settings.
        notes=tuple(f"{rd.renderer}: {n}" for rd in renderings for n in rd.notes) + ((error,) if error else ()),
        metrics=to_data({f"{rd.renderer}.{k}": v for rd in renderings for k, v in rd.metrics.items()}))
    return dataclasses.replace(scanned, result=dataclasses.replace(scanned.result, reversed_target=target))


def _cache_hit(options: GateOptions, r: Resolved, stored: ScanResult, warnings: list[str],
               env: Mapping[str, str]) -> GateOutcome:
    """A verified cached result: same weights, anchor, policy, tool, seed and settings.

    When the same weights were reached under another name (path, revision), the result is
    relabelled and its reports re-rendered, so that the SARIF and the report name this model. A report
    format the entry has no file for (it was stored before the format existed) is rendered from it.
    """
    from amdet_gate.outputs import output_paths, write_reports, write_result
    from amdet_gate.report import formats

    paths = output_paths(options.out)
    result = dataclasses.replace(stored, cache_hit=True)
    named = r.model.describe()
    missing = [f.name for f in formats() if not paths[f.name].is_file()]
    if result.model.named() != named:
        result = dataclasses.replace(result, model=dataclasses.replace(result.model, **named))
        write_result(paths["result"], result)
        missing = [f.name for f in formats()]
    write_reports(result, options.out, {name: paths[name] for name in missing})
    return _finish(options, r, result, paths, warnings, env, cache_hit=True)


def _finish(options: GateOptions, r: Resolved, result: ScanResult, paths: dict[str, Path], warnings: list[str],
            env: Mapping[str, str], cache_hit: bool) -> GateOutcome:
    """Decide with the policy, copy reports where asked, append the job summary, write the lock."""
    from amdet_gate.outputs import append_step_summary, copy_reports
    from amdet_gate.report import JOB_SUMMARY_FORMAT

    decision = apply_policy(result.verdict, result.model.identity_sha256, r.policy)
    decision = _unscanned_policy(result.model, r.policy, decision, warnings)
    copy_reports(paths, options.reports)
    if options.lock is not None:
        from amdet_gate.lock import entry_from_result
        from amdet_gate.lock_sign import write_signed_lock

        write_signed_lock(options.lock, entry_from_result(_lock_view(result), options.model, options.revision), env)
    # Last: the job summary cannot be taken back, so nothing that can still fail comes after it.
    problem = append_step_summary(env, paths[JOB_SUMMARY_FORMAT].read_text("utf-8"))
    if problem:
        warnings.append(problem)
    return GateOutcome(dump(result), ExitCode(decision.exit_code), decision.note, paths, cache_hit, warnings,
                       scan_result=result, decision=decision)


def verify_model(model: str, lock: Path, revision: str | None = None, subfolder: str | None = None,
                 follow_symlinks: bool = False, require_signed: bool = False,
                 env: Mapping[str, str] | None = None) -> list[str]:
    """Problems that should stop a deployment: no lock entry, changed weights, a verdict not pass.

    A Hub model without --revision is fetched at the locked commit, so a moved branch cannot
    slip different weights under the locked identity.
    """
    from amdet_gate.lock import find_entry, verify_entry
    from amdet_gate.lock_sign import read_signed_lock

    signed = read_signed_lock(lock, os.environ if env is None else env, require_signed)
    if signed.problem is not None:  # an untrusted lock vouches for nothing
        return [signed.problem]
    entry = find_entry(signed.lock, model, subfolder)
    if entry is None:
        return [f"{lock} has no entry for {model}" + (f" (subfolder {subfolder})" if subfolder else "")]
    single_file = Path(model).is_file()  # a checkpoint file: the lock's subfolder names its encoder
    source = resolve_source(model, revision or entry.resolved_sha, None if single_file else subfolder,
                            follow_symlinks=follow_symlinks)
    if single_file:
        from amdet_gate.checkpoints.attach import EncoderOptions, attach

        source = attach(source, EncoderOptions(encoder=subfolder))
    problems = []
    if entry.resolved_sha and source.resolved_sha and source.resolved_sha != entry.resolved_sha:
        problems.append(f"{model} resolves to commit {source.resolved_sha}, the lock has {entry.resolved_sha}")
    weights = identify(source)
    if single_file and source.encoder is not None and source.encoder.identity(weights) == entry.identity_sha256:
        # An encoder of a multi-encoder file is locked under the file's sha256 and its name (docs/sources.md);
        # verify_entry recomputes the files' identity, which is what that name was added to.
        entry = dataclasses.replace(entry, identity_sha256=identity_sha256(weights))
    problems += verify_entry(entry, weights)
    if entry.verdict != "pass":
        problems.append(f"{model} was scanned with verdict {entry.verdict}, not pass")
    return problems


def _policy_record(policy: Policy, decision: PolicyDecision, identity: str) -> PolicyRecord:
    """What result.json records of the policy, with the line that names this model if any (for SARIF)."""
    line = next((a.line for a in policy.allow if a.sha256 == identity), None)
    return PolicyRecord(source=policy.source, sha256=policy.sha256, exit_code=int(decision.exit_code),
                        note=decision.note, model_line=line, on_unscanned=policy.on_unscanned,
                        allowed=decision.allowed, warn_only=decision.warn_only)


def _first(flag, fallback):
    return flag if flag is not None else fallback


# --- single-file checkpoints, multi-encoder models, LoRA (amdet_gate/checkpoints) ------------

def _targets(options: GateOptions) -> list[str]:
    """The text encoders this run scans ([] or one: a single scan, as before)."""
    from amdet_gate.checkpoints.attach import EncoderOptions, scan_targets

    return scan_targets(options.model, options.subfolder, EncoderOptions.of(options))


def _attach(model: ResolvedModel, options: GateOptions) -> ResolvedModel:
    from amdet_gate.checkpoints.attach import EncoderOptions, attach

    return attach(model, EncoderOptions.of(options))


def _encoder_identity(source: ResolvedModel) -> dict | None:
    return source.encoder.cache_identity() if source.encoder is not None else None


def _unscanned_policy(model: ModelIdentity, policy: Policy, decision: PolicyDecision,
                      warnings: list[str]) -> PolicyDecision:
    """A component that was not scanned (a T5) never passes silently: a warning, or with
    `on_unscanned: fail` a failing exit code."""
    from amdet_gate.multiscan import unscanned_policy

    return unscanned_policy(model, policy, decision, warnings)


def _lock_view(result: ScanResult) -> ScanResult:
    """An encoder of a checkpoint file is locked under its name (the lock's key is model + subfolder)."""
    model = result.model
    if model.details is not None and model.details.key_prefix is not None and len(model.details.encoders_in_model) > 1:
        return dataclasses.replace(result, model=dataclasses.replace(model, subfolder=model.encoder))
    return result
