"""What the two search loops share: one optimiser step, and the reasons a loop stops.

Kept apart from both loops so that the pooled loop can use them without importing the token
loop, which runs the pooled one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from amdet_gate.engine.measures import clip_triggers
from amdet_gate.result.enums import StopReason  # one definition: result.json holds these words

__all__ = ["StopReason", "descend"]


def descend(optimiser: torch.optim.Optimizer, loss: Tensor, triggers: Tensor, history: list[Tensor],
            bound: float | None = None) -> bool:
    """One step on the per-restart losses (R,); records them. False once a loss or trigger is non-finite."""
    optimiser.zero_grad(set_to_none=True)
    loss.sum().backward()  # restarts are independent: each v only moves its own loss
    optimiser.step()
    clip_triggers(triggers, bound)
    history.append(loss.detach().cpu())
    return bool(torch.isfinite(history[-1]).all() and torch.isfinite(triggers).all())
