"""Whole scans of checkpoint files, pipelines and LoRAs through the CLI: one verdict per encoder, named in every
report, the worst exit code, the T5 part reported as not scanned.

Plumbing tests use tiny encoders and `--threshold same_target=1` (no gate can pass: a forced PASS in a
few steps); the detection tests (slow) scan the built-in controls with the default settings.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPTextModelWithProjection

from amdet_gate.errors import ExitCode, GateError
from amdet_gate.multiscan import EncoderRun, exit_code
from tests import lora_files as lf
from tests import tiny_checkpoints as tc
from tests.conftest import run_cli

PASS = ("--max-steps", "16", "--n-prompts", "40", "--restarts", "2", "-q", "--threshold", "same_target=1")


@pytest.fixture(scope="module")
def tiny() -> dict:
    return {"l": tc.tiny_encoder(64, 2, seed=0), "g": tc.tiny_encoder(128, 2, seed=1)}


def read(path: Path) -> dict:
    return json.loads(path.read_text("utf-8"))


def sarif_results(path: Path) -> list[tuple[str, str, str]]:
    """(rule, level, location) of each result; the location's last path part (tmp_path is absolute: file://...)."""
    log = read(path)
    uri = lambda r: r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
    return [(r["ruleId"], r["level"], uri(r).rsplit("/", 1)[-1]) for r in log["runs"][0]["results"]]


def test_sd3_file_scans_both_clip_encoders_and_reports_the_t5(tmp_path: Path, tiny: dict) -> None:
    path = tc.sd3_file(tmp_path / "sd3.safetensors", tiny["l"], tiny["g"])
    out = tmp_path / "out"
    code, _, stderr = run_cli("scan", path, "--out", out, "--sarif", tmp_path / "amdet.sarif", *PASS)
    assert code == ExitCode.PASS, stderr
    assert "not scanned: text_encoder_3 (T5 encoder)" in stderr and "warning" in stderr
    summary = read(out / "result.json")
    assert summary["kind"] == "encoders" and summary["verdict"] == "pass"
    assert [(e["name"], e["verdict"], e["layer"]["scanned"]) for e in summary["encoders"]] == \
        [("text_encoder", "pass", "final"), ("text_encoder_2", "pass", "final")]
    assert [p["name"] for p in summary["not_scanned"]] == ["text_encoder_3"]
    for name in ("text_encoder", "text_encoder_2"):
        result = read(out / name / "result.json")
        assert result["model"]["encoder"] == name and result["model"]["layout"] == "sd3"
        assert [p["kind"] for p in result["model"]["not_scanned"]] == ["T5 encoder"]
        assert "**Not scanned** text\\_encoder\\_3" in (out / name / "summary.md").read_text()
        assert "not scanned" in (out / name / "report.html").read_text().lower()
    # One SARIF for the model: the T5 once, as a warning, located at its component
    assert sarif_results(tmp_path / "amdet.sarif") == [("AMDET102", "warning", "sd3.safetensors#text_encoder_3")]
    assert "text_encoder_3" in (out / "summary.md").read_text().replace("\\", "")
    assert "text_encoder_2/report.html" in (out / "report.html").read_text()
    # on_unscanned: fail turns the T5 into a failing gate (exit 1), and the SARIF result into an error
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\non_unscanned: fail\n")
    code, _, stderr = run_cli("scan", path, "--out", tmp_path / "strict", "--policy", policy, *PASS)
    assert code == ExitCode.FAIL, stderr
    levels = {r[1] for r in sarif_results(tmp_path / "strict" / "result.sarif")}
    assert levels == {"error"}


def test_flux_file_one_encoder_and_its_t5(tmp_path: Path, tiny: dict) -> None:
    path = tc.flux_file(tmp_path / "flux.safetensors", tiny["l"])
    code, _, stderr = run_cli("scan", path, "--out", tmp_path / "out", *PASS)
    assert code == ExitCode.PASS, stderr
    result = read(tmp_path / "out" / "result.json")  # one encoder: its result is --out's result
    assert (result["model"]["encoder"], result["model"]["layer"]["scanned"], result["model"]["layout"]) == \
        ("text_encoder", "final", "flux")
    assert result["model"]["not_scanned"][0]["name"] == "text_encoder_2"
    assert "not scanned" in stderr


