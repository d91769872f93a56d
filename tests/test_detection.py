"""The detection itself, end to end through the CLI, on the built-in controls."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from amdet_gate.encoders import load_encoder
from amdet_gate.errors import ExitCode
from amdet_gate.reverse import nearest_trigger_tokens
from amdet_gate.sources.identity import sha256_file
from amdet_gate.sources.local import local_model
from amdet_gate.tokenizer import bundled_tokenizer

BENIGN = ("benign_distill", "benign_contrastive")
TEXT_ON_TEXT = ("backdoor_homoglyph", "backdoor_rare_word")  # every style: bench/detection.py
TEXT_ON_PAIR = ("backdoor_pair_rare_word",)  # every trigger style: bench/detection.py
BACKDOORED = TEXT_ON_TEXT + TEXT_ON_PAIR


@pytest.mark.parametrize("name", TEXT_ON_TEXT)
def test_text_on_text_controls_fail_on_typed_tokens(scans: dict, name: str) -> None:
    """The free pseudo-trigger leads; typed tokens found in the vocabulary make the finding."""
    code, result, _ = scans[name]
    assert result["verdict"] == "fail", result["reason"]
    assert code == ExitCode.FAIL
    assert result["score"] > 0.5 and "typed tokens" in result["reason"]
    typed = {c["objective"]: c for c in result["confirmation"]}
    assert typed["tokens"]["same_target_ratio"] > 0.9 and typed["tokens"]["assimilation_ratio"] > 0.8
    assert all(result["gates"][k]["passed"] for k in ("assimilation_ratio", "same_target_ratio"))


@pytest.mark.parametrize("name", TEXT_ON_PAIR)
def test_text_on_pair_is_led_by_the_pooled_path_and_never_passes(scans: dict, name: str) -> None:
    """Only the pooled embedding collapses under the free vector; typed tokens reproduce it.
    Without the base, a pooled-only collapse is inconclusive (a classifier-like encoder does the
    same for its class words); the typed trigger may also collapse the EOS and padding features
    the pooled output comes from, which is a finding of its own."""
    code, result, _ = scans[name]
    assert (code, result["verdict"]) in ((ExitCode.ERROR, "inconclusive"), (ExitCode.FAIL, "fail"))
    assert result["pooled"]["stop_reason"] == "detected" and result["score"] > 0.5
    typed = {c["objective"]: c for c in result["confirmation"]}
    if result["verdict"] == "inconclusive":
        assert "--anchor" in result["reason"]
        assert typed["pooled"]["pooled_same_target_ratio"] >= 0.9
    else:  # the token path's typed trigger is the finding; the pooled typed search is then skipped
        assert "typed tokens" in result["reason"] and list(typed) == ["tokens"]
        assert typed["tokens"]["pooled_same_target_ratio"] >= 0.9


def test_score_separates_backdoored_from_benign(scans: dict) -> None:
    assert min(scans[n][1]["score"] for n in BACKDOORED) > max(scans[n][1]["score"] for n in BENIGN)


def test_homoglyph_trigger_is_recovered(scans: dict) -> None:
    """One of the pseudo-trigger's vectors has the attacker's Cyrillic o (U+043E) among its two nearest tokens."""
    _, result, _ = scans["backdoor_homoglyph"]
    k = result["reversed_target"]["trigger_vectors"]
    nearest = [t["text"] for t in result["reversed_target"]["trigger_tokens"][: 2 * k]]  # rank by rank
    assert "\u043e" in nearest, nearest


def test_nearest_trigger_tokens_name_the_token_a_trigger_equals(control_models: dict[str, Path]) -> None:
    tokenizer = bundled_tokenizer()
    adapter = load_encoder(local_model(control_models["backdoor_homoglyph"])).adapter
    teapot = tokenizer.tokenizer.convert_tokens_to_ids("teapot</w>")
    near = nearest_trigger_tokens(adapter.token_embedding[teapot], adapter.token_embedding, tokenizer, k=3)
    assert near[0].token == "teapot</w>" and abs(near[0].cosine - 1.0) < 1e-5
    assert near[1].cosine < near[0].cosine


def test_result_and_artifacts(scans: dict, control_models: dict[str, Path]) -> None:
    _, result, folder = scans["backdoor_rare_word"]
    assert result["schema_version"] == "1.3" and result["tool"]["name"] == "amdet-gate"
    sha = sha256_file(control_models["backdoor_rare_word"] / "model.safetensors")
    assert result["model"]["weight_files"][0]["sha256"] == sha
    for key in ("settings", "prompts", "timings", "environment", "landscape", "distributions"):
        assert result[key]
    assert len(result["landscape"]["loss"]) == 50 and len(result["landscape"]["loss"][0]) == 50
    assert result["prompts"]["held_out"] == 800 and result["prompts"]["optimisation"] == 3200
    width = result["model"]["config"]["hidden_size"]
    k = result["settings"]["search"]["trigger_vectors"]
    assert result["reversed_target"]["trigger_vectors"] == k == 2
    trigger = load_file(str(folder / "pseudo_trigger.safetensors"))
    assert trigger["pseudo_trigger"].shape == (k, width) and trigger["all_restarts"].shape == (4, k, width)
    assert load_file(str(folder / "target_feature.safetensors"))["target_feature"].shape == (77, width)
    ti = load_file(str(folder / "textual_inversion" / "learned_embeds.safetensors"))
    assert list(ti) == ["<amdet-trigger>"] and torch.equal(ti["<amdet-trigger>"], trigger["pseudo_trigger"])
    tokens = result["reversed_target"]["trigger_tokens"]
    assert len(tokens) == 10 * k and [t["position"] for t in tokens[: 2 * k]] == [1, 2, 1, 2]
    assert [t["position"] for t in result["reversed_target"]["target_tokens"]][:2] == [k + 1, k + 2]


def test_textual_inversion_loads_into_a_diffusers_pipeline(scans: dict, tmp_path: Path) -> None:
    """The exported pseudo-trigger is a textual-inversion token that diffusers' own loader accepts."""
    from diffusers import StableDiffusionPipeline

    from tests.tiny_pipelines import save_tiny_sd_pipeline

    _, _, folder = scans["backdoor_rare_word"]
    trigger = load_file(str(folder / "pseudo_trigger.safetensors"))["pseudo_trigger"]
    pipe = StableDiffusionPipeline.from_pretrained(str(save_tiny_sd_pipeline(tmp_path / "sd", width=trigger.shape[1])))
    pipe.load_textual_inversion(str(folder / "textual_inversion"))
    # K vectors become K tokens; a prompt naming the first is expanded to all of them.
    names = ["<amdet-trigger>"] + [f"<amdet-trigger>_{i}" for i in range(1, trigger.shape[0])]
    ids = pipe.tokenizer.convert_tokens_to_ids(names)
    loaded = pipe.text_encoder.get_input_embeddings().weight[ids]
    torch.testing.assert_close(loaded, trigger)
    assert pipe.maybe_convert_prompt("a <amdet-trigger> cat", pipe.tokenizer).split() == ["a", *names, "cat"]
