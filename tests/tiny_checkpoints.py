"""Tiny single-file checkpoints of every layout amdet-gate reads, built from small transformers encoders.

The keys are the real ones (diffusers' single-file loader and ComfyUI read the same), and each file
carries a few realistically named UNet / VAE / diffusion-transformer tensors beside its text
encoders, as a downloaded checkpoint does. `to_open_clip` is the inverse of the conversion under
test, written independently: q, k, v fused into in_proj (rows q, k, v), the projection transposed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

# A few tensors of the other parts of each kind of checkpoint (names as in the released files).
SD_UNET_VAE = {"model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3),
               "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (8, 8, 1, 1),
               "first_stage_model.encoder.conv_in.weight": (8, 3, 3, 3),
               "first_stage_model.decoder.conv_out.bias": (3,)}
SDXL_UNET_VAE = {"model.diffusion_model.label_emb.0.0.weight": (16, 8),
                 "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (8, 16),
                 "first_stage_model.quant_conv.weight": (8, 8, 1, 1)}
SD3_MMDIT = {"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": (16,),
             "first_stage_model.decoder.conv_in.weight": (8, 16, 3, 3)}
FLUX_DIT = {"model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": (8,),
            "vae.decoder.conv_in.weight": (8, 16, 3, 3)}
T5_KEYS = {"shared.weight": (64, 16), "encoder.block.0.layer.0.SelfAttention.k.weight": (16, 16),
           "encoder.final_layer_norm.weight": (16,)}


def tiny_encoder(width: int = 64, layers: int = 2, seed: int = 0, act: str = "quick_gelu",
                 projection: int | None = 32) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                            num_attention_heads=max(1, width // 64), max_position_embeddings=77, hidden_act=act,
                            projection_dim=projection or width, eos_token_id=49407, bos_token_id=49406,
                            pad_token_id=49407)
    model = CLIPTextModelWithProjection(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that a swapped or dropped tensor shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def text_state(model: CLIPTextModelWithProjection, with_projection: bool = True) -> dict[str, torch.Tensor]:
    """CLIPTextModel names (no text_model. prefix), plus text_projection.weight."""
    state = {k.removeprefix("text_model."): v for k, v in model.state_dict().items() if "position_ids" not in k}
    if not with_projection:
        state.pop("text_projection.weight", None)
    return state


def to_transformers(model: CLIPTextModelWithProjection, prefix: str, text_model: bool = True,
                    with_projection: bool = False) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in text_state(model, with_projection).items():
        inner = name if name == "text_projection.weight" or not text_model else f"text_model.{name}"
        out[prefix + inner] = tensor
    if text_model:  # SD 1.x files carry the position_ids buffer too
        out[prefix + "text_model.embeddings.position_ids"] = torch.arange(77)[None].float()
    return out


def to_open_clip(model: CLIPTextModelWithProjection, prefix: str, extra_block: bool = False,
                 with_projection: bool = True, seed: int = 1) -> dict[str, torch.Tensor]:
    """The tower in OpenCLIP naming; `extra_block` appends one more (random) block, as SD 2.x files carry
    the 24th block that the pipeline does not run."""
    s = text_state(model)
    n = model.config.num_hidden_layers
    out = {prefix + "token_embedding.weight": s["embeddings.token_embedding.weight"],
           prefix + "positional_embedding": s["embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": s["final_layer_norm.weight"],
           prefix + "ln_final.bias": s["final_layer_norm.bias"]}
    if with_projection:
        out[prefix + "text_projection"] = s["text_projection.weight"].T.contiguous()
    gen = torch.Generator().manual_seed(seed)
    for i in range(n + int(extra_block)):
        src = {k.removeprefix(f"encoder.layers.{min(i, n - 1)}."): v for k, v in s.items()
               if k.startswith(f"encoder.layers.{min(i, n - 1)}.")}
        if i == n:  # the extra block: same shapes, other values
            src = {k: torch.randn(v.shape, generator=gen) for k, v in src.items()}
        b = f"{prefix}transformer.resblocks.{i}."
        out[b + "attn.in_proj_weight"] = torch.cat([src[f"self_attn.{p}_proj.weight"] for p in "qkv"])
        out[b + "attn.in_proj_bias"] = torch.cat([src[f"self_attn.{p}_proj.bias"] for p in "qkv"])
        for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                             ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            out[b + theirs + ".weight"] = src[ours + ".weight"]
            out[b + theirs + ".bias"] = src[ours + ".bias"]
    return out


def others(shapes: dict[str, tuple[int, ...]], prefix: str = "", seed: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {prefix + k: torch.randn(v, generator=gen) for k, v in shapes.items()}


def save(tensors: dict[str, torch.Tensor], path: Path, dtype: torch.dtype = torch.float32,
         metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype).clone().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def sd1_file(path: Path, te: CLIPTextModelWithProjection, dtype=torch.float16, legacy: bool = False) -> Path:
    return save({**others(SD_UNET_VAE), **to_transformers(te, "cond_stage_model.transformer.", not legacy)},
                path, dtype)


def sd2_file(path: Path, te: CLIPTextModelWithProjection, dtype=torch.float16) -> Path:
    return save({**others(SD_UNET_VAE), **to_open_clip(te, "cond_stage_model.model.", extra_block=True)}, path, dtype)


def sdxl_file(path: Path, te1: CLIPTextModelWithProjection, te2: CLIPTextModelWithProjection,
              dtype=torch.float16) -> Path:
    return save({**others(SDXL_UNET_VAE), **to_transformers(te1, "conditioner.embedders.0.transformer."),
                 **to_open_clip(te2, "conditioner.embedders.1.model.")}, path, dtype)


def sdxl_refiner_file(path: Path, te2: CLIPTextModelWithProjection, dtype=torch.float16) -> Path:
    return save({**others(SDXL_UNET_VAE), **to_open_clip(te2, "conditioner.embedders.0.model.")}, path, dtype)


def sd3_file(path: Path, clip_l, clip_g, dtype=torch.float16, t5: bool = True) -> Path:
    tensors = {**others(SD3_MMDIT), **to_transformers(clip_l, "text_encoders.clip_l.transformer."),
               **to_transformers(clip_g, "text_encoders.clip_g.transformer.", with_projection=True)}
    if t5:
        tensors |= others(T5_KEYS, "text_encoders.t5xxl.transformer.")
    return save(tensors, path, dtype)


def flux_file(path: Path, clip_l, dtype=torch.bfloat16) -> Path:
    return save({**others(FLUX_DIT), **to_transformers(clip_l, "text_encoders.clip_l.transformer."),
                 **others(T5_KEYS, "text_encoders.t5xxl.transformer.")}, path, dtype)


def standalone_file(path: Path, te, dtype=torch.float16, with_projection: bool = True) -> Path:
    return save(to_transformers(te, "", with_projection=with_projection), path, dtype)


def comfy_save_file(path: Path, clip_l, clip_g, dtype=torch.float16) -> Path:
    return save({**to_transformers(clip_l, "clip_l.transformer."),
                 **to_transformers(clip_g, "clip_g.transformer.", with_projection=True)}, path, dtype)


def open_clip_folder(folder: Path, te, dtype=torch.float32, under_text: bool = False, act: str = "quick_gelu") -> Path:
    """open_clip_model.safetensors (with an image tower's keys) and open_clip_config.json."""
    prefix = "text." if under_text else ""
    tensors = {**to_open_clip(te, prefix), **others({"visual.conv1.weight": (8, 3, 4, 4), "logit_scale": ()})}
    save(tensors, folder / "open_clip_model.safetensors", dtype)
    c = te.config
    config = {"model_cfg": {"embed_dim": c.projection_dim, "quick_gelu": act == "quick_gelu",
                            "text_cfg": {"context_length": 77, "vocab_size": c.vocab_size, "width": c.hidden_size,
                                         "heads": c.num_attention_heads, "layers": c.num_hidden_layers}}}
    (folder / "open_clip_config.json").write_text(json.dumps(config), "utf-8")
    return folder


def hf_folder(folder: Path, te: CLIPTextModelWithProjection) -> Path:
    """The equivalent Hugging Face folder (CLIPTextModel, as transformers 5 saves it)."""
    from amdet_gate.tokenizer import save_bundled_tokenizer

    text = CLIPTextModel(te.config)
    text.load_state_dict(text_state(te, with_projection=False))
    text.save_pretrained(str(folder))
    save_bundled_tokenizer(folder)
    return folder
