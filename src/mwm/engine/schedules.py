"""Per-step learning-rate multipliers of the transfer tasks: linear warmup, then cosine or step decay.

One rule with the variants the tasks use, each behind a parameter (the numbers are those each task computed
before issue 13, to the last bit):

* warmup: ``warmup_start=None`` gives ``(step + 1) / warmup`` (never 0, so the first step learns: classification
  and segmentation); a number ``s`` gives ``s · (1 − a) + a`` with ``a = step / warmup`` (torchvision's and
  Detectron2's linear warmup from ``s × lr``: detection, ``s = 0.001``).
* decay: ``cosine`` from 1 at the end of warmup to ``final_ratio`` at ``total`` (all three tasks), or ``step``:
  ×``gamma`` at each fraction of ``total`` in ``milestones`` (detection's "1x" shape).

Pretraining keeps SparK's schedule (``mwm.train.optim``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

__all__ = ["lr_factor", "LrSchedule", "build_scheduler"]


def lr_factor(step: int, total: int, warmup: int, final_ratio: float = 0.0, *, warmup_start: float | None = None,
              decay: Literal["cosine", "step"] = "cosine", milestones: tuple[float, ...] = (),
              gamma: float = 0.1) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based) of ``total``, ``warmup`` of them warming up.

    Args:
        final_ratio: cosine: the multiplier reached at ``total``.
        warmup_start: None: warmup ``(step + 1) / warmup``; a number: linear from it at step 0.
        decay: ``cosine`` or ``step`` (``gamma`` per ``milestones`` fraction of ``total`` passed).
    """
    if step < warmup:
        if warmup_start is None:
            return (step + 1) / warmup
        a = step / warmup
        return warmup_start * (1 - a) + a
    if decay == "step":
        return gamma ** sum(step >= int(f * total) for f in milestones)
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * t))


class LrSchedule:
    """:func:`lr_factor` with its settings as a picklable callable (``LambdaLR`` saves a callable object's
    ``__dict__`` in its state_dict: plain numbers only, so checkpoints load with ``weights_only=True``)."""

    def __init__(self, total: int, warmup: int, final_ratio: float = 0.0, warmup_start: float | None = None,
                 decay: str = "cosine", milestones: tuple[float, ...] = (), gamma: float = 0.1):
        self.total, self.warmup, self.final_ratio = total, warmup, final_ratio
        self.warmup_start, self.decay, self.milestones, self.gamma = warmup_start, decay, tuple(milestones), gamma

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.total, self.warmup, self.final_ratio, warmup_start=self.warmup_start,
                         decay=self.decay, milestones=self.milestones, gamma=self.gamma)  # type: ignore[arg-type]


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, final_ratio: float = 0.0,
                    **variant) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` stepped once per optimizer step; ``variant``: ``warmup_start``, ``decay``, ``milestones``,
    ``gamma`` of :func:`lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LrSchedule(total_steps, warmup_steps, final_ratio, **variant))
