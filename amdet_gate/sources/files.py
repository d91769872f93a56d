"""Every file of a resolved model that a scan reads: the weights (and their identities), the tokenizer's,
the small files whose bytes change the result; all of them inside the model's folder (torch-free)."""

from __future__ import annotations

import os
from pathlib import Path

from amdet_gate.errors import LoadError, UsageError
from amdet_gate.files import OutsideFolder, resolve_inside
from amdet_gate.safetensors_header import check_header
from amdet_gate.sanitise import one_line
from amdet_gate.sources.identity import WeightFile, sha256_file
from amdet_gate.sources.local import INDEX_FILE, find_weight_files, weight_identities
from amdet_gate.sources.model import ResolvedModel

# Every file a CLIP tokenizer reads. The tokenizer is loaded from a private copy of exactly these
# (tokenizer.load_tokenizer), and the verdict cache key hashes exactly these: a changed
# added_tokens.json changes tokenization, so it must change the key too.
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")
MAX_TOKENIZER_FILE_BYTES = 64 * 1024 * 1024


def has_tokenizer_files(folder: Path) -> bool:
    """Whether the folder brings its own tokenizer. Whatever is there counts (a FIFO named tokenizer.json
    too): the capped reader refuses what is not a regular file, the bundled tokenizer never stands in for it."""
    def present(name: str) -> bool:
        return os.path.lexists(folder / name)

    return present("tokenizer.json") or (present("vocab.json") and present("merges.txt"))


def tokenizer_folder(model: ResolvedModel) -> Path | None:
    """The model folder when it has tokenizer files, else a diffusers pipeline's sibling tokenizer.

    A pipeline keeps text_encoder/ and tokenizer/ (text_encoder_2/ and tokenizer_2/) side by side.
    `--tokenizer FOLDER` (model.encoder.tokenizer) comes first; a single-file checkpoint has none of its own.
    """
    if model.encoder is not None and model.encoder.tokenizer is not None:
        return Path(model.encoder.tokenizer)
    if model.checkpoint_file is not None:
        return None
    if has_tokenizer_files(model.folder):
        return model.folder
    if model.subfolder and model.subfolder.startswith("text_encoder"):
        sibling = model.root / model.subfolder.replace("text_encoder", "tokenizer", 1)
        if has_tokenizer_files(sibling):
            return sibling
    return None


def model_files(model: ResolvedModel) -> list[Path]:
    """Every file of the model that a scan reads: config.json, the shard index, the weights, the tokenizer's."""
    folder = model.folder
    tok = tokenizer_folder(model)
    tokenizer = [tok / name for name in TOKENIZER_FILES] if tok is not None else []
    if model.checkpoint_file is not None:
        return [model.checkpoint_file, *tokenizer]
    files = [folder / "config.json", folder / INDEX_FILE]
    files += find_weight_files(folder) if folder.is_dir() else []
    files += tokenizer
    return [p for p in files if p.exists() or p.is_symlink()]


def check_contained(model: ResolvedModel) -> None:
    """LoadError (exit 2) for a model file that resolves outside the model folder (or its Hub cache
    repository): a symlinked weight or tokenizer file must not pull in a file from elsewhere on the
    machine, unless --follow-symlinks says so."""
    boundary = model.boundary
    if boundary is None:
        return
    for path in model_files(model):
        try:
            resolve_inside(path, boundary)
        except OutsideFolder as exc:
            raise LoadError(f"{path.name} in {model.spec}: {exc}; refused (pass --follow-symlinks to allow it)"
                            ) from None


def identities(model: ResolvedModel, deadline: float | None = None) -> list[WeightFile]:
    """The weight files this encoder's scan reads, hashed: the checkpoint file (or the folder's weights),
    and the LoRA. Every safetensors header is checked before its file is hashed."""
    file = model.checkpoint_file
    if file is not None:
        check_header(file, model.boundary)
        files = [WeightFile(file.name, sha256_file(file, deadline, model.boundary), file.stat().st_size)]
    else:
        files = weight_identities(model.folder, deadline, model.boundary)
    lora = model.encoder.lora if model.encoder is not None else None
    if lora is not None:
        check_header(lora.path)
        if any(w.name == lora.path.name for w in files):
            raise UsageError(f"--lora {one_line(lora.path.name)} has the name of a weight file of the base; rename it")
        files.append(WeightFile(lora.path.name, sha256_file(lora.path, deadline), lora.path.stat().st_size))
    return files


def result_files(model: ResolvedModel) -> dict[str, Path]:
    """Files besides the weights whose bytes change the result, by name (the verdict cache key hashes them):
    config.json, --config, an OpenCLIP file's open_clip_config.json, a LoRA's adapter_config.json, and
    every file the tokenizer reads. Same weights under another config or tokenizer are another model."""
    files = {"config.json": model.folder / "config.json"}
    ref = model.encoder
    if ref is not None:
        if ref.config is not None:
            files["--config"] = Path(ref.config)
        if model.checkpoint_file is not None and model.key_prefix in ("", "text."):
            files["open_clip_config.json"] = model.checkpoint_file.parent / "open_clip_config.json"
        if ref.lora is not None:
            files["adapter_config.json"] = ref.lora.path.parent / "adapter_config.json"
    tok = tokenizer_folder(model)
    if tok is not None:
        files.update({f"tokenizer/{n}": tok / n for n in TOKENIZER_FILES})
    return files
