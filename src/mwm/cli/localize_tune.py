"""`mwm localize-tune`: grid-search M2IB layer/β and the postprocessing on a few annotated images → best.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .common import ConfigOpt, SetOpt, Strict, console, count_bar, handle_errors, out


def _list(v: Optional[str]) -> Optional[list[str]]:
    """'0.1,1,2' → ['0.1', '1', '2'] (pydantic converts the items); None stays None (not given)."""
    return None if v is None else [p.strip() for p in v.split(",") if p.strip()]


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def setting(r: dict) -> str:
    """A row's settings in one short string: 'layer 4, β 0.1, threshold 0.3, 1 comp., union, expand 0.1'."""
    b = r["binarize"] + ("" if r["threshold"] is None else f" {r['threshold']:g}")
    return f"layer {r['layer']}, β {r['beta']:g}, {b}, {r['components']} comp., {r['box_mode']}, expand {r['expand']:g}"


def _print(summary: dict, rows_md: Path) -> None:
    t = Table(title=f"localize-tune: {summary['n_rows']} settings on {summary['n_images']} annotated images "
                    f"(chosen by mean {summary['objective']})")
    for c in ("", "setting", "precision", "recall", "Dice", "IoU"):
        t.add_column(c, justify="left" if c in ("", "setting") else "right")
    for label, r in (("best", summary["best"]), ("defaults", summary["default"])):
        if r is not None:
            t.add_row(label, setting(r), *(_fmt(r[k]) for k in ("precision", "recall", "dice", "iou")))
    out.print(t)
    if summary["default"] is None:
        out.print("(the defaults are not in this grid)")
    out.print(f"all rows: {rows_md}", highlight=False)


@handle_errors
def localize_tune(
    data: Annotated[Path, typer.Argument(help="Scans with annotations: .npz (with masks), folder, .csv …")],
    gt: Annotated[Optional[Path], typer.Option("--gt", help="Ground-truth masks: npz with masks + mask_valid, or a folder of "
                                                            "mask images named like the image ids. [default: DATA]")] = None,
    vlm: Annotated[Optional[str], typer.Option(help="open_clip hub name (hf-hub:…), built-in name, or local VLM directory.")] = None,
    prompt: Annotated[Optional[str], typer.Option(help="What to localize, e.g. 'brain tumor'.")] = None,
    prompts_file: Annotated[Optional[Path], typer.Option(help="JSON {image id or class name: prompt}.")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Output folder (table.csv, table.md, best.yaml, tune.json).")] = None,
    vlm_pretrained: Annotated[Optional[str], typer.Option(help="Weights tag/file for a built-in open_clip name.")] = None,
    split: Annotated[Optional[str], typer.Option(help="Tune on images of this split. [default: val]")] = None,
    n: Annotated[Optional[int], typer.Option("--n", help="Tuning images (with a non-empty valid mask; seeded sample). [default: 20]")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the image sample. [default: 0]")] = None,
    layers: Annotated[Optional[str], typer.Option(help="M2IB layers, comma-separated. [default: 7,8,9 for 12 blocks; otherwise the "
                                                       "default layer and the next two, before the last block]")] = None,
    betas: Annotated[Optional[str], typer.Option(help="M2IB β values. [default: 0.1,1,2]")] = None,
    binarize: Annotated[Optional[str], typer.Option(help="Binarize methods: kmeans, otsu, threshold, crf. [default: kmeans,otsu,threshold]")] = None,
    thresholds: Annotated[Optional[str], typer.Option(help="Thresholds for binarize=threshold. [default: 0.3,0.5]")] = None,
    components: Annotated[Optional[str], typer.Option(help="Largest components kept. [default: 1,2]")] = None,
    box_mode: Annotated[Optional[str], typer.Option(help="union and/or per_component. [default: union]")] = None,
    expand: Annotated[Optional[str], typer.Option(help="Box margin ratios. [default: 0,0.05,0.1,0.2]")] = None,
    objective: Annotated[Optional[str], typer.Option(help="Choose by mean dice, iou, precision or recall. [default: dice]")] = None,
    steps: Annotated[Optional[int], typer.Option(help="M2IB optimisation steps. [default: 10]")] = None,
    noise_copies: Annotated[Optional[int], typer.Option(help="M2IB noisy copies per step. [default: 10]")] = None,
    feature_norm: Annotated[Optional[str], typer.Option(help="M2IB: standardize or none. [default: standardize]")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images optimised together. [default: 16]")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:1 … [default: auto]")] = None,
    config: ConfigOpt = None, set_: SetOpt = None, strict: Strict = None,
):
    """Choose the M2IB layer and β and the postprocessing on a few annotated images (MWM's --hyper-opt).

    Computes each (layer, β) saliency once for the tuning images, scores every postprocessing combination
    by the boxes' Dice (or --objective) against the masks, and writes OUT/table.csv, OUT/table.md,
    OUT/tune.json and OUT/best.yaml, which `mwm localize DATA --config OUT/best.yaml --out DIR` takes.

    Example: mwm localize-tune ../shared/data/br35h.npz --split val --n 20 --vlm clip_br --prompt "a brain MRI showing tumor" --out tune_br
    """

    from ..config import resolve
    from ..errors import MWMError
    from ..localize.tune import TuneConfig, tune

    opts = {"data": data, "gt": gt, "out": out_dir, "vlm": vlm, "prompt": prompt, "prompts_file": prompts_file,
            "vlm_pretrained": vlm_pretrained, "split": split, "n": n, "seed": seed, "layers": _list(layers),
            "betas": _list(betas), "binarize": _list(binarize), "thresholds": _list(thresholds),
            "components": _list(components), "box_mode": _list(box_mode), "expand": _list(expand),
            "objective": objective, "m2ib.steps": steps, "m2ib.noise_copies": noise_copies,
            "m2ib.feature_norm": feature_norm, "batch_size": batch_size, "device": device, "read.strict": strict}
    if out_dir is None and not config:
        raise MWMError("give --out DIR for the tuning table and best.yaml")
    cfg = resolve(TuneConfig, config, set_, opts)
    with count_bar("localize-tune") as advance:
        summary = tune(cfg, progress=advance, log=lambda msg: console.print(msg, highlight=False))
    _print(summary, cfg.out / "table.md")
    console.print(f"best settings → {summary['best_yaml']} (mwm localize DATA --config {summary['best_yaml']} --out DIR); "
                  f"{summary['seconds']}s", highlight=False)
