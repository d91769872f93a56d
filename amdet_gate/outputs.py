"""Write a scan's outputs into its folder: result.json and the artifacts.

  result.json                        the versioned result (everything the report shows)
  pseudo_trigger.safetensors         the reported pseudo-trigger and every restart's vector
  target_feature.safetensors         the recovered target feature (L x d)
  textual_inversion/learned_embeds.safetensors
                                     the pseudo-trigger as a textual-inversion token, loadable
                                     by diffusers' `load_textual_inversion`
  landscape.safetensors              the loss-landscape grid and Hessian eigenvalues
  result.sarif                       SARIF 2.1.0 for code scanning
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from safetensors.torch import save_file

from amdet_gate.errors import UsageError
from amdet_gate.sarif import scan_sarif
from amdet_gate.scan import Scan

TRIGGER_TOKEN = "<amdet-trigger>"


def _json_safe(value):
    """NaN/inf are not JSON; write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_outputs(scan: Scan, out_dir: Path, sarif_copy: Path | None = None) -> dict[str, Path]:
    """Write everything into `out_dir`; `sarif_copy` is a second place for the SARIF log (CI's)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "textual_inversion").mkdir(exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output folder {out_dir}: {exc.strerror}") from exc
    outcome = scan.outcome
    meta = {"tool": "amdet-gate", "model_sha256": scan.result.model["identity_sha256"],
            "verdict": scan.result.verdict}
    trigger = outcome.triggers[outcome.best_restart].clone()
    paths = {
        "result": out_dir / "result.json",
        "pseudo_trigger": out_dir / "pseudo_trigger.safetensors",
        "target_feature": out_dir / "target_feature.safetensors",
        "textual_inversion": out_dir / "textual_inversion" / "learned_embeds.safetensors",
        "landscape": out_dir / "landscape.safetensors",
        "sarif": out_dir / "result.sarif",
    }
    save_file({"pseudo_trigger": trigger, "all_restarts": outcome.triggers.contiguous()},
              paths["pseudo_trigger"], metadata=meta)
    save_file({"target_feature": scan.target_feature.contiguous()}, paths["target_feature"], metadata=meta)
    # diffusers reads a one-key state dict as {token: embedding}.
    save_file({TRIGGER_TOKEN: trigger[None].clone()}, paths["textual_inversion"], metadata=meta)
    land = outcome.landscape
    save_file({"offsets": land.offsets.contiguous(), "loss": land.loss.contiguous(),
               "eigenvalues": land.eigenvalues.contiguous()}, paths["landscape"], metadata=meta)
    result = _json_safe(scan.result.to_dict())
    result["artifacts"] = {k: str(p.relative_to(out_dir)) for k, p in paths.items() if k != "result"}
    write_json(paths["result"], result)
    sarif = scan_sarif(result)
    for path in (paths["sarif"], sarif_copy):
        if path is not None:
            write_json(path, sarif)
    return paths


def write_json(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_json_safe(data), indent=1, allow_nan=False) + "\n", "utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from exc
