"""`mwm data …`: inspect, convert, phantoms."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer
from pydantic import BaseModel, ConfigDict, Field
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ..config import resolve, save_config
from ..data import ReadOptions, open_source
from ..data.inspect import inspect_source
from .common import (Axis, ConfigOpt, Labels, SetOpt, SkipEmpty, SliceStart, SliceStop, Strict, Window, WindowCenter,
                     WindowWidth, console, handle_errors, out, read_option_values)

app = typer.Typer(help="Read, check and convert scans.", no_args_is_help=True)


class InspectConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: Path
    read: ReadOptions = ReadOptions()


class ConvertConfig(BaseModel):
    """`mwm data convert`: any supported input → our npz at one size."""

    model_config = ConfigDict(extra="forbid")
    source: Path
    out: Path
    size: int = Field(default=128, ge=8, le=4096)
    channels: int = Field(default=1, ge=1, le=3)
    resize: Literal["pad", "stretch", "crop"] = "pad"
    split: Optional[str] = None
    read: ReadOptions = ReadOptions()


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=True)


def _print_summary(info: dict) -> None:
    t = Table(title=f"{info['path']} ({info['format']})", show_header=False)
    t.add_row("images", str(info["count"]))
    t.add_row("sizes (H×W)", ", ".join(f"{k}: {v}" for k, v in info["sizes"].items())
              + (f" … ({info['distinct_sizes']} distinct)" if info["distinct_sizes"] > len(info["sizes"]) else ""))
    t.add_row("channels", ", ".join(f"{k}: {v}" for k, v in info["channels"].items()))
    t.add_row("dtype", ", ".join(f"{k}: {v}" for k, v in info["dtype"].items()))
    t.add_row("classes", f"{info['num_classes']} {info['label_names']}" if info["num_classes"] else "unlabelled")
    for split, d in info["splits"].items():
        t.add_row(f"split {split}", f"{d['count']}  " + ", ".join(f"{k}: {v}" for k, v in d["per_class"].items()))
    m = info["masks"]
    t.add_row("masks", f"{m['valid']} valid" if m["present"] else "none")
    t.add_row("captions", "yes" if info["captions"] else "no")
    t.add_row("skipped", str(info["skipped_count"]) + "".join(f"\n  {s['path']}: {s['reason']}" for s in info["skipped"][:10]))
    bad = info.get("nonfinite", {})
    if bad.get("images"):
        t.add_row("NaN/inf pixels", f"{bad['pixels']} in {bad['images']} images (read as 0)")
    if info["ignored_files"]:
        t.add_row("ignored (not scans)", str(info["ignored_files"]))
    out.print(t)


@app.command()
@handle_errors
def inspect(
    source: Annotated[Path, typer.Argument(help="Folder, .npz, .csv or a single image/DICOM/NIfTI file.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    config: ConfigOpt = None, set_: SetOpt = None, window: Window = None, window_center: WindowCenter = None,
    window_width: WindowWidth = None, axis: Axis = None, slice_start: SliceStart = None, slice_stop: SliceStop = None,
    skip_empty: SkipEmpty = None, labels: Labels = None, strict: Strict = None,
):
    """Count images, sizes, channels, dtype, class balance per split, masks, and files skipped (and why).

    Example: mwm data inspect ../shared/data/br35h.npz --json
    """
    cfg = resolve(InspectConfig, config, set_, {"source": source, **read_option_values(
        window, window_center, window_width, axis, slice_start, slice_stop, skip_empty, labels, strict)})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skipped files are listed in the summary instead
        info = inspect_source(open_source(cfg.source, cfg.read))
    if json_out:
        print(json.dumps(info, indent=2))
    else:
        _print_summary(info)


@app.command()
@handle_errors
def convert(
    source: Annotated[Path, typer.Argument(help="Folder, .npz, .csv or a single image/DICOM/NIfTI file.")],
    out_path: Annotated[Path, typer.Argument(metavar="OUT.npz", help="Output npz in mwm's format.")],
    size: Annotated[Optional[int], typer.Option(help="Output size in pixels (square). [default: 128]")] = None,
    channels: Annotated[Optional[int], typer.Option(help="1 (gray) or 3 (RGB). [default: 1]")] = None,
    resize: Annotated[Optional[str], typer.Option(help="pad (keep aspect, black borders), stretch, or crop. [default: pad]")] = None,
    split: Annotated[Optional[str], typer.Option(help="Convert only this split.")] = None,
    config: ConfigOpt = None, set_: SetOpt = None, window: Window = None, window_center: WindowCenter = None,
    window_width: WindowWidth = None, axis: Axis = None, slice_start: SliceStart = None, slice_stop: SliceStop = None,
    skip_empty: SkipEmpty = None, labels: Labels = None, strict: Strict = None,
):
    """Decode any supported input once into an npz (uint8 images at one size) that every command reads fast.

    Example: mwm data convert dicoms/ ct.npz --size 256 --window lung
    """
    cfg = resolve(ConvertConfig, config, set_, {
        "source": source, "out": out_path, "size": size, "channels": channels, "resize": resize, "split": split,
        **read_option_values(window, window_center, window_width, axis, slice_start, slice_stop, skip_empty, labels,
                             strict)})
    import warnings

    from ..data import decode

    src = open_source(cfg.source, cfg.read)
    n = len(src.indices(cfg.split))
    with warnings.catch_warnings(), _progress() as bar:
        warnings.simplefilter("ignore")
        task = bar.add_task("decoding", total=n)
        arrays = decode(src, cfg.size, cfg.channels, cfg.resize, cfg.split, progress=lambda k: bar.advance(task, k))
    if len(arrays) == 0:
        from ..errors import DataError

        raise DataError(f"{cfg.source}: none of the {n} images could be read; nothing written")
    arrays.save_npz(cfg.out, meta={"config": cfg.model_dump(mode="json")})
    cfg_path = save_config(cfg, cfg.out.with_suffix(".config.yaml"))
    msg = f"wrote {cfg.out}: {len(arrays)} images at {cfg.size}×{cfg.size}×{cfg.channels} (config: {cfg_path})"
    bad = src.nonfinite_summary()
    if bad["images"]:
        msg += f"; {bad['pixels']} NaN/inf pixels in {bad['images']} images were set to 0"
    if src.skipped:
        msg += f"; skipped {len(src.skipped)} unreadable: " + ", ".join(f"{s.path} ({s.reason})" for s in src.skipped[:5])
    console.print(msg, highlight=False)


@app.command()
@handle_errors
def phantoms(
    out_path: Annotated[Path, typer.Argument(metavar="OUT.npz", help="Output npz (with masks and captions).")],
    n: Annotated[Optional[int], typer.Option("--n", help="Number of images. [default: 512]")] = None,
    size: Annotated[Optional[int], typer.Option(help="Image size in pixels. [default: 64]")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed. [default: 0]")] = None,
    anatomy: Annotated[Optional[str], typer.Option(help="head, body or mixed. [default: head]")] = None,
    config: ConfigOpt = None, set_: SetOpt = None,
):
    """Make synthetic scan-like phantoms with lesions, exact masks, labels and captions.

    Example: mwm data phantoms phantoms.npz --n 512 --size 64 --seed 0
    """
    from ..data.synthetic import PhantomConfig, generate

    cfg = resolve(PhantomConfig, config, set_, {"n": n, "size": size, "seed": seed, "anatomy": anatomy})
    ph = generate(cfg)
    ph.save_npz(out_path)
    cfg_path = save_config(cfg, Path(out_path).with_suffix(".config.yaml"))
    counts = {name: int((ph.labels == k).sum()) for k, name in enumerate(ph.label_names)}
    console.print(f"wrote {out_path}: {cfg.n} phantoms at {cfg.size}px, classes {counts} (config: {cfg_path})",
                  highlight=False)


@app.command("gt-rois")
@handle_errors
def gt_rois_cmd(
    source: Annotated[Path, typer.Argument(help="npz with masks (+ mask_valid; without it every mask is an annotation); "
                                                "with --source foreground / reconstruction-error any readable data.")],
    out_path: Annotated[Path, typer.Argument(metavar="OUT.jsonl", help="ROI manifest to write.")],
    expand: Annotated[float, typer.Option(help="Box margin ratio per side (as mwm localize).")] = 0.1,
    box_mode: Annotated[str, typer.Option(help="union (one box) or per_component.")] = "union",
    fallback: Annotated[Optional[Path], typer.Option(
        help="rois.jsonl from `mwm localize` on the same data: its ROIs for the images without a box.")] = None,
    roi_source: Annotated[str, typer.Option("--source", help="gt-boxes (around the masks), foreground (classical "
                                            "lung-field / body / brain boxes) or reconstruction-error (where a "
                                            "pretraining run reconstructs worst; needs --run).")] = "gt-boxes",
    kind: Annotated[str, typer.Option(help="foreground: lungs (dark regions inside the body), body (largest bright "
                                      "component, e.g. the head) or brain (inside the skull).")] = "lungs",
    split: Annotated[Optional[str], typer.Option(help="Only this split (e.g. test); default: every image.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N images (after --split).")] = None,
    run: Annotated[Optional[Path], typer.Option(help="reconstruction-error: a `mwm pretrain` run folder "
                                                "(its checkpoints/last.pt holds the decoder too).")] = None,
    masks: Annotated[int, typer.Option(help="reconstruction-error: random masks per image.")] = 8,
    ratio: Annotated[float, typer.Option(help="reconstruction-error: mask ratio of each mask.")] = 0.6,
    level: Annotated[str, typer.Option(
        help="reconstruction-error: patch (the loss per mask cell) or pixel.")] = "patch",
    binarize: Annotated[str, typer.Option(help="reconstruction-error: otsu, kmeans or quantile (the hardest "
                                          "1 − --quantile of the pixels).")] = "quantile",
    quantile: Annotated[float, typer.Option(help="reconstruction-error with --binarize quantile.")] = 0.9,
    components: Annotated[int, typer.Option(help="reconstruction-error: keep the k largest high-error "
                                            "components.")] = 1,
    save_maps: Annotated[Optional[Path], typer.Option(help="reconstruction-error: also write the error maps "
                                                      "(ids + float16 maps) to this .npz.")] = None,
    device: Annotated[str, typer.Option(help="reconstruction-error: cpu, cuda, auto.")] = "cpu",
    precision: Annotated[Optional[float], typer.Option(
        help="perturb: target occlusion precision of each box (with --recall), e.g. 0.3.")] = None,
    recall: Annotated[Optional[float], typer.Option(
        help="perturb: target occlusion recall of each box (with --precision), e.g. 0.9.")] = None,
    place: Annotated[Optional[str], typer.Option(
        help="perturb: target (a box meeting --precision/--recall) or random (the same size at a random "
             "place; the gt box's size without --precision/--recall).")] = None,
    seed: Annotated[int, typer.Option(help="perturb / reconstruction-error: seed of the draws (with each image "
                                      "id).")] = 0,
):
    """ROI manifest without a localizer: boxes around ground-truth masks (the gt-boxes oracle; e.g. lung-field boxes
    for pretraining), degraded ones (--precision/--recall, --place random), or classical foreground boxes.

    Examples: mwm data gt-rois ../shared/data/kermany_cxr.npz lung_rois.jsonl --expand 0.05;
    mwm data gt-rois ../shared/data/br35h.npz degraded.jsonl --precision 0.3 --recall 0.9 --seed 0;
    mwm data gt-rois ../shared/data/chest_ct.npz ct_lungs.jsonl --source foreground --kind lungs;
    mwm data gt-rois ../shared/data/br35h.npz hard.jsonl --source reconstruction-error --run runs/pre --split test
    """
    from pydantic import ValidationError

    from ..config import ConfigError
    from ..localize.gt_rois import write_gt_rois
    from ..rois.perturb import PerturbConfig

    perturb = None
    if precision is not None or recall is not None or place is not None:
        try:
            perturb = PerturbConfig(precision=precision, recall=recall, place=place or "target")
        except ValidationError as e:
            raise ConfigError("--precision/--recall/--place: " + "; ".join(
                err["msg"].removeprefix("Value error, ") for err in e.errors())) from None
    recon = None
    if roi_source == "reconstruction-error":
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        recon = {"run": run, "masks": masks, "ratio": ratio, "level": level, "binarize": binarize,
                 "quantile": quantile, "components": components, "maps_out": save_maps, "device": device}
    elif run is not None:
        raise ConfigError("--run is for --source reconstruction-error")
    meta = write_gt_rois(source, out_path, expand, box_mode, fallback,  # type: ignore[arg-type]
                         source=roi_source, perturb=perturb, seed=seed, kind=kind,  # type: ignore[arg-type]
                         split=split, limit=limit, recon=recon)
    n_own = meta.get("n_gt", meta.get("n_foreground", meta.get("n_reconstruction")))
    more = f" ({n_own} from {meta['source']}, {meta['n_fallback']} from {fallback})" if fallback else ""
    console.print(f"wrote {out_path}: {meta['n_with_roi']} of {meta['n_images']} images with an ROI{more}",
                  highlight=False)
    if perturb is not None:
        pm = meta["perturb"]
        console.print(f"perturbed {pm['n']} boxes: mean occlusion precision {pm['achieved_precision']}, "
                      f"recall {pm['achieved_recall']}", highlight=False)
