"""What a model given to `scan` holds: its text encoders and its parts that cannot be scanned (torch-free).

- a safetensors file: its layout, recognised from the header alone (parts.layouts());
- a diffusers pipeline folder (model_index.json): its text_encoder* subfolders;
- an OpenCLIP folder (open_clip_config.json + open_clip_model.safetensors): that file;
- anything else: a single-encoder folder, as before.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from amdet_gate.checkpoints.layouts import layouts
from amdet_gate.checkpoints.lora import base_hint, looks_like_lora, plan_lora
from amdet_gate.checkpoints.parts import Keys, Match
from amdet_gate.errors import LoadError, PickleRefused, UnsupportedModel, UsageError
from amdet_gate.safetensors_header import Header, read_header
from amdet_gate.sanitise import one_line
from amdet_gate.sources.local import PICKLE_SUFFIXES, read_small
from amdet_gate.sources.selection import EncoderPart, LayerChoice, Unscanned

OPEN_CLIP_FILE, OPEN_CLIP_CONFIG = "open_clip_model.safetensors", "open_clip_config.json"
# Where text encoders live in the layouts we know: a tensor under one of these that no encoder of the
# recognised layout claims is refused (a file with an encoder we would silently skip is not scanned).
TEXT_ROOTS = ("cond_stage_model.", "conditioner.embedders.", "text_encoders.", "clip_l.", "clip_g.", "t5xxl.")
_ENCODER_NAME = re.compile(r"text_encoder(_\d)?")
CLIP_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
# What each diffusers pipeline feeds its denoiser (layer.py); any other pipeline: the final layer.
PIPELINE_LAYERS = {"StableDiffusionXLPipeline": (-2, "SDXL"), "StableDiffusionXLImg2ImgPipeline": (-2, "SDXL"),
                   "StableDiffusionXLInpaintPipeline": (-2, "SDXL"), "StableDiffusion3Pipeline": (-2, "SD 3"),
                   "FluxPipeline": (None, "Flux")}


@dataclass(frozen=True)
class Inventory:
    kind: str  # "file", "pipeline" or "folder"
    path: Path  # the file (for an OpenCLIP folder: its open_clip_model.safetensors), or the folder
    layout: str | None
    title: str | None
    parts: tuple[EncoderPart, ...] = ()  # a file's encoders
    subfolders: tuple[str, ...] = ()  # a pipeline's CLIP encoders
    unscanned: tuple[Unscanned, ...] = ()
    pipeline_layer: LayerChoice | None = None

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.parts] or list(self.subfolders)


def inventory(path: Path, inside: Path | None = None) -> Inventory:
    """The model at a local path, from headers and small JSON files only."""
    if path.is_file() or (path.is_symlink() and not path.is_dir()):
        if path.name.lower().endswith(PICKLE_SUFFIXES):
            raise PickleRefused(f"{one_line(path.name)} is pickle-based; pickle can run code when loaded, so "
                                "amdet-gate reads safetensors only - convert the weights first")
        return file_inventory(path, read_header(path, inside))
    if (path / "model_index.json").is_file() and not (path / "config.json").exists():
        return pipeline_inventory(path)
    if (path / OPEN_CLIP_CONFIG).is_file() and not (path / "config.json").exists():
        weights = path / OPEN_CLIP_FILE
        if not weights.is_file():
            pickles = sorted(p.name for p in path.iterdir() if p.name.lower().endswith(PICKLE_SUFFIXES))
            error = PickleRefused if pickles else UnsupportedModel
            raise error(f"{one_line(path)} is an OpenCLIP folder without {OPEN_CLIP_FILE}"
                        + (f" (only pickle weights, which can run code when loaded: {', '.join(pickles[:2])}; "
                           "convert them to safetensors first)" if pickles else ""))
        return file_inventory(weights, read_header(weights, inside))
    return Inventory("folder", path, None, None)


def file_inventory(path: Path, header: Header) -> Inventory:
    keys = Keys(header.tensors)
    match = next((m for layout in layouts() if (m := layout.detect(keys)) is not None), None)
    name = one_line(path.name, 80)
    if match is None:
        if looks_like_lora(header):
            plan_lora(path, header)  # refuses what it cannot read (no text-encoder keys, unknown keys) first
            raise UnsupportedModel(f"{name} is a LoRA adapter, not a model: scan it over its base with "
                                   f"`amdet-gate scan BASE --lora {name}` ({base_hint(header)})")
        if any(k.startswith("text_encoders.t5xxl.") or k.startswith("t5xxl.") or k == "shared.weight"
               for k in header.tensors):
            raise UnsupportedModel(f"{name} holds only a T5 encoder; AMDet scans CLIP-style text encoders, so there "
                                   "is nothing scannable (not a pass)")
        raise UnsupportedModel(f"{name}: no known text-encoder layout (found {prefix_summary(header)}); "
                               "see docs/sources.md for the layouts amdet-gate reads")
    unclaimed = sorted(k for k in header.tensors if k.startswith(TEXT_ROOTS)
                       and not k.endswith("logit_scale")
                       and not any(k.startswith(p.prefix) for p in match.parts if p.prefix)
                       and not any(k.startswith(u.where) for u in match.unscanned))
    if unclaimed:
        raise UnsupportedModel(f"{name}: recognised as {match.title}, but {len(unclaimed)} text-encoder tensors are "
                               f"not part of it (e.g. {one_line(unclaimed[0], 100)}); refused rather than scanned "
                               "in part")
    return _from_match(path, match)


def _from_match(path: Path, match: Match) -> Inventory:
    return Inventory("file", path, match.layout, match.title, match.parts, (), match.unscanned)


def prefix_summary(header: Header, limit: int = 4) -> str:
    """The file's top-level key prefixes with counts: what an unrecognised file holds, in one line."""
    def prefix(key: str) -> str:  # model.diffusion_model., first_stage_model., text_encoders.clip_l. ...
        parts = key.split(".")
        depth = 2 if parts[0] in ("model", "conditioner", "text_encoders") else 1
        return ".".join(parts[:depth]) + ("." if len(parts) > depth else "")

    counts = Counter(prefix(k) for k in header.tensors)
    shown = ", ".join(f"{one_line(p, 60)}* ({n})" for p, n in counts.most_common(limit))
    return shown + (f" and {len(counts) - limit} more prefixes" if len(counts) > limit else "") or "no tensors"


