"""`mwm bench CONFIG.yaml`: pretraining arms × seeds → transfer tasks → results.csv / results.md / plots."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import SetOpt, console, handle_errors, out


def _parse_shard(shard: str | None) -> tuple[int, int]:
    """``"1/2"`` → (1, 2); None → (0, 1)."""
    from ..config import ConfigError, parse_shard

    if shard is None:
        return 0, 1
    try:
        return parse_shard(shard)
    except ValueError as e:
        raise ConfigError(f"--shard: {e}") from None


def _parse_seeds(seeds: str | None, option: str = "--seeds") -> list[int] | None:
    """``"0,1,2"`` → ``[0, 1, 2]``; anything else is a ConfigError saying what to pass to ``option``."""
    if seeds is None:
        return None
    from ..config import ConfigError

    items = [s.strip() for s in seeds.split(",")]
    if not all(s.isdigit() for s in items):
        raise ConfigError(f"{option} {seeds!r}: give comma-separated non-negative integers, e.g. {option} 0,1,2")
    return [int(s) for s in items]


@handle_errors
def bench(
    config: Annotated[Path, typer.Argument(help="Bench YAML: data, rois, arms, seeds, tasks (see configs/bench/).")],
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Output folder. [default: runs/bench/<name>]")] = None,
    seeds: Annotated[Optional[str], typer.Option(help="Comma-separated seeds, overriding the YAML's (arms with "
                                                      "their own `seeds:` keep them).")] = None,
    shard: Annotated[Optional[str], typer.Option(help="i/n: run every n-th arm x seed starting at i, so n "
                                                      "processes share one bench folder.")] = None,
    phases: Annotated[Optional[str], typer.Option(help="Comma-separated arm phases to run, e.g. 0 (the main "
                                                       "arms) before any dataset's secondary arms; the tables "
                                                       "still show every finished part. [default: all]")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda for every part.")] = None,
    tables_only: Annotated[bool, typer.Option("--tables-only", help="Only rebuild the tables and plots from "
                                                                     "finished parts.")] = False,
    sets: SetOpt = None,
):
    """Run (or resume) a benchmark protocol and write OUT/results.csv, OUT/results.md and OUT/plots/.

    Finished parts (a pretraining run, a task, a gt-boxes ROI manifest) are reused only when they were made with
    the config now asked for; a part made with another config is moved to OUT/stale/ and run again, with what
    depends on it. So a killed bench continues where it stopped, a new seed or arm runs only what is missing,
    and a changed setting reruns exactly the parts it affects. The whole bench file is validated first.

    Example: mwm bench configs/bench/br35h_r18_64.yaml --seeds 0,1,2
    """
    import time

    from ..bench import BenchConfig, run_bench
    from ..config import resolve

    if not config.is_file():
        from ..errors import MWMError

        raise MWMError(f"{config}: no such bench config; see configs/bench/ for examples")
    seed_list = _parse_seeds(seeds)
    phase_list = _parse_seeds(phases, "--phases")
    cfg = resolve(BenchConfig, config, sets, {"out": out_dir, "device": device, "seeds": seed_list})
    t0 = time.perf_counter()
    rows = run_bench(cfg, log=lambda msg: console.print(f"[bold]bench[/bold] {msg}", highlight=False),
                     only_tables=tables_only, shard=_parse_shard(shard), phases=phase_list)
    md = (cfg.out_dir / "results.md").read_text()
    out.print(md, markup=False, highlight=False)
    console.print(f"{len(rows)} result rows in {time.perf_counter() - t0:.0f}s: {cfg.out_dir}/results.csv, "
                  f"results.md, plots/", highlight=False)
