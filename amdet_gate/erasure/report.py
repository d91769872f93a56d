"""What a repair writes about itself: `repair.json`, `repair.md` and the console lines.

The copy is labelled "repaired, re-verify before use", never "clean": an edit removes what
the scans found, and a later scan (or a real trigger nobody found) can still disagree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path

from amdet_gate.erasure.findings import Finding
from amdet_gate.erasure.measure import Fidelity, GateReading, TypedReading
from amdet_gate.erasure.plan import Corruption, Evidence, Plan, RepairSettings
from amdet_gate.outputs import write_json, write_text
from amdet_gate.report import json_safe
from amdet_gate.sanitise import md_text, one_line
from amdet_gate.settings import Thresholds
from amdet_gate.sources.identity import WeightFile, identity_sha256
from amdet_gate.version import __version__

REPAIR_SCHEMA_VERSION = "1.0"
LABEL = "repaired, re-verify before use"
METHOD = ("closed-form covariance-regularised key-to-value edit of MLP output weights (fc2), "
          "keys: MLP inputs of triggered prompts, values: the clean prompts' states")


class Status(StrEnum):
    REPAIRED = "repaired"  # the re-scan passes and clean fidelity holds: exit 0
    NOT_REPAIRED = "not_repaired"  # the copy is written, but the proof does not hold: exit 1


@dataclass(frozen=True)
class RoundRecord:
    number: int
    probes: tuple[str, ...]
    layers: tuple[int, ...]
    lam: float
    rescan_verdict: str
    rescan_score: float
    rescan_reason: str
    edit_s: float
    rescan_s: float


@dataclass(frozen=True)
class RepairRecord:
    status: Status
    exit_code: int
    reason: str
    model: str
    subfolder: str | None
    original: tuple[WeightFile, ...]
    repaired: tuple[WeightFile, ...]
    rewritten: tuple[str, ...]
    out: Path
    finding: Finding
    plan: Plan
    tried: tuple[Plan, ...]
    evidence: tuple[Evidence, ...]
    shares_after: tuple[float, ...]
    corruption: tuple[Corruption, ...]
    fidelity: Fidelity
    min_fidelity: float
    before: GateReading  # the pseudo-trigger's gates on the original
    after: GateReading  # ... and on the repaired copy
    typed_before: TypedReading | None  # the typed trigger's measures, when the finding has one
    typed_after: TypedReading | None
    thresholds: Thresholds
    rounds: tuple[RoundRecord, ...]
    rescan_folder: Path
    anchor: str | None
    settings: RepairSettings
    timings: dict[str, float]  # load_s, probes_s, edit_s, rescan_s, measure_s, total_s


def _plan(plan: Plan) -> dict:
    return {"layers": list(plan.layers), "lambda": plan.lam, "fidelity": round(plan.fidelity.value, 6),
            "margin": None if plan.margin is None else round(plan.margin, 6)}


def _identity(files: tuple[WeightFile, ...]) -> dict:
    return {"identity_sha256": identity_sha256(list(files)), "weight_files": [asdict(w) for w in files]}


def to_json(r: RepairRecord) -> dict:
    """repair.json's content: everything the summary says, and what it rests on."""
    f, last = r.finding, r.rounds[-1]
    gate_names = {"assimilation_ratio": r.thresholds.assimilation_ratio,
                  "same_target_ratio": r.thresholds.same_target_ratio,
                  "pooled_same_target_ratio": r.thresholds.pooled_same_target_ratio}
    return json_safe({
        "schema_version": REPAIR_SCHEMA_VERSION,
        "tool": {"name": "amdet-gate", "version": __version__},
        "label": LABEL,
        "status": r.status.value, "exit_code": r.exit_code, "reason": r.reason,
        "original": {"source": r.model, "subfolder": r.subfolder, **_identity(r.original)},
        "repaired": {"folder": str(r.out), "subfolder": r.subfolder, **_identity(r.repaired),
                     "rewritten_files": list(r.rewritten)},
        "finding": {"result": str(f.result_path), "schema_version": f.schema_version, "path": f.path.value,
                    "score": f.score, "same_target_share": f.share, "trigger_vectors": f.vectors},
        "edit": {"method": METHOD, "layers": list(r.plan.layers), "lambda": r.plan.lam,
                 "tensors": [f"encoder.layers.{e.layer}.mlp.fc2.weight" for e in r.plan.edits],
                 "per_layer": [{"layer": e.layer, "keys": e.keys, "residual_before": round(e.residual_before, 6),
                                "residual_after": round(e.residual_after, 6)} for e in r.plan.edits],
                 "anchor": r.anchor, "plans_tried": [_plan(p) for p in r.tried],
                 "probes": [{"name": e.probe.name, "kind": e.kind.value, "found_in": e.found_in,
                             "vectors": e.probe.vectors.shape[0], "attack_share_before": round(e.share_before, 6),
                             "attack_share_after": round(a, 6)}
                            for e, a in zip(r.evidence, r.shares_after, strict=True)]},
        "corruption": [asdict(c) for c in r.corruption],
        "fidelity": {"tokens": r.fidelity.tokens, "pooled": r.fidelity.pooled,
                     "worst_prompt": r.fidelity.worst_prompt, "value": r.fidelity.value,
                     "min_fidelity": r.min_fidelity, "held_out_prompts": r.settings.held_out_prompts},
        "pseudo_trigger_gates": {name: {"before": getattr(r.before, name), "after": getattr(r.after, name),
                                        "threshold": threshold} for name, threshold in gate_names.items()},
        "typed_trigger": None if r.typed_before is None or r.typed_after is None else {
            "token_ids": list(f.typed), "before": r.typed_before.as_dict(), "after": r.typed_after.as_dict(),
            "thresholds": {"same_target_ratio": r.thresholds.typed_same_target_ratio,
                           "pooled_same_target_ratio": r.thresholds.typed_pooled_same_target_ratio,
                           "variation_ratio": r.thresholds.typed_variation}},
        "rescan": {"verdict": last.rescan_verdict, "score": last.rescan_score, "reason": last.rescan_reason,
                   "identity_sha256": identity_sha256(list(r.repaired)),  # the pipeline checked the scan read it
                   "result": str(r.rescan_folder / "result.json"), "report": str(r.rescan_folder / "report.html")},
        "rounds": [asdict(x) for x in r.rounds],
        "settings": asdict(r.settings),
        "timings": dict(r.timings),
    })


