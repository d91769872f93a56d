"""Reversed-target renderers: diffusion on a tiny random SD pipeline, clip-vision on a tiny CLIPModel, tokens card."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPModel, CLIPTextModel, CLIPVisionModelWithProjection

from amdet_gate import render as rd
from amdet_gate.encoders import load_encoder
from amdet_gate.errors import GateError, LoadError, PickleRefused, UsageError
from amdet_gate.render import clip_vision as rd_vision
from amdet_gate.render import diffusion as rd_diffusion
from amdet_gate.render import tokens as rd_tokens
from amdet_gate.result import NearPrompt, NearToken, ResultError, ReversedTarget
from amdet_gate.result.codec import from_data
from amdet_gate.sources.local import local_model
from amdet_gate.tokenizer import bundled_tokenizer, load_tokenizer
from tests.tiny_pipelines import save_tiny_clip, save_tiny_sd_pipeline

HOSTILE = "$\\frac{1}{2}$ \x1b[31mred\x1b[0m \u202eevil\u200b \ud800 \U0001f98a " + "x" * 500

RESULT = ReversedTarget(  # what a scan's result holds; the strings are untrusted
    trigger_vectors=2,
    trigger_tokens=(
        NearToken(id=13506, token="\u00d0\u00be", text="\u043e", cosine=0.70, position=1),
        NearToken(id=1, token="$x$", text=HOSTILE, cosine=float("nan"), position=2),
        NearToken(id=2, token="ok", text="line\nbreak\ttab", cosine=None, position=None),
    ),
    target_tokens=(NearToken(id=1119, token="morning</w>", text="morning", cosine=0.40, position=3),),
    target_prompts=(NearPrompt("a velvet camera", 0.94), NearPrompt(HOSTILE, 0.9)),
)
EMPTY = ReversedTarget(trigger_tokens=(), target_tokens=())


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message
    return message


def png(path: Path) -> Image.Image:
    image = Image.open(path)
    image.load()
    return image


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model: CLIPTextModel) -> Path:
    """A plain CLIPTextModel folder (no vision tower), built once for the module."""
    folder = tmp_path_factory.mktemp("text") / "tiny"
    tiny_model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipeline")


@pytest.fixture(scope="module")
def sd_target(sd_folder: Path) -> torch.Tensor:
    """The pipeline's own text encoder output for a prompt: a last_hidden_state-like L x d feature."""
    loaded = load_encoder(local_model(sd_folder, "text_encoder"))
    ids = load_tokenizer(loaded.folder)(["a white teapot"], loaded.adapter.seq_len)
    with torch.no_grad():
        return loaded.adapter.encode(loaded.adapter.embed(ids))[0]


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CLIPModel]:
    folder = tmp_path_factory.mktemp("clip") / "clip"
    return folder, save_tiny_clip(folder)


@pytest.fixture(scope="module")
def clip_target(clip: tuple[Path, CLIPModel]) -> torch.Tensor:
    ids = bundled_tokenizer()(["a red apple on a table"], 77)
    with torch.no_grad():
        return clip[1].text_model(input_ids=ids).last_hidden_state[0]


def diffusion_request(folder: Path, **kw) -> rd.RenderRequest:
    return rd.RenderRequest(**{"kind": "auto", "pipeline": str(folder), "steps": 2, **kw})


# ----------------------------------------------------------------------------- choosing


def test_auto_choice(text_dir: Path, sd_folder: Path, clip: tuple[Path, CLIPModel]) -> None:
    auto = rd.RenderRequest()
    assert rd.choose_renderer(auto, text_dir, None) == "tokens"
    assert rd.choose_renderer(diffusion_request(sd_folder), text_dir, None) == "diffusion"
    assert rd.choose_renderer(auto, clip[0], None) == "clip-vision"  # a full CLIPModel has a vision tower
    assert rd.choose_renderer(rd.RenderRequest(vision=clip[0]), text_dir, None) == "clip-vision"
    assert rd.choose_renderer(rd.RenderRequest(kind="none"), clip[0], None) == "none"
    assert rd.choose_renderer(rd.RenderRequest(kind="tokens"), clip[0], None) == "tokens"
    # SD's text encoder subfolder is a plain CLIPTextModel: no vision tower, so tokens.
    assert rd.choose_renderer(auto, sd_folder, "text_encoder") == "tokens"


