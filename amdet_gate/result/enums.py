"""The closed sets of words result.json holds: verdicts, why a search stopped, what a typed search aims at.

Each is a str Enum: the values are what result.json has always held, they compare equal to those
strings, and str() / format() give the bare value (as the plain strings did).
"""

from __future__ import annotations

from enum import Enum


class Word(str, Enum):
    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return self.value.__format__(spec)


class Verdict(Word):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"


class StopReason(Word):
    """Why a search loop ended."""

    DETECTED = "detected"  # every gate passed on a trigger
    MAX_STEPS = "max_steps"  # the step budget ran out
    PLATEAU = "plateau"  # token path only: no restart improved for `patience` steps
    TIME_BUDGET = "time_budget"  # the wall-clock deadline passed
    NON_FINITE = "non_finite"  # a loss or a trigger became NaN or infinite


class Objective(Word):
    """What a typed-trigger search (token_search) aims at."""

    TOKENS = "tokens"  # every position's feature: what tells prompts apart (variation ratio)
    POOLED = "pooled"  # the pooled (EOS, projected) feature, centred on the clean prompts' mean


class OnSetting(Word):
    """A policy's on_finding / on_inconclusive / on_unscanned."""

    FAIL = "fail"
    WARN = "warn"
