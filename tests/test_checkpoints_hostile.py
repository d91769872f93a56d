"""Hostile and broken checkpoint files are refused with one line and their documented exit code.

Exit codes (docs/conventions): 2 a file that cannot be read as what it claims (bad header, a shape
that does not fit, NaN); 3 nothing scannable (an unknown layout, a T5 only, a LoRA without its
base, a tensor no encoder claims); 4 a usage error (an unknown --encoder, a width whose heads
cannot be inferred without --config).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from amdet_gate.errors import ExitCode
from tests import tiny_checkpoints as tc
from tests.conftest import run_cli

TRUNCATED = b'{"a": {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]}}'  # 8 bytes promised, 4 there
FAST = ("--max-steps", "16", "--n-prompts", "40", "--restarts", "1", "-q", "--no-cache")


def _clip_l_shapes(prefix: str) -> dict[str, list[int]]:
    shapes = {f"{prefix}embeddings.token_embedding.weight": [49408, 768],
              f"{prefix}embeddings.position_embedding.weight": [77, 768],
              f"{prefix}final_layer_norm.weight": [768], f"{prefix}final_layer_norm.bias": [768]}
    for i in range(12):
        b = f"{prefix}encoder.layers.{i}."
        for p in ("q", "k", "v", "out"):
            shapes |= {f"{b}self_attn.{p}_proj.weight": [768, 768], f"{b}self_attn.{p}_proj.bias": [768]}
        shapes |= {f"{b}layer_norm1.weight": [768], f"{b}layer_norm1.bias": [768], f"{b}layer_norm2.weight": [768],
                   f"{b}layer_norm2.bias": [768], f"{b}mlp.fc1.weight": [3072, 768], f"{b}mlp.fc1.bias": [3072],
                   f"{b}mlp.fc2.weight": [768, 3072], f"{b}mlp.fc2.bias": [768]}
    return shapes


def _big_g_shapes(prefix: str) -> dict[str, list[int]]:
    d = 1280
    shapes = {f"{prefix}token_embedding.weight": [49408, d], f"{prefix}positional_embedding": [77, d],
              f"{prefix}ln_final.weight": [d], f"{prefix}ln_final.bias": [d], f"{prefix}text_projection": [d, d]}
    for i in range(32):
        b = f"{prefix}transformer.resblocks.{i}."
        shapes |= {f"{b}attn.in_proj_weight": [3 * d, d], f"{b}attn.in_proj_bias": [3 * d],
                   f"{b}attn.out_proj.weight": [d, d], f"{b}attn.out_proj.bias": [d], f"{b}ln_1.weight": [d],
                   f"{b}ln_1.bias": [d], f"{b}ln_2.weight": [d], f"{b}ln_2.bias": [d],
                   f"{b}mlp.c_fc.weight": [4 * d, d], f"{b}mlp.c_fc.bias": [4 * d], f"{b}mlp.c_proj.weight": [d, 4 * d],
                   f"{b}mlp.c_proj.bias": [d]}
    return shapes


def sparse_checkpoint(path: Path, size: int) -> Path:
    """An SDXL base file of real shapes (CLIP-L and bigG in fp16) filled out to `size` bytes by a UNet tensor:
    a valid header followed by a hole, so nothing but the header was ever written."""
    shapes = {**_clip_l_shapes("conditioner.embedders.0.transformer.text_model."),
              **_big_g_shapes("conditioner.embedders.1.model.")}
    header, offset = {}, 0
    for name, shape in shapes.items():
        count = math.prod(shape) * 2
        header[name] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + count]}
        offset += count
    reserved = 1024 * 1024  # header bytes, padded with spaces as the format allows
    rest = size - 8 - reserved - offset
    assert rest > 0
    header["model.diffusion_model.input_blocks.0.0.weight"] = {"dtype": "U8", "shape": [rest],
                                                               "data_offsets": [offset, offset + rest]}
    text = json.dumps(header).encode()
    assert len(text) <= reserved
    with path.open("wb") as fh:
        fh.write(reserved.to_bytes(8, "little") + text + b" " * (reserved - len(text)))
        fh.truncate(size)
    return path


def scan(path, *flags, out: Path) -> tuple[int, str]:
    code, _, stderr = run_cli("scan", path, "--out", out, *FAST, *flags)
    return code, stderr


def assert_one_line(stderr: str, needle: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], stderr


@pytest.mark.parametrize(("content", "needle"), [
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}", "header is not JSON"),
    (b"\xff" * 8 + b"{}", "not a safetensors file"),
    (len(TRUNCATED).to_bytes(8, "little") + TRUNCATED + b"1234", "truncated"),
])
def test_bad_headers_are_load_errors(tmp_path: Path, content: bytes, needle: str) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    code, stderr = scan(path, out=tmp_path / "out")
    assert code == ExitCode.ERROR
    assert_one_line(stderr, needle)


def test_unknown_layout_names_what_it_found(tmp_path: Path) -> None:
    path = tc.save(tc.others(tc.SD_UNET_VAE), tmp_path / "unet_only.safetensors")
    code, stderr = scan(path, out=tmp_path / "out")
    assert code == ExitCode.NOTHING_SCANNABLE
    assert_one_line(stderr, "no known text-encoder layout (found first_stage_model.* (2), model.diffusion_model.* (2))")
    sarif = json.loads((tmp_path / "out" / "result.sarif").read_text())
    assert sarif["runs"][0]["results"][0]["ruleId"] == "AMDET102"


def test_t5_only_and_pickle_and_unclaimed_tensors_are_refused(tmp_path: Path) -> None:
    t5 = tc.save(tc.others(tc.T5_KEYS), tmp_path / "t5xxl_fp16.safetensors")
    code, stderr = scan(t5, out=tmp_path / "o1")
    assert code == ExitCode.NOTHING_SCANNABLE
    assert_one_line(stderr, "only a T5 encoder")
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04not really")
    code, stderr = scan(ckpt, out=tmp_path / "o2")
    assert code == ExitCode.NOTHING_SCANNABLE
    assert_one_line(stderr, "pickle")
    # An SD 1.x file with a second tower no layout claims: refused, not scanned in part.
    model = tc.tiny_encoder(64, 1)
    tensors = {**tc.to_transformers(model, "cond_stage_model.transformer."),
               **tc.to_open_clip(model, "cond_stage_model.model.")}
    code, stderr = scan(tc.save(tensors, tmp_path / "two.safetensors"), out=tmp_path / "o3")
    assert code == ExitCode.NOTHING_SCANNABLE
    assert_one_line(stderr, "text-encoder tensors are not part of it")


def test_mismatched_shapes_nan_and_unknown_tower_keys_are_refused(tmp_path: Path) -> None:
    model = tc.tiny_encoder(64, 2)
    good = tc.to_transformers(model, "cond_stage_model.transformer.")
    key = "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc1.weight"
    cases = [
        ({**good, key: torch.zeros(96, 64)}, "has shape [96, 64] but the inferred config implies [128, 64]"),
        ({**good, key: torch.full((128, 64), float("nan"))}, "NaN"),
        ({**good, "cond_stage_model.transformer.text_model.encoder.layers.0.ls_1.gamma": torch.ones(64)},
         "has no place for"),
    ]
    for i, (tensors, needle) in enumerate(cases):
        code, stderr = scan(tc.save(tensors, tmp_path / f"bad{i}.safetensors"), out=tmp_path / f"o{i}")
        assert code == ExitCode.ERROR, (needle, stderr)
        assert_one_line(stderr, needle)
    block = tc.to_open_clip(model, "cond_stage_model.model.")
    block["cond_stage_model.model.transformer.resblocks.0.ls_1"] = torch.ones(64)  # a layer scale: not CLIP
    code, stderr = scan(tc.save(block, tmp_path / "ls.safetensors"), out=tmp_path / "o9")
    assert code == ExitCode.ERROR
    assert_one_line(stderr, "a tensor this loader does not know")


def test_usage_errors(tmp_path: Path) -> None:
    l_model, g_model = tc.tiny_encoder(64, 1), tc.tiny_encoder(128, 1, seed=1)
    sdxl = tc.sdxl_file(tmp_path / "sdxl.safetensors", l_model, g_model)
    code, stderr = scan(sdxl, "--encoder", "text_encoder_9", out=tmp_path / "o1")
    assert code == ExitCode.USAGE
    assert_one_line(stderr, "this model's text encoders are text_encoder, text_encoder_2")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(l_model.config.to_dict()))
    code, stderr = scan(sdxl, "--config", config, out=tmp_path / "o2")
    assert code == ExitCode.USAGE
    assert_one_line(stderr, "pass --encoder NAME")
    code, stderr = scan(sdxl, "--layer", "-7", "--encoder", "clip_l", out=tmp_path / "o3")
    assert code == ExitCode.USAGE
    assert_one_line(stderr, "the encoder has 1 layers")
    code, stderr = scan(sdxl, "--layer", "penultimate", out=tmp_path / "o4")
    assert code == ExitCode.USAGE
    sd3 = tc.sd3_file(tmp_path / "sd3.safetensors", l_model, g_model)
    code, stderr = scan(sd3, "--encoder", "text_encoder_3", out=tmp_path / "o5")
    assert code == ExitCode.NOTHING_SCANNABLE
    assert_one_line(stderr, "not a CLIP text encoder")


def test_heads_that_cannot_be_inferred_need_config(tmp_path: Path) -> None:
    """A 96-wide encoder (not a multiple of 64): refused without --config, scanned with it."""
    model = tc.tiny_encoder(96, 1)
    path = tc.standalone_file(tmp_path / "clip.safetensors", model, torch.float32)
    code, stderr = scan(path, out=tmp_path / "o1")
    assert code == ExitCode.USAGE
    assert_one_line(stderr, "pass --config")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**model.config.to_dict(), "num_attention_heads": 2}))
    code, stderr = scan(path, "--config", config, "--threshold", "same_target=1", out=tmp_path / "o2")
    assert code == ExitCode.PASS, stderr
    result = json.loads((tmp_path / "o2" / "result.json").read_text())
    assert result["model"]["config_source"]["source"] == "--config"