def test_pipeline_folder_scans_every_clip_encoder(tmp_path: Path, tiny: dict) -> None:
    root = tmp_path / "sdxl-pipe"
    tc.hf_folder(root / "text_encoder", tiny["l"])
    tc.hf_folder(root / "text_encoder_2", tiny["g"])
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline", "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "unet": ["diffusers", "UNet2DConditionModel"]}))
    code, _, stderr = run_cli("scan", root, "--out", tmp_path / "out", *PASS)
    assert code == ExitCode.PASS, stderr
    summary = read(tmp_path / "out" / "result.json")
    assert [(e["name"], e["layer"]["chosen_by"], e["layer"]["consumer_reads"]) for e in summary["encoders"]] == \
        [("text_encoder", "default", "-2 (SDXL)"), ("text_encoder_2", "default", "-2 (SDXL)")]
    one = read(tmp_path / "out" / "text_encoder_2" / "result.json")
    assert one["model"]["subfolder"] == "text_encoder_2"
    # a second run: each encoder from the verdict cache
    code, _, _ = run_cli("scan", root, "--out", tmp_path / "out2", *PASS)
    assert code == ExitCode.PASS
    assert all(e["cache_hit"] for e in read(tmp_path / "out2" / "result.json")["encoders"])


def test_lock_and_verify_an_encoder_of_a_file(tmp_path: Path, tiny: dict) -> None:
    path = tc.sdxl_file(tmp_path / "sdxl.safetensors", tiny["l"], tiny["g"])
    lock = tmp_path / "amdet.lock"
    code, _, stderr = run_cli("scan", path, "--out", tmp_path / "out", "--lock", lock, *PASS)
    assert code == ExitCode.PASS, stderr
    entries = read(lock)["models"]
    assert sorted(e["subfolder"] for e in entries) == ["text_encoder", "text_encoder_2"]
    assert len({e["identity_sha256"] for e in entries}) == 2
    code, _, stderr = run_cli("verify", path, "--lock", lock, "--subfolder", "text_encoder_2")
    assert code == 0, stderr
    with path.open("r+b") as fh:  # one byte of a tensor changes: the file is not the scanned one
        fh.seek(-3, 2)
        fh.write(b"\x01")
    code, _, stderr = run_cli("verify", path, "--lock", lock, "--subfolder", "text_encoder_2")
    assert code == ExitCode.FAIL and "changed" in stderr


def test_worst_exit_code_and_exit_zero(tmp_path: Path) -> None:
    def run(code: ExitCode) -> EncoderRun:
        return EncoderRun("e", None, GateError("x")) if code == ExitCode.ERROR else \
            EncoderRun("e", type("O", (), {"exit_code": code})(), None)

    assert exit_code([run(ExitCode.PASS), run(ExitCode.FAIL), run(ExitCode.ERROR)], False) == ExitCode.FAIL
    assert exit_code([run(ExitCode.FAIL), run(ExitCode.ERROR)], True) == ExitCode.ERROR  # never hides a 2
    assert exit_code([run(ExitCode.FAIL), run(ExitCode.PASS)], True) == ExitCode.PASS


def test_an_encoder_that_cannot_be_read_is_an_error_beside_the_others(tmp_path: Path, tiny: dict) -> None:
    """One encoder with NaN weights: exit 2 for it (and for the model), the other still scanned and reported."""
    tensors = {**tc.to_transformers(tiny["l"], "conditioner.embedders.0.transformer."),
               **tc.to_open_clip(tiny["g"], "conditioner.embedders.1.model.")}
    tensors["conditioner.embedders.1.model.ln_final.weight"] = torch.full((128,), float("nan"))
    path = tc.save(tensors, tmp_path / "sdxl.safetensors")
    code, _, stderr = run_cli("scan", path, "--out", tmp_path / "out", *PASS)
    assert code == ExitCode.ERROR, stderr
    summary = read(tmp_path / "out" / "result.json")
    assert [(e["name"], e["verdict"]) for e in summary["encoders"]] == [("text_encoder", "pass"),
                                                                        ("text_encoder_2", "error")]
    assert ("AMDET003", "warning", "sdxl.safetensors#text_encoder_2") in sarif_results(tmp_path / "out" /
                                                                                          "result.sarif")


