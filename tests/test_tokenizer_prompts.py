"""Bundled CLIP tokenizer ids, prompt cleaning, tokenizer files from a model folder, prompt corpus."""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

import pytest

from amdet_gate.errors import LoadError, UsageError
from amdet_gate.prompts import builtin_prompts, generate_corpus, read_prompt_file
from amdet_gate.scanner import split_prompts
from amdet_gate.tokenizer import bundled_tokenizer, bundled_vocab_and_merges, clean_prompt, load_tokenizer


def test_bundled_bpe_file_is_the_openai_one() -> None:
    data = resources.files("amdet_gate").joinpath("data/bpe_simple_vocab_16e6.txt.gz").read_bytes()
    assert hashlib.sha256(data).hexdigest().startswith("924691ac")
    assert hashlib.sha256(data).hexdigest().endswith("6804a")


def test_bundled_vocab_matches_clip() -> None:
    vocab, merges = bundled_vocab_and_merges()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    ids = bundled_tokenizer()(["a photo of a cat"], 10)[0].tolist()
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407, 49407, 49407, 49407]


def test_prompts_are_cleaned_like_openai() -> None:
    assert clean_prompt("a  caf&amp;eacute;\n photo") == "a café photo"
    tok = bundled_tokenizer()
    assert tok(["a &amp; b"], 8).tolist() == tok(["a & b"], 8).tolist()
    assert tok(["ＦＵＬＬ width"], 8).tolist() == tok(["full width"], 8).tolist()


def test_folder_tokenizer_files_are_used(tmp_path: Path) -> None:
    vocab, merges = bundled_vocab_and_merges()
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tok = load_tokenizer(tmp_path)
    assert tok.source == "model folder"
    assert tok(["a photo of a cat"], 7)[0].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_folder_without_tokenizer_falls_back_to_bundled(tmp_path: Path) -> None:
    assert load_tokenizer(tmp_path).source == "bundled CLIP BPE"


def test_hostile_tokenizer_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(LoadError):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "vocab.json").write_text("{}")
    (tmp_path / "merges.txt").write_text("")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": "x.Y"}}))
    with pytest.raises(LoadError, match="remote code"):
        load_tokenizer(tmp_path)


def test_builtin_corpus_is_shipped_generated_and_large() -> None:
    prompts = builtin_prompts()
    assert len(prompts) >= 4000 and len(set(prompts)) == len(prompts)
    assert prompts == generate_corpus()  # the shipped file is the generator's output
    lengths = [len(p.split()) for p in prompts]
    assert sum(lengths) / len(lengths) > 8  # text-to-image style: subjects plus modifiers


def test_prompt_split_is_seeded_and_disjoint() -> None:
    prompts = builtin_prompts()
    opt, held = split_prompts(prompts, 4000, 0.2, seed=0)
    assert (len(opt), len(held)) == (3200, 800) and not set(opt) & set(held)
    assert split_prompts(list(reversed(prompts)), 4000, 0.2, seed=0) == (opt, held)  # order-independent
    assert split_prompts(prompts, 4000, 0.2, seed=1) != (opt, held)


def test_prompt_file(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(f"prompt {i}" for i in range(30)) + "\n\nprompt 0\n")
    assert len(read_prompt_file(path)) == 30
    path.write_text("too few\n")
    with pytest.raises(UsageError):
        read_prompt_file(path)
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UsageError):
        read_prompt_file(path)
