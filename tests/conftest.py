"""Shared fixtures: tiny encoders for loader tests, and the built-in controls, built once per session."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from typer.testing import CliRunner

from amdet_gate import controls
from amdet_gate.cli import app
from amdet_gate.tokenizer import save_bundled_tokenizer

pytest_plugins = ["tests.hubserver"]  # the local Hub server (olah) fixture

WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # set when pytest-xdist runs this process as one of several
# One thread per worker: the workers already fill the cores, and these small matrices gain little from two.
torch.set_num_threads(1 if WORKER else min(2, os.cpu_count() or 1))


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


@pytest.fixture(scope="session", autouse=True)
def isolated_session_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Session fixtures that scan (before any test's own environment is set) use a cache of this run,
    never the machine's: a stored verdict of an earlier run must not stand in for a scan."""
    with pytest.MonkeyPatch.context() as patch:
        root = tmp_path_factory.mktemp("session-cache")
        patch.setenv("AMDET_CACHE_DIR", str(root / "amdet-cache"))
        patch.setenv("XDG_CONFIG_HOME", str(root / "config"))
        yield


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
    "backdoor_pair_rare_word": lambda base: controls.backdoor_text_on_pair(base, "rare_word", seed=20),
    # trained in the linear layers alone, as a text-encoder LoRA trainer does (the LoRA tests)
    "backdoor_rare_word_adapters": lambda base: controls.backdoor_text_on_text(base, "rare_word", seed=6,
                                                                               adapters_only=True),
}  # the emoji and phrase styles, and every text-on-pair style: bench/detection.py


class SharedBuilds:
    """Expensive things built once per test run, whichever pytest-xdist worker asks first.

    Each item is a folder under one root that every worker of the run sees; a file lock per
    item makes the first asker build it (into a temporary folder, renamed when complete) and
    the others wait for it, so two workers never build the same control or scan twice.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def get(self, name: str, build: Callable[[Path], None]) -> Path:
        folder = self.root / name
        with FileLock(str(self.root / f"{name}.lock")):
            if not folder.is_dir():
                partial = self.root / f"{name}.partial"
                shutil.rmtree(partial, ignore_errors=True)
                build(partial)
                partial.rename(folder)
        return folder


@pytest.fixture(scope="session")
def shared_builds(tmp_path_factory: pytest.TempPathFactory) -> SharedBuilds:
    """Under xdist every worker's base temp sits in one folder of the run; alone, our own."""
    basetemp = tmp_path_factory.getbasetemp()
    return SharedBuilds((basetemp.parent if WORKER else basetemp) / "shared-builds")


class Controls(Mapping[str, Path]):
    """The built-in controls by name ("base" or a CONTROL_RECIPES key), each built on first use."""

    def __init__(self, builds: SharedBuilds) -> None:
        self.builds = builds
        self.base: CLIPTextModelWithProjection | None = None

    def _base_model(self) -> CLIPTextModelWithProjection:
        def pretrain(folder: Path) -> None:
            shape = controls.ControlShape(width=128, layers=4, positions=77)
            controls.pretrain_base(shape, steps=controls.BASE_STEPS).save_pretrained(str(folder))

        if self.base is None:  # with its (untrained, seeded) projection, which the recipes read
            full = self.builds.get("base-with-projection", pretrain)
            self.base = CLIPTextModelWithProjection.from_pretrained(str(full)).eval()
        return self.base

    def __getitem__(self, name: str) -> Path:
        if name == "base":
            return self.builds.get(name, lambda folder: controls.save_control(self._base_model(), folder))
        recipe = CONTROL_RECIPES[name]
        return self.builds.get(name, lambda folder: controls.save_control(
            recipe(self._base_model()), folder, with_projection=name.endswith("contrastive")))

    def __iter__(self) -> Iterator[str]:
        return iter(("base", *CONTROL_RECIPES))

    def __len__(self) -> int:
        return 1 + len(CONTROL_RECIPES)


@pytest.fixture(scope="session")
def control_models(shared_builds: SharedBuilds) -> Controls:
    """The built-in controls (benign fine-tunes and backdoored students), each built once per run
    on first use: a test that needs two controls does not pay for all of them."""
    return Controls(shared_builds)


@pytest.fixture(scope="session")
def control_model(control_models: Controls) -> Callable[[str], Path]:
    return control_models.__getitem__


@pytest.fixture(scope="session")
def control_scan(control_models: Controls, shared_builds: SharedBuilds) -> Callable[[str], tuple[int, Path]]:
    """A default scan of a control through the CLI, once per run: name -> (exit code, output folder).
    The budget is generous: on a busy shared CPU a starved scan would stop inconclusive."""
    def scan(name: str) -> tuple[int, Path]:
        def run(folder: Path) -> None:
            folder.mkdir()
            code, _, stderr = run_cli("scan", control_models[name], "--out", folder / "out", "--quiet",
                                      "--time-budget", "20000")
            assert (folder / "out" / "result.json").is_file(), stderr
            (folder / "exit-code").write_text(str(code))

        folder = shared_builds.get(f"scan-{name}", run)
        return int((folder / "exit-code").read_text()), folder / "out"

    return scan


class ControlScans(Mapping[str, tuple[int, dict, Path]]):
    """Each control's default scan by name: (exit code, result.json, output folder), scanned on first
    use (`control_scan`) and checked against the shipped schema, so a file that reads one control's
    verdict waits only for that scan, and two files that read different controls run side by side."""

    def __init__(self, scan: Callable[[str], tuple[int, Path]]) -> None:
        self.scan = scan

    def __getitem__(self, name: str) -> tuple[int, dict, Path]:
        from tests.results import check_file

        code, folder = self.scan(name)
        check_file(folder / "result.json")  # valid against the shipped schema, loads, re-dumps to the same bytes
        return code, json.loads((folder / "result.json").read_text()), folder

    def __iter__(self) -> Iterator[str]:
        return iter(CONTROL_RECIPES)

    def __len__(self) -> int:
        return len(CONTROL_RECIPES)


@pytest.fixture(scope="session")
def scans(control_scan: Callable[[str], tuple[int, Path]]) -> ControlScans:
    return ControlScans(control_scan)
