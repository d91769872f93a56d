"""Encoder families: a text encoder loaded from an untrusted Hugging Face folder, without running its code.

A plug point. Each family is an `EncoderFamily` (base.py) and `FAMILIES` lists them; `load_encoder`
asks the first whose `matches` takes the folder's config.json. Order of work, so that hostile input
is refused before any tensor is built:
  1. find the weight files (safetensors only; pickle files are refused, never opened: sources/local.py),
  2. read config.json and validate the family's part of it (architecture, sizes, parameter budget),
  3. read safetensors headers and check every key and shape against the config,
  4. build the module on the meta device and load the tensors into it,
  5. check that every weight is finite.

The scan engine only sees the family's adapter (base.EncoderAdapter), and its `AdapterTraits`.

  base.py     the interfaces (EncoderFamily, EncoderAdapter, AdapterTraits) and LoadedEncoder
  tensors.py  what every tower shares: the size limits, the config check, the header-checked reader
  clip.py     the CLIP family (the first and only one)
"""

from __future__ import annotations

import json
from pathlib import Path

from amdet_gate.encoders.base import EncoderFamily, LoadedEncoder
from amdet_gate.encoders.clip import CLIP
from amdet_gate.encoders.tensors import read_tensors
from amdet_gate.errors import LoadError, UnsupportedModel
from amdet_gate.sources.identity import WeightFile
from amdet_gate.sources.local import find_weight_files, read_small, weight_identities
from amdet_gate.sources.model import ResolvedModel

FAMILIES: tuple[EncoderFamily, ...] = (CLIP,)


def read_config(folder: Path) -> tuple[EncoderFamily, str, dict]:
    """The family of the folder's config.json, the declared architecture, and the validated text-tower config."""
    path = folder / "config.json"
    if not (path.exists() or path.is_symlink()):  # a FIFO or folder named config.json: read_small refuses it
        raise UnsupportedModel(f"no config.json in {folder}")
    try:
        raw = json.loads(read_small(path))
    except json.JSONDecodeError as exc:
        raise LoadError(f"config.json in {folder} is not valid JSON: {exc.msg} (line {exc.lineno})") from exc
    except RecursionError:  # "[[[[..." nested deeper than the parser's stack
        raise LoadError(f"config.json in {folder} is nested too deeply") from None
    if not isinstance(raw, dict):
        raise LoadError(f"config.json in {folder} is not a JSON object")
    if "auto_map" in raw:
        raise UnsupportedModel("config.json asks for remote code (auto_map); amdet-gate never runs model code")
    model_type = raw.get("model_type")
    archs = raw.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else str(model_type)
    family = next((f for f in FAMILIES if f.matches(raw)), None)
    if family is None:
        raise UnsupportedModel(f"unsupported architecture {arch!r} (model_type {model_type!r}); amdet-gate scans "
                               + "; ".join(f.title for f in FAMILIES))
    return family, arch, family.validate(family.text_config(raw), "config.json")


def load_encoder(model: ResolvedModel, identities: list[WeightFile] | None = None) -> LoadedEncoder:
    """Load the text encoder in `model.folder` (a folder in Hugging Face layout; `--subfolder` of a
    diffusers pipeline is in the resolved model, checked by its one rule, sources.model.check_subfolder).

    `identities`: the weight files' sha256s when the caller has already hashed them.
    """
    folder = model.folder
    if not folder.exists():
        raise LoadError(f"model folder {folder} does not exist")
    files = find_weight_files(folder)
    family, arch, cfg = read_config(folder)
    tensors = read_tensors(files, family.expected_shapes(cfg), family.module_key)
    module = family.build(cfg, tensors)
    projection = family.read_projection(files, cfg)
    if identities is None:
        identities = weight_identities(folder)
    return LoadedEncoder(family, family.adapter(module, cfg, projection), arch, cfg, identities, folder)


__all__ = ["FAMILIES", "LoadedEncoder", "load_encoder", "read_config"]
