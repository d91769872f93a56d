"""The hostile corpus: every hostile case the suite knows, one table entry each (bench/hostile.py runs it).

An entry is (name, build, expected exit code). `build(ws)` makes the hostile input inside the
case's own folder (tiny encoders copied from a template, hand-written files, FIFOs, symlinks,
sparse files), may run preparatory commands (`ws.run`: the passing scan whose outputs must not
outlive the case), names the inputs that must stay unchanged (`ws.protect`) and the outputs that
must not hold a PASS afterwards (`ws.watch`), and returns the command to judge.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import torch
from hostile import Case, Invocation, Outcome, Workspace
from safetensors.torch import load_file, save_file

FAST = ("--max-steps", "4", "--n-prompts", "40", "--restarts", "2", "-q")
PASSING = (*FAST, "--threshold", "same_target=1")  # a tiny random encoder, decided as a pass
LOCK_KEY = "a-ci-secret-of-32-characters-xx"
SAMPLE_RESULT = Path(__file__).resolve().parents[1] / "tests" / "data" / "sample_result.json"
USAGE, ERROR, NOTHING, FAIL, PASS = 4, 2, 3, 1, 0


def _scan(ws: Workspace, model: Path, *extra: object, flags: tuple = FAST, env: dict | None = None,
          **kw) -> Invocation:
    return Invocation(("scan", str(model), *flags, "--out", str(ws.root / "out"), *map(str, extra)), env or {}, **kw)


def _fifo(ws: Workspace, name: str = "input.fifo") -> Path:
    path = ws.root / name
    os.mkfifo(path)
    return path


def _folder(ws: Workspace) -> Path:
    path = ws.root / "a-folder"
    path.mkdir()
    return path


def _write(ws: Workspace, name: str, text: str) -> Path:
    path = ws.root / name
    path.write_text(text)
    return path


def _config(model: Path, **changes) -> None:
    config = json.loads((model / "config.json").read_text())
    config.update(changes)
    (model / "config.json").write_text(json.dumps(config))


def _tensors(model: Path, change) -> None:
    tensors = load_file(str(model / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in change(tensors).items()}, str(model / "model.safetensors"))


def _resave(ws: Workspace, name: str, change=lambda k, v: (k, v)) -> Path:
    """The model re-saved with other metadata, key order, names or dtype: the model in disguise."""
    copy = ws.model(name)
    tensors = load_file(str(copy / "model.safetensors"))
    save_file(dict(change(k, v.contiguous()) for k, v in reversed(tensors.items())),
              str(copy / "model.safetensors"), metadata={"n": "x"})
    return copy


def _noise(k: str, v: torch.Tensor) -> tuple[str, torch.Tensor]:
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


def _locked(ws: Workspace, model: Path, sign: bool = False) -> Path:
    """A lock entry saying `model` was scanned and passed (as `scan --lock` writes it)."""
    from amdet_gate.lock import entry_from_result, write_lock
    from amdet_gate.lock_sign import LockKey, sign_lock
    from amdet_gate.source import identity_sha256, weight_identities

    weights = weight_identities(model)
    result = {"model": {"weight_files": [w.__dict__ for w in weights], "identity_sha256": identity_sha256(weights),
                        "subfolder": None}, "verdict": "pass", "score": 0.1, "tool": {"version": "0.1.0"}}
    lock = write_lock(ws.root / "amdet.lock", entry_from_result(result, str(model)))
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


def _stdout_starts(word: str):
    def check(ws: Workspace, out: Outcome) -> str | None:
        return None if out.stdout.startswith(word) else f"stdout does not start with {word}: {out.stdout[:80]!r}"
    return check


def _no_cache_hit(ws: Workspace, out: Outcome) -> str | None:
    return "a cached verdict for a changed tokenizer" if "verdict cache" in out.stdout else None


def _error_sarif(ws: Workspace, out: Outcome) -> str | None:
    path = ws.root / "out" / "result.sarif"
    if not path.is_file():
        return "no error SARIF"
    return None if json.loads(path.read_text())["runs"][0]["results"][0]["ruleId"] == "AMDET003" else "wrong rule"


def _fast(seconds: float):
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


def _policy_nan(ws: Workspace, text: str) -> Path:
    return _write(ws, "policy.yaml", f"version: 1\n{text}\n")


def _stale(ws: Workspace, breaks) -> Invocation:
    model = ws.model()
    flags = _passed_first(ws, model)
    extra = breaks(ws, model)
    return _scan(ws, model, *flags, *extra, flags=PASSING)


def _broken(damage, expect: int, name: str) -> Case:
    def build(ws: Workspace) -> Invocation:
        model = ws.model()
        damage(model)
        return _scan(ws, model)
    return Case(f"broken model: {name}", build, expect)


def _bomb() -> str:
    lines = ["version: 1", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    return "\n".join(lines + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]) + "\n"



# --- builders of the cases that take more than one step ---------------------------------------------

def broken_config_hostile_name(ws: Workspace) -> Invocation:
    model = ws.model("bad\n::error::x\x1b]0;t\x07")
    (model / "config.json").write_text("{x")
    return _scan(ws, model)


def pickle_only_hostile_name(ws: Workspace) -> Invocation:
    model = ws.model("pk\r::warning::y")
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    return _scan(ws, model)


def relative_policy_name(ws: Workspace) -> Invocation:
    _write(ws, "::error::pwned.yaml", "version: 1\n")
    return Invocation(("policy", "validate", "::error::pwned.yaml"))  # relative: the run's folder is ws.root


def relative_lock_name(ws: Workspace) -> Invocation:
    lock = _locked(ws, ws.model())
    _flip(lock, "fail")
    lock.rename(ws.root / "::error::pwned.lock")
    return Invocation(("lock", "check", "::error::pwned.lock"))


def config_fifo(ws: Workspace) -> Invocation:
    model = ws.model()
    (model / "config.json").unlink()
    os.mkfifo(model / "config.json")
    return _scan(ws, model)


def tokenizer_fifo(ws: Workspace) -> Invocation:
    model = ws.model()
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (model / name).unlink()
    os.mkfifo(model / "tokenizer.json")
    return _scan(ws, model)


def vocab_is_dev_zero(ws: Workspace) -> Invocation:
    model = ws.model()
    (model / "vocab.json").unlink()
    (model / "vocab.json").symlink_to("/dev/zero")
    return _scan(ws, model)


def symlinked_cache(ws: Workspace, link: str, command: tuple[str, ...]) -> Invocation:
    root = ws.root / "cache"
    root.mkdir()
    victim = _victim(ws)
    (root / link).symlink_to(victim / "precious.txt" if link == "CACHEDIR.TAG" else victim)
    if command[0] == "scan":
        return _scan(ws, ws.model(), flags=PASSING)
    return Invocation((*command, "--cache-dir", str(root)))


def output_is_an_input(ws: Workspace, flag: str, target: str) -> Invocation:
    """An output flag pointing at (or into) the model folder; the model must stay byte for byte the same."""
    model = ws.model()
    ws.protect(model)
    path = model if target == "." else model / target
    if flag == "--out":
        return Invocation(("scan", str(model), *FAST, "--out", str(path)))
    return _scan(ws, model, flag, path)


def out_is_a_file(ws: Workspace) -> Invocation:
    file = _write(ws, "a-file", "keep")
    ws.protect(file)
    return Invocation(("scan", str(ws.model()), *FAST, "--out", str(file)))


def sarif_is_the_policy(ws: Workspace) -> Invocation:
    policy = _write(ws, "p.yaml", "version: 1\n")
    ws.protect(policy)
    return _scan(ws, ws.model(), "--policy", policy, "--sarif", policy)


def html_links_to_config(ws: Workspace) -> Invocation:
    model = ws.model()
    ws.protect(model)
    (ws.root / "l.html").symlink_to(model / "config.json")
    return _scan(ws, model, "--html", ws.root / "l.html")


def report_over_its_result(ws: Workspace) -> Invocation:
    result = _write(ws, "result.json", SAMPLE_RESULT.read_text())
    ws.protect(result)
    return Invocation(("report", str(result), "--html", str(result)))


def full_disk(ws: Workspace) -> Invocation:
    ws.watch(ws.root / "out" / "result.json", ws.root / "out" / "report.html")
    return _scan(ws, ws.model(), "--no-cache", flags=PASSING, file_size_limit=64 * 1024, check=_no_tmp)


def ctrl_c(ws: Workspace, sent: int = signal.SIGINT) -> Invocation:
    return Invocation(("scan", str(ws.model()), "--max-steps", "100000", "--n-prompts", "40", "--no-cache",
                       "--out", str(ws.root / "out")), interrupt_after="searching", signal=sent, check=_error_sarif)


def added_tokens_after_a_cached_scan(ws: Workspace) -> Invocation:
    model = ws.model()
    ws.run("scan", model, *PASSING, "--out", ws.root / "first")
    (model / "added_tokens.json").write_text('{"<new>": 49408}')
    return _scan(ws, model, flags=PASSING, check=_no_cache_hit)


def pickle_beside(ws: Workspace, name: str, command: str) -> Invocation:
    model = ws.model()
    lock = _locked(ws, model)
    _pickle(ws, model, name)
    return _scan(ws, model) if command == "scan" else Invocation(("verify", str(model), "--lock", str(lock)))


def sparse_weights(ws: Workspace) -> Invocation:
    model = ws.model()
    os.truncate(model / "model.safetensors", 10 * 1024**3)
    return _scan(ws, model, check=_fast(30))


def file_outside(ws: Workspace, name: str) -> Invocation:
    model = ws.model()
    _outside(ws, model, name)
    return _scan(ws, model)


def verify_follow_symlinks(ws: Workspace) -> Invocation:
    model = ws.model()
    lock = _locked(ws, model)
    _outside(ws, model, "model.safetensors")
    return Invocation(("verify", str(model), "--lock", str(lock), "--follow-symlinks"))


def tampered_signed_lock(ws: Workspace, command: str) -> Invocation:
    model = ws.model()
    lock = _locked(ws, model, sign=True)
    _flip(lock)
    args = ("verify", str(model), "--lock", str(lock)) if command == "verify" else ("lock", "check", str(lock))
    return Invocation(args, {"AMDET_LOCK_KEY": LOCK_KEY})


def unsigned_lock_required(ws: Workspace) -> Invocation:
    model = ws.model()
    return Invocation(("verify", str(model), "--lock", str(_locked(ws, model)), "--require-signed"),
                      {"AMDET_LOCK_KEY": LOCK_KEY})


def scan_onto_tampered_lock(ws: Workspace) -> Invocation:
    model = ws.model()
    lock = _locked(ws, model, sign=True)
    _flip(lock, "fail")
    ws.protect(lock)
    return _scan(ws, model, "--lock", lock, flags=PASSING, env={"AMDET_LOCK_KEY": LOCK_KEY})


def anchor_is_the_model(ws: Workspace) -> Invocation:
    model = ws.model()
    return _scan(ws, model, "--anchor", model)


def foreign_tokenizer(ws: Workspace, knows_one_word: bool) -> Invocation:
    model = ws.model()
    if not knows_one_word:
        _tokenizer(model, {"<|startoftext|>": 0, "<|endoftext|>": 1,
                           **{f"{c}</w>": i + 2 for i, c in enumerate("abcdefgh")}})
        return _scan(ws, model)
    _tokenizer(model, {f"zq{i}</w>": i for i in range(49406) if i != 320}
               | {"a</w>": 320, "<|startoftext|>": 49406, "<|endoftext|>": 49407})
    words = ("red", "blue", "big", "old", "new", "odd", "dim", "wet", "dry", "hot", "raw", "icy", "shy", "sly",
             "fat", "thin", "tall", "wide", "long", "tiny")
    return _scan(ws, model, "--prompts", _write(ws, "p.txt", "\n".join(f"a {w} photo" for w in words)))


def validate(ws: Workspace, text: str, name: str = "p.yaml") -> Invocation:
    return Invocation(("policy", "validate", str(_write(ws, name, text))))


def check_lock_text(ws: Workspace, text: str, name: str = "amdet.lock") -> Invocation:
    return Invocation(("lock", "check", str(_write(ws, name, text))))


def pins(ws: Workspace, text: str, **kw) -> Invocation:
    return Invocation(("pins", str(_write(ws, "p.yaml", text))), **kw)


def report_without_weights(ws: Workspace) -> Invocation:
    result = json.loads(SAMPLE_RESULT.read_text()) | {"model": {"source": "x"}}
    return Invocation(("report", str(_write(ws, "r.json", json.dumps(result))), "--sarif", str(ws.root / "s")))


def _scan_with(*extra: object, env: dict | None = None, flags: tuple = FAST):
    """A scan of a fresh tiny model with these arguments (the hostile part is in `extra`)."""
    def build(ws: Workspace) -> Invocation:
        return _scan(ws, ws.model(), *(e(ws) if callable(e) else e for e in extra), flags=flags,
                     env={k: (v(ws) if callable(v) else v) for k, v in (env or {}).items()})
    return build


def _on_stale(breaks):
    return lambda ws: _stale(ws, breaks)


ALLOW_EXPIRED = (f"version: 1\nallow:\n  - rule: AMDET001\n    sha256: {'ab' * 32}\n"
                 "    statement: \"accepted by the team\"\n    expires: 2020-01-01\n")
PYTHON_TAG = "version: 1\nanchor: !!python/object/apply:os.system ['touch pwned']\n"


CASES: list[Case] = [
    # --- CI and log injection: untrusted names never reach a log raw -------------------------------
    Case("folder named evil\\n::error file=x::pwned, passing scan",
         lambda ws: _scan(ws, ws.model("evil\n::error file=x::pwned"), flags=PASSING, check=_stdout_starts("PASS")),
         PASS),
    Case("folder name with ESC, U+202E and U+200B, passing scan",
         lambda ws: _scan(ws, ws.model("esc\x1b[31m\u202eevil\u200b"), flags=PASSING), PASS),
    Case("hostile folder name, broken config (error line, SARIF, job summary)", broken_config_hostile_name, ERROR),
    Case("hostile folder name, pickle only", pickle_only_hostile_name, NOTHING),
    Case("policy file named ::error::pwned.yaml, given relative as pre-commit does (validate prints it)",
         relative_policy_name, PASS),
    Case("lock file named ::error::pwned.lock with a failing entry (lock check prints its problems)",
         relative_lock_name, FAIL),
    Case("lock file named x\\n::error::y.lock with hostile content",
         lambda ws: check_lock_text(ws, "{\x1b[2J", "x\n::error::y.lock"), USAGE),
    Case("hostile --threshold value", _scan_with("--threshold", "same_target=\x1b[31m\n::error::x"), USAGE),
    Case("hostile --n-prompts value echoed by the flag parser",
         lambda ws: Invocation(("scan", str(ws.model()), "--n-prompts", "1\n::error::x\u202e")), USAGE),
    # --- one capped reader: FIFOs, devices, folders, oversize --------------------------------------
    Case("--policy is a FIFO", _scan_with("--policy", _fifo), USAGE),
    Case("--policy is /dev/zero", _scan_with("--policy", "/dev/zero"), USAGE),
    Case("--policy is a folder", _scan_with("--policy", _folder), USAGE),
    Case("--policy larger than 1 MiB",
         _scan_with("--policy", lambda ws: _write(ws, "big.yaml", "version: 1\n" + "#\n" * 600_000)), USAGE),
    Case("AMDET_POLICY is a FIFO", _scan_with(env={"AMDET_POLICY": lambda ws: str(_fifo(ws))}), USAGE),
    Case("AMDET_POLICY is /dev/zero", _scan_with(env={"AMDET_POLICY": "/dev/zero"}), USAGE),
    Case("policy validate a FIFO", lambda ws: Invocation(("policy", "validate", str(_fifo(ws)))), USAGE),
    Case("policy validate /dev/zero", lambda ws: Invocation(("policy", "validate", "/dev/zero")), USAGE),
    Case("--prompts is a FIFO", _scan_with("--prompts", _fifo), USAGE),
    Case("--prompts is /dev/zero", _scan_with("--prompts", "/dev/zero"), USAGE),
    Case("report RESULT is a FIFO",
         lambda ws: Invocation(("report", str(_fifo(ws)), "--sarif", str(ws.root / "r.sarif"))), USAGE),
    Case("report RESULT is /dev/zero",
         lambda ws: Invocation(("report", "/dev/zero", "--sarif", str(ws.root / "r.sarif"))), USAGE),
    Case("lock check a FIFO", lambda ws: Invocation(("lock", "check", str(_fifo(ws)))), USAGE),
    Case("pins /dev/zero", lambda ws: Invocation(("pins", "/dev/zero")), USAGE),
    Case("verify --lock is a FIFO",
         lambda ws: Invocation(("verify", str(ws.model()), "--lock", str(_fifo(ws)))), USAGE),
    Case("config.json is a FIFO", config_fifo, ERROR),
    Case("tokenizer.json is a FIFO (no silent fallback to the bundled tokenizer)", tokenizer_fifo, ERROR),
    Case("vocab.json is a symlink to /dev/zero", vocab_is_dev_zero, ERROR),
    # --- NaN and infinity ----------------------------------------------------------------------------
    Case("policy thresholds: {same_target_ratio: .nan} (validate)",
         lambda ws: validate(ws, "version: 1\nthresholds: {same_target_ratio: .nan}\n"), USAGE),
    Case("policy thresholds: {same_target_ratio: .nan} (scan)",
         _scan_with("--policy", lambda ws: _policy_nan(ws, "thresholds: {same_target_ratio: .nan}")), USAGE),
    Case("policy scan: {time_budget_s: .nan}",
         _scan_with("--policy", lambda ws: _policy_nan(ws, "scan: {time_budget_s: .nan}")), USAGE),
    Case("AMDET_TIME_BUDGET=nan", _scan_with(env={"AMDET_TIME_BUDGET": "nan"}), USAGE),
    Case("AMDET_TIME_BUDGET=inf", _scan_with(env={"AMDET_TIME_BUDGET": "inf"}), USAGE),
    Case("--time-budget inf", _scan_with("--time-budget", "inf"), USAGE),
    Case("--time-budget nan", _scan_with("--time-budget", "nan"), USAGE),
    Case("--threshold same_target=nan", _scan_with("--threshold", "same_target=nan"), USAGE),
    # --- the verdict cache never follows a symlink below its root -----------------------------------
    Case("cache clear with v1/ symlinked to a victim folder",
         lambda ws: symlinked_cache(ws, "v1", ("cache", "clear")), ERROR),
    Case("cache list with v1/ symlinked to a victim folder",
         lambda ws: symlinked_cache(ws, "v1", ("cache", "list")), ERROR),
    Case("scan with the cache's v1/ symlinked to a victim folder (uncached, writes nothing there)",
         lambda ws: symlinked_cache(ws, "v1", ("scan",)), PASS),
    Case("scan with the cache's CACHEDIR.TAG symlinked to a victim file",
         lambda ws: symlinked_cache(ws, "CACHEDIR.TAG", ("scan",)), PASS),
    # --- output paths: cleared, atomic, never an input ------------------------------------------------
    Case("stale PASS after a run that fails with exit 2 (broken config)",
         _on_stale(lambda ws, m: ((m / "config.json").write_text("{x"), ())[1]), ERROR),
    Case("stale PASS after a run that fails with exit 4 (invalid policy)",
         _on_stale(lambda ws, m: ("--policy", _write(ws, "bad.yaml", "version: 2\n"))), USAGE),
    Case("stale PASS after a run that fails with exit 4 (unknown threshold)",
         _on_stale(lambda ws, m: ("--threshold", "nope=1")), USAGE),
    Case("stale PASS after a run that fails with exit 3 (pickle beside the weights)",
         _on_stale(lambda ws, m: ((m / "pytorch_model.bin").write_bytes(b"x"), ())[1]), NOTHING),
    Case("--sarif MODEL/config.json", lambda ws: output_is_an_input(ws, "--sarif", "config.json"), USAGE),
    Case("--html OUT/result.json", _scan_with("--html", lambda ws: ws.root / "out" / "result.json"), USAGE),
    Case("--out MODEL", lambda ws: output_is_an_input(ws, "--out", "."), USAGE),
    Case("--out inside MODEL", lambda ws: output_is_an_input(ws, "--out", "amdet-out"), USAGE),
    Case("--lock inside MODEL", lambda ws: output_is_an_input(ws, "--lock", "amdet.lock"), USAGE),
    Case("--out is an existing file", out_is_a_file, USAGE),
    Case("--sarif and --markdown at one path",
         _scan_with("--sarif", lambda ws: ws.root / "x", "--markdown", lambda ws: ws.root / "x"), USAGE),
    Case("--sarif is the policy file", sarif_is_the_policy, USAGE),
    Case("--html is a symlink to MODEL/config.json", html_links_to_config, USAGE),
    Case("report RESULT --html RESULT", report_over_its_result, USAGE),
    Case("a full disk while writing the outputs (RLIMIT_FSIZE 64 KiB)", full_disk, ERROR),
    Case("Ctrl-C during the search (SIGINT)", ctrl_c, ERROR),
    Case("SIGTERM during the search (a cancelled CI job)", lambda ws: ctrl_c(ws, signal.SIGTERM), ERROR),
    Case("--sarif /dev/null", _scan_with("--sarif", "/dev/null"), USAGE),
    Case("--sarif is a FIFO", _scan_with("--sarif", _fifo), USAGE),
    Case("--html is a folder", _scan_with("--html", _folder), USAGE),
    Case("--lock is a FIFO (refused before the scan)", _scan_with("--lock", _fifo), USAGE),
    Case("GITHUB_STEP_SUMMARY is a FIFO with no reader (no hang)",
         lambda ws: (lambda m: ((m / "config.json").write_text("{x"),
                                _scan(ws, m, env={"GITHUB_STEP_SUMMARY": str(_fifo(ws, "summary.fifo"))}))[1])(
             ws.model()), ERROR),
    # --- supply chain ----------------------------------------------------------------------------------
    Case("added_tokens.json changed after a cached scan (the cache key covers it)",
         added_tokens_after_a_cached_scan, PASS),
    Case("pytorch_model.bin beside model.safetensors (scan)",
         lambda ws: pickle_beside(ws, "pytorch_model.bin", "scan"), NOTHING),
    Case("model.ckpt beside model.safetensors (scan)", lambda ws: pickle_beside(ws, "model.ckpt", "scan"), NOTHING),
    Case("pytorch_model.bin beside model.safetensors (verify)",
         lambda ws: pickle_beside(ws, "pytorch_model.bin", "verify"), NOTHING),
    Case("a 10 GB sparse file as model.safetensors (header before hashing)", sparse_weights, ERROR),
    Case("model.safetensors is a symlink outside the model folder",
         lambda ws: file_outside(ws, "model.safetensors"), ERROR),
    Case("vocab.json is a symlink outside the model folder", lambda ws: file_outside(ws, "vocab.json"), ERROR),
    Case("weights outside the folder, verify --follow-symlinks", verify_follow_symlinks, PASS),
    Case("signed lock with the verdict edited by hand (verify)", lambda ws: tampered_signed_lock(ws, "verify"), FAIL),
    Case("signed lock with the verdict edited by hand (lock check)",
         lambda ws: tampered_signed_lock(ws, "lock check"), FAIL),
    Case("unsigned lock, verify --require-signed", unsigned_lock_required, FAIL),
    Case("lock check --require-signed without AMDET_LOCK_KEY",
         lambda ws: Invocation(("lock", "check", str(_locked(ws, ws.model(), sign=True)), "--require-signed")), USAGE),
    Case("scan --lock onto a tampered signed lock", scan_onto_tampered_lock, ERROR),
    # --- the anchor is never the model in disguise -----------------------------------------------------
    Case("anchor is the model itself", anchor_is_the_model, USAGE),
    Case("anchor is the model re-saved with other metadata", _scan_with("--anchor", lambda ws: _resave(ws, "a")),
         USAGE),
    Case("anchor is the model with the text_model. key prefix",
         _scan_with("--anchor", lambda ws: _resave(ws, "a", lambda k, v: (f"text_model.{k}", v))), USAGE),
    Case("anchor is the model in fp16", _scan_with("--anchor", lambda ws: _resave(ws, "a", lambda k, v: (k, v.half()))),
         USAGE),
    Case("anchor is the model with 1e-3 relative noise", _scan_with("--anchor", lambda ws: _resave(ws, "a", _noise)),
         USAGE),
    # --- a tokenizer that does not fit the model -------------------------------------------------------
    Case("a 10-token vocabulary", lambda ws: foreign_tokenizer(ws, knows_one_word=False), ERROR),
    Case("a full-size vocabulary that knows one word", lambda ws: foreign_tokenizer(ws, knows_one_word=True), ERROR),
    # --- broken and hostile models the loader refuses (tests/test_loading.py) ------------------------
    _broken(lambda m: os.truncate(m / "model.safetensors", (m / "model.safetensors").stat().st_size // 2), ERROR,
            "truncated safetensors"),
    _broken(lambda m: (m / "model.safetensors").rename(m / "pytorch_model.bin"), NOTHING, "pickle only"),
    _broken(lambda m: _config(m, hidden_size=64), ERROR, "config lies about the width"),
    _broken(lambda m: _config(m, num_hidden_layers=3), ERROR, "config lies about the depth"),
    _broken(lambda m: _config(m, model_type="bert", architectures=["BertModel"]), NOTHING, "wrong architecture"),
    _broken(lambda m: _config(m, auto_map={"AutoModel": "evil.Model"}), NOTHING, "remote code in config"),
    _broken(lambda m: _config(m, hidden_size=10**9), ERROR, "absurd size"),
    _broken(lambda m: _tensors(m, lambda t: {k: (v.fill_(float("nan")) if k.endswith("fc1.weight") else v)
                                            for k, v in t.items()}), ERROR, "NaN weights"),
    _broken(lambda m: (m / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"final_layer_norm.weight": "../../etc/passwd.safetensors"}})), ERROR,
        "index naming a shard outside the folder"),
    _broken(lambda m: (m / "config.json").write_text("{not json"), ERROR, "config not JSON"),
    _broken(lambda m: (m / "config.json").write_text("[" * 100_000), ERROR, "config nested too deeply"),
    _broken(lambda m: (m / "config.json").unlink(), NOTHING, "no config"),
    _broken(lambda m: (m / "model.safetensors").unlink(), NOTHING, "no weights"),
    _broken(lambda m: (m / "tokenizer_config.json").write_text("[" * 100_000), ERROR, "tokenizer config nested"),
    _broken(lambda m: (m / "tokenizer_config.json").write_text('{"auto_map": {"AutoTokenizer": "x.Y"}}'), ERROR,
            "tokenizer asks for remote code"),
    _broken(lambda m: (m / "model.fp16.safetensors").write_bytes((m / "model.safetensors").read_bytes()), NOTHING,
            "a stray fp16 variant"),
    Case("--subfolder ../..", _scan_with("--subfolder", "../.."), USAGE),
    Case("model folder does not exist", lambda ws: _scan(ws, ws.root / "nope"), ERROR),
    # --- usage errors --------------------------------------------------------------------------------
    Case("--threshold same_target=2", _scan_with("--threshold", "same_target=2"), USAGE),
    Case("--restarts 0", _scan_with("--restarts", "0"), USAGE),
    Case("--device tpu", _scan_with("--device", "tpu"), USAGE),
    Case("AMDET_CACHE_KEY too short", _scan_with(env={"AMDET_CACHE_KEY": "short"}), USAGE),
    Case("scan without a model", lambda ws: Invocation(("scan",)), USAGE),
    # --- hostile policies, locks and pin files (tests/test_policy.py, tests/test_lock.py) -----------
    Case("policy with a duplicate key", lambda ws: validate(ws, "version: 1\non_finding: fail\non_finding: warn\n"),
         USAGE),
    Case("policy with YAML aliases",
         lambda ws: validate(ws, "version: 1\nx: &a [1, 2]\ny: &b [*a, *a]\nscan: [*b, *b]\n"), USAGE),
    Case("policy with an expired allow entry", lambda ws: validate(ws, ALLOW_EXPIRED), USAGE),
    Case("policy with a python tag", lambda ws: validate(ws, PYTHON_TAG), USAGE),
    Case("lock with NaN", lambda ws: check_lock_text(ws, '{"version": 1, "models": [], "x": NaN}'), USAGE),
    Case("lock with a duplicate key", lambda ws: check_lock_text(ws, '{"version": 1, "version": 1, "models": []}'),
         USAGE),
    Case("lock nested too deeply", lambda ws: check_lock_text(ws, "[" * 100_000 + "]" * 100_000), USAGE),
    Case("pins: a python object tag", lambda ws: pins(ws, PYTHON_TAG), USAGE),
    Case("pins: an alias bomb is cheap", lambda ws: pins(ws, _bomb(), check=_fast(20)), PASS),
    Case("report: a result without weight files", report_without_weights, USAGE),
]
