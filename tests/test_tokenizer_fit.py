"""A tokenizer that does not fit the model is an error (exit 2), never a verdict; the verdict cache
key covers every file the tokenizer reads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from amdet_gate.encoders import load_encoder
from amdet_gate.errors import ExitCode, LoadError
from amdet_gate.prompts import builtin_prompts
from amdet_gate.scanner import tokenize
from amdet_gate.sources.files import TOKENIZER_FILES
from amdet_gate.sources.local import local_model
from amdet_gate.tokenizer import BOS_TOKEN, EOS_TOKEN, bundled_tokenizer, load_tokenizer
from tests.conftest import run_cli

FAST = ("--max-steps", "16", "--n-prompts", "40", "--restarts", "2", "-q")


def _replace_tokenizer(folder: Path, vocab: dict[str, int], unk: str = EOS_TOKEN) -> None:
    """A folder tokenizer made of `vocab` (no merges), in place of the model's own files."""
    for name in TOKENIZER_FILES:
        (folder / name).unlink(missing_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"unk_token": unk, "bos_token": BOS_TOKEN,
                                                              "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN}))


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("amdet-gate: error:"), stderr
    return lines[0]


def test_a_ten_token_vocabulary_is_an_error_not_a_verdict(tiny_dir: Path, tmp_path: Path) -> None:
    """Every prompt tokenized to BOS, EOS, EOS...: a benign model read as FAIL 0.899."""
    _replace_tokenizer(tiny_dir, {BOS_TOKEN: 0, EOS_TOKEN: 1, **{f"{c}</w>": i + 2 for i, c in enumerate("abcdefgh")}})
    code, stdout, stderr = run_cli("scan", tiny_dir, *FAST, "--out", tmp_path / "out")
    assert code == ExitCode.ERROR and "tokenizer" in _one_error_line(stderr) and stdout == ""
    sarif = json.loads((tmp_path / "out" / "result.sarif").read_text())
    assert sarif["runs"][0]["results"][0]["ruleId"] == "AMDET003"


def test_a_tokenizer_that_maps_distinct_prompts_to_the_same_ids_is_refused(tiny_dir: Path) -> None:
    # As large as the model's vocabulary, but it knows one word only ("a"): every other word is
    # unknown (<|endoftext|>, as CLIP's unk), so prompts that start alike get the same ids.
    vocab = {f"zq{i}</w>": i for i in range(49406) if i != 320} | {"a</w>": 320, BOS_TOKEN: 49406,
                                                                    EOS_TOKEN: 49407}
    _replace_tokenizer(tiny_dir, vocab)
    prompts = [p for p in builtin_prompts() if p.startswith("a ")][:40]
    with pytest.raises(LoadError, match="40 distinct prompts to 1 distinct id"):
        tokenize(load_tokenizer(tiny_dir), prompts, load_encoder(local_model(tiny_dir)))


def test_a_tokenizer_that_knows_none_of_the_words_is_refused(tiny_dir: Path) -> None:
    # Unknown words become <unk> (not EOS): sequences still differ by length, but carry nothing.
    vocab = {f"zq{i}</w>": i for i in range(49405)} | {"<unk>": 49405, BOS_TOKEN: 49406, EOS_TOKEN: 49407}
    _replace_tokenizer(tiny_dir, vocab, unk="<unk>")
    with pytest.raises(LoadError, match="no known token"):
        tokenize(load_tokenizer(tiny_dir), builtin_prompts()[:40], load_encoder(local_model(tiny_dir)))


def test_the_real_tokenizer_and_corpus_pass_the_checks(tiny_dir: Path) -> None:
    encoder = load_encoder(local_model(tiny_dir))
    ids = tokenize(bundled_tokenizer(), builtin_prompts(), encoder)  # all 5,000 built-in prompts
    assert len({tuple(r) for r in ids.tolist()}) == len(builtin_prompts())
    assert tokenize(bundled_tokenizer(), [""], encoder).shape == (1, 77)  # one prompt: no corpus checks
    prompts = [p.upper() if i % 2 else p for i, p in enumerate(builtin_prompts()[:40] * 2)]
    assert tokenize(bundled_tokenizer(), prompts, encoder).shape == (80, 77)  # case twins: half distinct


def test_every_file_the_tokenizer_reads_is_in_the_cache_key(tiny_dir: Path, tmp_path: Path) -> None:
    """added_tokens.json was not in the key: a cached verdict came back for a changed tokenizer."""
    assert {"added_tokens.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
            "vocab.json", "merges.txt"} <= set(TOKENIZER_FILES)
    args = ("--threshold", "same_target=1", *FAST)
    assert run_cli("scan", tiny_dir, *args, "--out", tmp_path / "a")[0] == 0
    assert "verdict cache" in run_cli("scan", tiny_dir, *args, "--out", tmp_path / "b")[1]
    (tiny_dir / "added_tokens.json").write_text(json.dumps({"<new-token>": 49408}))
    code, stdout, stderr = run_cli("scan", tiny_dir, *args, "--out", tmp_path / "c")
    assert code == 0 and "verdict cache" not in stdout, stderr


def test_a_tokenizer_file_that_is_a_fifo_is_refused_not_replaced(tiny_dir: Path, tmp_path: Path) -> None:
    for name in TOKENIZER_FILES:
        (tiny_dir / name).unlink(missing_ok=True)
    os.mkfifo(tiny_dir / "tokenizer.json")  # the bundled tokenizer must not silently stand in
    with pytest.raises(LoadError, match="not a regular file"):
        load_tokenizer(tiny_dir)
    code, _, stderr = run_cli("scan", tiny_dir, *FAST, "--out", tmp_path / "out")
    assert code == ExitCode.ERROR and "tokenizer" in _one_error_line(stderr)


def test_the_tokenizer_reads_only_its_own_files(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Built from a private copy: a chat template (or anything else) in the folder is never opened."""
    (tiny_dir / "chat_template.jinja").write_text("{{ evil }}")
    tok = load_tokenizer(tiny_dir)
    assert tok.source == "model folder" and not getattr(tok.tokenizer, "chat_template", None)
    assert torch.equal(tok(["a photo of a cat"], 7), bundled_tokenizer()(["a photo of a cat"], 7))


def test_a_stored_result_of_another_schema_is_not_restored(tiny_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The result schema is part of the cache key: after a schema bump, every scan is a fresh one."""
    import amdet_gate.gate

    args = ("--threshold", "same_target=1", *FAST)
    assert run_cli("scan", tiny_dir, *args, "--out", tmp_path / "a")[0] == 0
    assert "verdict cache" in run_cli("scan", tiny_dir, *args, "--out", tmp_path / "b")[1]
    monkeypatch.setattr(amdet_gate.gate, "SCHEMA_VERSION", "1.99")
    code, stdout, stderr = run_cli("scan", tiny_dir, *args, "--out", tmp_path / "c")
    assert code == 0 and "verdict cache" not in stdout, stderr
