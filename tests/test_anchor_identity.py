"""An anchor that is the model in disguise is refused (exit 4): compared by tensors and by outputs,
not by the weight file's sha256."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

from amdet_gate.encoders import load_encoder
from amdet_gate.errors import ExitCode, UsageError
from amdet_gate.scanner import ANCHOR_MIN_DIFFERENCE, anchor_output_difference, check_anchor_is_another_model, probe_ids
from amdet_gate.sources.local import local_model
from amdet_gate.tokenizer import bundled_tokenizer
from tests.conftest import run_cli, tiny_config

FAST = ("--max-steps", "16", "--n-prompts", "40", "--restarts", "2")


def _disguise(model: Path, out: Path, change=lambda name, t: (name, t), metadata: dict | None = None) -> Path:
    shutil.copytree(model, out)
    tensors = load_file(str(model / "model.safetensors"))
    renamed = dict(change(k, v) for k, v in reversed(tensors.items()))  # another key order too
    save_file({k: v.contiguous() for k, v in renamed.items()}, str(out / "model.safetensors"),
              metadata=metadata or {"n": "x"})
    return out


def _noise(scale: float):
    generator = torch.Generator().manual_seed(0)
    return lambda name, t: (name, t + scale * t.std() * torch.randn(t.shape, generator=generator))


DISGUISES = {
    "re-saved with other metadata": lambda name, t: (name, t),
    "key prefix added": lambda name, t: (f"text_model.{name}", t),
    "fp16": lambda name, t: (name, t.half()),
    "bf16 round trip": lambda name, t: (name, t.bfloat16().float()),
    "relative noise 1e-3": _noise(1e-3),
}


@pytest.mark.parametrize("disguise", sorted(DISGUISES))
def test_the_model_in_disguise_is_refused_as_its_own_anchor(tiny_dir: Path, tmp_path: Path, disguise: str) -> None:
    """`save_file(load_file(...), ..., metadata={'n': 'x'})` gave a byte-different copy and PASS 0.245."""
    anchor = _disguise(tiny_dir, tmp_path / "anchor", DISGUISES[disguise])
    assert (anchor / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()
    with pytest.raises(UsageError, match=r"same tensors|near-copy"):
        check_anchor_is_another_model(load_encoder(local_model(tiny_dir)), load_encoder(local_model(anchor)),
                                      bundled_tokenizer())
    code, stdout, stderr = run_cli("scan", tiny_dir, "--anchor", anchor, *FAST, "--out", tmp_path / "o")
    lines = [line for line in stderr.splitlines() if "error" in line]
    assert code == ExitCode.USAGE and len(lines) == 1 and "anchor" in lines[0], stderr
    assert "searching" not in stderr and "PASS" not in stdout


def test_a_genuinely_different_anchor_is_far_above_the_threshold(tiny_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(1)
    CLIPTextModel(tiny_config()).save_pretrained(str(tmp_path / "other"))
    model, other = load_encoder(local_model(tiny_dir)), load_encoder(local_model(tmp_path / "other"))
    tokenizer = bundled_tokenizer()
    ids = probe_ids(tokenizer, model)
    assert anchor_output_difference(model, other, ids, tokenizer.tokenizer.eos_token_id) > 10 * ANCHOR_MIN_DIFFERENCE
    assert anchor_output_difference(model, model, ids, tokenizer.tokenizer.eos_token_id) == 0.0
    check_anchor_is_another_model(model, other, tokenizer)  # accepted