@pytest.mark.parametrize(("request_kw", "expected"), [
    ({"kind": "diffusion"}, "needs --pipeline"),
    ({"kind": "clip-vision"}, "needs a CLIP vision tower"),
    ({"kind": "pictures"}, "use one of"),
    ({"n_images": 0}, "--render-images"),
    ({"steps": -1}, "--render-steps"),
    ({"guidance": float("nan")}, "--guidance"),
    ({"device": "tpu"}, "auto, cpu or cuda"),
    ({"pipeline": "someone/sd-model"}, "Hub ids are not resolved here"),
    ({"pipeline": "/no/such/folder"}, "no such folder"),
    ({"vision": Path("/no/such/folder")}, "no such folder"),
])
def test_explicit_choice_that_cannot_work(text_dir: Path, request_kw: dict, expected: str) -> None:
    with pytest.raises(UsageError) as exc:
        rd.choose_renderer(rd.RenderRequest(**request_kw), text_dir, None)
    assert expected in one_line(exc)
    assert exc.value.exit_code == 4


def test_diffusion_without_diffusers_says_how_to_install(text_dir: Path, sd_folder: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rd_diffusion, "diffusers_available", lambda: False)
    with pytest.raises(UsageError) as exc:
        rd.choose_renderer(diffusion_request(sd_folder, kind="diffusion"), text_dir, None)
    assert "pip install 'amdet-gate[render]'" in one_line(exc)


@pytest.mark.parametrize(("key", "value"), [
    ("_class_name", "MyCustomPipeline"),
    ("_class_name", "StableDiffusionXLPipeline"),
    ("unet", ["my_module", "EvilUNet"]),
    ("scheduler", ["my_module", "EvilScheduler"]),
])
def test_custom_pipelines_are_refused(tmp_path: Path, text_dir: Path, sd_folder: Path, key: str, value) -> None:
    folder = tmp_path / "custom"
    shutil.copytree(sd_folder, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, key: value}))
    with pytest.raises(UsageError) as exc:
        rd.choose_renderer(diffusion_request(folder), text_dir, None)
    one_line(exc)


# ----------------------------------------------------------------------------- diffusion


def test_diffusion_renders_seeded_images(tmp_path: Path, sd_folder: Path, sd_target: torch.Tensor) -> None:
    made = rd.render(diffusion_request(sd_folder), sd_target, RESULT, sd_folder, "text_encoder", tmp_path / "a")
    assert [r.renderer for r in made] == ["diffusion", "tokens"]
    diffusion = made[0]
    assert [i.path for i in diffusion.images] == [f"images/diffusion_{i}.png" for i in range(4)]
    first = [(tmp_path / "a" / i.path).read_bytes() for i in diffusion.images]
    for data in first:
        image = Image.open(io.BytesIO(data))
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (32, 32)  # sample_size 16 x VAE 2
    assert len(set(first)) == 4  # four different images from one seeded batch
    assert diffusion.metrics["steps"] == 2 and "unconditional branch" in diffusion.text

    again = rd.render(diffusion_request(sd_folder), sd_target, RESULT, sd_folder, "text_encoder", tmp_path / "b")
    assert [(tmp_path / "b" / i.path).read_bytes() for i in again[0].images] == first
    other = rd.render(diffusion_request(sd_folder, seed=1), sd_target, RESULT, sd_folder, "text_encoder",
                      tmp_path / "c")
    assert [(tmp_path / "c" / i.path).read_bytes() for i in other[0].images] != first


