"""What `repair` reads from a scan's outputs: the one place that knows their layout.

A scan's folder holds `result.json` and `pseudo_trigger.safetensors` (outputs.py). Both are
untrusted input: a result can be edited (a pass turned into a fail, another model's sha256
pasted in), a trigger file swapped. Everything here is size-capped, type-checked and reduced
to one `Finding`; every refusal is one line and exit 4 (a bad input, as a bad policy is).
A `fail` rests on a typed trigger (`confirmation`: real tokens whose collapse the scan
confirmed, verdict.decide); an earlier 1.x result without one on the pseudo-trigger's gates.
When the result schema changes, this module is what adapts; the edit and the pipeline only see
`Finding`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path, PurePosixPath

import torch
from safetensors.torch import load as load_safetensors

from amdet_gate.errors import UsageError
from amdet_gate.files import read_capped
from amdet_gate.outputs import read_result
from amdet_gate.result import ModelIdentity, Objective, ScanResult, StopReason, Verdict
from amdet_gate.sanitise import one_line
from amdet_gate.sources.identity import WeightFile, identity_sha256

MAX_TRIGGER_BYTES = 64 * 1024 * 1024  # R x K x d floats: a few hundred KiB at CLIP-L width
MAX_TRIGGER_VECTORS = 16
MAX_CANDIDATES = 64
SHA256 = re.compile(r"[0-9a-f]{64}")
TRIGGER_FILE = "pseudo_trigger.safetensors"
# The gates each detection path must have passed for its verdict to be `fail` (scanner._gates).
TOKEN_GATES = ("assimilation_ratio", "same_target_ratio", "landscape_positive_ratio")
POOLED_GATES = ("pooled_same_target_ratio",)


class DetectionPath(StrEnum):
    """Which of the scan's searches found the backdoor (method.md gates, or the pooled path)."""

    TOKEN = "token"
    POOLED = "pooled"


@dataclass(frozen=True)
class Finding:
    """A scan's detection, checked for consistency; tensors on the CPU, float32."""

    result_path: Path
    schema_version: str
    model_sha256: str  # the identity the scan recorded (sources.identity.identity_sha256)
    weight_files: tuple[WeightFile, ...]
    verdict: Verdict
    score: float
    path: DetectionPath
    share: float  # the finding's same-target share (typed trigger's, else the pseudo-trigger's), as reported
    trigger: torch.Tensor  # (K, d): the reported pseudo-trigger
    restarts: torch.Tensor  # (R, K, d): every restart's final pseudo-trigger (the reported one among them)
    candidate_tokens: tuple[int, ...]  # vocabulary ids near the trigger's vectors, nearest first
    typed: tuple[int, ...] = ()  # the typed trigger the verdict rests on (result.confirmation), if any
    pseudo_share: float | None = None  # the pseudo-trigger's reported same-target share on the finding's path

    @property
    def vectors(self) -> int:
        return self.trigger.shape[0]


def _bad(path: Path, what: str) -> UsageError:
    return UsageError(f"{path} is not a usable scan result: {what}")


def _weight_files(path: Path, model: ModelIdentity) -> tuple[WeightFile, ...]:
    files = []
    for item in model.weight_files:
        if not (SHA256.fullmatch(item.sha256) and item.size >= 0 and PurePosixPath(item.name).name == item.name):
            raise _bad(path, "model.weight_files holds an entry that is not a file name, sha256 and size")
        files.append(WeightFile(item.name, item.sha256, item.size))
    # The identity is derived from the files; a result whose two disagree was edited by hand.
    if identity_sha256(files) != model.identity_sha256:
        raise _bad(path, "model.identity_sha256 does not match its weight_files (tampered result)")
    return tuple(files)


