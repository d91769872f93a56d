"""The source stage: which files a Hub scan fetches, pins, tokenizer folders, Markdown escaping."""

from __future__ import annotations

from pathlib import Path

import pytest

from amdet_gate.errors import LoadError, PickleRefused, UnsupportedModel, UsageError
from amdet_gate.report.markdown import md_text, render_markdown
from amdet_gate.sources import check_pin, resolve_source
from amdet_gate.sources.files import tokenizer_folder
from amdet_gate.sources.hub import UnpinnedRevision, files_to_fetch, is_hub_id
from amdet_gate.tokenizer import save_bundled_tokenizer
from tests.results import sample_result

SD_REPO = [
    "model_index.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin",
    "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/pytorch_model.bin",
    "text_encoder/model.fp16.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json", "vae/config.json",
]


def test_hub_scan_fetches_only_config_safetensors_and_tokenizer() -> None:
    wanted = files_to_fetch(SD_REPO, "text_encoder")
    assert wanted == ["text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer/vocab.json",
                      "tokenizer/merges.txt", "tokenizer/tokenizer_config.json",
                      "tokenizer/special_tokens_map.json"]
    assert not any(name.endswith(".bin") for name in wanted)


def test_sharded_repo_fetches_index_and_shards() -> None:
    repo = ["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors", "pytorch_model.bin", "vocab.json", "merges.txt"]
    assert files_to_fetch(repo, None) == ["config.json", "model.safetensors.index.json",
                                          "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                                          "vocab.json", "merges.txt"]


def test_pickle_only_and_empty_repos_are_refused_before_download() -> None:
    with pytest.raises(PickleRefused, match="pickle"):
        files_to_fetch(["config.json", "pytorch_model.bin"], None)
    with pytest.raises(UnsupportedModel, match="wrong --subfolder"):
        files_to_fetch(SD_REPO, "text_encoder_2")
    with pytest.raises(UnsupportedModel, match=r"config\.json"):
        files_to_fetch(["model.safetensors"], None)


def test_hub_ids_and_pins(tmp_path: Path) -> None:
    assert is_hub_id("openai/clip-vit-large-patch14")
    assert not is_hub_id("../x/y") and not is_hub_id("a/b/c") and not is_hub_id("name")
    check_pin("org/name", "a" * 40)
    check_pin(str(tmp_path), None)  # local folders have no revision to pin
    for revision in (None, "main", "v1.0", "A" * 40, "a" * 39):
        with pytest.raises(UnpinnedRevision) as info:
            check_pin("org/name", revision)
        assert info.value.exit_code == 1 and info.value.rule_id == "AMDET100"


def test_local_sources(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="relative path"):
        resolve_source(str(tmp_path), None, "../escape")
    with pytest.raises(UsageError, match="Hub ids"):
        resolve_source(str(tmp_path), "main")
    with pytest.raises(LoadError, match="does not exist"):
        resolve_source(str(tmp_path / "missing" / "deeper" / "x"))
    source = resolve_source(str(tmp_path), None, "text_encoder")
    assert source.folder == tmp_path / "text_encoder" and source.resolved_sha is None


def test_diffusers_pipeline_tokenizer_is_found_beside_the_text_encoder(tmp_path: Path) -> None:
    (tmp_path / "text_encoder").mkdir()
    assert tokenizer_folder(resolve_source(str(tmp_path), None, "text_encoder")) is None
    save_bundled_tokenizer(tmp_path / "tokenizer")
    assert tokenizer_folder(resolve_source(str(tmp_path), None, "text_encoder")) == tmp_path / "tokenizer"
    save_bundled_tokenizer(tmp_path / "text_encoder")
    assert tokenizer_folder(resolve_source(str(tmp_path), None, "text_encoder")) == tmp_path / "text_encoder"


@pytest.mark.parametrize("hostile", ["![x](https://tracker.example/p.png)", "<img src=x onerror=alert(1)>",
                                     "[click](javascript:alert(1))", "line\nbreak | table", "`code` **b**"])
def test_markdown_shows_untrusted_text_inert(hostile: str) -> None:
    text = md_text(hostile)
    assert "\n" not in text and "<" not in text and ">" not in text
    assert "](" not in text  # no link or image syntax survives
    result = sample_result(verdict="fail", score=0.9, reason=hostile, model={"source": hostile,
                           "identity_sha256": "ab" * 32},
                           gates={hostile: {"value": 1.0, "threshold": 0.8, "passed": True, "margin": 1.0}},
                           reversed_target={"trigger_tokens": [{"id": 1, "token": hostile, "text": hostile,
                                                                "cosine": 0.5}], "target_tokens": []})
    summary = render_markdown(result)
    assert "<img" not in summary and "](" not in summary and "FAIL" in summary


def _weights(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"x")
    return folder


def test_the_scanned_weights_are_the_ones_a_loader_reads(tmp_path: Path) -> None:
    from amdet_gate.sources.local import find_weight_files

    with pytest.raises(PickleRefused, match="would not cover"):  # a loader told use_safetensors=False reads it
        find_weight_files(_weights(tmp_path / "a", "model.safetensors", "pytorch_model.bin"))
    with pytest.raises(UnsupportedModel, match="would not cover"):  # a variant a loader could be asked for
        find_weight_files(_weights(tmp_path / "b", "model.safetensors", "model.fp16.safetensors"))
    with pytest.raises(PickleRefused):  # no standard name: a loader would read the pickle file
        find_weight_files(_weights(tmp_path / "c", "weights.safetensors", "pytorch_model.bin"))
    lone = _weights(tmp_path / "d", "weights.safetensors")
    assert find_weight_files(lone) == [lone / "weights.safetensors"]


def test_revisions_with_a_trailing_newline_are_not_pins() -> None:
    from amdet_gate.sources.hub import is_pinned

    assert is_pinned("a" * 40) and not is_pinned("a" * 40 + "\n") and not is_hub_id("org/name\n")


def test_hub_errors_become_one_clear_line() -> None:
    """The real huggingface_hub exception classes (olah cannot serve a gated repo, so this one is built here)."""
    import httpx2
    from huggingface_hub import errors as hf

    from amdet_gate.sources.hub import hub_error_message

    response = httpx2.Response(403, request=httpx2.Request("GET", "http://127.0.0.1/api/models/a/b"))
    messages = {cls: hub_error_message(cls("boom", response=response), "a/b", "main")
                for cls in (hf.GatedRepoError, hf.RepositoryNotFoundError, hf.RevisionNotFoundError)}
    assert "gated" in messages[hf.GatedRepoError] and "HF_TOKEN" in messages[hf.GatedRepoError]
    assert "not found" in messages[hf.RepositoryNotFoundError]
    assert "revision not found" in messages[hf.RevisionNotFoundError]
    assert "amdet-gate fetch" in hub_error_message(hf.LocalEntryNotFoundError("x"), "a/b", "v1")
    assert "cannot download" in hub_error_message(httpx2.ConnectError("refused"), "a/b", "main")


def test_cached_hub_weights_must_match_the_hubs_sha256(tmp_path: Path) -> None:
    from amdet_gate.sources.hub import check_hub_sha256
    from amdet_gate.sources.identity import WeightFile
    from amdet_gate.sources.model import ResolvedModel

    listed = ResolvedModel("org/name", tmp_path, hub_id="org/name", resolved_sha="c" * 40,
                         hub_sha256=(("model.safetensors", "a" * 64),))
    check_hub_sha256(listed, [WeightFile("model.safetensors", "a" * 64, 1)])
    with pytest.raises(LoadError, match="the Hub lists"):
        check_hub_sha256(listed, [WeightFile("model.safetensors", "b" * 64, 1)])
    check_hub_sha256(ResolvedModel("local", tmp_path), [WeightFile("model.safetensors", "b" * 64, 1)])  # no listing
