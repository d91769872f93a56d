"""The layer over the model sources (amdet_gate/sources): which encoder of a resolved model one scan reads.

A source kind resolves a spec to files on disk; a single-file checkpoint, a diffusers pipeline or an
OpenCLIP folder holds several encoders (or a plain folder is read with --layer, --lora, ...), and this
refines the resolved model into one of them by setting its `EncoderRef` (torch-free):

  scan_targets(options)    which encoders one `scan` runs: [] for the plain single-folder case,
                           else their names (several: one scan each, multiscan.py)
  attach(source, options)  the ResolvedModel of one encoder, with its EncoderRef

Its files and identities are then the sources' (sources/files.py); loading it is loader.py's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from amdet_gate.checkpoints.inventory import Inventory, inventory, select
from amdet_gate.checkpoints.layer import choose
from amdet_gate.errors import UsageError
from amdet_gate.sanitise import one_line
from amdet_gate.sources.selection import EncoderRef, LoraRef

if TYPE_CHECKING:
    from amdet_gate.sources.model import ResolvedModel


@dataclass(frozen=True)
class EncoderOptions:
    """The scan flags this package adds (CLI and GateOptions)."""

    encoder: str | None = None
    layer: str | None = None
    config: Path | None = None
    tokenizer: Path | None = None
    lora: Path | None = None
    lora_scale: float | None = None

    @classmethod
    def of(cls, options: object) -> EncoderOptions:
        return cls(*(getattr(options, f"{name}", None) for name in
                     ("encoder", "layer", "text_config", "tokenizer", "lora", "lora_scale")))

    @property
    def plain(self) -> bool:
        return all(v is None for v in (self.encoder, self.layer, self.config, self.tokenizer, self.lora,
                                       self.lora_scale))


def _local(spec: str, subfolder: str | None) -> Path | None:
    path = Path(spec)
    return path if path.exists() and not subfolder else None


def scan_targets(spec: str, subfolder: str | None, opts: EncoderOptions) -> list[str]:
    """The encoders a scan of `spec` runs, by name; [] when it is one encoder folder (or a Hub id)."""
    _check(opts)
    path = _local(spec, subfolder)
    if path is None:
        return []
    inv = inventory(path)
    if inv.kind == "folder":
        if opts.encoder is not None:
            raise UsageError(f"--encoder: {one_line(spec)} is a single text encoder (no pipeline, no checkpoint file)")
        return []
    names = select(inv, opts.encoder)
    if len(names) > 1:
        for flag, value in (("--config", opts.config), ("--tokenizer", opts.tokenizer)):
            if value is not None:
                raise UsageError(f"{flag} describes one encoder but {one_line(spec)} has {len(names)} "
                                 f"({', '.join(names)}): pass --encoder NAME")
    return names


def _check(opts: EncoderOptions) -> None:
    choose(opts.layer, None)  # a bad --layer is refused before anything is read
    if opts.lora_scale is not None and (not math.isfinite(opts.lora_scale) or opts.lora is None):
        raise UsageError("--lora-scale needs --lora and a finite number")
    for flag, path in (("--lora", opts.lora), ("--config", opts.config)):
        if path is not None and not Path(path).is_file():
            raise UsageError(f"{flag} {one_line(path)}: no such file")
    if opts.tokenizer is not None and not Path(opts.tokenizer).is_dir():
        raise UsageError(f"--tokenizer {one_line(opts.tokenizer)}: no such folder")


def attach(source: ResolvedModel, opts: EncoderOptions) -> ResolvedModel:
    """`source` with the EncoderRef of the one encoder it names (`opts.encoder`, or its only one)."""
    _check(opts)
    local = not source.hub_id
    inv = inventory(source.root) if local and not source.subfolder else None
    lora = LoraRef(Path(opts.lora), 1.0 if opts.lora_scale is None else float(opts.lora_scale)) if opts.lora else None
    common = {"config": opts.config, "tokenizer": opts.tokenizer, "lora": lora}
    if inv is None or inv.kind == "folder":
        pipeline = _pipeline_of(source) if local and source.subfolder else None
        if opts.plain and pipeline is None:
            return source  # the plain case: exactly as before this package existed
        name = source.subfolder.strip("/") if source.subfolder else None
        layer = choose(opts.layer, pipeline.pipeline_layer if pipeline else None)
        ref = EncoderRef(name, layer, layout="pipeline" if pipeline else None,
                         layout_title=pipeline.title if pipeline else None,
                         not_scanned=pipeline.unscanned if pipeline else (),
                         encoders_in_model=tuple(pipeline.names) if pipeline else (), **common)
        return replace(source, encoder=ref)
    (name,) = select(inv, opts.encoder) if opts.encoder or len(inv.names) == 1 else _one(inv)
    if inv.kind == "pipeline":
        layer = choose(opts.layer, inv.pipeline_layer)
        ref = EncoderRef(name, layer, layout="pipeline", layout_title=inv.title, not_scanned=inv.unscanned,
                         encoders_in_model=tuple(inv.names), **common)
        return replace(source, subfolder=name, encoder=ref)
    part = next(p for p in inv.parts if p.name == name)
    ref = EncoderRef(name, choose(opts.layer, part.layer), part, inv.layout, inv.title, not_scanned=inv.unscanned,
                     encoders_in_model=tuple(inv.names), **common)
    return replace(source, root=inv.path, encoder=ref)


def _one(inv: Inventory) -> list[str]:
    raise UsageError(f"{one_line(inv.path)} has {len(inv.names)} text encoders ({', '.join(inv.names)}): pass "
                     "--encoder NAME to scan one of them")


def _pipeline_of(source: ResolvedModel) -> Inventory | None:
    """The pipeline a --subfolder scan is inside (for its layer and its unscanned parts), if any."""
    if not (source.root / "model_index.json").is_file():
        return None
    try:
        return inventory(source.root)
    except Exception:  # the pipeline's own problems are not this subfolder scan's
        return None
