"""LoRA files in the three formats amdet-gate merges, and the low-rank difference of two encoders as one."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def kohya_name(prefix: str, layer: int, module: str) -> str:
    return f"{prefix}_text_model_encoder_layers_{layer}_{module.replace('.', '_')}"


def low_rank_difference(tuned: dict[str, torch.Tensor], base: dict[str, torch.Tensor], rank: int,
                        layers: int) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """(up, down) per linear layer with up @ down the best rank-`rank` approximation of tuned - base."""
    out = {}
    for i in range(layers):
        for module in LINEARS:
            name = f"encoder.layers.{i}.{module}.weight"
            u, s, vh = torch.linalg.svd(tuned[name].float() - base[name].float(), full_matrices=False)
            root = s[:rank].sqrt()
            out[(i, module)] = ((u[:, :rank] * root).contiguous(), (root[:, None] * vh[:rank]).contiguous())
    return out


def kohya_file(path: Path, pairs: dict, prefix: str = "lora_te", alpha: float | None = None,
               unet: bool = True, metadata: dict[str, str] | None = None) -> Path:
    tensors = {}
    for (i, module), (up, down) in pairs.items():
        name = kohya_name(prefix, i, module)
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha if alpha is not None else down.shape[0]))
    if unet:  # what a LoRA trained on the UNet too carries (left alone by the merge)
        tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 8)
        tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"] = torch.zeros(8, 4)
        tensors["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"] = torch.tensor(4.0)
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def peft_file(path: Path, pairs: dict, prefix: str = "text_encoder.", alpha: float | None = None) -> Path:
    tensors = {}
    for (i, module), (up, down) in pairs.items():
        name = f"{prefix}text_model.encoder.layers.{i}.{module}"
        tensors[f"{name}.lora_A.weight"] = down
        tensors[f"{name}.lora_B.weight"] = up
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(path))
    if alpha is not None:
        rank = next(iter(pairs.values()))[1].shape[0]
        (path.parent / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank,
                                                                     "lora_alpha": alpha}))
    return path


def diffusers_file(path: Path, pairs: dict) -> Path:
    tensors = {}
    for (i, module), (up, down) in pairs.items():
        name = f"text_encoder.text_model.encoder.layers.{i}.{module}.lora_linear_layer"
        tensors[f"{name}.down.weight"] = down
        tensors[f"{name}.up.weight"] = up
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(path))
    return path