def test_diffusion_conditions_on_the_feature(tmp_path: Path, sd_folder: Path, sd_target: torch.Tensor) -> None:
    """A different target feature gives different pixels for the same seed: T really conditions the UNet."""
    req = diffusion_request(sd_folder, n_images=1, guidance=7.5)
    empty = torch.zeros_like(sd_target)
    a = rd.render(req, sd_target, EMPTY, sd_folder, "text_encoder", tmp_path / "a", empty_feature=empty)
    b = rd.render(req, -sd_target, EMPTY, sd_folder, "text_encoder", tmp_path / "b", empty_feature=empty)
    assert (tmp_path / "a" / a[0].images[0].path).read_bytes() != (tmp_path / "b" / b[0].images[0].path).read_bytes()


def test_diffusion_positions_are_fitted_and_width_checked(tmp_path: Path, sd_folder: Path,
                                                          sd_target: torch.Tensor) -> None:
    req = diffusion_request(sd_folder, n_images=1, steps=1)
    short, empty = sd_target[:40], torch.zeros(40, sd_target.shape[1])
    made = rd.render(req, short, EMPTY, sd_folder, "text_encoder", tmp_path, empty_feature=empty)
    assert any("padded to the 77" in note for note in made[0].notes)
    assert rd_diffusion.fit_positions(torch.randn(100, 8)).shape == (77, 8)
    padded = rd_diffusion.fit_positions(short)
    assert torch.equal(padded[:40], short) and torch.equal(padded[-1], short[-1])

    with pytest.raises(UsageError) as exc:
        rd.render(req, torch.randn(77, 48), EMPTY, sd_folder, "text_encoder", tmp_path,
                  empty_feature=torch.randn(77, 48))
    assert "does not match the encoder" in one_line(exc)


def test_diffusion_refuses_pickle_weights(tmp_path: Path, sd_folder: Path, sd_target: torch.Tensor) -> None:
    folder = tmp_path / "pickled"
    shutil.copytree(sd_folder, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), folder / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(PickleRefused) as exc:
        rd.render(diffusion_request(folder), sd_target, EMPTY, sd_folder, "text_encoder", tmp_path / "out")
    assert exc.value.exit_code == 3 and "pickle" in one_line(exc)


def test_diffusion_refuses_hostile_configs(tmp_path: Path, sd_folder: Path, sd_target: torch.Tensor) -> None:
    folder = tmp_path / "hostile"
    shutil.copytree(sd_folder, folder)
    config = folder / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "layers_per_block": 10_000}))
    with pytest.raises(LoadError) as exc:
        rd.render(diffusion_request(folder), sd_target, EMPTY, sd_folder, "text_encoder", tmp_path / "out")
    assert "layers_per_block" in one_line(exc)
    config.write_text("{not json")
    with pytest.raises(LoadError) as exc:
        rd.render(diffusion_request(folder), sd_target, EMPTY, sd_folder, "text_encoder", tmp_path / "out")
    one_line(exc)


# ----------------------------------------------------------------------------- clip-vision


def embed_pngs(model: CLIPModel, paths: list[Path]) -> torch.Tensor:
    """Embed saved PNGs with the reference transformers model, independently of the renderer."""
    pixels = torch.stack([torch.from_numpy(np.array(png(p))).permute(2, 0, 1).float() / 255 for p in paths])
    mean, std = torch.tensor(rd_vision.CLIP_MEAN)[:, None, None], torch.tensor(rd_vision.CLIP_STD)[:, None, None]
    with torch.no_grad():
        pooled = model.vision_model(pixel_values=(pixels - mean) / std).pooler_output
        return nnf.normalize(model.visual_projection(pooled), dim=-1)


