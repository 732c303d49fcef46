"""`mwm pretrain`: stage 2, (guided) masked image modeling → an encoder timm loads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import (Axis, ConfigOpt, Labels, SetOpt, SkipEmpty, SliceStart, SliceStop, Window, WindowCenter,
                     WindowWidth, console, handle_errors, read_option_values)
from .common import TaskBars, run_with_bar


class _Bar(TaskBars):
    """The training steps and a line per epoch (only rank 0 ever receives events, so re-launched DDP ranks draw
    nothing)."""

    def __call__(self, kind: str, done: int, total, info: dict) -> None:
        if not self.enabled:
            return
        if kind == "decode":
            return  # decoding is short next to training; the bar starts with the steps
        if self.bar is None and kind in ("start", "step"):
            self._task("pretrain", total, done)
        if kind == "start":
            console.print(f"{info['images']} images (split {info['split']}), {info['world_size']} rank(s), "
                          f"{info['steps_per_epoch']} steps/epoch; {info['lr_rule']}", highlight=False)
            if info.get("roi_stats"):
                s = info["roi_stats"]
                console.print(f"ROIs: {s['with_roi']} images with a box ({s.get('share', 0):.0%}), {s['without_roi']} "
                              f"without, {s['missing']} not in the manifest", highlight=False)
            if info.get("saliency_stats"):
                s = info["saliency_stats"]
                console.print(f"saliency maps: {s['with_saliency']} images with a map ({s['share']:.0%}), "
                              f"{s['without_saliency']} without, {s['missing']} not in the manifest (masked "
                              "uniformly)", highlight=False)
            if info.get("init"):
                i = info["init"]
                console.print(f"init: {i['source']} (sha256 {i['sha256'][:12]}…, {i['tensors']} tensors"
                              + (f"; skipped {', '.join(i['skipped'])}" if i["skipped"] else "") + ")", highlight=False)
            for note in info.get("notes") or []:
                console.print(f"note: {note}", highlight=False)
        elif kind == "step":
            ratios = f"mask {info['mask_ratio']:.2f} " if info.get("mask_ratio") is not None else ""  # MIM only
            if info.get("mask_ratio_in") is not None:
                ratios = ratios[:-1] + f" (in {info['mask_ratio_in']:.2f} / out {info['mask_ratio_out']:.2f}) "
            self._task("pretrain", total, done, f"loss {info['loss']:.4f} lr {info['lr']:.2e} {ratios}"
                                                f"{info['images_per_s']:.0f} img/s")
        elif kind == "epoch":
            console.print(f"epoch {info['epoch']}/{info['epochs']}: loss {info['loss']:.4f}, "
                          f"{info['seconds']:.1f}s", highlight=False)
        elif kind == "end":
            self.close()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    from rich.text import Text

    console.print(Text.assemble(("warning: ", "bold yellow"), str(message)), soft_wrap=True)


@handle_errors
def pretrain(
    data: Annotated[Path, typer.Argument(help="Scans: folder, .npz, .csv or a single file.")],
    out: Annotated[Optional[Path], typer.Option(help="Run folder: config.yaml, checkpoints/, metrics.csv, tb/, "
                                                     "recon/, encoder.pth.")] = None,
    rois: Annotated[Optional[Path], typer.Option(help="rois.jsonl from `mwm localize` (joined by image id); for "
                                                     "saliency_soft/saliency_topk one written with "
                                                     "--save-saliency.")] = None,
    min_roi_share: Annotated[Optional[float], typer.Option(help="ROI-guided masking warns (with --strict: fails) "
                                                                "when fewer of the images have an ROI box. "
                                                                "[default: 0.5]")] = None,
    init: Annotated[Optional[str], typer.Option(help="Encoder init: none, imagenet (timm's weights for --arch; "
                                                     "online) or a file: a timm checkpoint (.pth/.safetensors) or "
                                                     "RUN/encoder.pth (continued pretraining). [default: none]")] = None,
    allow_missing_rois: Annotated[Optional[bool], typer.Option("--allow-missing-rois", help="Images missing from "
                                                               "the manifest get no ROI instead of an error.")] = None,
    masking: Annotated[Optional[str], typer.Option(help="random, roi (MWM two-level), roi_overall, soft or topk (by "
                                                        "ROI box), saliency_soft, saliency_topk or "
                                                        "saliency_topk_diverse (MedIM) (by the maps of `mwm localize "
                                                        "--save-saliency` or `mwm importance`, no boxes). "
                                                        "[default: random]")] = None,
    ratio: Annotated[Optional[float], typer.Option(help="Overall mask ratio (random/roi_overall/soft/topk/saliency_*; "
                                                        "images without ROI under roi). [default: 0.6]")] = None,
    ratio_in: Annotated[Optional[float], typer.Option(help="roi: mask ratio inside the ROI. [default: 0.8]")] = None,
    ratio_out: Annotated[Optional[float], typer.Option(help="roi: mask ratio outside the ROI. [default: 0.2]")] = None,
    method: Annotated[Optional[str], typer.Option(help="Pretraining method, by name in the method registry "
                                                       "(mwm.train.methods): spark (timm CNNs) or mae (timm ViTs), "
                                                       "hpm, anatomask (loss-guided SparK), hpm_mae "
                                                       "(HPM on MAE), attmask (attention-guided MAE), "
                                                       "simclr, mocov2, byol (contrastive baselines, timm CNNs), "
                                                       "or any registered one. [default: from --arch]")] = None,
    arch: Annotated[Optional[str], typer.Option(help="timm encoder: resnet18/50, convnext_*, vit_*. "
                                                     "[default: resnet50]")] = None,
    size: Annotated[Optional[int], typer.Option(help="Input side in pixels (a multiple of 32 for CNNs). "
                                                     "[default: 224]")] = None,
    mask_stride: Annotated[Optional[int], typer.Option(help="Pixels per mask cell: a divisor of the CNN's stride "
                                                            "32 for a finer grid at the same cost (8 at 64 px: 8 × 8 "
                                                            "cells); MAE: the patch size. [default: the encoder's "
                                                            "stride]")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs in total (also when resuming). [default: 100]")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per device and micro-step. [default: 32]")] = None,
    accumulate: Annotated[Optional[int], typer.Option(help="Micro-steps per optimizer step. [default: 1]")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Absolute peak lr (used as given; overrides --base-lr).")] = None,
    base_lr: Annotated[Optional[float], typer.Option(help="Peak lr per 256 images: lr = base_lr × batch × "
                                                          "accumulate × ranks / 256. [default: 2e-4]")] = None,
    optimizer: Annotated[Optional[str], typer.Option(help="lamb or adamw. [default: lamb]")] = None,
    warmup_epochs: Annotated[Optional[float], typer.Option(help="Linear warmup, then cosine. [default: 5]")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="[default: 0.04]")] = None,
    clip_grad: Annotated[Optional[float], typer.Option(help="Max gradient norm. [default: 5]")] = None,
    ema: Annotated[Optional[float], typer.Option(help="EMA decay of the weights, e.g. 0.999 (encoder.pth from the "
                                                      "EMA).")] = None,
    precision: Annotated[Optional[str], typer.Option(help="32-true, bf16-mixed or 16-mixed. [default: 32-true]")] = None,
    accelerator: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, gpu, mps. [default: auto]")] = None,
    devices: Annotated[Optional[str], typer.Option(help="Devices per node: N, -1 (all) or a list '0,2'. "
                                                        "[default: 1]")] = None,
    strategy: Annotated[Optional[str], typer.Option(help="auto, ddp, ddp_spawn, ddp_fork. [default: auto]")] = None,
    num_nodes: Annotated[Optional[int], typer.Option(help="Nodes (with torchrun or a cluster launcher). "
                                                          "[default: 1]")] = None,
    seed: Annotated[Optional[int], typer.Option(help="[default: 0]")] = None,
    resume: Annotated[Optional[bool], typer.Option("--resume", help="Continue OUT/checkpoints/last.pt exactly.")] = None,
    recon_every: Annotated[Optional[int], typer.Option(help="Epochs between reconstruction PNGs. [default: 5]")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="Epochs between checkpoints. [default: 1]")] = None,
    log_every: Annotated[Optional[int], typer.Option(help="Optimizer steps between metrics rows. [default: 10]")] = None,
    split: Annotated[Optional[str], typer.Option(help="Split to train on, or 'all'. [default: train if present]")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N images (quick runs).")] = None,
    workers: Annotated[Optional[int], typer.Option(help="DataLoader workers per rank. [default: from CPUs]")] = None,
    resize: Annotated[Optional[str], typer.Option(help="pad, stretch or crop. [default: pad]")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar or per-epoch lines.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
    config: ConfigOpt = None, set_: SetOpt = None, window: Window = None, window_center: WindowCenter = None,
    window_width: WindowWidth = None, axis: Axis = None, slice_start: SliceStart = None, slice_stop: SliceStop = None,
    skip_empty: SkipEmpty = None, labels: Labels = None,
    strict: Annotated[Optional[bool], typer.Option("--strict/--lenient", help="Fail on the first unreadable file "
                                                   "instead of skipping it, and when fewer than --min-roi-share of "
                                                   "the images have an ROI instead of warning.")] = None,
):
    """Pretrain an encoder by (guided) masked image modeling: SparK for CNNs, MAE for ViTs, on Lightning Fabric.

    Writes OUT/encoder.pth (timm state_dict: timm.create_model(arch).load_state_dict(sd, strict=False) misses only
    the classifier), OUT/encoder_d2.pth (Detectron2 names, ResNets), checkpoints/last.pt (--resume continues it
    exactly), metrics.csv, tb/ (TensorBoard), recon/epoch_XXX.png, config.yaml and summary.json.

    Example: mwm pretrain scans.npz --rois rois/rois.jsonl --masking roi --ratio-in 0.8 --ratio-out 0.2 --arch resnet18 --size 64 --epochs 50 --out run/

    Without boxes: mwm pretrain scans.npz --rois rois/rois.jsonl --masking saliency_topk --ratio 0.6 --out run/ (rois/
    from `mwm localize --save-saliency`).

    Many GPUs: --devices 4 --strategy ddp --precision bf16-mixed; many nodes: start it with torchrun and --num-nodes.

    From ImageNet weights (as the MWM paper) or any checkpoint: --init imagenet | --init weights.safetensors |
    --init OLD_RUN/encoder.pth (continued pretraining on new data); config.yaml and summary.json record the source
    and its sha256.
    """
    import json
    import warnings

    from ..config import resolve
    from ..errors import MWMError
    from ..train.pretrain import PretrainConfig, pretrain as run

    # flags: not given → None, so a --config file's value stands (typer reports an absent flag as False)
    opts = {"data": data, "out": out, "rois": rois, "allow_missing_rois": allow_missing_rois or None,
            "min_roi_share": min_roi_share, "init": init,
            "masking.strategy": masking, "masking.ratio": ratio, "masking.ratio_in": ratio_in,
            "masking.ratio_out": ratio_out, "model.method": method, "model.arch": arch, "model.size": size,
            "model.mask_stride": mask_stride,
            "epochs": epochs, "batch_size": batch_size, "accumulate": accumulate, "lr": lr, "base_lr": base_lr,
            "optimizer": optimizer, "warmup_epochs": warmup_epochs, "weight_decay": weight_decay,
            "clip_grad": clip_grad, "ema": ema, "precision": precision, "accelerator": accelerator,
            "devices": devices, "strategy": strategy, "num_nodes": num_nodes, "seed": seed, "resume": resume or None,
            "recon_every": recon_every, "checkpoint_every": checkpoint_every, "log_every": log_every,
            "split": split, "limit": limit, "workers": workers, "resize": resize,
            **read_option_values(window, window_center, window_width, axis, slice_start, slice_stop, skip_empty,
                                 labels, strict)}
    if out is None and not config:
        raise MWMError("give --out DIR for the run (checkpoints, metrics, encoder.pth)")
    cfg = resolve(PretrainConfig, config, set_, opts)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning  # one yellow line per warning, not Python's file:line form
        s = run_with_bar(run, cfg, _Bar(enabled=not quiet))
    if s is None:  # a re-launched DDP rank: rank 0 reports
        return
    first = f"{s['first_loss']:.4f}" if s["first_loss"] is not None else "?"
    final = f"{s['final_loss']:.4f}" if s["final_loss"] is not None else "?"
    how = cfg.model.method + (f", masking {s['masking']}" if s.get("masking") else "")
    console.print(f"pretrained {cfg.arch} ({how}) for {s['epochs_done']} "
                  f"epochs / {s['steps']} steps in {s['seconds']:.0f}s; loss {first} → {final}; "
                  f"encoder: {s['encoder']}" + (f" (Detectron2: {s['encoder_d2']})" if s["encoder_d2"] else "")
                  + f"; run: {s['run']}", highlight=False)
    if json_out:
        print(json.dumps(s))
