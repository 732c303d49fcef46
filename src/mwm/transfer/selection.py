"""Model selection on ``val``: keep the best state, count evaluations without improvement (early stopping).

Every transfer loop (linear probe, full fine-tuning, segmentation, detection) selects the same way, so the
bookkeeping lives here once:

>>> keep = BestOnVal(patience=3)
>>> for epoch in range(1, epochs + 1):
...     train_one_epoch()
...     keep.update(val_score(), epoch, model)   # True when this is the best so far (its state is copied)
...     if keep.should_stop:
...         break
>>> keep.restore(model)                           # the best state back, before testing

Scores compare with ``>`` (floats, or tuples for lexicographic tie-breaking as in ``classify``). The first
update always counts as the best, so a NaN score on the first evaluation still leaves a state to restore.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["BestOnVal"]


class BestOnVal:
    """best: the best score so far (None before the first update); best_epoch: its epoch (0 before);
    bad: evaluations since the last improvement; state: a detached copy of the best ``state_dict``
    (on ``device``: ``"cpu"`` frees accelerator memory, None keeps each tensor where it is)."""

    def __init__(self, patience: int | None = None, device: str | torch.device | None = None):
        self.patience = patience
        self.device = device
        self.best: Any = None
        self.best_epoch = 0
        self.bad = 0
        self.state: dict[str, torch.Tensor] | None = None

    def update(self, score: Any, epoch: int, module: torch.nn.Module) -> bool:
        if self.state is None or score > self.best:
            self.best, self.best_epoch, self.bad = score, epoch, 0
            self.state = {k: v.detach().to(self.device or v.device, copy=True)
                          for k, v in module.state_dict().items()}
            return True
        self.bad += 1
        return False

    @property
    def should_stop(self) -> bool:
        """``patience`` evaluations in a row without a better score (never when patience is 0 or None)."""
        return bool(self.patience) and self.bad >= self.patience

    def restore(self, module: torch.nn.Module) -> bool:
        """Load the best state into ``module``; False (and nothing loaded) when there was no update."""
        if self.state is None:
            return False
        module.load_state_dict(self.state)
        return True
