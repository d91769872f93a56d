"""The projected benign scan time of bench/scan_speed.py (bench/scan_projection): counts and budget."""

from __future__ import annotations

from dataclasses import replace

from amdet_gate.settings import SearchSettings
from bench.scan_projection import Counts, PhaseTimes, benign_counts, project, project_with_budget

ZERO = PhaseTimes(precompute=0, step=0, check=0, report=0, pooled_step=0, pooled_check=0, pooled_final=0,
                  natural=0, confirm=0)


def test_default_benign_counts_follow_the_settings():
    s = SearchSettings()
    # 640 token steps, a check due every 10; the pooled path's 100 steps, checked at 50 and 100.
    assert benign_counts(s) == Counts(s.max_steps, s.max_steps // s.check_every, s.pooled_steps,
                                      s.pooled_steps // s.pooled_check_every) == Counts(640, 64, 100, 2)
    assert benign_counts(s, 140) == Counts(140, 14, 100, 2)  # a plateau at step 140
    assert benign_counts(s, 10_000) == benign_counts(s)  # never beyond max_steps
    # The loops check at their last step too, and the pooled budget is capped by max_steps.
    assert benign_counts(replace(s, max_steps=205)) == Counts(205, 21, 100, 2)
    assert benign_counts(replace(s, max_steps=75)) == Counts(75, 8, 75, 2)
    assert benign_counts(replace(s, pooled_steps=0)).pooled_checks == 0


def test_projection_adds_each_phase_at_its_count():
    s = SearchSettings()
    assert project(replace(ZERO, step=1.0), s) == 640
    assert project(replace(ZERO, check=1.0), s, token_steps=140) == 14
    assert project(replace(ZERO, pooled_step=1.0, pooled_check=10.0), s) == 100 + 20
    once = replace(ZERO, precompute=1.0, report=2.0, pooled_final=4.0, natural=8.0, confirm=16.0)
    assert project(once, s) == 15 and project(once, s, confirm=True) == 31
    assert project(replace(once, pooled_step=1.0), replace(s, pooled_steps=0)) == 11  # no pooled path


def test_the_time_budget_cuts_the_loops_and_makes_the_scan_inconclusive():
    s = SearchSettings()  # 900 s
    slow = replace(ZERO, step=10.0, pooled_step=3.0, report=5.0, pooled_final=7.0, natural=11.0)
    cut = project_with_budget(slow, s)
    # 91 steps: the deadline is tested after each, and 910 s is the first past 900; then one pooled step.
    assert (cut.token_steps, cut.cut_off, cut.inconclusive) == (91, True, True)
    assert cut.seconds == 910 + 3 + 5 + 7 + 11
    long_enough = project_with_budget(replace(slow, step=4.0), s)
    # Past 200 steps too: a scan the deadline stopped is inconclusive (verdict.decide).
    assert (long_enough.token_steps, long_enough.cut_off, long_enough.inconclusive) == (226, True, True)
    pooled_cut = project_with_budget(replace(slow, step=1.0, pooled_step=10.0), s, token_steps=140)
    assert (pooled_cut.token_steps, pooled_cut.cut_off, pooled_cut.inconclusive) == (140, True, True)
    fast = replace(slow, step=1.0)
    done = project_with_budget(fast, s, token_steps=140)
    assert not done.cut_off and not done.inconclusive and done.token_steps == 140
    assert done.seconds == project(fast, s, 140)
    assert project_with_budget(ZERO, replace(s, max_steps=150)).inconclusive  # below min_decisive_steps
