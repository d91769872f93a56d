"""Replay every hostile case the suite knows against the `amdet-gate` command and print `N/N handled`.

    python bench/hostile.py [-k SUBSTRING] [--in-process] [--keep DIR]

Each case (bench/hostile_cases.py) builds its own hostile input in a fresh folder -- nothing is
downloaded -- runs one command and is handled when:

  * the exit code is the documented one (docs/supply-chain.md);
  * an error is exactly one line on stderr (`amdet-gate: error: ...`), never a traceback, and a
    success prints no error line;
  * nothing printed (stdout, stderr, the job summary) holds a raw control character or a line that
    starts with `::` (a GitHub Actions workflow command);
  * every input the case protects is byte for byte unchanged;
  * no output path the case watches holds a PASS (result.json, SARIF, report, summary) afterwards;
  * the case's own check, if any, holds.

By default each case runs in its own process (`amdet-gate` next to this interpreter), with its own
HOME, caches and job summary; `--in-process` runs the command in this interpreter (faster: torch
is imported once), except for the cases that need a process of their own (a signal, a file-size
limit). tests/test_hostile.py runs the whole corpus in-process.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

CASE_TIMEOUT_S = 300  # a case that runs longer is not handled (a FIFO read blocks forever)


@dataclass(frozen=True)
class Outcome:
    code: int
    stdout: str
    stderr: str
    seconds: float


@dataclass
class Workspace:
    """A case's own folder, what it protects and watches, and how it runs the command."""

    root: Path
    template: Path  # a tiny CLIP text encoder with tokenizer files, built once per run
    runner: Callable[[Workspace, Invocation], Outcome]
    timeout_s: float = CASE_TIMEOUT_S
    protected: dict[Path, dict[str, str]] = field(default_factory=dict)
    watched: list[Path] = field(default_factory=list)

    @property
    def summary(self) -> Path:
        return self.root / "job-summary.md"

    def env(self) -> dict[str, str]:
        return {"HOME": str(self.root / "home"), "XDG_CONFIG_HOME": str(self.root / "config"),
                "XDG_CACHE_HOME": str(self.root / "xdg-cache"), "AMDET_CACHE_DIR": str(self.root / "cache"),
                "GITHUB_STEP_SUMMARY": str(self.summary), "HF_HOME": str(self.root / "hf"),
                "HF_HUB_OFFLINE": "1", "MPLCONFIGDIR": str(self.template.parent / "mpl")}

    def model(self, name: str = "model") -> Path:
        """A fresh copy of the tiny encoder under `name` (any name: hostile ones too)."""
        import shutil

        folder = self.root / name
        shutil.copytree(self.template, folder)
        return folder

    def protect(self, *paths: Path) -> None:
        """These inputs must be byte for byte the same after the case."""
        for path in paths:
            self.protected[path] = _digest(path)

    def watch(self, *paths: Path) -> None:
        """No PASS may be left at these output paths after the case."""
        self.watched.extend(paths)

    def run(self, *args: object, env: Mapping[str, str] | None = None) -> Outcome:
        """A preparatory run (say, the passing scan whose outputs must not outlive the case)."""
        return self.runner(self, Invocation(tuple(str(a) for a in args), dict(env or {})))


@dataclass(frozen=True)
class Invocation:
    args: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    interrupt_after: str | None = None  # send `signal` once stderr shows this text
    signal: int = signal.SIGINT
    file_size_limit: int | None = None  # RLIMIT_FSIZE in bytes: writes beyond fail (a full disk)
    check: Callable[[Workspace, Outcome], str | None] | None = None  # the case's own condition


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Workspace], Invocation]
    expect: int


def _digest(path: Path) -> dict[str, str]:
    if path.is_symlink():
        return {"": f"symlink to {os.readlink(path)}"}
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    if not path.exists():
        return {"": "missing"}
    return {p.relative_to(path).as_posix(): (f"symlink to {os.readlink(p)}" if p.is_symlink()
                                             else hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(path.rglob("*"))}


def raw_control(text: str) -> str | None:
    """The first raw control, format or separator character in printed text (line ends excepted)."""
    for ch in text:
        if ch != "\n" and ch != " " and unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            return f"U+{ord(ch):04X}"
    return None


def holds_pass(path: Path) -> bool:
    """Whether an output file says the model passed (a stale verdict if the run did not end with 0)."""
    if not path.is_file():
        return False
    text = path.read_text("utf-8", "replace")
    if path.suffix == ".json":
        return '"verdict": "pass"' in text
    if path.suffix == ".sarif":
        try:
            return json.loads(text)["runs"][0]["results"] == []
        except (ValueError, KeyError, IndexError, TypeError):
            return False
    return "PASS" in text


def judge(ws: Workspace, case: Case, inv: Invocation, out: Outcome) -> list[str]:
    problems = []
    if out.code != case.expect:
        problems.append(f"exit {out.code}, expected {case.expect}")
    # Every stderr line is ours ("amdet-gate: ..."): progress stages, warnings, and for an error
    # exactly one "amdet-gate: error: ..." line; a success has no error line.
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("amdet-gate: error:")]
    stray = [line for line in lines if not line.startswith("amdet-gate: ")]
    if case.expect in (0, 1) and errors:
        problems.append(f"an error line on success: {errors[0][:120]!r}")
    # An inconclusive verdict is exit 2 too, reported as a verdict on stdout, not as an error.
    inconclusive = case.expect == 2 and not errors and "INCONCLUSIVE" in out.stdout
    if case.expect not in (0, 1) and len(errors) != 1 and not inconclusive:
        problems.append(f"{len(errors)} error lines on stderr: {out.stderr[-300:]!r}")
    if stray:
        problems.append(f"stray stderr: {stray[0][:120]!r}")
    if "Traceback" in out.stderr + out.stdout:
        problems.append("a traceback")
    printed = {"stdout": out.stdout, "stderr": out.stderr,
               "job summary": ws.summary.read_text("utf-8", "replace") if ws.summary.is_file() else ""}
    for where, text in printed.items():
        bad = raw_control(text)
        if bad:
            problems.append(f"a raw {bad} in {where}")
        if any(line.lstrip().startswith("::") for line in text.splitlines()):
            problems.append(f"a line in {where} starts with '::' (a workflow command)")
    for path, before in ws.protected.items():
        if _digest(path) != before:
            problems.append(f"input {path.name} changed")
    if out.code != 0:
        stale = [p.name for p in ws.watched if holds_pass(p)]
        if stale:
            problems.append(f"a PASS left at {', '.join(stale)}")
    if inv.check is not None:
        problem = inv.check(ws, out)
        if problem:
            problems.append(problem)
    return problems


