"""`mwm localize-robustness`: how much the prompt's wording moves the ROI, per prompt family, and what an ensemble does."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import ConfigOpt, SetOpt, Strict, console, count_bar, handle_errors


@handle_errors
def localize_robustness(
    data: Annotated[Path, typer.Argument(help="Scans with annotations: .npz (with masks), folder, .csv …")],
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="Variants YAML: reference prompt + families "
                                                    "(e.g. configs/prompts/phantoms_variants.yaml).")] = None,
    vlm: Annotated[Optional[str], typer.Option(help="open_clip hub name (hf-hub:…), built-in name, or local VLM directory.")] = None,
    gt: Annotated[Optional[Path], typer.Option("--gt", help="Ground-truth masks: npz with masks + mask_valid, or a folder "
                                                            "of mask images named like the image ids. [default: DATA]")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (robustness.csv/.md/.png, summary.json, gallery.png).")] = None,
    split: Annotated[Optional[str], typer.Option(help="Only this split, e.g. test.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N images of the split.")] = None,
    noise: Annotated[Optional[str], typer.Option(help="Noise families from the reference and 'short' prompts: KIND=RATE,… "
                                                      "with typos (character edits per letter) and dropout (share of words "
                                                      "dropped), or none. [default: typos=0.1,dropout=0.1]")] = None,
    noise_samples: Annotated[Optional[int], typer.Option(help="Noisy versions per source prompt and kind. [default: 1]")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the noisy prompts. [default: 0]")] = None,
    ensemble: Annotated[Optional[str], typer.Option(help="Family ensemble rows: mean or median of the saliency maps. [default: mean]")] = None,
    vlm_pretrained: Annotated[Optional[str], typer.Option(help="Weights tag/file for a built-in open_clip name.")] = None,
    layer: Annotated[Optional[int], typer.Option(help="M2IB: bottleneck after this vision block (0-based). [default: 7 of 12 blocks, scaled]")] = None,
    beta: Annotated[Optional[float], typer.Option(help="M2IB β. [default: 0.1]")] = None,
    steps: Annotated[Optional[int], typer.Option(help="M2IB optimisation steps. [default: 10]")] = None,
    noise_copies: Annotated[Optional[int], typer.Option(help="M2IB noisy copies per step. [default: 10]")] = None,
    feature_norm: Annotated[Optional[str], typer.Option(help="M2IB: standardize or none. [default: standardize]")] = None,
    binarize: Annotated[Optional[str], typer.Option(help="kmeans, otsu, threshold or crf. [default: kmeans]")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="Threshold for --binarize threshold. [default: 0.5]")] = None,
    components: Annotated[Optional[int], typer.Option(help="Keep the k largest components. [default: 1]")] = None,
    box_mode: Annotated[Optional[str], typer.Option(help="union (one box) or per_component.")] = None,
    expand: Annotated[Optional[float], typer.Option(help="Box margin ratio per side. [default: 0.1]")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images localized together (every prompt; at most --set pairs_per_pass=64 image-prompt pairs per M2IB pass). [default: 8]")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:1 … [default: auto]")] = None,
    gallery: Annotated[Optional[int], typer.Option(help="Images (rows) in gallery.png. [default: 6]")] = None,
    config: ConfigOpt = None, set_: SetOpt = None, strict: Strict = None,
):
    """Localize every prompt variant (and each family's ensemble) on annotated scans and score how far each moves the ROI.

    Writes OUT/robustness.csv, OUT/robustness.md (family, variant, precision, recall, Dice, changed share, plus
    the spread per family and the ensembles' effect), OUT/summary.json, OUT/robustness.png and OUT/gallery.png.

    Example: mwm localize-robustness ph2k.npz --split test --vlm clip6k --prompts configs/prompts/phantoms_variants.yaml --gt ph2k.npz --out rob/ --layer 4 --binarize threshold --threshold 0.5
    """
    from ..config import resolve
    from ..errors import MWMError
    from ..localize.robustness import RobustnessConfig, run_study

    opts = {"data": data, "prompts": prompts, "vlm": vlm, "gt": gt, "out": out, "split": split, "limit": limit,
            "noise": noise, "noise_samples": noise_samples, "seed": seed, "ensemble": ensemble,
            "vlm_pretrained": vlm_pretrained, "m2ib.layer": layer, "m2ib.beta": beta, "m2ib.steps": steps,
            "m2ib.noise_copies": noise_copies, "m2ib.feature_norm": feature_norm, "binarize": binarize,
            "threshold": threshold, "components": components, "box_mode": box_mode, "expand": expand,
            "batch_size": batch_size, "device": device, "gallery": gallery, "read.strict": strict}
    if out is None and not config:
        raise MWMError("give --out DIR for the robustness table, plot and gallery")
    if prompts is None and not config:
        raise MWMError("give --prompts VARIANTS.yaml (a reference prompt and families of variants; see "
                       "configs/prompts/phantoms_variants.yaml)")
    cfg = resolve(RobustnessConfig, config, set_, opts)
    with count_bar("localize-robustness") as advance:
        s = run_study(cfg, progress=advance, log=lambda msg: console.print(msg, highlight=False))
    ref = next(r for r in s["rows"] if r["family"] == "reference")
    worst = min((r for r in s["rows"] if r["kind"] == "single" and r["recall"] is not None),
                key=lambda r: r["recall"], default=None)
    console.print(f"{len(s['rows'])} rows on {s['n_images']} images in {s['seconds']}s. Reference “{s['reference']}”: "
                  f"recall {ref['recall'] or 0:.3f}, Dice {ref['dice'] or 0:.3f}"
                  + (f"; lowest recall {worst['recall']:.3f} ({worst['family']}: “{worst['variant']}”)" if worst else "")
                  + f" → {cfg.out / 'robustness.md'}", highlight=False)
