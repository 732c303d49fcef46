"""`mwm demo`: the end-to-end walk-through on phantoms (grows as stages land)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from .common import console, handle_errors


@handle_errors
def demo(out: Annotated[Path, typer.Option(help="Folder for everything the demo writes.")] = Path("mwm-demo"),
         n: Annotated[int, typer.Option("--n", help="Number of phantoms.")] = 256,
         size: Annotated[int, typer.Option(help="Phantom size in pixels.")] = 64):
    """Run every stage that exists on synthetic phantoms and say what each did.

    Example: mwm demo --out mwm-demo
    """
    import warnings

    from ..config import save_config
    from ..data import open_source
    from ..data.inspect import inspect_source
    from ..data.synthetic import PhantomConfig, generate

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    cfg = PhantomConfig(n=n, size=size, seed=0)
    save_config(cfg, out / "phantoms.config.yaml")
    path = out / "phantoms.npz"
    generate(cfg).save_npz(path)
    console.print(f"[1/2] phantoms: wrote {path} ({n} images, {size}px, lesion masks and captions)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = inspect_source(open_source(path))
    splits = ", ".join(f"{k} {v['count']}" for k, v in info["splits"].items())
    console.print(f"[2/2] inspect: {info['count']} images, {info['num_classes']} classes {info['label_names']}, "
                  f"splits {splits}, {info['masks']['valid']} masks")
    console.print("Not yet in the demo (later stages): vlm train, localize, localize-eval, pretrain, finetune, report.")
    console.print(f"done in {time.perf_counter() - t0:.1f}s; outputs in {out}/")
