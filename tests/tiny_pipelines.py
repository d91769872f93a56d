"""Tiny, randomly initialised image models for renderer tests: real diffusers / transformers code, small shapes.

- `save_tiny_sd_pipeline`: a Stable Diffusion pipeline (UNet2DConditionModel, AutoencoderKL,
  PNDMScheduler, CLIPTextModel and CLIP tokenizer) saved with safetensors, 32 x 32 images,
  laid out as on the Hub (the text_encoder subfolder has no tokenizer files of its own).
- `save_tiny_clip`: a full CLIPModel (text and vision towers), 32 x 32 images.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel

from amdet_gate.tokenizer import bundled_tokenizer, save_bundled_tokenizer

TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=49407, bos_token_id=49406,
            pad_token_id=49407)


def save_tiny_sd_pipeline(folder: Path, width: int = 32, seed: int = 0) -> Path:
    """A diffusers SD folder whose text encoder (subfolder text_encoder) is `width` wide."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    # Two blocks each: the smallest UNet/VAE that still has a cross-attention block and a 2x VAE.
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=width, norm_num_groups=2, attention_head_dim=2)
    vae = AutoencoderKL(
        block_out_channels=(4, 8), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(**{**TEXT, "hidden_size": width, "intermediate_size": 2 * width}))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=bundled_tokenizer().tokenizer, unet=unet,
        scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def save_tiny_clip(folder: Path, seed: int = 0, image_size: int = 32, patch_size: int = 8) -> CLIPModel:
    torch.manual_seed(seed)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=patch_size, hidden_act="quick_gelu")
    model = CLIPModel(CLIPConfig(text_config=TEXT, vision_config=vision, projection_dim=16)).eval()
    model.save_pretrained(str(folder))
    save_bundled_tokenizer(folder)
    return model
