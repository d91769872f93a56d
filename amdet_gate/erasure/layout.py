"""Write the repaired copy: the input's layout, file names, tensor names and dtypes, edited tensors only.

A weight file that holds no edited tensor is copied byte for byte; one that does is rewritten
with every other tensor read back exactly as stored (safetensors keeps the bytes), the edited
ones cast to their stored dtype, and the file's own metadata kept (plus one provenance key).
config.json, a shard index and the tokenizer files are copied. The copy is assembled in a
staging folder beside `--out` and renamed into place, so `--out` never holds half a model.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from amdet_gate.encoders.clip import CLIP
from amdet_gate.errors import LoadError, UsageError
from amdet_gate.files import read_capped
from amdet_gate.sources.files import MAX_TOKENIZER_FILE_BYTES, TOKENIZER_FILES, tokenizer_folder
from amdet_gate.sources.local import INDEX_FILE, find_weight_files, read_small
from amdet_gate.sources.model import ResolvedModel

REPORT_FILE = "repair.json"
PROVENANCE_KEY = "amdet_gate_repair"  # safetensors metadata: what this file is a repair of


@dataclass(frozen=True)
class CopyPlan:
    """Where the repaired copy goes: `out` mirrors the source's root, the encoder in `subfolder`."""

    source: ResolvedModel
    out: Path

    @property
    def folder(self) -> Path:
        return self.out / self.source.subfolder if self.source.subfolder else self.out


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_out(source: ResolvedModel, out: Path, rescan_out: Path, result: Path) -> None:
    """Refuse, before any work, an --out that could overwrite the model, the scan's result or someone
    else's files. --out may not exist, be empty, or hold an earlier repair (a repair.json): that one
    is replaced. The re-scan's folder is cleared by the gate, so it may hold none of those either.
    """
    model, target, rescan = source.root.resolve(), out.resolve(), rescan_out.resolve()
    scanned = result.resolve().parent
    if _inside(target, model) or _inside(model, target):
        raise UsageError(f"--out {out} overlaps the model folder {source.root}; write the copy elsewhere")
    if _inside(rescan, target) or _inside(target, rescan) or _inside(rescan, model) or _inside(model, rescan):
        raise UsageError(f"--rescan-out {rescan_out} must lie outside the model and the repaired copy")
    if _inside(scanned, target) or _inside(scanned, rescan):
        raise UsageError(f"--result {result} lies inside --out or --rescan-out, which the repair replaces; "
                         "keep the scan's folder apart")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UsageError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / REPORT_FILE).is_file():
        raise UsageError(f"--out {out} is not empty and holds no earlier repair ({REPORT_FILE}); "
                         "give an empty or new folder")


def clear_record(out: Path) -> None:
    """Remove an earlier repair's record, so that a run that stops early leaves no stale "repaired"."""
    for name in (REPORT_FILE, REPORT_FILE.replace(".json", ".md")):
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()


def _rewrite(path: Path, target: Path, edits: dict[str, torch.Tensor], provenance: str) -> bool:
    """Write `path` to `target` with the edited tensors replaced; False (nothing written) if it has none."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = list(fh.keys())
            if not any(CLIP.module_key(k) in edits for k in keys):
                return False
            metadata = dict(fh.metadata() or {})
            tensors = {}
            for key in keys:
                stored = fh.get_tensor(key)
                name = CLIP.module_key(key)
                tensors[key] = edits[name].to(stored.dtype).contiguous() if name in edits else stored
    except Exception as exc:  # the source was loaded a moment ago; this is a read failure, not bad input
        raise LoadError(f"cannot read {path.name} again to copy it: {type(exc).__name__}") from None
    metadata[PROVENANCE_KEY] = provenance
    save_file(tensors, str(target), metadata=metadata)
    shutil.copymode(path, target)  # safetensors writes 0600; the copy keeps the source's mode
    return True


def write_copy(plan: CopyPlan, edits: dict[str, torch.Tensor], provenance: str) -> list[str]:
    """Assemble the repaired copy and move it into place; returns the weight files that were rewritten.

    `edits` maps CLIPTextModel parameter names (e.g. `encoder.layers.2.mlp.fc2.weight`) to new values.
    """
    source, out = plan.source, plan.out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.repair-", dir=out.parent))
    except OSError as exc:
        raise UsageError(f"cannot create {out}: {exc.strerror}") from None
    try:
        shutil.copymode(source.root, staging)  # mkdtemp makes it 0700
        folder = staging / source.subfolder if source.subfolder else staging
        folder.mkdir(parents=True, exist_ok=True)
        rewritten = []
        for path in find_weight_files(source.folder):
            if _rewrite(path, folder / path.name, edits, provenance):
                rewritten.append(path.name)
            else:
                shutil.copyfile(path, folder / path.name)
        # Small files go through the capped reader, inside the model's boundary, as the scan read them.
        for name in ("config.json", INDEX_FILE):
            if (source.folder / name).is_file():
                (folder / name).write_text(read_small(source.folder / name, source.boundary), encoding="utf-8")
        tokenizer = tokenizer_folder(source)
        if tokenizer is not None:  # the model's own, or a pipeline's sibling tokenizer/ kept beside it
            tok_out = staging / tokenizer.relative_to(source.root)
            tok_out.mkdir(parents=True, exist_ok=True)
            for name in TOKENIZER_FILES:
                if (tokenizer / name).is_file():
                    (tok_out / name).write_bytes(read_capped(tokenizer / name, MAX_TOKENIZER_FILE_BYTES,
                                                             "tokenizer file", LoadError, inside=source.boundary))
        _move_into_place(staging, out)
        staging = None
    except OSError as exc:
        raise UsageError(f"cannot write the repaired copy to {out}: {exc.strerror}") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return rewritten


def _move_into_place(staging: Path, out: Path) -> None:
    """Replace `out` (absent, empty, or an earlier repair: check_out said which) by `staging`."""
    old = None
    if out.is_dir():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    os.rename(staging, out)
    if old is not None:
        with contextlib.suppress(OSError):
            shutil.rmtree(old)
