"""What one gate run is asked (GateOptions) and what it answers (GateOutcome).

Below both gate.py, which runs one model, and multiscan.py, which runs it once per text encoder:
each imports these from here, so neither has to import the other's module for its types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from amdet_gate.errors import ExitCode
from amdet_gate.result import PolicyDecision, ScanResult


@dataclass
class GateOptions:
    """What one scan is asked to do; None means: take it from the policy (then the default)."""

    model: str
    revision: str | None = None
    subfolder: str | None = None
    anchor: str | None = None
    anchor_revision: str | None = None
    anchor_subfolder: str | None = None
    policy: Path | None = None
    prompts: Path | None = None
    n_prompts: int | None = None
    out: Path = Path("amdet-out")
    reports: dict[str, Path] = field(default_factory=dict)  # copies of the reports: format name -> path (--sarif)
    seed: int | None = None
    restarts: int | None = None
    max_steps: int | None = None
    time_budget: float | None = None
    device: str | None = None
    thresholds: dict[str, float] = field(default_factory=dict)
    render: str = "auto"
    pipeline: str | None = None  # a Stable Diffusion pipeline folder or Hub id
    pipeline_revision: str | None = None
    vision: Path | None = None
    render_steps: int | None = None
    lock: Path | None = None
    use_cache: bool = True
    cache_dir: Path | None = None
    follow_symlinks: bool = False  # model files may resolve outside the model folder
    # Single-file checkpoints, multi-encoder models, LoRA (amdet_gate/checkpoints, docs/sources.md).
    encoder: str | None = None  # --encoder: one of the model's text encoders
    layer: str | None = None  # --layer final|-N (default: what the model's family reads)
    text_config: Path | None = None  # --config: the encoder's config.json, for a single-file checkpoint
    tokenizer: Path | None = None  # --tokenizer FOLDER
    lora: Path | None = None  # --lora: merged into the base before the scan
    lora_scale: float | None = None


@dataclass
class GateOutcome:
    result: dict  # result.json's content (the public API's view; `scan_result` is the typed one)
    exit_code: ExitCode
    note: str  # what the policy did, if anything ("allowed by ...", "reported as a warning")
    paths: dict[str, Path]
    cache_hit: bool = False
    warnings: list[str] = field(default_factory=list)
    encoder_runs: list = field(default_factory=list)  # a model of several text encoders: each one's run
    scan_result: ScanResult | None = None  # the typed result (None for the summary of several encoders)
    decision: PolicyDecision | None = None  # the policy's decision (None for the summary of several encoders)
