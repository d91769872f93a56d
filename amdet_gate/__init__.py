"""amdet-gate: a supply-chain gate that finds injected backdoors in CLIP-style text encoders.

The Python API, for registry promotion hooks and pre-deployment steps:

    import amdet_gate
    outcome = amdet_gate.scan("org/name", revision="<sha>", policy="policy.yaml", out="amdet-out")
    outcome.exit_code, outcome.result["verdict"], outcome.result["score"]
    problems = amdet_gate.verify("org/name", lock="amdet.lock")   # [] when the weights are the scanned ones

Both raise `amdet_gate.errors.GateError` (with `.exit_code`) when they cannot decide.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from amdet_gate.gate import GateOutcome


def scan(model: str, *, policy: str | Path | None = None, out: str | Path = "amdet-out", **options) -> GateOutcome:
    """Scan one model like `amdet-gate scan` (same options, as keyword arguments) and return the outcome."""
    from amdet_gate.errors import GateError
    from amdet_gate.gate import GateOptions, run_gate

    for name in ("sarif", "html", "markdown", "prompts", "vision", "lock", "cache_dir", "lora", "text_config",
                 "tokenizer"):
        if options.get(name) is not None:
            options[name] = Path(options[name])
    try:
        return run_gate(GateOptions(model=model, policy=Path(policy) if policy else None, out=Path(out), **options))
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