def test_clip_vision_moves_images_towards_the_target(tmp_path: Path, clip: tuple[Path, CLIPModel],
                                                     clip_target: torch.Tensor) -> None:
    folder, model = clip
    with torch.no_grad():  # the documented pooling: mean of positions 2.., then the text projection
        text = nnf.normalize(model.text_projection(clip_target[2:].mean(0)), dim=0)
    start = rd.render(rd.RenderRequest(steps=0, n_images=2), clip_target, RESULT, folder, None, tmp_path / "start")
    done = rd.render(rd.RenderRequest(steps=30, n_images=2), clip_target, RESULT, folder, None, tmp_path / "done")
    assert [r.renderer for r in done] == ["clip-vision", "tokens"]
    paths = [i.path for i in done[0].images]
    assert paths == ["images/clip_vision_0.png", "images/clip_vision_1.png"]
    assert all(png(tmp_path / "done" / p).size == (32, 32) for p in paths)
    before = embed_pngs(model, [tmp_path / "start" / p for p in paths]) @ text
    after = embed_pngs(model, [tmp_path / "done" / p for p in paths]) @ text
    assert (after > before + 0.05).all(), (before, after)
    assert start[0].metrics["cosine_after"] == start[0].metrics["cosine_before"]  # 0 steps: the initial images
    metrics = done[0].metrics
    assert all(a > b for a, b in zip(metrics["cosine_after"], metrics["cosine_before"], strict=True))
    assert metrics["text_projection"] == "model"  # the scanned model's own projection


def test_clip_vision_is_seeded(tmp_path: Path, clip: tuple[Path, CLIPModel], clip_target: torch.Tensor) -> None:
    folder = clip[0]

    def run(seed: int, name: str) -> list[bytes]:
        made = rd.render(rd.RenderRequest(kind="clip-vision", steps=3, n_images=2, seed=seed), clip_target, EMPTY,
                         folder, None, tmp_path / name)
        return [(tmp_path / name / i.path).read_bytes() for i in made[0].images]

    first = run(0, "a")
    assert run(0, "b") == first
    assert run(1, "c") != first


def test_clip_vision_with_separate_vision_folder(tmp_path: Path, text_dir: Path, clip: tuple[Path, CLIPModel],
                                                 clip_target: torch.Tensor) -> None:
    """A plain CLIPTextModel scan with --vision FULL_CLIP uses that checkpoint's text projection."""
    made = rd.render(rd.RenderRequest(vision=clip[0], steps=1, n_images=1), clip_target, EMPTY, text_dir, None,
                     tmp_path)
    assert made[0].renderer == "clip-vision" and made[0].metrics["text_projection"] == "vision"

    vision_only = tmp_path / "vision_only"
    tower = CLIPVisionModelWithProjection(clip[1].config.vision_config.__class__(
        **{**clip[1].config.vision_config.to_dict(), "projection_dim": 16}))
    tower.save_pretrained(str(vision_only))
    with pytest.raises(UsageError) as exc:
        rd.render(rd.RenderRequest(vision=vision_only, steps=1), clip_target, EMPTY, text_dir, None, tmp_path)
    assert "needs a text projection" in one_line(exc)


def test_clip_vision_refuses_pickle_and_mismatched_headers(tmp_path: Path, clip: tuple[Path, CLIPModel],
                                                           clip_target: torch.Tensor) -> None:
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(clip[0] / "config.json", pickled)
    torch.save({"x": torch.zeros(1)}, pickled / "pytorch_model.bin")
    with pytest.raises(PickleRefused) as exc:
        rd.render(rd.RenderRequest(vision=pickled, steps=1), clip_target, EMPTY, clip[0], None, tmp_path / "o")
    one_line(exc)

    lying = tmp_path / "lying"
    shutil.copytree(clip[0], lying)
    config = json.loads((lying / "config.json").read_text())
    config["vision_config"]["image_size"] = 64  # the position embedding in the file is for 32 x 32
    (lying / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError) as exc:
        rd.render(rd.RenderRequest(steps=1), clip_target, EMPTY, lying, None, tmp_path / "o")
    assert "position_embedding" in one_line(exc)

    with pytest.raises(UsageError) as exc:  # an encoder of another width than the tower's text projection
        rd.render(rd.RenderRequest(vision=clip[0], steps=1), torch.randn(77, 48), EMPTY, tmp_path / "none", None,
                  tmp_path / "o")
    assert "does not match the encoder" in one_line(exc)


