"""The scan pipeline: source -> encoder -> prompts -> search -> decision -> result.

Each stage is a small function with a narrow interface; `scan_model` strings them together
and `outputs.write_outputs` writes what it returns. No global state: everything a scan
depends on is in `ScanRequest`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import platform
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers

from amdet_gate.checkpoints.loader import load, tokenizer_of, wrap_anchor
from amdet_gate.confirm import NaturalSteering, natural_steering
from amdet_gate.encoders.base import LoadedEncoder
from amdet_gate.engine import (
    GateCheck,
    Models,
    PooledOutcome,
    SearchOutcome,
    SearchProgress,
    SearchSettings,
    Thresholds,
    precompute,
    search,
)
from amdet_gate.errors import LoadError, UsageError
from amdet_gate.prompts import builtin_prompts, read_prompt_file
from amdet_gate.result import (
    SCHEMA_VERSION,
    Check,
    Distributions,
    EncoderDetails,
    Environment,
    Gate,
    GateTable,
    Landscape,
    ModelIdentity,
    Natural,
    NearPrompt,
    NearToken,
    PooledSearch,
    Prompts,
    ScanResult,
    Search,
    Settings,
    Timings,
    Tool,
    WeightFileRecord,
)
from amdet_gate.result import (
    Confirmation as ConfirmationRecord,
)
from amdet_gate.result import (
    ReversedTarget as ReversedTargetRecord,
)
from amdet_gate.result.codec import from_data, to_data
from amdet_gate.reverse import ReversedTarget, reverse_target
from amdet_gate.sanitise import one_line
from amdet_gate.sources.files import check_contained, identities
from amdet_gate.sources.identity import WeightFile, identity_sha256
from amdet_gate.sources.model import ResolvedModel
from amdet_gate.token_search import Confirmation, confirm_outcome
from amdet_gate.tokenizer import PromptTokenizer
from amdet_gate.verdict import check_score, decide, is_typed_finding, margin, typed_score
from amdet_gate.version import __version__

RESULT_SCHEMA_VERSION = SCHEMA_VERSION  # the history of the versions: amdet_gate/result/document.py


@dataclass(frozen=True)
class ScanRequest:
    model: ResolvedModel | Path  # a path is a local folder (with `subfolder`)
    subfolder: str | None = None
    anchor: ResolvedModel | Path | None = None
    anchor_subfolder: str | None = None
    prompts_file: Path | None = None
    n_prompts: int = 4000
    held_out_fraction: float = 0.2
    device: str = "auto"
    settings: SearchSettings = field(default_factory=SearchSettings)
    thresholds: Thresholds = field(default_factory=Thresholds)
    inconclusive_band: float = 0.05


@dataclass(frozen=True)
class Scan:
    """The typed result (never changed: a later stage makes a new one with `dataclasses.replace`) and
    the tensors for the artifacts."""

    result: ScanResult
    outcome: SearchOutcome
    target_feature: torch.Tensor  # (L, d)
    empty_feature: torch.Tensor | None = None  # (L, d): the encoding of "", a diffusion renderer's negative


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise UsageError(f"--device {name!r}: use auto, cpu or cuda[:N]")
    return torch.device(name)


def as_source(model: ResolvedModel | Path, subfolder: str | None) -> ResolvedModel:
    return model if isinstance(model, ResolvedModel) else ResolvedModel(str(model), Path(model), subfolder)


def load_models(model: ResolvedModel, anchor_source: ResolvedModel | None, device: torch.device,
                weights: list[WeightFile] | None = None) -> tuple[LoadedEncoder, LoadedEncoder | None]:
    for source in (model, anchor_source):  # every file read resolves inside its folder (or --follow-symlinks)
        if source is not None:
            check_contained(source)
    suspect = load(model, weights)  # a plain folder, or an encoder of a checkpoint file or a pipeline, a LoRA
    if weights is not None and identities(model) != weights:
        # Hashed by the caller, then read here: the bytes scanned must be the bytes identified.
        raise LoadError(f"the weights in {model.folder} changed while they were being scanned")
    anchor = None
    if anchor_source is not None:
        anchor = wrap_anchor(load(anchor_source), model)  # read at the model's layer
        s, a = suspect.adapter, anchor.adapter
        if (s.hidden_size, s.seq_len) != (a.hidden_size, a.seq_len):
            raise UsageError(f"anchor width/positions {a.hidden_size}/{a.seq_len} differ from the "
                             f"model's {s.hidden_size}/{s.seq_len}; the anchor must share the architecture")
        check_anchor_is_another_model(suspect, anchor, tokenizer_of(model, suspect))
        anchor.adapter.to(device)
    suspect.adapter.to(device)
    return suspect, anchor


# Gate 3 asks "does the triggered output differ from a clean reference's?"; an anchor that is the
# model, or a near-copy of it, answers no for every trigger and passes any backdoor. The weight
# files' sha256 only catches a byte-identical copy: re-saving the same tensors with other metadata,
# order or key prefix, in another dtype, or with tiny noise, makes a new file. So the anchor is
# compared by what matters, its tensors and its outputs. ANCHOR_MIN_DIFFERENCE is measured by
# bench/anchor_similarity.py on the 128-wide, 4-layer controls (docs/supply-chain.md): a backdoored
# student re-saved is 0, in fp16 0.0005, in bf16 0.004, with 1e-2 relative weight noise 0.017;
# the clean base as the anchor of a backdoored student is 0.053 to 0.54. A benign distillation
# that barely moved from its base (0.005) is refused too: an anchor that close tells gate 3 nothing.
ANCHOR_PROBE_PROMPTS = 32
ANCHOR_MIN_DIFFERENCE = 0.02


def check_anchor_is_another_model(suspect: LoadedEncoder, anchor: LoadedEncoder, tokenizer: PromptTokenizer) -> None:
    """UsageError (exit 4) for an anchor with the model's tensors, or with outputs near-identical to its
    outputs on the probe prompts (ANCHOR_MIN_DIFFERENCE)."""
    if same_tensors(suspect, anchor):
        raise UsageError("the anchor has the same tensors as the model (a re-saved or renamed copy); give a "
                         "clean reference encoder")
    ids = probe_ids(tokenizer, suspect)
    difference = anchor_output_difference(suspect, anchor, ids, tokenizer.tokenizer.eos_token_id)
    if difference < ANCHOR_MIN_DIFFERENCE:
        raise UsageError(f"the anchor's outputs differ from the model's by {difference:.4f} on "
                         f"{ANCHOR_PROBE_PROMPTS} probe prompts (below {ANCHOR_MIN_DIFFERENCE}): a near-copy of the "
                         "model cannot be its clean reference; give another encoder")


def same_tensors(first: LoadedEncoder, second: LoadedEncoder) -> bool:
    """Every tensor equal under the same name (names as loaded: file metadata, order, key prefix and
    the dtype of an exactly representable copy do not matter)."""
    a, b = first.adapter.model.state_dict(), second.adapter.model.state_dict()
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def probe_ids(tokenizer: PromptTokenizer, encoder: LoadedEncoder) -> torch.Tensor:
    """A fixed, evenly spaced sample of the built-in prompts, tokenized for the model."""
    prompts = builtin_prompts()
    step = len(prompts) // ANCHOR_PROBE_PROMPTS
    return tokenize(tokenizer, prompts[::step][:ANCHOR_PROBE_PROMPTS], encoder)


def anchor_output_difference(suspect: LoadedEncoder, anchor: LoadedEncoder, ids: torch.Tensor,
                             eos_token_id: int) -> float:
    """Median over prompts of |F_model - F_anchor| / |F_model| on the final-layer token features, over
    each prompt's positions up to its first EOS (what the prompt says, not the padding)."""
    with torch.no_grad():
        model_features = suspect.adapter.encode(suspect.adapter.embed(ids))
        anchor_features = anchor.adapter.encode(anchor.adapter.embed(ids))
    first_eos = (ids == eos_token_id).int().argmax(dim=1)
    mask = (torch.arange(ids.shape[1])[None, :] <= first_eos[:, None]).unsqueeze(-1).float()
    difference = ((model_features - anchor_features) * mask).flatten(1).norm(dim=1)
    scale = (model_features * mask).flatten(1).norm(dim=1).clamp_min(1e-12)
    return float((difference / scale).median())