def pipeline_inventory(folder: Path) -> Inventory:
    """A diffusers pipeline's text encoders, from model_index.json: CLIP ones are scanned, others listed."""
    try:
        index = json.loads(read_small(folder / "model_index.json"))
    except (json.JSONDecodeError, RecursionError):
        raise LoadError(f"model_index.json in {one_line(folder)} is not valid JSON") from None
    if not isinstance(index, dict):
        raise LoadError(f"model_index.json in {one_line(folder)} is not a JSON object")
    scanned, unscanned = [], []
    for name in sorted(k for k in index if isinstance(k, str) and _ENCODER_NAME.fullmatch(k)):
        entry = index[name]
        cls = entry[1] if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str) else None
        if cls is None:  # [null, null]: the pipeline was saved without this component
            continue
        if not (folder / name).is_dir():
            raise LoadError(f"model_index.json in {one_line(folder)} names {name} ({one_line(cls, 60)}), but there "
                            "is no such subfolder")
        if cls in CLIP_CLASSES:
            scanned.append(name)
        else:
            kind = "T5 encoder" if cls.startswith("T5") else one_line(cls, 60)
            unscanned.append(Unscanned(name, kind, f"{name}/", f"a {kind} is not a CLIP text encoder; AMDet scans "
                                       "CLIP-style encoders only"))
    if not scanned:
        raise UnsupportedModel(f"the pipeline in {one_line(folder)} has no CLIP text encoder"
                               + (f" (only {', '.join(u.name for u in unscanned)}: not scanned)" if unscanned else ""))
    cls = index.get("_class_name")
    layer = None
    if isinstance(cls, str) and cls in PIPELINE_LAYERS:
        index_, by = PIPELINE_LAYERS[cls]
        layer = LayerChoice(index_, by)
    return Inventory("pipeline", folder, "pipeline", f"diffusers pipeline ({one_line(cls, 60)})",
                     (), tuple(scanned), tuple(unscanned), layer)


def select(inv: Inventory, wanted: str | None) -> list[str]:
    """The encoder names to scan: all of them, or the one `--encoder` names (its alias too)."""
    if wanted is None:
        return inv.names
    for part in inv.parts:
        if part.answers_to(wanted):
            return [part.name]
    if wanted in inv.subfolders:
        return [wanted]
    if any(u.name == wanted for u in inv.unscanned):
        raise UnsupportedModel(f"--encoder {one_line(wanted, 40)} is a component that is not a CLIP text encoder; "
                               "nothing scannable")
    known = ", ".join(inv.names + [a for p in inv.parts for a in p.aliases])
    raise UsageError(f"--encoder {one_line(wanted, 40)}: this model's text encoders are {known}")
