"""`mwm demo`: the whole pipeline on synthetic phantoms, ending in one HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import console, handle_errors


@handle_errors
def demo(out: Annotated[Path, typer.Option(help="Folder for everything the demo writes.")] = Path("mwm-demo"),
         n: Annotated[Optional[int], typer.Option("--n", help="Phantoms (70 % train). [default: 1000]")] = None,
         size: Annotated[Optional[int], typer.Option(help="Phantom side in pixels. [default: 128]")] = None,
         seed: Annotated[Optional[int], typer.Option(help="Seed of every stage. [default: 0]")] = None):
    """Phantoms → tiny CLIP → localize → localize-eval → pretrain (random vs MWM masking) → linear probe →
    OUT/report.html. About five minutes on one CPU core.

    Example: mwm demo --out mwm-demo
    """
    from ..config import resolve
    from ..demo import DemoConfig, run_demo

    cfg = resolve(DemoConfig, None, None, {"out": out, "n": n, "size": size, "seed": seed})
    summary = run_demo(cfg, log=lambda s: console.print(s, highlight=False))
    console.print(f"done in {summary['seconds']:.0f}s. Open the report: [bold]{summary['report']}[/bold]",
                  highlight=False)
