"""What the two search loops share: one optimiser step, and the reasons a loop stops.

Kept apart from both loops so that the pooled loop can use them without importing the token
loop, which runs the pooled one.
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import Tensor

from amdet_gate.engine.measures import clip_triggers


class StopReason(str, Enum):
    """Why a search loop ended. A str: the values are what result.json has always held, and they
    compare equal to those strings (`verdict` tests `"non_finite" in (...)`)."""

    DETECTED = "detected"  # every gate passed on a trigger
    MAX_STEPS = "max_steps"  # the step budget ran out
    PLATEAU = "plateau"  # token path only: no restart improved for `patience` steps
    TIME_BUDGET = "time_budget"  # the wall-clock deadline passed
    NON_FINITE = "non_finite"  # a loss or a trigger became NaN or infinite

    # str() and format() give the bare value, as the plain strings did (Enum's own would give
    # "StopReason.DETECTED" in messages and reports).
    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return self.value.__format__(spec)


def descend(optimiser: torch.optim.Optimizer, loss: Tensor, triggers: Tensor, history: list[Tensor],
            bound: float | None = None) -> bool:
    """One step on the per-restart losses (R,); records them. False once a loss or trigger is non-finite."""
    optimiser.zero_grad(set_to_none=True)
    loss.sum().backward()  # restarts are independent: each v only moves its own loss
    optimiser.step()
    clip_triggers(triggers, bound)
    history.append(loss.detach().cpu())
    return bool(torch.isfinite(history[-1]).all() and torch.isfinite(triggers).all())
