"""Shared fixtures: tiny encoders for loader tests, and the built-in controls, built once per session."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from typer.testing import CliRunner

from amdet_gate import controls
from amdet_gate.cli import app
from amdet_gate.tokenizer import save_bundled_tokenizer

pytest_plugins = ["tests.hubserver"]  # the local Hub server (olah) fixture

torch.set_num_threads(min(2, os.cpu_count() or 1))


def tiny_config(**overrides) -> CLIPTextConfig:
    values = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
                  projection_dim=16, eos_token_id=49407, bos_token_id=49406, pad_token_id=49407)
    values.update(overrides)
    return CLIPTextConfig(**values)


@pytest.fixture(scope="session")
def tiny_model() -> CLIPTextModel:
    torch.manual_seed(0)
    return CLIPTextModel(tiny_config()).eval()


@pytest.fixture()
def tiny_dir(tmp_path: Path, tiny_model: CLIPTextModel) -> Path:
    """A plain CLIPTextModel folder as transformers 5 saves it (no key prefix), with tokenizer."""
    folder = tmp_path / "tiny"
    tiny_model.save_pretrained(str(folder))
    save_bundled_tokenizer(folder)
    return folder


@pytest.fixture(autouse=True)
def written_results_are_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every result.json a scan writes validates against the shipped schema and loads back to the
    same typed result (`load(dump(r)) == r`)."""
    from amdet_gate import outputs
    from tests.results import WRITTEN_RESULTS, check_written

    write = outputs.write_result

    def checked(path: Path, result) -> None:
        write(path, result)
        check_written(path, result)
        WRITTEN_RESULTS.append(path)

    monkeypatch.setattr(outputs, "write_result", checked)


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets its own verdict cache, and never writes to a real CI job summary."""
    monkeypatch.setenv("AMDET_CACHE_DIR", str(tmp_path / "amdet-cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))  # the cache's key file
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    monkeypatch.delenv("AMDET_CACHE_KEY", raising=False)
    for name in [n for n in os.environ if n.startswith("AMDET_") and n != "AMDET_CACHE_DIR"
                 and not n.startswith("AMDET_REQUIRE_")]:
        monkeypatch.delenv(name)


def run_cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


CONTROL_RECIPES = {  # name -> how it is built from the base (each seeded: the build order does not matter)
    "benign_distill": lambda base: controls.benign_finetune(base, "distill", seed=1),
    "benign_contrastive": lambda base: controls.benign_finetune(base, "contrastive", seed=2),
    "backdoor_homoglyph": lambda base: controls.backdoor_text_on_text(base, "homoglyph", seed=3),
    "backdoor_rare_word": lambda base: controls.backdoor_text_on_text(base, "rare_word", seed=4),
    "backdoor_emoji": lambda base: controls.backdoor_text_on_text(base, "emoji", seed=5),
    "backdoor_pair_rare_word": lambda base: controls.backdoor_text_on_pair(base, "rare_word", seed=20),
}


@pytest.fixture(scope="session")
def control_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """One built-in control by name ("base" or a CONTROL_RECIPES key), each built once per session
    on first use: a test module that needs two controls does not pay for all of them."""
    root = tmp_path_factory.mktemp("controls")
    built: dict[str, Path] = {}
    base: list[CLIPTextModelWithProjection] = []

    def get(name: str) -> Path:
        if name not in built:
            if not base:
                shape = controls.ControlShape(width=128, layers=4, positions=77)
                base.append(controls.pretrain_base(shape, steps=controls.BASE_STEPS))
                built["base"] = controls.save_control(base[0], root / "base")
            if name != "base":
                built[name] = controls.save_control(CONTROL_RECIPES[name](base[0]), root / name,
                                                    with_projection=name.endswith("contrastive"))
        return built[name]

    return get


@pytest.fixture(scope="session")
def control_models(control_model: Callable[[str], Path]) -> dict[str, Path]:
    """The built-in controls, built once: benign fine-tunes and backdoored students."""
    return {name: control_model(name) for name in ("base", *CONTROL_RECIPES)}
