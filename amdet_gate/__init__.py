"""amdet-gate: a supply-chain gate that finds injected backdoors in CLIP-style text encoders.

The Python API, for registry promotion hooks and pre-deployment steps:

    import amdet_gate
    outcome = amdet_gate.scan("org/name", revision="<sha>", policy="policy.yaml", out="amdet-out")
    outcome.exit_code, outcome.result["verdict"], outcome.result["score"]   # result.json's data
    outcome.scan_result.verdict, outcome.decision.allowed                     # typed (amdet_gate.result)
    problems = amdet_gate.verify("org/name", lock="amdet.lock")   # [] when the weights are the scanned ones
    repaired = amdet_gate.repair("path/to/model", result="amdet-out/result.json", out="repaired")
    repaired.exit_code, repaired.status, repaired.report["rescan"]["verdict"]   # "repaired, re-verify before use"

All three raise `amdet_gate.errors.GateError` (with `.exit_code`) when they cannot decide.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from amdet_gate.version import __version__ as __version__  # the API reports it: amdet_gate.__version__

if TYPE_CHECKING:
    from amdet_gate.erasure.pipeline import RepairOutcome
    from amdet_gate.gate import GateOutcome


def scan(model: str, *, policy: str | Path | None = None, out: str | Path = "amdet-out", **options) -> GateOutcome:
    """Scan one model like `amdet-gate scan` (same options, as keyword arguments) and return the outcome."""
    from amdet_gate.errors import GateError
    from amdet_gate.gate import GateOptions, run_gate
    from amdet_gate.report import formats

    # A report copy is named as on the command line (sarif="amdet.sarif", junit=...), or given as reports={...}.
    reports = {name: Path(path) for name, path in (options.pop("reports", None) or {}).items() if path is not None}
    for fmt in formats():
        path = options.pop(fmt.name, None)
        if path is not None:
            reports[fmt.name] = Path(path)
    for name in ("prompts", "vision", "lock", "cache_dir", "lora", "text_config", "tokenizer"):
        if options.get(name) is not None:
            options[name] = Path(options[name])
    try:
        return run_gate(GateOptions(model=model, policy=Path(policy) if policy else None, out=Path(out),
                                    reports=reports, **options))
    except GateError:
        raise
    except Exception as exc:  # one error type for callers, so that a hook can fail closed on it
        raise GateError(f"internal error during the scan: {type(exc).__name__}: {str(exc)[:300]}") from exc


def verify(model: str, *, lock: str | Path = "amdet.lock", revision: str | None = None,
           subfolder: str | None = None, follow_symlinks: bool = False, require_signed: bool = False) -> list[str]:
    """Problems that should stop a deployment (empty when the weights are the ones scanned and passed)."""
    from amdet_gate.errors import GateError
    from amdet_gate.gate import verify_model

    try:
        return verify_model(model, Path(lock), revision, subfolder, follow_symlinks, require_signed)
    except GateError:
        raise
    except Exception as exc:
        raise GateError(f"cannot verify {model}: {type(exc).__name__}: {str(exc)[:300]}") from exc


def repair(model: str, *, result: str | Path, out: str | Path, **options) -> RepairOutcome:
    """Erase the backdoor a scan found (`result`), write the repaired copy to `out` and re-scan it,
    like `amdet-gate repair` (same options, as keyword arguments). `exit_code` is 0 only when the
    re-scan passes and clean fidelity holds; the copy is "repaired, re-verify before use", never clean."""
    from amdet_gate.errors import GateError

    for name in ("rescan_out", "policy", "prompts"):
        if options.get(name) is not None:
            options[name] = Path(options[name])
    try:
        from amdet_gate.erasure.pipeline import RepairRequest, run_repair

        return run_repair(RepairRequest(model=model, result=Path(result), out=Path(out), **options))
    except GateError:
        raise
    except Exception as exc:  # one error type for callers, as scan() does
        raise GateError(f"internal error during the repair: {type(exc).__name__}: {str(exc)[:300]}") from exc