def _gate_detection(path: Path, result: ScanResult) -> tuple[DetectionPath, float]:
    """Results without typed confirmation: the path whose pseudo-trigger gates all passed, and its
    same-target share; a `fail` without one is forged."""
    gates = result.gates
    pooled = result.pooled
    detected = DetectionPath.POOLED if pooled is not None and pooled.stop_reason is StopReason.DETECTED \
        else DetectionPath.TOKEN
    names = POOLED_GATES if detected is DetectionPath.POOLED else TOKEN_GATES
    anchor_gate = "pooled_anchor_difference_ratio" if detected is DetectionPath.POOLED else "anchor_difference_ratio"
    names += (anchor_gate,) if anchor_gate in gates.names else ()  # scanned with an anchor
    for name in names:
        gate = gates.get(name)
        if not (gate is not None and gate.value is not None and gate.passed and gate.value > gate.threshold):
            raise _bad(path, f"its verdict is fail but gate {name} did not pass (tampered result)")
    return detected, float(gates[names[0]].value)


def _typed_ids(path: Path, value: tuple[int, ...], vocab_size: int) -> tuple[int, ...]:
    if not (1 <= len(value) <= MAX_TRIGGER_VECTORS and all(0 <= i < vocab_size for i in value)):
        raise _bad(path, "confirmation.token_ids is not a short list of vocabulary ids")
    return value


def _typed_detection(path: Path, result: ScanResult, vocab_size: int) -> tuple[DetectionPath, float, tuple[int, ...]]:
    """Results with typed confirmation (scanner: the verdict rests on real tokens, verdict.decide):
    the typed search whose score is the result's score and above 0.5, its share and its tokens."""
    for objective, path_of in ((Objective.TOKENS, DetectionPath.TOKEN), (Objective.POOLED, DetectionPath.POOLED)):
        entry = next((e for e in result.confirmation or () if e.objective is objective), None)
        if entry is None or entry.score is None or not entry.score > 0.5:
            continue
        if path_of is DetectionPath.POOLED and result.anchor is None:
            # Without an anchor a pooled typed collapse is inconclusive (a classifier-like encoder does it).
            raise _bad(path, "its verdict is fail on a pooled typed trigger but it names no anchor (tampered result)")
        share = entry.same_target_ratio if path_of is DetectionPath.TOKEN else entry.pooled_same_target_ratio
        if abs(entry.score - result.score) > 1e-5 or share is None:
            raise _bad(path, "its score is not its typed trigger's score (tampered result)")
        return path_of, float(share), _typed_ids(path, entry.token_ids, vocab_size)
    raise _bad(path, "its verdict is fail but no typed trigger in confirmation scores above 0.5 (tampered result)")


def _candidates(result: ScanResult, vocab_size: int) -> tuple[int, ...]:
    """Vocabulary ids of the tokens nearest the pseudo-trigger, nearest first (`trigger_tokens`).

    Only ids inside the vocabulary are kept; texts are never needed here.
    """
    seen: list[int] = []
    for token in result.reversed_target.trigger_tokens:
        if 0 <= token.id < vocab_size and token.id not in seen:
            seen.append(token.id)
    return tuple(seen[:MAX_CANDIDATES])


def _trigger_file(result_path: Path, result: ScanResult) -> Path:
    """The pseudo-trigger file named by the result, which must be a plain file in the result's folder."""
    named = (result.artifacts or {}).get("pseudo_trigger", TRIGGER_FILE)
    if PurePosixPath(named).name != named:
        raise _bad(result_path, "artifacts.pseudo_trigger is not a file name in the result's folder")
    return result_path.parent / named


def _header_metadata(data: bytes) -> dict:
    """A safetensors file's `__metadata__` (the scan stamps its trigger file with the model's sha256)."""
    length = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    if not 2 <= length <= len(data) - 8:
        raise ValueError("no safetensors header")
    meta = json.loads(data[8 : 8 + length]).get("__metadata__") or {}
    return meta if isinstance(meta, dict) else {}


