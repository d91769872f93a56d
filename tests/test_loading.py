"""Loading every supported layout, and refusing hostile or broken ones with the right exit code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPTextModelWithProjection

from amdet_gate.encoders import load_encoder
from amdet_gate.errors import ExitCode, LoadError, PickleRefused, UnsupportedModel
from amdet_gate.sources.identity import sha256_file
from amdet_gate.sources.local import local_model
from tests.conftest import run_cli, tiny_config

IDS = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70])


def reference_features(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).last_hidden_state


def adapter_features(folder: Path, subfolder: str | None = None) -> torch.Tensor:
    adapter = load_encoder(local_model(folder, subfolder)).adapter
    with torch.no_grad():
        return adapter.encode(adapter.embed(IDS))


def test_plain_text_model_matches_transformers(tiny_dir: Path, tiny_model: CLIPTextModel) -> None:
    keys = load_file(str(tiny_dir / "model.safetensors")).keys()
    assert not any(k.startswith("text_model.") for k in keys)  # transformers 5 layout
    torch.testing.assert_close(adapter_features(tiny_dir), reference_features(tiny_model), rtol=1e-5, atol=1e-5)


def test_prefixed_with_projection_layout(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = CLIPTextModelWithProjection(tiny_config()).eval()
    model.save_pretrained(str(tmp_path))
    keys = load_file(str(tmp_path / "model.safetensors")).keys()
    assert all(k.startswith("text_model.") or k == "text_projection.weight" for k in keys)
    torch.testing.assert_close(adapter_features(tmp_path), reference_features(model), rtol=1e-5, atol=1e-5)


def test_full_clip_model_uses_text_tower(tmp_path: Path) -> None:
    torch.manual_seed(2)
    config = CLIPConfig(text_config=tiny_config().to_dict(),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=16),
                        projection_dim=16)
    model = CLIPModel(config).eval()
    model.save_pretrained(str(tmp_path))
    loaded = load_encoder(local_model(tmp_path))
    assert loaded.architecture == "CLIPModel"
    with torch.no_grad():
        expected = model.text_model(input_ids=IDS).last_hidden_state
    torch.testing.assert_close(adapter_features(tmp_path), expected, rtol=1e-5, atol=1e-5)


def test_sharded_checkpoint_with_index(tmp_path: Path, tiny_model: CLIPTextModel) -> None:
    tiny_model.save_pretrained(str(tmp_path), max_shard_size="1MB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    loaded = load_encoder(local_model(tmp_path))
    assert len(loaded.weight_files) > 1
    torch.testing.assert_close(adapter_features(tmp_path), reference_features(tiny_model), rtol=1e-5, atol=1e-5)


def test_diffusers_pipeline_subfolder_and_sha256(tmp_path: Path, tiny_model: CLIPTextModel) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    # Stable Diffusion 1.x text encoders carry the text_model. prefix.
    sub = tmp_path / "text_encoder"
    sub.mkdir()
    prefixed = {f"text_model.{k}": v.contiguous() for k, v in tiny_model.state_dict().items()}
    save_file(prefixed, str(sub / "model.safetensors"))
    (sub / "config.json").write_text(json.dumps(tiny_model.config.to_dict()))
    loaded = load_encoder(local_model(tmp_path, "text_encoder"))
    assert loaded.weight_files[0].sha256 == sha256_file(sub / "model.safetensors")
    torch.testing.assert_close(adapter_features(tmp_path, "text_encoder"), reference_features(tiny_model),
                               rtol=1e-5, atol=1e-5)


def test_half_precision_weights_load(tmp_path: Path, tiny_model: CLIPTextModel) -> None:
    tiny_model.half().save_pretrained(str(tmp_path))
    tiny_model.float()
    torch.testing.assert_close(adapter_features(tmp_path), reference_features(tiny_model), rtol=5e-2, atol=5e-2)


def test_longclip_positions(tmp_path: Path) -> None:
    model = CLIPTextModel(tiny_config(max_position_embeddings=248)).eval()
    model.save_pretrained(str(tmp_path))
    assert load_encoder(local_model(tmp_path)).adapter.seq_len == 248


# --- refusals ------------------------------------------------------------------------------

def _rewrite_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _truncate(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _pickle_only(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")


def _nan_weights(folder: Path) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    name = next(k for k in tensors if k.endswith("fc1.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(folder / "model.safetensors"))


def _traversal_index(folder: Path) -> None:
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"final_layer_norm.weight": "../../etc/passwd.safetensors"}}))


def _bad_json(folder: Path) -> None:
    (folder / "config.json").write_text("{not json")


BROKEN = {
    "truncated safetensors": (_truncate, LoadError, ExitCode.ERROR),
    "pickle only": (_pickle_only, PickleRefused, ExitCode.NOTHING_SCANNABLE),
    "config lies about width": (lambda f: _rewrite_config(f, hidden_size=64), LoadError, ExitCode.ERROR),
    "config lies about depth": (lambda f: _rewrite_config(f, num_hidden_layers=3), LoadError, ExitCode.ERROR),
    "wrong architecture": (lambda f: _rewrite_config(f, model_type="bert", architectures=["BertModel"]),
                           UnsupportedModel, ExitCode.NOTHING_SCANNABLE),
    "remote code": (lambda f: _rewrite_config(f, auto_map={"AutoModel": "evil.Model"}), UnsupportedModel,
                    ExitCode.NOTHING_SCANNABLE),
    "absurd size": (lambda f: _rewrite_config(f, hidden_size=10**9), LoadError, ExitCode.ERROR),
    "NaN weights": (_nan_weights, LoadError, ExitCode.ERROR),
    "path traversal in index": (_traversal_index, LoadError, ExitCode.ERROR),
    "config not JSON": (_bad_json, LoadError, ExitCode.ERROR),
    "config nested too deeply": (lambda f: (f / "config.json").write_text("[" * 100_000), LoadError,
                                 ExitCode.ERROR),
    "no config": (lambda f: (f / "config.json").unlink(), UnsupportedModel, ExitCode.NOTHING_SCANNABLE),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), UnsupportedModel, ExitCode.NOTHING_SCANNABLE),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_model_is_refused(tiny_dir: Path, case: str) -> None:
    damage, error, code = BROKEN[case]
    damage(tiny_dir)
    with pytest.raises(error):
        load_encoder(local_model(tiny_dir))
    exit_code, stdout, stderr = run_cli("scan", tiny_dir, "--quiet", "--out", tiny_dir.parent / "out")
    assert exit_code == code
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("amdet-gate: error:"), stderr
    assert "Traceback" not in stderr + stdout


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "model.ckpt", "weights.pth", "model.pkl"])
def test_pickle_weights_beside_safetensors_are_refused_never_opened(tiny_dir: Path, tmp_path: Path,
                                                                   name: str) -> None:
    """A pytorch_model.bin beside model.safetensors passed scan and verify, while a stray safetensors variant
    was refused: a loader asked for use_safetensors=False would unpickle it."""
    lock = _lock_for(tiny_dir, tmp_path / "amdet.lock")  # verify gets as far as the weights
    pwned = tmp_path / "pwned"
    (tiny_dir / name).write_bytes(f"cposix\nsystem\n(S'touch {pwned}'\ntR.".encode())
    with pytest.raises(PickleRefused, match=f"also holds pickle weights .*{name}"):
        load_encoder(local_model(tiny_dir))
    code, _, stderr = run_cli("scan", tiny_dir, "--quiet", "--out", tmp_path / "out")
    assert code == ExitCode.NOTHING_SCANNABLE and name in stderr and len(stderr.strip().splitlines()) == 1
    sarif = json.loads((tmp_path / "out" / "result.sarif").read_text())
    assert sarif["runs"][0]["results"][0]["ruleId"] == "AMDET101"
    code, _, stderr = run_cli("verify", tiny_dir, "--lock", lock)
    assert code == ExitCode.NOTHING_SCANNABLE and name in stderr and len(stderr.strip().splitlines()) == 1
    assert not pwned.exists()


def _lock_for(folder: Path, lock: Path) -> Path:
    """A lock entry that says `folder` was scanned and passed (as `scan --lock` would write it)."""
    from amdet_gate.lock import entry_from_result, write_lock
    from amdet_gate.sources.identity import identity_sha256
    from amdet_gate.sources.local import weight_identities
    from tests.results import sample_result

    weights = weight_identities(folder)
    result = sample_result(model={"weight_files": [w.__dict__ for w in weights],
                                  "identity_sha256": identity_sha256(weights), "subfolder": None},
                           verdict="pass", score=0.1, policy=None)
    write_lock(lock, entry_from_result(result, str(folder)))
    assert run_cli("verify", folder, "--lock", lock)[0] == ExitCode.PASS
    return lock


def test_missing_folder_and_bad_subfolder(tmp_path: Path, tiny_dir: Path) -> None:
    assert run_cli("scan", tmp_path / "nope", "-q")[0] == ExitCode.ERROR
    code, _, stderr = run_cli("scan", tiny_dir, "--subfolder", "../..", "-q")
    assert code == ExitCode.USAGE and "relative path" in stderr


def test_copy_of_model_has_same_identity(tmp_path: Path, tiny_dir: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dir, copy)
    assert load_encoder(local_model(copy)).weight_files == load_encoder(local_model(tiny_dir)).weight_files


def test_hostile_tokenizer_config_is_one_line_exit_2(tiny_dir: Path) -> None:
    (tiny_dir / "tokenizer_config.json").write_text("[" * 100_000)
    code, stdout, stderr = run_cli("scan", tiny_dir, "--quiet", "--out", tiny_dir.parent / "out")
    assert code == ExitCode.ERROR and "tokenizer_config.json" in stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr + stdout


def test_prompts_without_the_tokenizers_eos_are_refused(tiny_dir: Path) -> None:
    """The pooled features are read at EOS: a tokenizer that never emits it cannot be scanned."""
    from types import SimpleNamespace

    from amdet_gate.scanner import tokenize
    from amdet_gate.tokenizer import bundled_tokenizer

    real = bundled_tokenizer()
    encoder = load_encoder(local_model(tiny_dir))
    assert tokenize(real, ["a cat"], encoder).shape == (1, 77)

    class Tokenizer:
        tokenizer = SimpleNamespace(eos_token_id=real.tokenizer.eos_token_id)

        def __call__(self, prompts: list[str], length: int) -> torch.Tensor:
            ids = real(prompts, length)
            return torch.where(ids == real.tokenizer.eos_token_id, torch.zeros_like(ids), ids)

    with pytest.raises(LoadError, match="EOS"):
        tokenize(Tokenizer(), ["a cat"], encoder)
