"""Training metrics: RUN/metrics.csv (one row per logging interval) and TensorBoard (RUN/tb/), rank 0 only.

On resume, rows logged after the checkpoint's step (a run killed mid-epoch) are dropped from the CSV and
TensorBoard is told to purge events from that step on, so both read as one uninterrupted run.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from ..io import atomic_write_text

__all__ = ["COLUMNS", "MetricsLogger", "read_metrics"]

COLUMNS = ["step", "epoch", "loss", "lr", "mask_ratio", "mask_ratio_in", "mask_ratio_out", "grad_norm",
           "images_per_s", "elapsed_s"]
TIMING = ("images_per_s", "elapsed_s")  # depend on the machine, not on the run's numbers


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return repr(v)  # round-trips exactly: a resumed run's rows compare equal to an uninterrupted run's
    return str(v)


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a metrics.csv as dicts of floats (ints for step/epoch, None for empty cells)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with path.open(newline="") as f:
        for r in csv.DictReader(f):
            rows.append({k: (None if v == "" else (int(v) if k in ("step", "epoch") else float(v)))
                         for k, v in r.items()})
    return rows


class MetricsLogger:
    """``log(row)`` appends to metrics.csv (flushed) and writes scalars to TensorBoard under ``train/``.
    ``enabled=False`` (ranks ≠ 0) makes every call a no-op. ``resume_step``: keep only rows up to that step."""

    def __init__(self, out: str | Path, enabled: bool = True, resume_step: int | None = None,
                 tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(out) / "metrics.csv"
        self._tb = None
        if not enabled:
            return
        if resume_step is None:
            atomic_write_text(self.path, ",".join(COLUMNS) + "\n")
        else:
            kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            text = ",".join(COLUMNS) + "\n" + "".join(",".join(_fmt(r.get(c)) for c in COLUMNS) + "\n" for r in kept)
            atomic_write_text(self.path, text)
        self._f = self.path.open("a", newline="")
        self._w = csv.writer(self._f)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency, but the CSV is the record: never fail over it
                SummaryWriter = None
            if SummaryWriter is not None:
                # purge_step: events at or after it from an earlier (interrupted) session are hidden
                self._tb = SummaryWriter(str(Path(out) / "tb"), purge_step=(resume_step or 0) + 1)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self._w.writerow([_fmt(row.get(c)) for c in COLUMNS])
        self._f.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "epoch") and v is not None and not (isinstance(v, float) and math.isnan(v)):
                    self._tb.add_scalar(f"train/{k}", v, row["step"])

    def add_image(self, tag: str, img, step: int) -> None:
        """uint8 (H, W, 3) image to TensorBoard."""
        if self.enabled and self._tb is not None:
            self._tb.add_image(tag, img, step, dataformats="HWC")

    def close(self) -> None:
        if not self.enabled:
            return
        self._f.close()
        if self._tb is not None:
            self._tb.close()
