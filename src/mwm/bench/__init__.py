"""The benchmark protocol (``mwm bench CONFIG.yaml``): pretraining arms × seeds → transfer tasks → one table.

``config`` (BenchConfig), ``runner`` (runs and resumes every part), ``tables`` (results.csv / results.md with
mean ± std and paired differences to the baseline arm), plots in :mod:`mwm.report.plots`.
"""

from .config import ArmConfig, BenchConfig, RoiSourceConfig, TaskConfig
from .runner import run_bench
from .tables import summarize, write_tables

__all__ = ["BenchConfig", "ArmConfig", "RoiSourceConfig", "TaskConfig", "run_bench", "summarize", "write_tables"]
