"""Tokenizers: the model folder's own CLIP tokenizer files, else the bundled CLIP BPE.

The bundled vocabulary is OpenAI's `bpe_simple_vocab_16e6.txt.gz` (MIT, shipped in
open-clip-torch), turned into the Hugging Face vocab/merges tables exactly as OpenAI's
simple tokenizer builds them. Prompts are cleaned the way OpenAI's tokenizer does
(ftfy, HTML unescape twice, whitespace) because transformers' CLIPTokenizer does not.
"""

from __future__ import annotations

import gzip
import html
import json
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import ftfy
import torch
from transformers import CLIPTokenizer

from amdet_gate.errors import LoadError
from amdet_gate.files import read_capped
from amdet_gate.sources.files import MAX_TOKENIZER_FILE_BYTES, TOKENIZER_FILES, has_tokenizer_files

BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


@lru_cache(maxsize=1)
def bundled_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Derive vocab.json / merges.txt content from the bundled BPE file (49,408 tokens)."""
    raw = resources.files("amdet_gate").joinpath("data/bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # line 0 is a version header
    units = list(_bytes_to_unicode().values())
    tokens = units + [u + "</w>" for u in units] + ["".join(m.split()) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(tokens)}, [tuple(m.split()) for m in merges]


def clean_prompt(text: str) -> str:
    """OpenAI's basic_clean + whitespace_clean."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).strip()


@dataclass
class PromptTokenizer:
    """Turns prompts into fixed-length id tensors padded as the model expects."""

    tokenizer: CLIPTokenizer
    source: str  # "model folder" or "bundled CLIP BPE"

    def __call__(self, prompts: list[str], length: int) -> torch.Tensor:
        batch = self.tokenizer([clean_prompt(p) for p in prompts], padding="max_length",
                               truncation=True, max_length=length, return_tensors="pt")
        return batch["input_ids"]

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def decode_token(self, token_id: int) -> str:
        return self.tokenizer.convert_ids_to_tokens(int(token_id))

    def decode_text(self, token_id: int) -> str:
        return self.tokenizer.decode([int(token_id)]).strip()


def bundled_tokenizer() -> PromptTokenizer:
    vocab, merges = bundled_vocab_and_merges()
    tok = CLIPTokenizer(vocab=vocab, merges=merges, unk_token=EOS_TOKEN, bos_token=BOS_TOKEN,
                        eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)
    return PromptTokenizer(tok, "bundled CLIP BPE")


def save_bundled_tokenizer(folder: Path) -> None:
    """Write tokenizer.json, vocab.json and merges.txt the way CLIP repos on the Hub have them."""
    bundled_tokenizer().tokenizer.save_pretrained(str(folder))
    vocab, merges = bundled_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), "utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", "utf-8")


def load_tokenizer(folder: Path | None) -> PromptTokenizer:
    """The folder's CLIP tokenizer when it has one, else the bundled one.

    The tokenizer files (sources.files.TOKENIZER_FILES, the same list the verdict cache key hashes) are
    read with the capped reader and the tokenizer is built from a private copy of exactly those
    bytes: it cannot read any other file of the folder, a FIFO or device, or a file that changes
    between the check and the load.
    """
    if folder is None or not has_tokenizer_files(folder):
        return bundled_tokenizer()
    files = {name: read_capped(folder / name, MAX_TOKENIZER_FILE_BYTES, "tokenizer file", LoadError)
             for name in TOKENIZER_FILES if os.path.lexists(folder / name)}
    if "tokenizer_config.json" in files:
        try:
            config = json.loads(files["tokenizer_config.json"])
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise LoadError(f"tokenizer_config.json in {folder} is not valid JSON") from exc
        if not isinstance(config, dict):
            raise LoadError(f"tokenizer_config.json in {folder} is not a JSON object")
        if "auto_map" in config:
            raise LoadError(f"tokenizer in {folder} asks for remote code (auto_map); refused")
    try:
        with tempfile.TemporaryDirectory(prefix="amdet-tokenizer-") as copy:
            for name, data in files.items():
                (Path(copy) / name).write_bytes(data)
            # The CLIP class, not AutoTokenizer: the folder cannot choose what code runs.
            tok = CLIPTokenizer.from_pretrained(copy, local_files_only=True)
    except Exception as exc:
        raise LoadError(f"cannot read the tokenizer files in {folder}: {type(exc).__name__}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return PromptTokenizer(tok, "model folder")
