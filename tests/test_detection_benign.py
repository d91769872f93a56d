"""The detection on the benign controls, end to end through the CLI: a file of its own, so that a
second pytest-xdist worker builds and scans them beside test_detection.py's backdoored controls."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import CLIPTextModel

from amdet_gate.encoders import load_encoder
from amdet_gate.engine import assimilation
from amdet_gate.errors import ExitCode
from amdet_gate.prompts import builtin_prompts
from amdet_gate.sources.local import local_model
from amdet_gate.tokenizer import bundled_tokenizer
from tests.test_detection import BENIGN


def test_base_is_pretrained_like_not_random(control_models: dict[str, Path]) -> None:
    ids = bundled_tokenizer()(builtin_prompts()[:300], 77)
    base = load_encoder(local_model(control_models["base"])).adapter
    with torch.no_grad():
        clean = float(assimilation(base.encode(base.embed(ids))).mean())
        torch.manual_seed(0)
        random_model = CLIPTextModel(base.model.config).eval()
        random_init = float(assimilation(random_model(input_ids=ids).last_hidden_state).mean())
    assert random_init > 0.75  # random initialisation already assimilates
    assert 0.3 < clean < 0.65, clean  # CLIP's range, after the short pretraining


@pytest.mark.parametrize("name", BENIGN)
def test_benign_controls_run_the_pooled_path_and_no_typed_tokens_confirm_it(scans: dict, name: str) -> None:
    """A bounded free vector may steer a benign encoder's pooled output (0.59 on the contrastive
    control): a lead at most, which no typed tokens reproduce."""
    _, result, _ = scans[name]
    assert result["pooled"]["steps"] > 0
    typed = {c["objective"]: c for c in result["confirmation"]}
    assert "pooled" not in typed or typed["pooled"]["pooled_same_target_ratio"] < 0.9


@pytest.mark.parametrize("name", BENIGN)
def test_benign_controls_pass(scans: dict, name: str) -> None:
    code, result, _ = scans[name]
    assert result["verdict"] == "pass", result["reason"]
    assert code == ExitCode.PASS
    assert result["score"] < 0.45
