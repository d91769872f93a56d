"""The hostile corpus (bench/hostile_cases.py), replayed through the CLI: every case handled.

Each case builds its hostile input itself (nothing is downloaded); see bench/hostile.py for what
"handled" means. Cases that need a process of their own (a real SIGINT, a file-size limit) run as one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import hostile  # noqa: E402
from hostile_cases import CASES  # noqa: E402


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hostile.build_template(tmp_path_factory.mktemp("hostile") / "model")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_case_is_handled(case: hostile.Case, template: Path, tmp_path: Path) -> None:
    problems, _ = hostile.run_case(case, tmp_path / "case", template, hostile.run_in_process)
    assert problems == [], f"{case.name}: {'; '.join(problems)}"


def test_the_corpus_covers_every_exit_code_and_names_are_unique() -> None:
    assert {c.expect for c in CASES} == {0, 1, 2, 3, 4}
    assert len({c.name for c in CASES}) == len(CASES) >= 100


def test_the_judge_catches_what_it_is_for(template: Path, tmp_path: Path) -> None:
    """A judge that cannot fail proves nothing: raw escapes, '::' lines, stale PASSes, changed inputs,
    a wrong exit code and a second error line are each reported."""
    ws = hostile.Workspace(tmp_path, template, hostile.run_in_process)
    (tmp_path / "input").write_text("x")
    ws.protect(tmp_path / "input")
    (tmp_path / "input").write_text("changed")
    (tmp_path / "result.json").write_text('{"verdict": "pass"}')
    ws.watch(tmp_path / "result.json")
    case = hostile.Case("judge", lambda ws: hostile.Invocation(()), 2)
    bad = hostile.Outcome(4, "\x1b[31mPASS\n::error::x\n", "amdet-gate: error: a\namdet-gate: error: b\n", 0.1)
    problems = " | ".join(hostile.judge(ws, case, hostile.Invocation(()), bad))
    for words in ("exit 4, expected 2", "2 error lines", "raw U+001B in stdout", "starts with '::'",
                  "input input changed", "a PASS left at result.json"):
        assert words in problems, problems