# ----------------------------------------------------------------------------- tokens


def test_tokens_card_is_safe_and_deterministic(tmp_path: Path, text_dir: Path) -> None:
    target = torch.randn(77, 32)
    first = rd.render(rd.RenderRequest(), target, RESULT, text_dir, None, tmp_path / "a")
    rd.render(rd.RenderRequest(kind="tokens"), target, RESULT, text_dir, None, tmp_path / "b")
    assert len(first) == 1 and first[0].renderer == "tokens"
    card = first[0].images[0]
    assert card.path == "images/tokens.png" and card.renderer == "tokens"
    data = (tmp_path / "a" / card.path).read_bytes()
    assert data == (tmp_path / "b" / card.path).read_bytes()
    assert b"Software" not in data and png(tmp_path / "a" / card.path).format == "PNG"

    text = first[0].text
    assert all(ch in "\n" or ch.isprintable() for ch in text)  # no escape sequences, bidi overrides, surrogates
    assert "$\\frac{1}{2}$" in text  # literal, not mathtext
    assert "U+043E" in text  # the homoglyph trigger is told apart from a Latin o
    assert "pos  1   0.700" in text and "pos  3   0.400" in text
    assert next(line for line in text.splitlines() if "break" in line).strip().startswith("n/a")  # no position
    assert "a velvet camera" in text and "n/a" in text and "x" * 100 not in text
    assert "\u2026" in text  # long strings are cut


def test_tokens_card_without_reversed_target(tmp_path: Path) -> None:
    made = rd_tokens.render_tokens(EMPTY, tmp_path)
    assert made.text.count("(none)") == 3
    assert png(tmp_path / made.images[0].path).size[0] > 100


def test_render_none_and_errors_are_gate_errors(tmp_path: Path, text_dir: Path) -> None:
    assert rd.render(rd.RenderRequest(kind="none"), torch.randn(77, 32), EMPTY, text_dir, None, tmp_path) == []
    with pytest.raises(GateError) as exc:
        rd.render(rd.RenderRequest(), torch.full((77, 32), float("nan")), EMPTY, text_dir, None, tmp_path)
    one_line(exc)


def test_core_import_does_not_need_diffusers() -> None:
    """The renderer module loads without touching diffusers (the `render` extra is optional)."""
    code = "import sys, amdet_gate.render; assert 'diffusers' not in sys.modules and 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


def test_trigger_vectors_are_read_from_an_untrusted_result() -> None:
    assert RESULT.vectors == 2
    assert EMPTY.vectors == 1  # a result before schema 1.2: one vector
    for implausible in (0, -3, 10**9):
        assert replace(RESULT, trigger_vectors=implausible).vectors == 1
    for bad in (None, True, "2", 2.0, [2]):  # not an integer: result.json is refused before any renderer
        data = {"trigger_vectors": bad, "trigger_tokens": [], "target_tokens": []}
        if bad is None:
            assert from_data(ReversedTarget, data).vectors == 1
        else:
            with pytest.raises(ResultError):
                from_data(ReversedTarget, data)


@pytest.mark.parametrize("k", [1, 2])
def test_target_text_embedding_skips_bos_and_the_trigger(k: int) -> None:
    target, projection = torch.randn(10, 4), torch.randn(3, 4)
    expected = torch.nn.functional.normalize(projection @ target[1 + k :].mean(dim=0), dim=0)
    torch.testing.assert_close(rd_vision.target_text_embedding(target, projection, k), expected)


def test_every_registered_renderer_resolves_and_tokens_comes_last() -> None:
    """The registry is the only list of renderers: each entry imports, carries its name, and auto ends on tokens."""
    assert ("auto", *rd.REGISTRY, "none") == rd.REQUEST_KINDS and list(rd.REGISTRY)[-1] == rd.CARD
    for name in rd.REGISTRY:
        renderer = rd.get_renderer(name)
        assert renderer.name == name
        assert all(callable(getattr(renderer, method)) for method in ("applies", "check", "render"))
