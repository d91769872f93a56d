"""The report formats' registry (amdet_gate/report) is the one list of formats: the scan and report options,
the files in --out, the checks and clearing of the copies, the error outputs, the verdict cache's files.

A format is added by one module in amdet_gate/report/; the tests add one the same way, from a folder put
on the package's path in a subprocess (`PLUGIN`), and check that every one of those places knows it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer

import amdet_gate.report as report
from amdet_gate.cli import app
from amdet_gate.errors import UsageError
from amdet_gate.gate import GateOptions
from amdet_gate.outpaths import OutputPlan, check_plan
from amdet_gate.outputs import ARTIFACTS
from amdet_gate.report import ReportFormat, formats

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = Path(__file__).parent / "data" / "sample_result.json"
PASS = ("--max-steps", "16", "--n-prompts", "40", "--restarts", "2", "-q", "--threshold", "same_target=1")

PLUGIN = '''
from amdet_gate.report import ReportFormat

FORMAT = ReportFormat("plain", "--plain", "verdict.txt", "the verdict as plain text",
                      render=lambda result, base_dir: f"verdict {result.verdict}\\n".encode(),
                      render_error=lambda error: f"error {error.rule} exit {int(error.exit_code)}\\n".encode(),
                      order=99)
'''
# Run the CLI (or print what the registry drives) with the plugin folder on amdet_gate.report's path.
DRIVER = '''
import json, sys
import amdet_gate.report as report
report.__path__.append(sys.argv[1])
if sys.argv[2] == "--describe":
    import typer
    from amdet_gate.cache import output_patterns
    from amdet_gate.cli import app
    from amdet_gate.outputs import output_paths
    command = typer.main.get_command(app)
    options = {name: {p.opts[0]: p.help for p in command.commands[name].params if p.opts[0].startswith("--")}
               for name in ("scan", "report")}
    print(json.dumps({"options": options, "patterns": list(output_patterns()),
                      "paths": {k: v.name for k, v in output_paths(__import__("pathlib").Path("o")).items()}}))
else:
    from amdet_gate.cli import app
    sys.argv = ["amdet-gate", *sys.argv[2:]]
    app()
'''


def _options(command: str) -> dict[str, str | None]:
    params = typer.main.get_command(app).commands[command].params
    return {p.opts[0]: p.help for p in params if p.opts[0].startswith("--")}


def test_every_format_module_is_registered_and_names_are_distinct() -> None:
    modules = {m.name for m in pkgutil.iter_modules(report.__path__) if not m.name.startswith("_")}
    fmts = formats()
    assert {f.__class__ for f in fmts} == {ReportFormat} and len(modules) == len(fmts)
    assert [f.name for f in fmts][:3] == ["sarif", "html", "markdown"]  # the order of the options
    names = {f.name for f in fmts}
    # A format's name is a key beside the artifacts, a GateOptions field's neighbour and a scan parameter.
    assert not names & ({"result", *ARTIFACTS} | {f.name for f in dataclasses.fields(GateOptions)})
    for attribute in ("name", "option", "file_name"):
        assert len({getattr(f, attribute) for f in fmts}) == len(fmts)


@pytest.mark.parametrize("bad", [dict(name="two words"), dict(option="-x"), dict(file_name="../x"),
                                 dict(file_name="sub/x"), dict(file_name=".hidden")])
def test_a_format_with_an_unusable_name_is_refused_when_declared(bad: dict) -> None:
    fields = dict(name="x", option="--x", file_name="x.txt", what="x", render=lambda r, b: b"") | bad
    with pytest.raises(ValueError):
        ReportFormat(**fields)


def test_the_scan_and_report_options_are_the_registry() -> None:
    scan, rerender = _options("scan"), _options("report")
    for fmt in formats():
        assert scan[fmt.option] == f"Also write {fmt.what} here." == fmt.scan_help
        assert rerender[fmt.option] == f"Write {fmt.what} here." == fmt.report_help
    assert set(rerender) == {f.option for f in formats()}
    # In place of the one `reports` parameter: after --out, before --render, in the registry's order.
    order = list(scan)
    place = order.index("--out") + 1
    assert order[place:place + len(formats())] == [f.option for f in formats()]


def test_check_plan_knows_every_format_copy(tmp_path: Path) -> None:
    out, policy = tmp_path / "out", tmp_path / "p.yaml"
    policy.write_text("version: 1\n")
    for fmt in formats():
        check_plan(OutputPlan(out, {fmt.name: out / fmt.file_name}), {}, {})  # the same report: fine
        check_plan(OutputPlan(out, {fmt.name: tmp_path / "ci" / fmt.file_name}), {}, {})
        for path, inputs in ((out / "result.json", {}), (policy, {"the policy": policy})):
            with pytest.raises(UsageError, match=fmt.option):
                check_plan(OutputPlan(out, {fmt.name: path}), inputs, {})
    first, second = formats()[0], formats()[-1]
    with pytest.raises(UsageError, match="the same file"):
        check_plan(OutputPlan(out, {first.name: tmp_path / "x", second.name: tmp_path / "x"}), {}, {})
    with pytest.raises(UsageError, match="no report format 'pdf'"):
        check_plan(OutputPlan(out, {"pdf": tmp_path / "x"}), {}, {})


def test_the_api_refuses_an_unknown_report_format_before_reading(tmp_path: Path) -> None:
    import amdet_gate

    with pytest.raises(UsageError, match="no report format"):
        amdet_gate.scan(str(tmp_path / "missing"), out=tmp_path / "out", reports={"pdf": tmp_path / "r.pdf"})


@pytest.fixture()
def plugin(tmp_path: Path):
    """Run amdet-gate with one more report format, declared as a format module declares itself."""
    folder = tmp_path / "plugin"
    folder.mkdir()
    (folder / "plain.py").write_text(PLUGIN, "utf-8")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER, "utf-8")

    def run(*args: object) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        return subprocess.run([sys.executable, str(driver), str(folder), *map(str, args)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)

    return run


def test_a_registered_format_is_an_option_a_file_in_out_and_in_the_cache_list(plugin) -> None:
    done = plugin("--describe")
    assert done.returncode == 0, done.stderr
    described = json.loads(done.stdout)
    assert described["options"]["scan"]["--plain"] == "Also write the verdict as plain text here."
    assert described["options"]["report"]["--plain"] == "Write the verdict as plain text here."
    assert described["paths"]["plain"] == "verdict.txt" and "verdict.txt" in described["patterns"]


def test_a_registered_format_is_cleared_at_the_start_and_written_on_errors(plugin, tmp_path: Path) -> None:
    out, copy, model = tmp_path / "out", tmp_path / "ci" / "v.txt", tmp_path / "empty-model"
    model.mkdir()
    copy.parent.mkdir()
    for stale in (out / "verdict.txt", copy):
        stale.parent.mkdir(exist_ok=True)
        stale.write_text("verdict pass\n")
    done = plugin("scan", model, "-q", "--out", out, "--plain", copy, "--threshold", "nope=1")
    assert done.returncode == 4, done.stderr
    assert not (out / "verdict.txt").exists() and not copy.exists()  # a usage error leaves no stale pass
    done = plugin("scan", model, "-q", "--out", out, "--plain", copy)  # no weights: exit 3, the error outputs
    assert done.returncode == 3, done.stderr
    assert copy.read_text() == (out / "verdict.txt").read_text() == "error AMDET102 exit 3\n"
    done = plugin("scan", model, "-q", "--out", out, "--plain", model / "config.json")
    assert done.returncode == 4 and "--plain" in done.stderr and not (model / "config.json").exists()
    done = plugin("report", SAMPLE, "--plain", tmp_path / "r.txt")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "r.txt").read_text() == "verdict fail\n"
    done = plugin("report", SAMPLE)
    assert done.returncode == 4 and "and/or --plain" in done.stderr


@pytest.mark.slow
def test_a_registered_format_is_written_copied_and_cached(plugin, tiny_dir: Path, tmp_path: Path) -> None:
    from tests.conftest import run_cli

    code, _, stderr = run_cli("scan", tiny_dir, *PASS, "--out", tmp_path / "old")  # before the format existed
    assert code == 0 and not (tmp_path / "old" / "verdict.txt").exists(), stderr
    # A cache hit on that entry: the format's file is rendered from the stored result, and copied.
    done = plugin("scan", tiny_dir, *PASS, "--out", tmp_path / "a", "--plain", tmp_path / "a.txt")
    assert done.returncode == 0 and "verdict cache" in done.stdout, done.stderr
    assert (tmp_path / "a" / "verdict.txt").read_text() == (tmp_path / "a.txt").read_text() == "verdict pass\n"
    done = plugin("scan", tiny_dir, *PASS, "--no-cache", "--out", tmp_path / "c")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "c" / "result.json").read_text())["artifacts"]["plain"] == "verdict.txt"