def run_process(ws: Workspace, inv: Invocation) -> Outcome:
    exe = Path(sys.executable).parent / "amdet-gate"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMDET_", "GITHUB_"))} | ws.env() | dict(inv.env)

    def limits() -> None:
        if inv.file_size_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (inv.file_size_limit, inv.file_size_limit))
        # A runner started in the background (nohup, `cmd &`) has SIGINT ignored, and a child would inherit
        # that: give the command the Ctrl-C a terminal or a CI runner would deliver.
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    started = time.monotonic()
    proc = subprocess.Popen([str(exe), *inv.args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ws.root, preexec_fn=limits, errors="backslashreplace")
    seen = ""
    if inv.interrupt_after is not None:
        while True:
            line = proc.stderr.readline()
            seen += line
            if not line or inv.interrupt_after in line:
                break
        proc.send_signal(inv.signal)  # at once: on a fast machine a tiny encoder's scan is over in seconds
    try:
        stdout, stderr = proc.communicate(timeout=ws.timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        stderr += f"\n(timed out after {ws.timeout_s:.0f} s)"
    return Outcome(proc.returncode, stdout, seen + stderr, time.monotonic() - started)


def run_in_process(ws: Workspace, inv: Invocation) -> Outcome:
    if inv.interrupt_after is not None or inv.file_size_limit is not None:
        return run_process(ws, inv)
    from typer.testing import CliRunner

    from amdet_gate.cli import app

    unset = {k: None for k in os.environ if k.startswith(("AMDET_", "GITHUB_"))}
    env = {**unset, **ws.env(), **inv.env}
    started = time.monotonic()
    cwd = os.getcwd()
    os.chdir(ws.root)  # as a subprocess runs: relative names (what pre-commit passes) resolve in the case's folder
    try:
        result = CliRunner().invoke(app, list(inv.args), env=env)
    finally:
        os.chdir(cwd)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += f"\nTraceback: {type(result.exception).__name__}: {result.exception}"
    return Outcome(result.exit_code, result.stdout, stderr, time.monotonic() - started)


def build_template(folder: Path) -> Path:
    """The tiny encoder every case copies (2 layers, width 32, CLIP vocabulary, bundled tokenizer)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from amdet_gate.tokenizer import save_bundled_tokenizer

    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
                            projection_dim=16, eos_token_id=49407, bos_token_id=49406, pad_token_id=49407)
    CLIPTextModel(config).eval().save_pretrained(str(folder))
    save_bundled_tokenizer(folder)
    # matplotlib's font cache, built once here: a case under a file-size limit must not be the one to write it.
    mpl = folder.parent / "mpl"
    mpl.mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-c", "import matplotlib.font_manager"],
                   env={**os.environ, "MPLCONFIGDIR": str(mpl)},
                   check=True, capture_output=True)
    return folder


def run_case(case: Case, root: Path, template: Path, runner: Callable[[Workspace, Invocation], Outcome],
             timeout_s: float = CASE_TIMEOUT_S) -> tuple[list[str], Outcome | None]:
    ws = Workspace(root, template, runner, timeout_s)
    root.mkdir(parents=True)
    try:
        inv = case.build(ws)
    except Exception as exc:  # a case that cannot even be built is not handled
        return [f"could not build the case: {type(exc).__name__}: {exc}"], None
    if ws.summary.exists():
        ws.summary.unlink()  # only what the case's own command writes is judged
    out = runner(ws, inv)
    return judge(ws, case, inv, out), out


def main(argv: list[str] | None = None) -> int:
    from hostile_cases import CASES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", default="", help="only the cases whose name contains this")
    parser.add_argument("--in-process", action="store_true", help="run the command in this interpreter")
    parser.add_argument("--keep", type=Path, help="keep every case's folder here")
    parser.add_argument("--timeout", type=float, default=CASE_TIMEOUT_S, help="seconds a case may take (processes)")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if args.k in c.name]
    runner = run_in_process if args.in_process else run_process
    with tempfile.TemporaryDirectory(prefix="amdet-hostile-") as tmp:
        base = args.keep or Path(tmp)
        template = build_template(base / "template" / "model")
        handled = 0
        for i, case in enumerate(cases):
            problems, out = run_case(case, base / f"case-{i:03d}", template, runner, args.timeout)
            handled += not problems
            took = f"{out.seconds:5.1f} s" if out else "   -   "
            print(f"{'ok  ' if not problems else 'FAIL'} {took}  {case.name}"
                  + ("" if not problems else f": {'; '.join(problems)}"), flush=True)
    print(f"{handled}/{len(cases)} handled")
    return 0 if handled == len(cases) else 1


if __name__ == "__main__":
    sys.exit(main())
