"""How the hostile corpus builds its inputs: tiny encoders in disguise, broken files, FIFOs, symlinks,
signed and tampered locks, and one builder per case that takes more than one step (the table is
bench/hostile_cases.py)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import torch
from hostile import Case, Invocation, Outcome, Workspace
from safetensors.torch import load_file, save_file

FAST = ("--max-steps", "16", "--n-prompts", "40", "--restarts", "2", "-q")
UNBUDGETED = FAST[2:]  # the same scan, its step budget left to the case
PASSING = (*FAST, "--threshold", "same_target=1")  # a tiny random encoder, decided as a pass
LOCK_KEY = "a-ci-secret-of-32-characters-xx"
SAMPLE_RESULT = Path(__file__).resolve().parents[1] / "tests" / "data" / "sample_result.json"
USAGE, ERROR, NOTHING, FAIL, PASS = 4, 2, 3, 1, 0


def scan(ws: Workspace, model: Path, *extra: object, flags: tuple = FAST, env: dict | None = None,
         **kw) -> Invocation:
    return Invocation(("scan", str(model), *flags, "--out", str(ws.root / "out"), *map(str, extra)), env or {}, **kw)


def fifo(ws: Workspace, name: str = "input.fifo") -> Path:
    path = ws.root / name
    os.mkfifo(path)
    return path


def folder(ws: Workspace) -> Path:
    path = ws.root / "a-folder"
    path.mkdir()
    return path


def write(ws: Workspace, name: str, text: str) -> Path:
    path = ws.root / name
    path.write_text(text)
    return path


def edit_config(model: Path, **changes) -> None:
    config = json.loads((model / "config.json").read_text())
    config.update(changes)
    (model / "config.json").write_text(json.dumps(config))


def edit_tensors(model: Path, change) -> None:
    tensors = load_file(str(model / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in change(tensors).items()}, str(model / "model.safetensors"))


def disguised(ws: Workspace, name: str, change=lambda k, v: (k, v)) -> Path:
    """The model re-saved with other metadata, key order, names or dtype: the model in disguise."""
    copy = ws.model(name)
    tensors = load_file(str(copy / "model.safetensors"))
    save_file(dict(change(k, v.contiguous()) for k, v in reversed(tensors.items())),
              str(copy / "model.safetensors"), metadata={"n": "x"})
    return copy


def noisy(k: str, v: torch.Tensor) -> tuple[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return k, v + 1e-3 * v.std() * torch.randn(v.shape, generator=generator)


def _tokenizer(model: Path, vocab: dict[str, int]) -> None:
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)
    (model / "vocab.json").write_text(json.dumps(vocab))
    (model / "merges.txt").write_text("#version: 0.2\n")
    (model / "tokenizer_config.json").write_text(json.dumps({
        "unk_token": "<|endoftext|>", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>"}))


def _outside(ws: Workspace, model: Path, name: str) -> Path:
    """model/name becomes a symlink to a file outside the model folder."""
    elsewhere = ws.root / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    (model / name).rename(elsewhere / name)
    (model / name).symlink_to(elsewhere / name)
    ws.protect(elsewhere / name)
    return elsewhere / name


def locked(ws: Workspace, model: Path, sign: bool = False) -> Path:
    """A lock entry saying `model` was scanned and passed (as `scan --lock` writes it)."""
    from amdet_gate.lock import LockEntry, write_lock
    from amdet_gate.lock_sign import LockKey, sign_lock
    from amdet_gate.sources.identity import identity_sha256
    from amdet_gate.sources.local import weight_identities

    weights = weight_identities(model)
    entry = LockEntry(id=str(model), subfolder=None, revision=None, resolved_sha=None, weight_files=tuple(weights),
                      identity_sha256=identity_sha256(weights), verdict="pass", score=0.1, tool_version="0.1.0",
                      policy_sha256=None, scanned_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    lock = write_lock(ws.root / "amdet.lock", entry)
    if sign:
        sign_lock(ws.root / "amdet.lock", LockKey(LOCK_KEY.encode()), lock.dumps().encode())
    return ws.root / "amdet.lock"


def _flip(lock: Path, verdict: str = "pass", score: float = 0.0) -> None:
    data = json.loads(lock.read_text())
    data["models"][0].update(verdict=verdict, score=score)
    lock.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _victim(ws: Workspace) -> Path:
    victim = ws.root / "victim"
    (victim / ("e" * 64)).mkdir(parents=True)
    (victim / "precious.txt").write_text("keep")
    ws.protect(victim)
    return victim


def _passed_first(ws: Workspace, model: Path) -> tuple:
    """A passing scan with every report path, as CI leaves them between runs; returns those flags."""
    flags = ("--sarif", ws.root / "ci" / "amdet.sarif", "--html", ws.root / "ci" / "r.html",
             "--markdown", ws.root / "ci" / "r.md")
    first = ws.run("scan", model, *PASSING, "--out", ws.root / "out", *flags)
    assert first.code == 0, first.stderr
    out = ws.root / "out"
    ws.watch(*(Path(p) for p in flags[1::2]), out / "result.json", out / "result.sarif", out / "report.html",
             out / "summary.md")
    return flags


def stdout_starts_with(word: str):
    def check(ws: Workspace, out: Outcome) -> str | None:
        return None if out.stdout.startswith(word) else f"stdout does not start with {word}: {out.stdout[:80]!r}"
    return check


def _no_cache_hit(ws: Workspace, out: Outcome) -> str | None:
    return "a cached verdict for a changed tokenizer" if "verdict cache" in out.stdout else None


def _error_sarif(ws: Workspace, out: Outcome) -> str | None:
    path = ws.root / "out" / "result.sarif"
    if not path.is_file():
        return "no error SARIF"
    results = json.loads(path.read_text())["runs"][0]["results"]
    return None if results and results[0]["ruleId"] == "AMDET003" else "no AMDET003 result in result.sarif"


def finishes_within(seconds: float):
    def check(ws: Workspace, out: Outcome) -> str | None:
        return None if out.seconds < seconds else f"took {out.seconds:.0f} s (more than {seconds:.0f})"
    return check


def _no_tmp(ws: Workspace, out: Outcome) -> str | None:
    left = list((ws.root / "out").rglob("*.tmp"))
    return f"temporary files left: {left[:2]}" if left else None


def _pickle(ws: Workspace, model: Path, name: str) -> None:
    marker = ws.root / "pwned"
    (model / name).write_bytes(f"cposix\nsystem\n(S'touch {marker}'\ntR.".encode())
    ws.protect(model, marker)


def policy_with(ws: Workspace, text: str) -> Path:
    return write(ws, "policy.yaml", f"version: 1\n{text}\n")


def _stale(ws: Workspace, breaks) -> Invocation:
    model = ws.model()
    flags = _passed_first(ws, model)
    extra = breaks(ws, model)
    return scan(ws, model, *flags, *extra, flags=PASSING)


def broken_model(damage, expect: int, name: str) -> Case:
    def build(ws: Workspace) -> Invocation:
        model = ws.model()
        damage(model)
        return scan(ws, model)
    return Case(f"broken model: {name}", build, expect)


def alias_bomb() -> str:
    lines = ["version: 1", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    return "\n".join(lines + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]) + "\n"



# --- builders of the cases that take more than one step ---------------------------------------------

def broken_config_hostile_name(ws: Workspace) -> Invocation:
    model = ws.model("bad\n::error::x\x1b]0;t\x07")
    (model / "config.json").write_text("{x")
    return scan(ws, model)


def pickle_only_hostile_name(ws: Workspace) -> Invocation:
    model = ws.model("pk\r::warning::y")
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    return scan(ws, model)


def relative_policy_name(ws: Workspace) -> Invocation:
    write(ws, "::error::pwned.yaml", "version: 1\n")
    return Invocation(("policy", "validate", "::error::pwned.yaml"))  # relative: the run's folder is ws.root


def relative_lock_name(ws: Workspace) -> Invocation:
    lock = locked(ws, ws.model())
    _flip(lock, "fail")
    lock.rename(ws.root / "::error::pwned.lock")
    return Invocation(("lock", "check", "::error::pwned.lock"))


def config_fifo(ws: Workspace) -> Invocation:
    model = ws.model()
    (model / "config.json").unlink()
    os.mkfifo(model / "config.json")
    return scan(ws, model)


def tokenizer_fifo(ws: Workspace) -> Invocation:
    model = ws.model()
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (model / name).unlink()
    os.mkfifo(model / "tokenizer.json")
    return scan(ws, model)


def vocab_is_dev_zero(ws: Workspace) -> Invocation:
    model = ws.model()
    (model / "vocab.json").unlink()
    (model / "vocab.json").symlink_to("/dev/zero")
    return scan(ws, model)


def symlinked_cache(ws: Workspace, link: str, command: tuple[str, ...]) -> Invocation:
    root = ws.root / "cache"
    root.mkdir()
    victim = _victim(ws)
    (root / link).symlink_to(victim / "precious.txt" if link == "CACHEDIR.TAG" else victim)
    if command[0] == "scan":
        return scan(ws, ws.model(), flags=PASSING)
    return Invocation((*command, "--cache-dir", str(root)))


def output_is_an_input(ws: Workspace, flag: str, target: str) -> Invocation:
    """An output flag pointing at (or into) the model folder; the model must stay byte for byte the same."""
    model = ws.model()
    ws.protect(model)
    path = model if target == "." else model / target
    if flag == "--out":
        return Invocation(("scan", str(model), *FAST, "--out", str(path)))
    return scan(ws, model, flag, path)


def out_is_a_file(ws: Workspace) -> Invocation:
    file = write(ws, "a-file", "keep")
    ws.protect(file)
    return Invocation(("scan", str(ws.model()), *FAST, "--out", str(file)))


def sarif_is_the_policy(ws: Workspace) -> Invocation:
    policy = write(ws, "p.yaml", "version: 1\n")
    ws.protect(policy)
    return scan(ws, ws.model(), "--policy", policy, "--sarif", policy)


def html_links_to_config(ws: Workspace) -> Invocation:
    model = ws.model()
    ws.protect(model)
    (ws.root / "l.html").symlink_to(model / "config.json")
    return scan(ws, model, "--html", ws.root / "l.html")


def report_over_its_result(ws: Workspace) -> Invocation:
    result = write(ws, "result.json", SAMPLE_RESULT.read_text())
    ws.protect(result)
    return Invocation(("report", str(result), "--html", str(result)))


def full_disk(ws: Workspace) -> Invocation:
    ws.watch(ws.root / "out" / "result.json", ws.root / "out" / "report.html")
    return scan(ws, ws.model(), "--no-cache", flags=PASSING, file_size_limit=64 * 1024, check=_no_tmp)


def ctrl_c(ws: Workspace, sent: int = signal.SIGINT) -> Invocation:
    # The default 4,000 prompts: the search and its gate checks take long enough for the signal to land in them.
    return Invocation(("scan", str(ws.model()), "--no-cache", "--out", str(ws.root / "out")),
                      interrupt_after="searching", signal=sent, check=_error_sarif)


def added_tokens_after_a_cached_scan(ws: Workspace) -> Invocation:
    model = ws.model()
    ws.run("scan", model, *PASSING, "--out", ws.root / "first")
    (model / "added_tokens.json").write_text('{"<new>": 49408}')
    return scan(ws, model, flags=PASSING, check=_no_cache_hit)


def pickle_beside(ws: Workspace, name: str, command: str) -> Invocation:
    model = ws.model()
    lock = locked(ws, model)
    _pickle(ws, model, name)
    return scan(ws, model) if command == "scan" else Invocation(("verify", str(model), "--lock", str(lock)))


def sparse_weights(ws: Workspace) -> Invocation:
    model = ws.model()
    os.truncate(model / "model.safetensors", 10 * 1024**3)
    return scan(ws, model, check=finishes_within(30))


def file_outside(ws: Workspace, name: str) -> Invocation:
    model = ws.model()
    _outside(ws, model, name)
    return scan(ws, model)


def verify_follow_symlinks(ws: Workspace) -> Invocation:
    model = ws.model()
    lock = locked(ws, model)
    _outside(ws, model, "model.safetensors")
    return Invocation(("verify", str(model), "--lock", str(lock), "--follow-symlinks"))


def tampered_signed_lock(ws: Workspace, command: str) -> Invocation:
    model = ws.model()
    lock = locked(ws, model, sign=True)
    _flip(lock)
    args = ("verify", str(model), "--lock", str(lock)) if command == "verify" else ("lock", "check", str(lock))
    return Invocation(args, {"AMDET_LOCK_KEY": LOCK_KEY})


def unsigned_lock_required(ws: Workspace) -> Invocation:
    model = ws.model()
    return Invocation(("verify", str(model), "--lock", str(locked(ws, model)), "--require-signed"),
                      {"AMDET_LOCK_KEY": LOCK_KEY})


def scan_onto_tampered_lock(ws: Workspace) -> Invocation:
    model = ws.model()
    lock = locked(ws, model, sign=True)
    _flip(lock, "fail")
    ws.protect(lock)
    return scan(ws, model, "--lock", lock, flags=PASSING, env={"AMDET_LOCK_KEY": LOCK_KEY})


def anchor_is_the_model(ws: Workspace) -> Invocation:
    model = ws.model()
    return scan(ws, model, "--anchor", model)


def foreign_tokenizer(ws: Workspace, knows_one_word: bool) -> Invocation:
    model = ws.model()
    if not knows_one_word:
        _tokenizer(model, {"<|startoftext|>": 0, "<|endoftext|>": 1,
                           **{f"{c}</w>": i + 2 for i, c in enumerate("abcdefgh")}})
        return scan(ws, model)
    _tokenizer(model, {f"zq{i}</w>": i for i in range(49406) if i != 320}
               | {"a</w>": 320, "<|startoftext|>": 49406, "<|endoftext|>": 49407})
    words = ("red", "blue", "big", "old", "new", "odd", "dim", "wet", "dry", "hot", "raw", "icy", "shy", "sly",
             "fat", "thin", "tall", "wide", "long", "tiny")
    return scan(ws, model, "--prompts", write(ws, "p.txt", "\n".join(f"a {w} photo" for w in words)))


def validate(ws: Workspace, text: str, name: str = "p.yaml") -> Invocation:
    return Invocation(("policy", "validate", str(write(ws, name, text))))


def check_lock_text(ws: Workspace, text: str, name: str = "amdet.lock") -> Invocation:
    return Invocation(("lock", "check", str(write(ws, name, text))))


def pins(ws: Workspace, text: str, **kw) -> Invocation:
    return Invocation(("pins", str(write(ws, "p.yaml", text))), **kw)


def report_without_weights(ws: Workspace) -> Invocation:
    result = json.loads(SAMPLE_RESULT.read_text()) | {"model": {"source": "x"}}
    return Invocation(("report", str(write(ws, "r.json", json.dumps(result))), "--sarif", str(ws.root / "s")))


def scan_with(*extra: object, env: dict | None = None, flags: tuple = FAST):
    """A scan of a fresh tiny model with these arguments (the hostile part is in `extra`)."""
    def build(ws: Workspace) -> Invocation:
        return scan(ws, ws.model(), *(e(ws) if callable(e) else e for e in extra), flags=flags,
                     env={k: (v(ws) if callable(v) else v) for k, v in (env or {}).items()})
    return build


def after_a_pass(breaks):
    return lambda ws: _stale(ws, breaks)


ALLOW_EXPIRED = (f"version: 1\nallow:\n  - rule: AMDET001\n    sha256: {'ab' * 32}\n"
                 "    statement: \"accepted by the team\"\n    expires: 2020-01-01\n")
PYTHON_TAG = "version: 1\nanchor: !!python/object/apply:os.system ['touch pwned']\n"
