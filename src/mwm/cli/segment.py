"""`mwm segment`: stage 3, segmentation transfer of an encoder (UNet decoder on its timm feature pyramid)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import (Axis, ConfigOpt, Labels, SetOpt, SkipEmpty, SliceStart, SliceStop, Strict, Window, WindowCenter,
                     WindowWidth, console, handle_errors, read_option_values)
from .common import (DeviceOpt, InputSizeOpt, JsonOpt, PrecisionOpt, QuietOpt, ResizeOpt, SeedOpt, TaskBars,
                     TimmArchOpt, WeightsOpt, require_transfer_args, run_with_bar)


class _Bar(TaskBars):
    """Decoding, then the training steps; a line per epoch."""

    def __init__(self, enabled: bool = True):
        super().__init__(enabled)
        self.msg = ""

    def __call__(self, kind: str, done: int, total, info: dict) -> None:
        if not self.enabled:
            return
        if kind == "decode":
            if done % 64 == 0:  # a redraw per image costs more than decoding it
                self._task("decode", None, done, "images")
        elif kind == "start":
            console.print(f"{info['arch']} ({info['weights']}) at {info['size']} px on {info['device']}: "
                          f"{info['n_train']} train / {info['n_val']} val / {info['n_test']} test images with masks, "
                          f"{info['steps_per_epoch']} steps/epoch, encoder lr × {info['encoder_lr_scale']:g}",
                          highlight=False)
            self._task("train", total, 0)
        elif kind == "step":
            self._task("train", total, done, self.msg)
        elif kind == "epoch":
            self.msg = (f"loss {info['loss']:.4f} val Dice {info['val_dice']:.3f} (best {info['best_val_dice']:.3f} "
                        f"at {info['best_epoch']})")
            console.print(f"epoch {done}/{total}: {self.msg}, {info['seconds']:.1f}s", highlight=False)
        elif kind == "end":
            self.close()



def _fmt(v) -> str:
    return "—" if v is None else f"{v:.4f}"


def _report(m: dict) -> None:
    from rich.table import Table

    t = Table(title=f"test ({m['n_test']} images with masks, {m['n_test_empty']} empty; model of epoch "
                    f"{m['best_epoch']}/{m['epochs_done']}, val Dice {m['val_dice']:.4f})", title_justify="left")
    t.add_column("metric")
    t.add_column("test", justify="right")
    for k, label in (("dice", "Dice (mean per image)"), ("iou", "IoU (mean per image)"),
                     ("dice_pooled", "Dice (pooled pixels)"), ("iou_pooled", "IoU (pooled pixels)"),
                     ("dice_fg", "Dice (images with a lesion)")):
        t.add_row(label, _fmt(m[k]))
    console.print(t)


@handle_errors
def segment(
    data: Annotated[Path, typer.Argument(help="Images with masks: .npz with 'masks' (+ 'mask_valid', 'split'), or "
                                              "a folder with a mask folder.")],
    weights: WeightsOpt = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder: metrics.json, config.yaml, examples.png, "
                                                     "model.pt.")] = None,
    arch: TimmArchOpt = None,
    size: InputSizeOpt = None,
    epochs: Annotated[Optional[int], typer.Option(help="[default: 30]")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak lr of the decoder (AdamW, warmup + cosine). "
                                                     "[default: 1e-3]")] = None,
    encoder_lr_scale: Annotated[Optional[float], typer.Option(help="Encoder lr = lr × this. [default: 0.1 with "
                                                                   "pretrained weights, 1 with --weights none]")] = None,
    freeze_encoder: Annotated[Optional[bool], typer.Option("--freeze-encoder", help="Train the decoder only.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="[default: 16]")] = None,
    decoder_channels: Annotated[Optional[int], typer.Option(help="Width of the coarsest decoder block (halves per "
                                                                 "block). [default: 256]")] = None,
    patience: Annotated[Optional[int], typer.Option(help="Early stopping: epochs without a better val Dice "
                                                         "(0: off). [default: 10]")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="Foreground when the probability exceeds it. "
                                                            "[default: 0.5]")] = None,
    include_empty: Annotated[Optional[bool], typer.Option("--include-empty/--exclude-empty", help="Train also on "
                                                          "images whose mask is empty. [default: include]")] = None,
    train_limit: Annotated[Optional[int], typer.Option(help="Only the first N training images with a mask.")] = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    resize: ResizeOpt = None,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
    config: ConfigOpt = None, set_: SetOpt = None, window: Window = None, window_center: WindowCenter = None,
    window_width: WindowWidth = None, axis: Axis = None, slice_start: SliceStart = None, slice_stop: SliceStop = None,
    skip_empty: SkipEmpty = None, labels: Labels = None, strict: Strict = None,
):
    """Transfer an encoder to segmentation: a UNet decoder on its timm feature pyramid, trained with Dice + BCE,
    selected on val Dice and reported on test (mean per-image and pooled Dice/IoU; an image whose mask and
    prediction are both empty scores 1).

    Writes OUT/metrics.json, OUT/config.yaml, OUT/examples.png (image | ground truth | prediction) and OUT/model.pt.

    Example: mwm segment br35h.npz --weights run/encoder.pth --out seg/

    Example: mwm segment br35h.npz --weights none --arch resnet18 --size 64 --epochs 20 --out seg/random
    """
    import json

    from ..config import resolve
    from ..transfer.segment import SegmentConfig, segment as run

    opts = {"data": data, "weights": weights, "out": out, "arch": arch, "size": size, "epochs": epochs, "lr": lr,
            "encoder_lr_scale": encoder_lr_scale, "freeze_encoder": freeze_encoder or None,
            "batch_size": batch_size, "decoder_channels": decoder_channels, "patience": patience,
            "threshold": threshold, "include_empty": include_empty, "train_limit": train_limit, "seed": seed,
            "device": device, "precision": precision, "resize": resize,
            **read_option_values(window, window_center, window_width, axis, slice_start, slice_stop, skip_empty,
                                 labels, strict)}
    require_transfer_args(out, weights, config, "the metrics, examples and the model")
    cfg = resolve(SegmentConfig, config, set_, opts)
    m = run_with_bar(run, cfg, _Bar(enabled=not quiet))
    _report(m)
    console.print(f"{m['arch']} ({m['weights']}) at {m['size']} px in {m['seconds']:.0f}s; metrics: "
                  f"{m['files']['metrics']}" + (f", examples: {m['files']['examples']}" if "examples" in m["files"]
                                                else ""), highlight=False)
    if json_out:
        print(json.dumps(m))
