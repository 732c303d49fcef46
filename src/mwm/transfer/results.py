"""What a transfer task returns and writes to ``OUT/metrics.json``: :class:`TaskMetrics`.

Every task reports the same bookkeeping (split sizes, the selected epoch, the encoder, the input size, the time);
those fields are typed here, and each task adds its own metrics as extra keys (classification: accuracy,
macro-F1, AUROC…; segmentation: Dice/IoU; detection: COCO APs). The file is ``json.dumps(…, indent=2)`` plus a
newline, keys in the order the task gave them, so ``TaskMetrics.load(path).as_dict()`` equals what the task
returned and the bench's tables read the same columns in the same order.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, PrivateAttr, model_validator

__all__ = ["TaskMetrics"]


class TaskMetrics(BaseModel):
    """The shared part of every transfer task's metrics; the task's own keys ride along (``extra="allow"``)."""

    model_config = ConfigDict(extra="allow")

    n_train: int
    n_val: int
    n_test: int
    best_epoch: int | None
    arch: str
    weights: str
    size: int
    seconds: float

    _order: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_order(cls, data, handler):
        m = handler(data)
        if isinstance(data, dict):
            m._order = list(data)
        return m

    def as_dict(self) -> dict:
        """Every key, in the order the task gave them (what the task function returns)."""
        d = self.model_dump()
        return {**{k: d[k] for k in self._order if k in d}, **{k: v for k, v in d.items() if k not in self._order}}

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2) + "\n"

    def save(self, path: str | Path) -> Path:
        """Write atomically to ``path`` (``OUT/metrics.json``)."""
        from ..io import atomic_write_text

        atomic_write_text(Path(path), self.to_json())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "TaskMetrics":
        """Read a task's ``metrics.json``."""
        return cls.model_validate(json.loads(Path(path).read_text()))
