"""`mwm localize-eval`: score an ROI manifest against ground-truth masks (occlusion precision/recall, Dice, IoU)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import BaseModel, ConfigDict, Field
from rich.table import Table

from .common import ConfigOpt, SetOpt, console, handle_errors, out


class LocalizeEvalConfig(BaseModel):
    """`mwm localize-eval`: ROI manifest + ground truth → mean metrics and a per-image CSV."""

    model_config = ConfigDict(extra="forbid")
    manifest: Path
    gt: Path
    out: Optional[Path] = Field(default=None, description="per-image CSV; default: eval_per_image.csv beside the manifest")
    random_baseline: bool = False
    seed: int = 0


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.3f}"


def _print_table(s: dict, cfg: LocalizeEvalConfig) -> None:
    t = Table(title=f"{cfg.manifest} vs {cfg.gt}")
    t.add_column("metric")
    t.add_column("ROI boxes", justify="right")
    if cfg.random_baseline:
        t.add_column(f"random boxes (seed {cfg.seed})", justify="right")
    for k, label in (("precision", "occlusion precision"), ("recall", "occlusion recall"), ("dice", "Dice"),
                     ("iou", "IoU")):
        t.add_row(label, _fmt(s[k]), *([_fmt(s[f"random_{k}"])] if cfg.random_baseline else []))
    out.print(t)
    out.print(f"scored {s['n']} of {s['n_manifest']} manifest images; left out: {s['n_no_gt']} without ground truth, "
              f"{s['n_empty_gt']} with an empty mask (no lesion; {s['n_false_positive']} of them got an ROI: "
              f"false positives); {s['n_failed']} localization failures (scored as given); "
              f"{s['n_missing']} annotated images not in the manifest", highlight=False)


@handle_errors
def localize_eval(
    manifest: Annotated[Path, typer.Argument(metavar="ROIS.jsonl", help="ROI manifest written by `mwm localize`.")],
    gt: Annotated[Optional[Path], typer.Option("--gt", help="Ground truth: our npz with masks + mask_valid, or a folder "
                                                            "of mask images named like the image ids.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON instead of a table.")] = False,
    out_csv: Annotated[Optional[Path], typer.Option("--out", help="Per-image CSV. [default: eval_per_image.csv beside "
                                                                  "the manifest]")] = None,
    random_baseline: Annotated[Optional[bool], typer.Option("--random-baseline/--no-random-baseline",
                                                            help="Also score boxes of the same sizes at random "
                                                                 "positions. [default: off]")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the random baseline. [default: 0]")] = None,
    config: ConfigOpt = None, set_: SetOpt = None,
):
    """Occlusion precision/recall, Dice and IoU of the ROI boxes against annotated masks.

    Example: mwm localize-eval runs/br35h/rois.jsonl --gt ../shared/data/br35h.npz --random-baseline --json
    """
    import warnings

    from ..config import resolve, save_config
    from ..errors import DataError
    from ..localize.metrics import evaluate_manifest, write_per_image_csv

    if gt is None and config is None and not any(s.strip().startswith("gt=") for s in set_ or []):
        raise DataError("give the ground truth: --gt MASKS.npz (our npz with masks + mask_valid) or --gt MASKS_DIR/")
    cfg = resolve(LocalizeEvalConfig, config, set_, {"manifest": manifest, "gt": gt, "out": out_csv,
                                                     "random_baseline": random_baseline, "seed": seed})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = evaluate_manifest(cfg.manifest, cfg.gt, random_baseline=cfg.random_baseline, seed=cfg.seed)
    for w in caught:
        console.print(f"[yellow]warning:[/] {w.message}", highlight=False, soft_wrap=True)
    csv_path = cfg.out or cfg.manifest.parent / "eval_per_image.csv"
    write_per_image_csv(res.rows, csv_path)
    cfg_path = save_config(cfg, csv_path.with_suffix(".config.yaml"))
    if json_out:
        print(json.dumps(res.summary))
    else:
        _print_table(res.summary, cfg)
    console.print(f"wrote {csv_path} (config: {cfg_path})", highlight=False)