def split_prompts(prompts: list[str], n: int, held_out_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded shuffle of the sorted prompt list, then optimisation / held-out split."""
    if n < 20:
        raise UsageError("at least 20 prompts are needed")
    ordered = sorted(prompts)
    random.Random(seed).shuffle(ordered)
    chosen = ordered[: min(n, len(ordered))]
    held = max(10, round(len(chosen) * held_out_fraction))
    return chosen[held:], chosen[:held]


# A tokenizer that does not fit the model turns every prompt into (nearly) the same ids; the
# encoder's outputs then agree on every prompt and look like a collapse onto one target: a benign
# model reads as backdoored (a 10-token vocabulary gave FAIL 0.899). Such a tokenizer is an error,
# never a verdict. Limits: the real CLIP BPE keeps all 5,000 built-in prompts distinct and knows
# every word of them; a prompt file whose lines differ only in case or punctuation stays far above.
MIN_DISTINCT_SHARE = 0.5  # distinct id sequences per distinct prompt
MAX_EMPTY_SHARE = 0.5  # prompts with no token between BOS and EOS, or only unknown tokens
MIN_VOCAB_SHARE = 0.5  # the tokenizer's size against the model's vocabulary
TOKENIZER_CHECK_MIN_PROMPTS = 10  # the checks need a corpus; one prompt ("" for the renderer) is not one


def tokenize(tokenizer: PromptTokenizer, prompts: list[str], encoder: LoadedEncoder) -> torch.Tensor:
    ids = tokenizer(prompts, encoder.adapter.seq_len)
    vocab = encoder.config["vocab_size"]
    if int(ids.max()) >= vocab:
        raise LoadError(f"tokenizer produces id {int(ids.max())} but the model's vocabulary has {vocab} entries")
    if not (ids == tokenizer.tokenizer.eos_token_id).any(dim=1).all():
        raise LoadError("the tokenizer does not end every prompt with its EOS token")
    if len(prompts) >= TOKENIZER_CHECK_MIN_PROMPTS:
        check_tokenizer_fits(tokenizer, prompts, ids, vocab)
    return ids


def check_tokenizer_fits(tokenizer: PromptTokenizer, prompts: list[str], ids: torch.Tensor, vocab: int) -> None:
    """LoadError (exit 2) for a tokenizer that lacks the model's vocabulary or maps most distinct
    prompts to the same ids: what the scan would see is the tokenizer, not the model."""
    size = getattr(tokenizer, "vocab_size", vocab)
    if size < MIN_VOCAB_SHARE * vocab:
        raise LoadError(f"the tokenizer has {size} tokens but the model's vocabulary has {vocab}: it is not this "
                        "model's tokenizer (a scan with it would measure the tokenizer, not the model)")
    eos = tokenizer.tokenizer.eos_token_id
    unk = getattr(tokenizer.tokenizer, "unk_token_id", None)
    first_eos = (ids == eos).int().argmax(dim=1)
    distinct_prompts = len(set(prompts))  # what each prompt says: its ids up to the first EOS
    distinct_ids = len({tuple(row[: int(end) + 1]) for row, end in zip(ids.tolist(), first_eos, strict=True)})
    content = torch.arange(ids.shape[1])[None, :].lt(first_eos[:, None]) & torch.arange(ids.shape[1])[None, :].ge(1)
    known = content & (ids != unk) if unk is not None else content
    empty = float((known.sum(dim=1) == 0).float().mean())
    if empty > MAX_EMPTY_SHARE:
        raise LoadError(f"the tokenizer finds no known token in {empty:.0%} of the prompts: it lacks the "
                        "vocabulary of this model")
    if distinct_ids < MIN_DISTINCT_SHARE * distinct_prompts:
        raise LoadError(f"the tokenizer maps {distinct_prompts} distinct prompts to {distinct_ids} distinct id "
                        "sequences: it does not fit this model (broken or foreign vocabulary), or the prompts "
                        "differ only in case, spacing or punctuation")


def _identity(enc: LoadedEncoder, source: ResolvedModel) -> ModelIdentity:
    identity = (source.encoder.identity(enc.weight_files) if source.encoder is not None
                else identity_sha256(enc.weight_files))
    return ModelIdentity(
        **source.describe(), identity_sha256=identity, architecture=enc.architecture, config=to_data(enc.config),
        weight_files=tuple(WeightFileRecord(w.name, w.sha256, w.size) for w in enc.weight_files),
        # which encoder, layer and config, the LoRA (amdet_gate/checkpoints)
        details=from_data(EncoderDetails, to_data(enc.details)) if enc.details else None)


def environment(device: torch.device) -> Environment:
    return Environment(
        python=platform.python_version(), platform=platform.platform(), torch=torch.__version__,
        transformers=transformers.__version__, device=str(device),
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None, threads=torch.get_num_threads())


def scan_model(request: ScanRequest, progress: SearchProgress | None = None,
               stage: Callable[[str], None] = lambda name: None, weights: list[WeightFile] | None = None) -> Scan:
    """Run the whole scan and return the result (nothing is written here).

    `weights`: the model's weight identities when the caller has hashed them already.
    """
    t0 = time.monotonic()
    deadline = t0 + request.settings.time_budget_s
    torch.manual_seed(request.settings.seed)
    device = pick_device(request.device)

    stage("loading model")
    model = as_source(request.model, request.subfolder)
    anchor_source = None if request.anchor is None else as_source(request.anchor, request.anchor_subfolder)
    suspect, anchor = load_models(model, anchor_source, device, weights)
    tokenizer = tokenizer_of(model, suspect)
    # Where EOS sits in the ids is the tokenizer's business: Stable Diffusion 1.x configs still
    # carry the legacy eos_token_id 2, which is not their vocabulary's end-of-text token.
    for enc in (suspect, anchor):
        if enc is not None:
            enc.adapter.eos_token_id = tokenizer.tokenizer.eos_token_id
    t_load = time.monotonic()

    stage("preparing prompts")
    prompts = read_prompt_file(request.prompts_file) if request.prompts_file else builtin_prompts()
    opt_prompts, held_prompts = split_prompts(prompts, request.n_prompts, request.held_out_fraction,
                                              request.settings.seed)
    chunk = request.settings.chunk_size
    with torch.no_grad():
        opt = precompute(suspect.adapter, tokenize(tokenizer, opt_prompts, suspect), chunk, clean=False)
        held = precompute(suspect.adapter, tokenize(tokenizer, held_prompts, suspect), chunk)
    t_pre = time.monotonic()

    stage("searching for a pseudo-trigger")
    models = Models(suspect.adapter, anchor.adapter if anchor else None)
    outcome = search(models, opt, held, request.settings, request.thresholds, progress, deadline)
    tok = tokenizer.tokenizer
    specials = {i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if i is not None}
    stage("measuring how far ordinary words steer the model")
    natural = natural_steering(models, held, request.thresholds, specials, chunk, seed=request.settings.seed,
                               span=request.settings.span_measures)
    stage("confirming with typed tokens")
    typed = confirm_outcome(models, opt, held, outcome, natural, specials, request.settings, request.thresholds,
                            decisive=lambda c: is_typed_finding(c, request.thresholds))
    decision = decide(outcome, request.thresholds, request.inconclusive_band, natural,
                      decisive_steps(request.settings, len(opt)), typed, lambda ids: tok.decode(list(ids)))
    t_search = time.monotonic()

    stage("reversing the target")
    target = outcome.held_out.mean_feature[0]
    reversed_target = reverse_target(outcome.triggers[outcome.best_restart], target, held, held_prompts,
                                     suspect.adapter.token_embedding.detach(), tokenizer, specials)
    t_end = time.monotonic()

    result = ScanResult(
        schema_version=RESULT_SCHEMA_VERSION,
        tool=Tool("amdet-gate", __version__),
        model=dataclasses.replace(_identity(suspect, model), tokenizer=tokenizer.source),
        anchor=_identity(anchor, anchor_source) if anchor and anchor_source else None,
        settings=Settings(search=to_data(asdict(request.settings)), thresholds=to_data(asdict(request.thresholds)),
                          inconclusive_band=request.inconclusive_band, device=str(device)),
        prompts=_prompt_summary(request, opt_prompts, held_prompts),
        verdict=decision.verdict,
        score=round(decision.score, 6),
        reason=decision.reason,
        gates=_gates(outcome, request.thresholds),
        search=_search_summary(outcome, request.thresholds),
        reversed_target=_reversed(reversed_target),
        distributions=Distributions(
            clean_assimilation=_floats(outcome.clean_assimilation),
            triggered_assimilation=_floats(outcome.held_out.assimilation[0]),
            same_target_similarity=_floats(outcome.held_out.same_target[0]),
            anchor_similarity=(None if outcome.held_out.anchor_similarity is None
                               else _floats(outcome.held_out.anchor_similarity[0]))),
        landscape=Landscape(offsets=_floats(outcome.landscape.offsets),
                            loss=tuple(_floats(row) for row in outcome.landscape.loss),
                            eigenvalues=_floats(outcome.landscape.eigenvalues)),
        timings=Timings(load_s=round(t_load - t0, 3), precompute_s=round(t_pre - t_load, 3),
                        search_s=round(t_search - t_pre, 3), reverse_s=round(t_end - t_search, 3),
                        total_s=round(t_end - t0, 3)),
        environment=environment(device),
        pooled=_pooled_summary(outcome.pooled, request.thresholds),
        natural=_natural_summary(natural, tokenizer),
        confirmation=tuple(_confirmation_summary(c, request.thresholds, tokenizer) for c in typed.values()),
    )
    with torch.no_grad():
        empty = suspect.adapter.encode(suspect.adapter.embed(tokenize(tokenizer, [""], suspect).to(device)))[0]
    return Scan(result, outcome, target, empty.cpu())


def decisive_steps(settings: SearchSettings, optimisation_prompts: int) -> int:
    """Steps a search must run before it may pass: `min_decisive_steps`, or two epochs over the
    optimisation prompts (the reference's budget) when that is fewer."""
    return min(settings.min_decisive_steps, math.ceil(2 * optimisation_prompts / settings.batch_size))


def _floats(t: torch.Tensor) -> tuple[float, ...]:
    return tuple(round(float(x), 6) for x in t.flatten())


def _prompt_summary(request: ScanRequest, opt: list[str], held: list[str]) -> Prompts:
    digest = hashlib.sha256("\n".join(opt + held).encode()).hexdigest()
    return Prompts(str(request.prompts_file) if request.prompts_file else "builtin", len(opt), len(held), digest)


def _gates(outcome: SearchOutcome, t: Thresholds) -> GateTable:
    """The reported check's gates (the detection, else the final check), against thresholds,
    and the pooled path's gates when it ran; the check's mean assimilation beside them."""
    reported = [outcome.detected.gates if outcome.detected else outcome.final_gates]
    if outcome.pooled is not None:
        reported.append(outcome.pooled.gates)
    rows: dict[str, Gate] = {}
    for gates in reported:
        passed = gates.passed(t)
        rows |= {name: Gate(name=name, value=value, threshold=threshold, passed=passed[name],
                            margin=round(margin(value, threshold), 6))
                 for name, (value, threshold) in gates.measured(t).items()}
    return GateTable(tuple(rows.values()), reported[0].mean_assimilation)


def _reversed(target: ReversedTarget) -> ReversedTargetRecord:
    def near(tokens) -> tuple[NearToken, ...]:
        return tuple(NearToken(id=n.id, token=n.token, text=n.text, cosine=n.cosine, position=n.position)
                     for n in tokens)

    return ReversedTargetRecord(trigger_vectors=target.trigger_vectors, trigger_tokens=near(target.trigger_tokens),
                                target_tokens=near(target.target_tokens),
                                target_prompts=tuple(NearPrompt(p.prompt, p.similarity) for p in target.target_prompts))


def _pooled_summary(pooled: PooledOutcome | None, t: Thresholds) -> PooledSearch | None:
    if pooled is None:
        return None
    return PooledSearch(steps=pooled.steps, stop_reason=pooled.stop_reason, detected_at_step=pooled.detected_at_step,
                        best_restart=pooled.best_restart, score=check_score(pooled.gates, t),
                        seconds=round(pooled.seconds, 3), similarity=_floats(pooled.similarity),
                        variation_ratio=pooled.gates.variation_ratio,
                        loss_history=tuple(_floats(row) for row in pooled.loss_history))


def _check(c: GateCheck, t: Thresholds) -> Check:
    return Check(step=c.step, restart=c.restart, running_loss=c.running_loss, score=check_score(c.gates, t),
                 **asdict(c.gates))


def _search_summary(outcome: SearchOutcome, t: Thresholds) -> Search:
    return Search(
        steps=outcome.steps,
        stop_reason=outcome.stop_reason,
        best_restart=outcome.best_restart,
        detected_at_step=outcome.detected.step if outcome.detected else None,
        checks=tuple(_check(c, t) for c in outcome.checks),
        loss_history=tuple(_floats(row) for row in outcome.loss_history),
        trigger_norms=_floats(outcome.triggers.flatten(1).norm(dim=1)),
        variation_ratio=outcome.final_gates.variation_ratio,
    )


def _confirmation_summary(confirmation: Confirmation, t: Thresholds,
                          tokenizer: PromptTokenizer) -> ConfirmationRecord:
    found = confirmation.trigger
    return ConfirmationRecord(
        objective=confirmation.objective, token_ids=tuple(found.ids),
        text=one_line(tokenizer.tokenizer.decode(list(found.ids))), score=typed_score(confirmation, t),
        same_target_ratio=found.same_target_ratio, assimilation_ratio=found.assimilation_ratio,
        variation_ratio=found.variation_ratio, pooled_same_target_ratio=found.pooled_same_target_ratio,
        pooled_variation_ratio=found.pooled_variation_ratio, screened_on=found.screened_on,
        search_loss=confirmation.search_loss, seconds=round(confirmation.seconds, 3))


def _natural_summary(natural: NaturalSteering, tokenizer: PromptTokenizer) -> Natural:
    strongest = max(natural.words, key=lambda w: w.pooled_same_target_ratio, default=None)
    word = None if strongest is None else one_line(tokenizer.tokenizer.decode(list(strongest.ids)))
    return Natural(words=len(natural.words), prompts=natural.words[0].screened_on if natural.words else 0,
                   token_variation_ratio=natural.token_variation, pooled_same_target_ratio=natural.pooled_share,
                   pooled_variation_ratio=natural.pooled_variation,
                   strongest_word=word)
