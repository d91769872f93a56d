"""Load one text encoder out of a checkpoint file, reading only its tensors.

Order of work, as encoders.load_encoder's, so that hostile input is refused before a tensor is built:
the header (already checked to tile the file) gives the encoder's keys and shapes (tower.py), the
config is chosen and every shape checked against it (families.py), then each of the encoder's
tensors is read on its own through safetensors' memory map: a 7 GB SDXL file costs the memory of
its encoders, not of the file. A LoRA's text-encoder part is merged in (lora.py), every weight is
checked to be finite, and the model is built on the meta device and given the tensors. Every tower a
single-file layout names is a CLIP one (tower.py maps it to CLIPTextModel's names): the CLIP family builds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from amdet_gate.checkpoints.families import ChosenConfig, check_shapes, choose_config, open_clip_text_config
from amdet_gate.checkpoints.tower import TowerMap, map_tower
from amdet_gate.encoders.base import LoadedEncoder
from amdet_gate.encoders.clip import CLIP, PROJECTION
from amdet_gate.encoders.tensors import FLOAT_DTYPES, check_finite, reason
from amdet_gate.errors import LoadError
from amdet_gate.safetensors_header import Header, read_header
from amdet_gate.sources.identity import WeightFile
from amdet_gate.sources.selection import EncoderPart, LayerChoice, Naming


@dataclass(frozen=True)
class LoadedPart:
    encoder: LoadedEncoder
    chosen: ChosenConfig


def read_tower(file: Path, tower: TowerMap) -> dict[str, torch.Tensor]:
    """The encoder's tensors by CLIPTextModel name, float32, one at a time (rows of a fused in_proj by slice)."""
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(file), framework="pt") as fh:
            for name, source in tower.tensors.items():
                if source.rows is not None:
                    start, stop = source.rows
                    tensor = fh.get_slice(source.key)[start:stop]
                else:
                    tensor = fh.get_tensor(source.key)
                tensor = tensor.float()
                tensors[name] = tensor.T.contiguous() if source.transpose else tensor
    except Exception as exc:  # any failure to read untrusted bytes is a load error
        raise LoadError(f"{file.name} is not a readable safetensors file ({reason(exc)})") from exc
    return tensors


def load_part(file: Path, part: EncoderPart, layer: LayerChoice, weight_files: list[WeightFile], *,
              architecture: str, header: Header | None = None, config: Path | None = None,
              merge=None) -> LoadedPart:
    """The encoder `part` of `file`, reading the chosen layer. `merge(tensors)` applies a LoRA in place."""
    header = header if header is not None else read_header(file)
    tower = map_tower(part, header, file.name)
    odd = sorted(tower.dtypes - set(FLOAT_DTYPES))
    if odd:
        raise LoadError(f"{file.name}: {part.name} has {odd[0]} tensors; expected F32/F16/BF16")
    open_clip = open_clip_text_config(file) if part.naming is Naming.OPEN_CLIP and part.prefix in ("", "text.") \
        else None
    chosen = choose_config(tower, file.name, config, open_clip)
    check_shapes(tower, chosen, file.name)
    layer.check(chosen.config["num_hidden_layers"])
    tensors = read_tower(file, tower)
    check_finite(tensors, f"{file.name} {part.name}")
    if merge is not None:
        merge(tensors)
        check_finite(tensors, f"{file.name} {part.name} with the LoRA merged")
    module = CLIP.build(chosen.config, tensors)  # check_shapes matched the set of tensors exactly
    projection = tensors.get(PROJECTION) if part.use_projection else None
    adapter = CLIP.adapter(module, chosen.config, projection, layer)
    return LoadedPart(LoadedEncoder(CLIP, adapter, architecture, chosen.config, weight_files, None), chosen)
