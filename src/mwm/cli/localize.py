"""`mwm localize`: text prompt → ROI per image."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import (Axis, ConfigOpt, count_bar, Labels, SetOpt, SkipEmpty, SliceStart, SliceStop, Strict, Window, WindowCenter,
                     WindowWidth, console, handle_errors, read_option_values)


@handle_errors
def localize(
    data: Annotated[Path, typer.Argument(help="Scans: folder, .npz, .csv or a single file.")],
    prompt: Annotated[Optional[str], typer.Option(help="What to localize, e.g. 'brain tumor'; 'a;b;c' is an ensemble of three prompts (their saliency maps combined by --ensemble).")] = None,
    vlm: Annotated[Optional[str], typer.Option(help="open_clip hub name (hf-hub:…), built-in name, or local VLM directory.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (rois.jsonl, meta.json, index.html).")] = None,
    prompts_file: Annotated[Optional[Path], typer.Option(help="JSON {image id or class name: prompt}.")] = None,
    prompt_family: Annotated[Optional[str], typer.Option(help="A prompt-library family as an ensemble: MODALITY/TARGET[:KIND], KIND short|synonyms|lay|descriptions|all (e.g. brain-mri/tumour:descriptions). [default kind: all]")] = None,
    ensemble: Annotated[Optional[str], typer.Option(help="Combine an ensemble's saliency maps pixel-wise by mean or median (before binarization). [default: mean]")] = None,
    vlm_pretrained: Annotated[Optional[str], typer.Option(help="Weights tag/file for a built-in open_clip name.")] = None,
    layer: Annotated[Optional[int], typer.Option(help="M2IB: bottleneck after this vision block (0-based). [default: 7 of 12 blocks, scaled to the tower]")] = None,
    beta: Annotated[Optional[float], typer.Option(help="M2IB β. [default: 0.1]")] = None,
    steps: Annotated[Optional[int], typer.Option(help="M2IB optimisation steps. [default: 10]")] = None,
    noise_copies: Annotated[Optional[int], typer.Option(help="M2IB noisy copies per step. [default: 10]")] = None,
    feature_norm: Annotated[Optional[str], typer.Option(help="M2IB: standardize (IBA) or none (reference). [default: standardize]")] = None,
    binarize: Annotated[Optional[str], typer.Option(help="kmeans, otsu, threshold or crf (MedCLIP-SAMv2's dense CRF; pip install 'mwm[crf]'). [default: kmeans]")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="Threshold for --binarize threshold.")] = None,
    components: Annotated[Optional[int], typer.Option(help="Keep the k largest components. [default: 1]")] = None,
    box_mode: Annotated[Optional[str], typer.Option(help="union (one box) or per_component.")] = None,
    expand: Annotated[Optional[float], typer.Option(help="Box margin ratio per side. [default: 0.1]")] = None,
    sam: Annotated[Optional[str], typer.Option("--sam", "--sam-checkpoint", help="SAM checkpoint (segment-anything) or transformers SAM dir/hub name.")] = None,
    sam_type: Annotated[Optional[str], typer.Option(help="segment-anything model type: vit_b, vit_l, vit_h.")] = None,
    split: Annotated[Optional[str], typer.Option(help="Only this split.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N images.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images optimised together. [default: 16]")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:1 … [default: auto]")] = None,
    shard: Annotated[Optional[str], typer.Option(help="i/n: take every n-th image starting at i (for many GPUs/nodes).")] = None,
    save_saliency: Annotated[Optional[bool], typer.Option("--save-saliency", help="Write saliency PNGs.")] = None,
    save_masks: Annotated[Optional[bool], typer.Option("--save-masks", help="Write binary mask PNGs.")] = None,
    gallery: Annotated[Optional[int], typer.Option(help="Images in the HTML gallery. [default: 24]")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Noise seed. [default: 0]")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete what an earlier run wrote in --out (manifest, "
                                            "parts, meta, saliency, masks, gallery) and start over. Without it, "
                                            "a folder holding other settings is an error.")] = False,
    config: ConfigOpt = None, set_: SetOpt = None, window: Window = None, window_center: WindowCenter = None,
    window_width: WindowWidth = None, axis: Axis = None, slice_start: SliceStart = None, slice_stop: SliceStop = None,
    skip_empty: SkipEmpty = None, labels: Labels = None, strict: Strict = None,
):
    """Localize a text prompt in every scan (M2IB saliency → binarize → components → [SAM] → box).

    Writes OUT/rois.jsonl (one line per image), OUT/meta.json, OUT/config.yaml and OUT/index.html.
    Re-running with the same settings resumes (images already in the manifest are skipped); other
    settings are an error naming what differs, unless --overwrite.

    A prompt "a;b;c" (or --prompt-family MODALITY/TARGET[:KIND]) is an ensemble: the saliency maps of its prompts,
    computed in one batched pass, are combined pixel-wise (--ensemble mean|median) before binarization.

    Example: mwm localize scans/ --prompt "brain tumor" --vlm ./biomedclip --out rois/
    """
    from ..config import resolve
    from ..localize.pipeline import LocalizeConfig, localize as run

    opts = {"data": data, "out": out, "prompt": prompt, "prompts_file": prompts_file, "prompt_family": prompt_family,
            "ensemble": ensemble, "vlm": vlm,
            "vlm_pretrained": vlm_pretrained, "m2ib.layer": layer, "m2ib.beta": beta, "m2ib.steps": steps,
            "m2ib.noise_copies": noise_copies, "m2ib.feature_norm": feature_norm, "m2ib.seed": seed,
            "binarize": binarize, "threshold": threshold, "components": components, "box_mode": box_mode,
            "expand": expand, "sam": sam, "sam_type": sam_type, "split": split, "limit": limit,
            "batch_size": batch_size, "device": device, "shard": shard, "save_saliency": save_saliency,
            "save_masks": save_masks, "gallery": gallery,
            **read_option_values(window, window_center, window_width, axis, slice_start, slice_stop, skip_empty,
                                 labels, strict)}
    if out is None and not config:
        from ..errors import MWMError

        raise MWMError("give --out DIR for the manifest and gallery")
    cfg = resolve(LocalizeConfig, config, set_, opts)
    with count_bar("localize") as advance:
        summary = run(cfg, progress=advance, overwrite=overwrite)
    console.print(f"{summary['processed']} images localized ({summary['ok']} ok, {summary['failed']} without ROI), "
                  f"{summary['skipped_done']} already done, in {summary['seconds']}s → {summary['manifest']}; "
                  f"gallery: {cfg.out / 'index.html'}", highlight=False)