def _gate_rows(data: dict) -> list[str]:
    rows = ["| gate | before | after | threshold |", "|---|---|---|---|"]
    for name, g in data["pseudo_trigger_gates"].items():
        rows.append(f"| pseudo-trigger {md_text(name)} | {g['before']:.3f} | {g['after']:.3f} | {g['threshold']} |")
    typed = data.get("typed_trigger")
    for name, threshold in (typed or {}).get("thresholds", {}).items():
        rows.append(f"| typed trigger {md_text(name)} | {typed['before'][name]:.3f} | {typed['after'][name]:.3f} "
                    f"| {threshold} |")
    return rows


def render_markdown(data: dict) -> str:
    """repair.md: the outcome first, then the evidence (untrusted strings escaped as in summary.md)."""
    ok = data["status"] == Status.REPAIRED
    fid, rescan = data["fidelity"], data["rescan"]
    lines = [
        f"## amdet-gate repair: {'✅' if ok else '❌'} {LABEL.upper() if ok else 'NOT REPAIRED'} "
        f"(exit {data['exit_code']})", "",
        f"**Model** {md_text(data['original']['source'])} → {md_text(data['repaired']['folder'])}", "",
        f"**Original sha256** `{data['original']['identity_sha256']}`", "",
        f"**Repaired sha256** `{data['repaired']['identity_sha256']}` ({LABEL}; never treat it as clean)", "",
        f"**Reason** {md_text(data['reason'], 400)}", "",
        f"**Edit** MLP output weights of layer(s) {', '.join(map(str, data['edit']['layers']))}, lambda "
        f"{data['edit']['lambda']}, {len(data['edit']['probes'])} probes, {len(data['rounds'])} round(s)", "",
        f"**Clean fidelity** {fid['value']:.4f} (tokens {fid['tokens']:.4f}, pooled {fid['pooled']:.4f}, worst prompt "
        f"{fid['worst_prompt']:.4f}; at least {fid['min_fidelity']})", "",
        f"**Re-scan** {md_text(rescan['verdict'])} (score {rescan['score']:.3f}): {md_text(rescan['reason'], 300)}", "",
        *_gate_rows(data), "",
    ]
    return "\n".join(lines) + "\n"


def write_reports(record: RepairRecord, path: Path) -> dict[str, Path]:
    """repair.json at `path` and repair.md beside it, each written atomically."""
    data = to_json(record)
    write_json(path, data)
    markdown = path.with_suffix(".md")
    write_text(markdown, render_markdown(data))
    return {"repair": path, "markdown": markdown, "rescan": record.rescan_folder / "result.json",
            "rescan_html": record.rescan_folder / "report.html"}


def console_lines(data: dict) -> list[str]:
    """The CLI's summary, one line each (untrusted names sanitised)."""
    fid, rescan = data["fidelity"], data["rescan"]
    head = "REPAIRED" if data["status"] == Status.REPAIRED else "NOT REPAIRED"
    lines = [f"{head} ({LABEL})  {one_line(data['original']['source'])} -> {one_line(data['repaired']['folder'])}",
             f"  reason: {one_line(data['reason'])}",
             f"  edit: layers {data['edit']['layers']}, lambda {data['edit']['lambda']}, "
             f"{len(data['edit']['probes'])} probes, {len(data['rounds'])} round(s)",
             f"  clean fidelity {fid['value']:.4f} (min {fid['min_fidelity']})",
             f"  re-scan: {rescan['verdict']} score {rescan['score']:.3f}"]
    for name, g in data["pseudo_trigger_gates"].items():
        lines.append(f"  pseudo-trigger {name:26s} {g['before']:.3f} -> {g['after']:.3f}  (threshold {g['threshold']})")
    typed = data.get("typed_trigger")
    for name, threshold in (typed or {}).get("thresholds", {}).items():
        lines.append(f"  typed trigger  {name:26s} {typed['before'][name]:.3f} -> {typed['after'][name]:.3f}  "
                     f"(threshold {threshold})")
    lines += [f"  original sha256 {data['original']['identity_sha256']}",
              f"  repaired sha256 {data['repaired']['identity_sha256']}",
              f"  report: {one_line(data['rescan']['report'])}"]
    return lines
