"""`mwm detect`: detection / instance segmentation transfer (torchvision Mask R-CNN on the pretrained ResNet)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import (Axis, ConfigOpt, Labels, SetOpt, SkipEmpty, SliceStart, SliceStop, Strict, Window, WindowCenter,
                     WindowWidth, console, handle_errors, read_option_values)
from .common import DeviceOpt, JsonOpt, QuietOpt, ResizeOpt, SeedOpt, TaskBars, require_transfer_args, run_with_bar


class _Bar(TaskBars):
    """A bar over the training steps, plus one line per epoch."""

    def __call__(self, kind: str, done: int, total, info: dict) -> None:
        if not self.enabled:
            return
        if kind == "start":
            console.print(f"Mask R-CNN on {info['arch']} ({info['weights']}): {info['n_train']} train images with "
                          f"{info['instances']} instances, {info['n_val']} val, {info['n_test']} test; "
                          f"{info['steps_per_epoch']} steps/epoch, lr {info['lr']:g}, {info['device']}",
                          highlight=False)
            self._task("detect", total, 0)
        elif kind == "step" and self.bar is not None:
            self._task("detect", total, done, f"epoch {info['epoch']} loss {info['loss']:.3f} lr {info['lr']:.2e}")
        elif kind == "epoch":
            val = f", val box AP {info['val_box_ap']:.3f}" if info.get("val_box_ap") is not None else ""
            console.print(f"epoch {info['epoch']}/{total}: loss {info['loss']:.4f}{val}, {info['seconds']:.1f}s",
                          highlight=False)
        elif kind == "test":
            self.close()


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.3f}"


@handle_errors
def detect(
    data: Annotated[Path, typer.Argument(help="Images with masks: .npz with 'masks' (+ 'mask_valid') or a folder.")],
    weights: Annotated[Optional[str], typer.Option(help="RUN/encoder.pth, RUN/, none (random init) or timm "
                                                        "(ImageNet, online). [default: none]")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder: metrics.json, config.yaml, examples.png, "
                                                     "model.pth.")] = None,
    arch: Annotated[Optional[str], typer.Option(help="ResNet (resnet18/34/50/101/152, resnext*, wide_resnet*). "
                                                     "[default: from encoder.json, else resnet18]")] = None,
    size: Annotated[Optional[int], typer.Option(help="Image side in pixels. [default: 128]")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="[default: 12]")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="[default: 8]")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak lr. [default: 0.02 × batch / 16 (sgd), 1e-4 (adamw)]")] = None,
    optimizer: Annotated[Optional[str], typer.Option(help="sgd or adamw. [default: sgd]")] = None,
    patience: Annotated[Optional[int], typer.Option(help="Stop after N val evaluations without a better box AP.")] = None,
    train_limit: Annotated[Optional[int], typer.Option(help="Train on the first N annotated train images.")] = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    resize: ResizeOpt = None,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
    config: ConfigOpt = None, set_: SetOpt = None, window: Window = None, window_center: WindowCenter = None,
    window_width: WindowWidth = None, axis: Axis = None, slice_start: SliceStart = None, slice_stop: SliceStop = None,
    skip_empty: SkipEmpty = None, labels: Labels = None, strict: Strict = None,
):
    """Transfer an encoder to detection + instance segmentation: torchvision Mask R-CNN with a ResNet-FPN.

    Trains on the train images with masks (each 8-connected lesion is one instance), keeps the epoch with the
    best val box AP, and reports COCO box/mask AP, AP50, AP75 (fractions) on the test images with masks.
    Writes OUT/metrics.json, OUT/config.yaml, OUT/examples.png and OUT/model.pth. Other options
    (warmup_iters, schedule, trainable_layers, norm, min_area, eval_every, val_limit, …): --set key=value or --config.

    Example: mwm detect br35h.npz --weights run/encoder.pth --out det/ --epochs 12
    """
    import json

    from rich.table import Table

    from ..config import resolve
    from ..transfer.detect import METRIC_KEYS, DetectConfig, detect as run

    opts = {"data": data, "out": out, "weights": weights, "arch": arch, "size": size, "epochs": epochs,
            "batch_size": batch_size, "lr": lr, "optimizer": optimizer, "patience": patience,
            "train_limit": train_limit, "seed": seed, "device": device, "resize": resize,
            **read_option_values(window, window_center, window_width, axis, slice_start, slice_stop, skip_empty,
                                 labels, strict)}
    require_transfer_args(out, weights, config, "the results (metrics.json, examples.png, model.pth)",
                          need_weights=False)
    cfg = resolve(DetectConfig, config, set_, opts)
    m = run_with_bar(run, cfg, _Bar(enabled=not quiet), quiet_unreadable=False)
    table = Table(title=f"Mask R-CNN ({m['arch']}, {m['weights']}) on {m['n_test']} test images "
                        f"({m['test_instances']} instances)")
    table.add_column("")
    for k in ("AP", "AP50", "AP75"):
        table.add_column(k, justify="right")
    table.add_row("box", *[_fmt(m[k]) for k in METRIC_KEYS[:3]])
    table.add_row("mask", *[_fmt(m[k]) for k in METRIC_KEYS[3:]])
    console.print(table)
    console.print(f"best epoch {m['best_epoch']} of {m['epochs_done']}, {m['seconds_per_epoch']:.1f}s/epoch, "
                  f"{m['seconds']:.0f}s in all; results: {m['out']}", highlight=False)
    if json_out:
        print(json.dumps({k: v for k, v in m.items() if k != "history"}))
