"""LoRA: kohya, PEFT and diffusers adapters merged into the base's text encoders (W + scale * alpha/r * up @ down),
both files' sha256 recorded, and every adapter we cannot apply whole refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from amdet_gate.checkpoints.attach import EncoderOptions, attach
from amdet_gate.checkpoints.loader import load_ref
from amdet_gate.errors import ExitCode
from amdet_gate.sources import resolve_source
from amdet_gate.sources.files import identities
from amdet_gate.sources.identity import sha256_file
from tests import lora_files as lf
from tests import tiny_checkpoints as tc
from tests.conftest import run_cli

FAST = ("--max-steps", "16", "--n-prompts", "40", "--restarts", "1", "-q", "--no-cache")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("lora-base")
    model = tc.tiny_encoder(64, 2, seed=0)
    return {"model": model, "folder": tc.hf_folder(root / "hf", model),
            "file": tc.standalone_file(root / "clip_l.safetensors", model, torch.float32),
            "sdxl": tc.sdxl_file(root / "sdxl.safetensors", model, tc.tiny_encoder(128, 2, seed=1), torch.float32)}


def random_pairs(rank: int = 4, width: int = 64, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {(0, "self_attn.q_proj"): (torch.randn(width, rank, generator=gen), torch.randn(rank, width, generator=gen)),
            (1, "mlp.fc1"): (torch.randn(2 * width, rank, generator=gen), torch.randn(rank, width, generator=gen))}


def merged(model_path: Path, lora: Path, encoder: str | None = None, scale: float | None = None):
    source = attach(resolve_source(str(model_path)), EncoderOptions(encoder=encoder, lora=lora, lora_scale=scale))
    return source, load_ref(source, None)


def expected(model, pairs: dict, factor: float) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in tc.text_state(model, with_projection=False).items()}
    for (i, module), (up, down) in pairs.items():
        state[f"encoder.layers.{i}.{module}.weight"] += factor * (up @ down)
    return state


def assert_state(enc, state: dict) -> None:
    got = enc.adapter.model.state_dict()
    for k, v in state.items():
        assert torch.allclose(got[k], v, atol=1e-5), k


@pytest.mark.parametrize("source", ["folder", "file"])
def test_kohya_merge_is_w_plus_scale_alpha_over_rank_up_down(tmp_path: Path, base: dict, source: str) -> None:
    pairs = random_pairs()
    lora = lf.kohya_file(tmp_path / "style.safetensors", pairs, alpha=2.0)
    src, enc = merged(base[source], lora, scale=0.5)
    assert_state(enc, expected(base["model"], pairs, 0.5 * 2.0 / 4))
    assert enc.details["lora"] | {"file": None} == {"file": None, "format": "kohya", "scale": 0.5,
                                                    "rank_scaling": "alpha / rank", "modules_merged": 2,
                                                    "denoiser_keys_ignored": 3}
    files = identities(src)
    assert [w.sha256 for w in files] == [sha256_file(base[source] / "model.safetensors" if source == "folder"
                                                     else base[source]), sha256_file(lora)]


def test_peft_with_adapter_config_and_diffusers_formats(tmp_path: Path, base: dict) -> None:
    pairs = random_pairs(seed=1)
    (tmp_path / "peft").mkdir()
    peft = lf.peft_file(tmp_path / "peft" / "adapter_model.safetensors", pairs, prefix="base_model.model.", alpha=8.0)
    _, enc = merged(base["folder"], peft)
    assert enc.details["lora"]["format"] == "peft"
    assert_state(enc, expected(base["model"], pairs, 8.0 / 4))
    old = lf.diffusers_file(tmp_path / "pytorch_lora_weights.safetensors", pairs)
    _, enc = merged(base["file"], old)
    assert enc.details["lora"]["format"] == "diffusers"
    assert_state(enc, expected(base["model"], pairs, 1.0))  # no alpha: alpha = rank


def test_sdxl_kohya_lora_adapts_each_encoder(tmp_path: Path, base: dict) -> None:
    te1, te2 = random_pairs(seed=2), random_pairs(width=128, seed=3)
    lora = tmp_path / "sdxl_lora.safetensors"
    from safetensors.torch import load_file, save_file

    one = load_file(str(lf.kohya_file(tmp_path / "a.safetensors", te1, prefix="lora_te1")))
    two = load_file(str(lf.kohya_file(tmp_path / "b.safetensors", te2, prefix="lora_te2", unet=False)))
    save_file({**one, **two}, str(lora))
    for name, pairs in (("text_encoder", te1), ("text_encoder_2", te2)):
        _, enc = merged(base["sdxl"], lora, encoder=name)
        assert enc.details["lora"]["modules_merged"] == 2
        got = enc.adapter.model.state_dict()["encoder.layers.1.mlp.fc1.weight"]
        width = 64 if name == "text_encoder" else 128
        up, down = pairs[(1, "mlp.fc1")]
        src = attach(resolve_source(str(base["sdxl"])), EncoderOptions(encoder=name))
        plain = load_ref(src, None).adapter.model.state_dict()["encoder.layers.1.mlp.fc1.weight"]
        assert got.shape[1] == width
        assert torch.allclose(got, plain + up @ down, atol=1e-4)


def scan(*args, out: Path) -> tuple[int, str]:
    code, _, stderr = run_cli("scan", *args, "--out", out, *FAST)
    return code, stderr.strip()


def test_refusals(tmp_path: Path, base: dict) -> None:
    pairs = random_pairs()
    good = lf.kohya_file(tmp_path / "good.safetensors", pairs)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(good))
    cases = {
        "lycoris": ({**tensors, "lora_te_text_model_encoder_layers_0_mlp_fc1.hada_w1_a": torch.zeros(4, 4)},
                    ExitCode.NOTHING_SCANNABLE, "LyCORIS LoHa keys are not supported"),
        "dora": ({**tensors, "lora_te_text_model_encoder_layers_0_self_attn_q_proj.dora_scale": torch.ones(1, 64)},
                 ExitCode.NOTHING_SCANNABLE, "DoRA keys are not supported"),
        "unet_only": ({k: v for k, v in tensors.items() if k.startswith("lora_unet")}, ExitCode.NOTHING_SCANNABLE,
                      "nothing to scan in the text encoder"),
        "unknown": ({**tensors, "something_else.weight": torch.zeros(2)}, ExitCode.NOTHING_SCANNABLE,
                    "a key of no known LoRA format"),
        "wrong_base": ({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 96),
                        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(128, 4)},
                       ExitCode.ERROR, "not this base's LoRA"),
        "deep": ({"lora_te_text_model_encoder_layers_7_mlp_fc1.lora_down.weight": torch.zeros(4, 64),
                  "lora_te_text_model_encoder_layers_7_mlp_fc1.lora_up.weight": torch.zeros(128, 4)},
                 ExitCode.ERROR, "which the base encoder does not have"),
        "te2_on_one": ({k.replace("lora_te_", "lora_te2_"): v for k, v in tensors.items()}, ExitCode.USAGE,
                       "adapts text_encoder_2, which the base does not have"),
    }
    for name, (content, code, needle) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(content, str(path))
        got, stderr = scan(base["folder"], "--lora", path, out=tmp_path / f"o-{name}")
        assert (got, len(stderr.splitlines())) == (code, 1) and needle in stderr, (name, stderr)


def test_a_lora_alone_names_the_base_it_needs(tmp_path: Path) -> None:
    sdxl = lf.kohya_file(tmp_path / "sdxl_style.safetensors", random_pairs(), prefix="lora_te2",
                         metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    code, stderr = scan(sdxl, out=tmp_path / "o1")
    assert code == ExitCode.NOTHING_SCANNABLE
    assert "is a LoRA adapter" in stderr and "--lora sdxl_style.safetensors" in stderr and "sdxl_base_v1-0" in stderr
    plain = lf.kohya_file(tmp_path / "sd15.safetensors", random_pairs())
    code, stderr = scan(plain, out=tmp_path / "o2")
    assert code == ExitCode.NOTHING_SCANNABLE and "SD 1.x / 2.x base" in stderr


def test_lora_scale_needs_lora(tmp_path: Path, base: dict) -> None:
    code, stderr = scan(base["folder"], "--lora-scale", "0.5", out=tmp_path / "o")
    assert code == ExitCode.USAGE and "--lora-scale needs --lora" in stderr


def test_peft_adapter_config_dora_is_refused(tmp_path: Path, base: dict) -> None:
    peft = lf.peft_file(tmp_path / "adapter_model.safetensors", random_pairs(), prefix="base_model.model.", alpha=4)
    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "use_dora": True}))
    code, stderr = scan(base["folder"], "--lora", peft, out=tmp_path / "o")
    assert code == ExitCode.NOTHING_SCANNABLE and "DoRA" in stderr
