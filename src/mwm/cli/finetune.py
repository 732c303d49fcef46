"""`mwm finetune`: stage 3, classification transfer of an encoder (linear probe or full fine-tuning)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import (Axis, ConfigOpt, Labels, SetOpt, SkipEmpty, SliceStart, SliceStop, Strict, Window, WindowCenter,
                     WindowWidth, console, handle_errors, read_option_values)
from .common import (DeviceOpt, InputSizeOpt, JsonOpt, PrecisionOpt, QuietOpt, ResizeOpt, SeedOpt, TaskBars,
                     TimmArchOpt, WeightsOpt, require_transfer_args, run_with_bar)


class _Bar(TaskBars):
    """One bar for feature extraction (linear), one for the epochs (L-BFGS iterations)."""

    def __init__(self, enabled: bool = True):
        super().__init__(enabled)
        self.mode = None

    def __call__(self, kind: str, done: int, total, info: dict) -> None:
        if not self.enabled:
            return
        if kind == "decode":
            self._task("decode", None, done, "images")
        elif kind == "extract":
            self._task(f"features {info['split']}", total, done)
        elif kind == "start":
            self.mode = info["mode"]
            console.print(f"{info['mode']}: {info['n_train']} train / {info['n_val']} val / {info['n_test']} test "
                          f"images, up to {info['epochs']} " + ("L-BFGS iterations" if info["mode"] == "linear"
                                                                else f"epochs of {info['steps_per_epoch']} step(s)"),
                          highlight=False)
        elif kind == "epoch":
            msg = (f"loss {info['train_loss']:.4f} val loss {info['val_loss']:.4f} val F1 {info['val_macro_f1']:.3f} "
                   f"(best {info['best_epoch']})")
            self._task("L-BFGS" if self.mode == "linear" else "epochs", total, done, msg)
            if self.mode == "full":  # a line per epoch; the probe's (many, cheap) iterations only move the bar
                console.print(f"epoch {done}/{total}: {msg}", highlight=False)
        elif kind == "end":
            self.close()



def _report(m: dict) -> None:
    from rich.table import Table

    console.print(f"selected at {'iteration' if m['mode'] == 'linear' else 'epoch'} {m['best_epoch']} of "
                  f"{m['epochs_run']} on val ({m['n_val']} images); test: {m['n_test']} images", highlight=False)
    t = Table()
    t.add_column("metric")
    t.add_column("test", justify="right")
    t.add_column("val", justify="right")
    for k in ("accuracy", "balanced_accuracy", "macro_f1", "auroc"):
        t.add_row(k, f"{m[k]:.4f}", f"{m['val'][k]:.4f}")
    console.print(t)
    cm = Table(title="test confusion matrix", title_justify="left")
    cm.add_column("true \\ predicted")
    for name in m["label_names"]:
        cm.add_column(name, justify="right")
    for name, row in zip(m["label_names"], m["confusion_matrix"]):
        cm.add_row(name, *(str(v) for v in row))
    console.print(cm)


@handle_errors
def finetune(
    data: Annotated[Path, typer.Argument(help="Labelled images: .npz with labels (and split), an ImageFolder "
                                              "(--labels folders) or a CSV with a label column.")],
    weights: WeightsOpt = None,
    mode: Annotated[Optional[str], typer.Option(help="linear (frozen encoder, linear head on cached features) or "
                                                     "full (everything trained). [default: linear]")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder: metrics.json, config.yaml, history.csv, "
                                                     "model.pth, features.npz (linear).")] = None,
    arch: TimmArchOpt = None,
    size: InputSizeOpt = None,
    epochs: Annotated[Optional[int], typer.Option(help="full: epochs [30]; linear: L-BFGS iterations [300].")] = None,
    lr: Annotated[Optional[float], typer.Option(help="full: peak lr, the head's (layer decay below) [1e-3]; "
                                                     "linear: L-BFGS step length [1]")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per step / extraction batch. [default: 64]")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="[default: full 0.05, linear 1e-4]")] = None,
    layer_decay: Annotated[Optional[float], typer.Option(help="full: lr ratio per block towards the input, 1 = off. "
                                                              "[default: 0.75]")] = None,
    label_smoothing: Annotated[Optional[float], typer.Option(help="[default: full 0.1, linear 0]")] = None,
    class_weights: Annotated[Optional[str], typer.Option(help="none or balanced (n / (k·n_c)). [default: none]")] = None,
    patience: Annotated[Optional[int], typer.Option(help="Early stopping on val: epochs/iterations without "
                                                         "improvement (0: off). [default: full 8, linear 50]")] = None,
    train_limit: Annotated[Optional[int], typer.Option(help="Only N training images (a seeded class-stratified subset).")] = None,
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
    """Transfer an encoder to classification: a linear probe (frozen encoder) or full fine-tuning; the model is
    selected on val and reported on test (accuracy, balanced accuracy, macro-F1, AUROC, confusion matrix).

    Writes OUT/metrics.json, OUT/config.yaml, OUT/history.csv, OUT/model.pth with model.json (a timm model with
    a num_classes head) and, linear, OUT/features.npz (reused while the weights, data and size are unchanged).

    Example: mwm finetune br35h.npz --weights run/encoder.pth --mode linear --out ft/linear

    Example: mwm finetune br35h.npz --weights none --arch resnet18 --size 64 --mode full --epochs 10 --out ft/full
    """
    import json

    from ..config import resolve
    from ..transfer.classify import FinetuneConfig, finetune as run

    opts = {"data": data, "weights": weights, "mode": mode, "out": out, "arch": arch, "size": size, "epochs": epochs,
            "lr": lr, "batch_size": batch_size, "weight_decay": weight_decay, "layer_decay": layer_decay,
            "label_smoothing": label_smoothing, "class_weights": class_weights, "patience": patience,
            "train_limit": train_limit, "seed": seed, "device": device, "precision": precision, "resize": resize,
            **read_option_values(window, window_center, window_width, axis, slice_start, slice_stop, skip_empty,
                                 labels, strict)}
    require_transfer_args(out, weights, config, "the metrics and the model")
    cfg = resolve(FinetuneConfig, config, set_, opts)
    m = run_with_bar(run, cfg, _Bar(enabled=not quiet))
    _report(m)
    console.print(f"{m['mode']} {m['arch']} ({m['weights']}) at {m['size']} px in {m['seconds']:.0f}s"
                  + (f", features {m['features']}" if m["features"] else "") + f"; metrics: {cfg.out / 'metrics.json'}",
                  highlight=False)
    if json_out:
        print(json.dumps(m))