# --- detection (slow): the built-in controls hidden in checkpoint files ------------------------

def control(folder: Path) -> CLIPTextModelWithProjection:
    """A saved control (CLIPTextModel, no projection) as a CLIPTextModelWithProjection with an identity projection."""
    state = load_file(str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    from transformers import CLIPTextConfig

    model = CLIPTextModelWithProjection(CLIPTextConfig(**{**config, "projection_dim": config["hidden_size"]}))
    model.text_model.load_state_dict({k.removeprefix("text_model."): v for k, v in state.items()}, strict=False)
    with torch.no_grad():
        model.text_projection.weight.copy_(torch.eye(config["hidden_size"]))
    return model.eval()


@pytest.mark.slow
def test_backdoor_hidden_as_text_encoder_2_of_an_sdxl_file_fails(control_models: Mapping[str, Path],
                                                                  tmp_path: Path) -> None:
    path = tc.sdxl_file(tmp_path / "sd_xl_base.safetensors", control(control_models["base"]),
                        control(control_models["backdoor_homoglyph"]), torch.float16)
    code, _, stderr = run_cli("scan", path, "--out", tmp_path / "out", "-q")
    assert code == ExitCode.FAIL, stderr
    summary = read(tmp_path / "out" / "result.json")
    assert [(e["name"], e["verdict"]) for e in summary["encoders"]] == [("text_encoder", "pass"),
                                                                        ("text_encoder_2", "fail")]
    found = [r for r in sarif_results(tmp_path / "out" / "result.sarif") if r[0] == "AMDET001"]
    assert found == [("AMDET001", "error", "sd_xl_base.safetensors#text_encoder_2")]
    assert "text_encoder_2" in read(tmp_path / "out" / "text_encoder_2" / "result.sarif")["runs"][0][
        "results"][0]["message"]["text"]


@pytest.mark.slow
def test_kohya_lora_carrying_a_backdoor_fails_on_the_clean_base(control_models: Mapping[str, Path],
                                                                tmp_path: Path) -> None:
    """A rare-word backdoor trained in the linear layers alone (what a text-encoder LoRA trains), shipped
    as the rank-32 kohya LoRA of its difference to the clean base: the clean base passes, the base with
    the LoRA merged fails on typed tokens; the identity is both files'."""
    def state(name: str) -> dict[str, torch.Tensor]:
        return {k.removeprefix("text_model."): v for k, v in
                load_file(str(control_models[name] / "model.safetensors")).items()}

    pairs = lf.low_rank_difference(state("backdoor_rare_word_adapters"), state("base"), rank=32, layers=4)
    lora = lf.kohya_file(tmp_path / "trigger_lora.safetensors", pairs)
    code, _, stderr = run_cli("scan", control_models["base"], "--lora", lora, "--out", tmp_path / "out", "-q")
    result = read(tmp_path / "out" / "result.json")
    assert code == ExitCode.FAIL, result["reason"]
    assert result["verdict"] == "fail" and "typed tokens" in result["reason"], result["reason"]
    assert [w["name"] for w in result["model"]["weight_files"]] == ["model.safetensors", "trigger_lora.safetensors"]
    assert result["model"]["lora"]["modules_merged"] == 24
    code, _, stderr = run_cli("scan", control_models["base"], "--out", tmp_path / "clean", "-q")
    assert code == ExitCode.PASS, stderr


@pytest.mark.slow
def test_sd1_single_file_with_a_backdoored_encoder_fails(control_models: Mapping[str, Path], tmp_path: Path) -> None:
    path = tc.sd1_file(tmp_path / "v1-5.safetensors", control(control_models["backdoor_rare_word"]), torch.float16)
    code, _, stderr = run_cli("scan", path, "--out", tmp_path / "out", "-q")
    assert code == ExitCode.FAIL, stderr
    result = read(tmp_path / "out" / "result.json")
    assert (result["model"]["layout"], result["model"]["layer"]["scanned"]) == ("sd1", "final")