def _read_trigger(path: Path, result_path: Path, sha256: str, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    # The capped reader refuses a FIFO, a device, a folder and a file that resolves outside the result's folder.
    data = read_capped(path, MAX_TRIGGER_BYTES, "pseudo-trigger file", UsageError, inside=result_path.parent)
    try:
        meta = _header_metadata(data)
        tensors = load_safetensors(data)
    except Exception as exc:  # untrusted bytes: any failure is a bad input
        raise _bad(result_path, f"{path.name} is not a readable safetensors file ({type(exc).__name__})") from None
    if "pseudo_trigger" not in tensors:
        raise _bad(result_path, f"{path.name} has no pseudo_trigger tensor")
    trigger = tensors["pseudo_trigger"]
    restarts = tensors.get("all_restarts", trigger[None])
    # The scan stamps the trigger file with the model it belongs to: a swapped file shows here.
    if meta.get("model_sha256") != sha256 or meta.get("verdict") != Verdict.FAIL:
        raise _bad(result_path, f"{path.name} was written for another model or verdict (tampered result)")
    if not trigger.is_floating_point() or trigger.dim() != 2 or not 1 <= trigger.shape[0] <= MAX_TRIGGER_VECTORS \
            or trigger.shape[1] != width:
        raise _bad(result_path, f"pseudo_trigger has shape {list(trigger.shape)}; expected (K, {width}) with "
                   f"1 <= K <= {MAX_TRIGGER_VECTORS}")
    if not restarts.is_floating_point() or restarts.dim() != 3 or restarts.shape[1:] != trigger.shape \
            or restarts.shape[0] > 256:
        raise _bad(result_path, f"all_restarts has shape {list(restarts.shape)}; expected (R, {trigger.shape[0]}, "
                   f"{width})")
    trigger, restarts = trigger.float(), restarts.float()
    if not (torch.isfinite(trigger).all() and torch.isfinite(restarts).all()):
        raise _bad(result_path, "the pseudo-trigger holds NaN or infinite values")
    return trigger, restarts


def read_finding(result_path: Path, width: int, vocab_size: int) -> Finding:
    """The detection in a scan's `result.json` (and its pseudo-trigger file), checked.

    Refused (UsageError, exit 4): an unreadable or malformed result, a verdict other than
    `fail` (benign models are never repaired), a result whose identity, gates or trigger file
    disagree with each other, a pseudo-trigger of the wrong shape. Whether the result belongs
    to the model at hand is the caller's check (`check_identity`).
    """
    result_path = Path(result_path)
    result = read_result(result_path)
    path = result_path
    if result.verdict is not Verdict.FAIL:
        raise UsageError(f"{path} has verdict {result.verdict.value}, not fail: there is no detected backdoor to "
                         "repair (benign and undecided models are never repaired)")
    model = result.model
    sha = model.identity_sha256
    if not SHA256.fullmatch(sha):
        raise _bad(path, "model.identity_sha256 is not a sha256")
    files = _weight_files(path, model)
    if not result.score > 0.5:
        raise _bad(path, f"its verdict is fail but its score {result.score} is not above 0.5 (tampered result)")
    typed: tuple[int, ...] = ()
    if result.confirmation:
        detected, share, typed = _typed_detection(path, result, vocab_size)
    else:  # an earlier 1.x result: the pseudo-trigger's gates decided
        detected, share = _gate_detection(path, result)
    # What the pseudo-trigger itself reached: a swapped trigger file must reproduce it too.
    gate = result.gates.get("pooled_same_target_ratio" if detected is DetectionPath.POOLED else "same_target_ratio")
    pseudo_share = float(gate.value) if gate is not None and gate.value is not None else None
    trigger, restarts = _read_trigger(_trigger_file(path, result), path, sha, width)
    return Finding(result_path=path, schema_version=one_line(result.schema_version)[:20], model_sha256=sha,
                   weight_files=files, verdict=result.verdict, score=float(result.score), path=detected, share=share,
                   trigger=trigger, restarts=restarts, candidate_tokens=_candidates(result, vocab_size), typed=typed,
                   pseudo_share=pseudo_share)


def check_identity(finding: Finding, weights: list[WeightFile], model: str) -> None:
    """The result must be of these weights: same identity, same files (UsageError otherwise)."""
    actual = identity_sha256(weights)
    if actual != finding.model_sha256:
        raise UsageError(f"{finding.result_path} is the result of another model: it records sha256 "
                         f"{finding.model_sha256[:16]}..., {one_line(model)} has {actual[:16]}...")
    if {(w.name, w.sha256) for w in weights} != {(w.name, w.sha256) for w in finding.weight_files}:
        raise UsageError(f"{finding.result_path} lists other weight files than {one_line(model)} has")
