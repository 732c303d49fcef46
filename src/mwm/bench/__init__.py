"""The benchmark protocol (``mwm bench CONFIG.yaml``): pretraining arms × seeds → transfer tasks → one table.

``config`` (BenchConfig), ``runner`` (validates every part's config, then runs and resumes every part),
``parts`` (the identity each part was made with: reused only under the same config, else moved to OUT/stale/),
``tables`` (results.csv / results.md with mean ± std and paired differences to the baseline arm), plots in
:mod:`mwm.report.plots`.
"""

from .config import ArmConfig, BenchConfig, RoiSourceConfig, TaskConfig
from .runner import check_bench, run_bench
from .tables import summarize, write_tables

__all__ = ["BenchConfig", "ArmConfig", "RoiSourceConfig", "TaskConfig", "run_bench", "check_bench", "summarize",
           "write_tables"]
