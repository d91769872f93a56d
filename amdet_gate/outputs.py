"""Write a scan's outputs into its folder: result.json, the artifacts and the reports.

  result.json                        the versioned result (everything the reports show)
  pseudo_trigger.safetensors         the reported pseudo-trigger and every restart's vector
  target_feature.safetensors         the recovered target feature (L x d)
  textual_inversion/learned_embeds.safetensors
                                     the pseudo-trigger as a textual-inversion token, loadable
                                     by diffusers' `load_textual_inversion`
  landscape.safetensors              the loss-landscape grid and Hessian eigenvalues
  one file per report format         result.sarif, report.html, summary.md, report.junit.xml, ...
                                     (amdet_gate/report: the registry names them)
  images/                            the reversed target's rendered images
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from amdet_gate.errors import OutputError, UsageError
from amdet_gate.files import append_regular, read_capped, read_capped_text, write_atomic
from amdet_gate.report import formats, json_bytes
from amdet_gate.result import ResultError, ScanResult, dumps, from_dict
from amdet_gate.result.document import parse

if TYPE_CHECKING:
    from amdet_gate.scanner import Scan

TRIGGER_TOKEN = "<amdet-trigger>"
# The artifacts a scan writes beside result.json: name -> path in --out.
ARTIFACTS = {
    "pseudo_trigger": "pseudo_trigger.safetensors",
    "target_feature": "target_feature.safetensors",
    "textual_inversion": "textual_inversion/learned_embeds.safetensors",
    "landscape": "landscape.safetensors",
}


def output_paths(out_dir: Path) -> dict[str, Path]:
    """Every file a scan writes into --out, by name: the result, the artifacts, one per report format."""
    return {"result": out_dir / "result.json", **{name: out_dir / rel for name, rel in ARTIFACTS.items()},
            **{f.name: out_dir / f.file_name for f in formats()}}


def write_outputs(scan: Scan, out_dir: Path) -> tuple[dict[str, Path], ScanResult]:
    """Write the artifacts, result.json and the reports into `out_dir`, each file atomically; returns
    the paths and the result as written (with its `artifacts`).

    A failure part-way (a full disk) is an OutputError (exit 2); the caller removes what was
    written before it, so no verdict is left behind for a run that did not finish.
    """
    from safetensors.torch import save

    def save_file(tensors: dict, path: Path, metadata: dict[str, str]) -> None:
        write_atomic(path, save(tensors, metadata=metadata))

    outcome = scan.outcome
    meta = {"tool": "amdet-gate", "model_sha256": scan.result.model.identity_sha256,
            "verdict": str(scan.result.verdict)}
    trigger = outcome.triggers[outcome.best_restart].clone()
    paths = output_paths(out_dir)
    save_file({"pseudo_trigger": trigger, "all_restarts": outcome.triggers.contiguous()},
              paths["pseudo_trigger"], metadata=meta)
    save_file({"target_feature": scan.target_feature.contiguous()}, paths["target_feature"], metadata=meta)
    # diffusers reads a one-key state dict as {token: embedding}; a (K, d) embedding becomes
    # the K tokens "<amdet-trigger>", "<amdet-trigger>_1", ... that the token expands to.
    save_file({TRIGGER_TOKEN: trigger}, paths["textual_inversion"], metadata=meta)
    land = outcome.landscape
    save_file({"offsets": land.offsets.contiguous(), "loss": land.loss.contiguous(),
               "eigenvalues": land.eigenvalues.contiguous()}, paths["landscape"], metadata=meta)
    result = replace(scan.result, artifacts={k: str(p.relative_to(out_dir)) for k, p in paths.items()
                                             if k != "result"})
    write_result(paths["result"], result)
    write_reports(result, out_dir, {f.name: paths[f.name] for f in formats()})
    return paths, result


def write_reports(result: ScanResult, base_dir: Path, targets: Mapping[str, Path | None]) -> None:
    """Every report format asked for in `targets` (format name -> path), from a result; also what
    `amdet-gate report` re-renders. `base_dir` is where the result's image paths are relative to."""
    for fmt in formats():
        target = targets.get(fmt.name)
        if target is not None:
            write_atomic(target, fmt.render(result, base_dir))


def copy_reports(paths: Mapping[str, Path], targets: Mapping[str, Path | None]) -> None:
    """Copy the reports from the output folder to where the user asked for them (--sarif ...), atomically."""
    for name, target in targets.items():
        if target is None or target.resolve() == paths[name].resolve():
            continue
        write_atomic(target, read_capped(paths[name], MAX_RESULT_BYTES, name, UsageError))


MAX_RESULT_BYTES = 64 * 1024 * 1024


def read_result(path: Path) -> ScanResult:
    """A stored result.json (untrusted: size-capped, validated against schemas/result.schema.json);
    UsageError (exit 4) naming the file when it is not one."""
    text = read_capped_text(path, MAX_RESULT_BYTES, "result", UsageError)
    try:
        data = parse(text)
        if isinstance(data, dict) and data.get("kind") == "encoders":  # multiscan.py's summary of several encoders
            raise ResultError("summarises a model with several text encoders; re-render one encoder's own "
                              "result (its folder beside it, e.g. text_encoder_2/result.json)")
        return from_dict(data)
    except ResultError as exc:
        raise ResultError(f"{path}: {exc}") from None


def append_step_summary(env: Mapping[str, str], text: str) -> str | None:
    """Append to GitHub's job summary when $GITHUB_STEP_SUMMARY is set; a warning if that fails."""
    summary = env.get("GITHUB_STEP_SUMMARY")
    if not summary:
        return None
    try:
        append_regular(Path(summary), (text + "\n").encode("utf-8"))
    except OutputError as exc:
        return f"GITHUB_STEP_SUMMARY: {exc}"
    return None


def write_result(path: Path, result: ScanResult) -> None:
    """result.json, atomically: the one writer of a scan's result (schemas/result.schema.json)."""
    write_text(path, dumps(result))


def write_text(path: Path, text: str) -> None:
    write_atomic(path, text.encode("utf-8"))


def write_json(path: Path, data: dict) -> None:
    write_atomic(path, json_bytes(data))
