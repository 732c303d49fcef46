"""`mwm localize-tune`: choose MWM's localization settings on a few annotated images (the authors' ``--hyper-opt``).

Mask What Matters runs MedCLIP-SAMv2's saliency script with ``--hyper-opt``: a grid over the M2IB layer
{7, 8, 9} and β {0.1, 1, 2} (and the noise variance, which our M2IB does not have), scored by the Dice of
``saliency > 0.3`` against the masks of a few validation images; then the whole dataset runs with the best
setting. Here the grid also covers the postprocessing `mwm localize` applies after the saliency (binarize
method and threshold, components kept, box mode, box margin), and the score is what `mwm localize-eval`
measures: the Dice (or IoU / occlusion precision / recall, ``objective``) of the final **boxes** against the
mask.

Cost: the saliency maps are the expensive part (one M2IB optimisation per image per (layer, β)); they are
computed once per (layer, β) for the tuning images, in batches, with the same functions, noise keys and
preprocessing as :func:`mwm.localize.pipeline.localize`, so a map here is the map `mwm localize` computes for
that image. Every postprocessing combination is then scored on those maps (cheap: batched binarization and
connected components, one :func:`~mwm.localize.metrics.evaluate_manifest` per row).

Outputs in ``out``: ``table.csv`` (one row per setting, grid order), ``table.md`` (sorted by the objective),
``best.yaml`` (a :class:`~mwm.localize.pipeline.LocalizeConfig` fragment: ``mwm localize DATA --config
best.yaml --out DIR``), ``tune.json`` (config, tuning image ids, best and default rows, timings).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..data import ReadOptions, open_source
from ..data.transforms import Fit, to_tensor
from ..errors import DataError
from ..io import atomic_write_text, lock_folder
from .m2ib import M2IBConfig, resolve_layer
from .metrics import GroundTruth, evaluate_manifest, load_ground_truth, strip_ext
from .pipeline import LocalizeConfig, batch_saliency, pick_device, prompt_embeddings, prompt_resolver
from .postprocess import (BinarizeMethod, BoxMode, binarize, expand_boxes, largest_components, mask_to_boxes,
                          require_crf)

Objective = Literal["dice", "iou", "precision", "recall"]

#: MedCLIP-SAMv2's --hyper-opt grid, for a 12-block vision tower (BiomedCLIP's ViT-B/16)
REFERENCE_LAYERS = (7, 8, 9)
REFERENCE_BETAS = (0.1, 1.0, 2.0)

TABLE_COLUMNS = ["rank", "layer", "beta", "binarize", "threshold", "components", "box_mode", "expand", "n",
                 "precision", "recall", "dice", "iou", "n_failed", "is_default"]


def _distinct(values: list, ok, message: str) -> list:
    """A grid axis: every value passes ``ok`` (else ``ValueError(message)``), duplicates dropped in order."""
    if not all(ok(v) for v in values):
        raise ValueError(f"{message}; got {values}")
    return list(dict.fromkeys(values))


class TuneConfig(BaseModel):
    """`mwm localize-tune`: the grid, the tuning images and the saliency settings they share."""

    model_config = ConfigDict(extra="forbid")

    data: Path
    out: Path
    gt: Path | None = Field(default=None, description="masks (npz with masks + mask_valid, or a folder); default: data")
    prompt: str | None = None
    prompts_file: Path | None = Field(default=None, description="JSON: {image id or class name: prompt}")
    ensemble: Literal["mean", "median"] = Field(default="mean", description="how the maps of an ensemble prompt "
                                                "'a;b;c' are combined, as in `mwm localize`")
    vlm: str = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    vlm_pretrained: str | None = None
    split: str | None = Field(default="val", description="tuning images come from this split")
    n: int = Field(default=20, ge=1, description="tuning images: this many with a non-empty valid mask (seeded sample)")
    seed: int = Field(default=0, description="seed of the tuning-image sample")
    layers: list[int] | None = Field(default=None, description="M2IB layers; None: MWM's {7, 8, 9} of 12 blocks, "
                                     "i.e. the default layer and the next two, ending at the second-to-last block at most")
    betas: list[float] = Field(default=list(REFERENCE_BETAS), min_length=1)
    binarize: list[BinarizeMethod] = Field(default=["kmeans", "otsu", "threshold"], min_length=1)
    thresholds: list[float] = Field(default=[0.3, 0.5], min_length=1, description="for binarize=threshold; 0.3 is the reference's")
    components: list[int] = Field(default=[1, 2], min_length=1)
    box_mode: list[BoxMode] = Field(default=["union"], min_length=1)
    expand: list[float] = Field(default=[0.0, 0.05, 0.1, 0.2], min_length=1)
    objective: Objective = "dice"
    m2ib: M2IBConfig = Field(default=M2IBConfig(), description="steps, noise copies, feature norm, seed; layer/β come from the grid")
    batch_size: int = Field(default=16, ge=1)
    device: str = "auto"
    resize: Literal["pad", "stretch", "crop"] = "pad"
    read: ReadOptions = ReadOptions()

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: list[float]) -> list[float]:
        if any(b < 0 for b in v):
            raise ValueError(f"β must be >= 0; got {v}")
        return list(dict.fromkeys(v))

    @field_validator("thresholds")
    @classmethod
    def _thresholds(cls, v: list[float]) -> list[float]:
        return _distinct(v, lambda t: 0 <= t <= 1, "thresholds must be in [0, 1]")

    @field_validator("components")
    @classmethod
    def _components(cls, v: list[int]) -> list[int]:
        return _distinct(v, lambda c: c >= 1, "components must be >= 1")

    @field_validator("expand")
    @classmethod
    def _expand(cls, v: list[float]) -> list[float]:
        return _distinct(v, lambda e: e >= 0, "expand ratios must be >= 0")

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(k < 0 for k in v)):
            raise ValueError(f"layers must be a non-empty list of block indices >= 0; got {v}")
        return None if v is None else list(dict.fromkeys(v))


def default_layers(n_blocks: int) -> list[int]:
    """MWM's grid {7, 8, 9} for 12 blocks; for other depths the default layer (:func:`resolve_layer`) and the
    next two, shifted down to end at the second-to-last block at most, as the reference's grid and default do:
    after the last block only the head runs, and a head that pools the class token cannot see the bottleneck's
    patch tokens, so that "saliency" would measure feature magnitude alone (``--layers`` may still name it)."""
    hi = max(0, n_blocks - 2)
    start = max(0, min(resolve_layer(None, n_blocks), hi - len(REFERENCE_LAYERS) + 1))
    return list(range(start, min(hi, start + len(REFERENCE_LAYERS) - 1) + 1))


# -- tuning images ----------------------------------------------------------------------------------
def select_images(ids: list[str], candidates: list[int], gt: GroundTruth, n: int, seed: int) -> list[int]:
    """Indices (of ``ids``) among ``candidates`` whose ground truth is valid and non-empty: all of them when
    there are at most ``n``, else a seeded sample of ``n``, in dataset order."""
    ok = []
    for i in candidates:
        k = gt.keys.get(strip_ext(ids[i]))
        if k is not None and gt.valid[k] and np.any(gt.masks[k]):
            ok.append(i)
    if len(ok) > n:
        ok = sorted(np.random.default_rng(seed).choice(ok, size=n, replace=False).tolist())
    return ok


@dataclass
class TuneImages:
    """The tuning images as the VLM sees them: ``images01`` (N, 3, S, S) in [0, 1] (for the CRF),
    ``pixels`` (N, 3, S, S) preprocessed, ``text`` the embedding of every prompt (ensemble member), plus ids,
    sizes, fits and each image's (ensemble) prompt."""

    ids: list[str]
    sizes: list[tuple[int, int]]
    fits: list[Fit]
    images01: torch.Tensor
    pixels: torch.Tensor
    text: dict[str, torch.Tensor]
    prompts: list[str]
    size: int


def prepare_images(src, idx: list[int], vlm, cfg: TuneConfig, device) -> TuneImages:
    """Read the tuning images and embed their prompts, as `mwm localize` does (same resize, preprocessing)."""
    resolve = prompt_resolver(cfg, src.label_names)
    size = vlm.image_size[0]
    grid = vlm.stages.grid
    ids, sizes, fits, imgs, prompts = [], [], [], [], []
    for i in idx:
        s = src.read(i)
        h, w = s.image.shape[:2]
        if min(h, w) < max(grid):
            raise DataError(f"{cfg.data}: image {s.id} ({w}x{h} px) is smaller than the VLM's {grid[1]}x{grid[0]} patch grid")
        ids.append(s.id)
        sizes.append((h, w))
        fits.append(Fit.of(h, w, size, cfg.resize))
        imgs.append(to_tensor(s.image, size, 3, cfg.resize))
        prompts.append(resolve(s.id, src.labels[i]))
    images01 = torch.stack(imgs).to(device)
    text = prompt_embeddings(vlm, prompts)
    return TuneImages(ids, sizes, fits, images01, vlm.preprocess(images01), text, prompts, size)


def saliency_maps(vlm, ti: TuneImages, m2ib: M2IBConfig, batch_size: int, progress=None,
                  reduce: str = "mean") -> torch.Tensor:
    """M2IB saliency (N, S, S) of every tuning image for one setting, in batches, keyed by image id as
    `mwm localize` keys them (so the noise, hence the map, is the one `mwm localize` gets; an ensemble prompt
    ``a;b`` is combined by ``reduce`` as there)."""
    out = []
    for b0 in range(0, len(ti.ids), batch_size):
        sl = slice(b0, b0 + batch_size)
        res = batch_saliency(vlm, ti.pixels[sl], ti.prompts[sl], ti.ids[sl], ti.text, m2ib, reduce=reduce,
                             out_size=(ti.size, ti.size))
        out.append(res.saliency)
        if progress is not None:
            progress(len(ti.ids[sl]))
    return torch.cat(out)


# -- postprocessing grid ------------------------------------------------------------------------------
def boxes_records(ti: TuneImages, kept_mask: torch.Tensor, status: list[str], box_mode: str, expand: float) -> list[dict]:
    """Manifest records (image, width, height, boxes, status) for kept masks, as :func:`~mwm.localize.pipeline.localize`
    turns its masks into boxes: boxes of the mask on the square input → margin → back to the image's own frame."""
    per_image = mask_to_boxes(kept_mask, box_mode)
    recs = []
    for j, image_id in enumerate(ti.ids):
        h, w = ti.sizes[j]
        st = status[j]
        boxes_sq = per_image[j] if st == "ok" else []
        if st == "ok" and not boxes_sq:
            st = "empty_roi"
        boxes = [ti.fits[j].unbox(b, h, w, ti.size) for b in expand_boxes(boxes_sq, expand)]
        boxes = [b for b in boxes if b[2] > b[0] and b[3] > b[1]]
        if st == "ok" and not boxes:
            st = "empty_roi"
        recs.append({"image": image_id, "width": w, "height": h, "boxes": boxes, "prompt": ti.prompts[j], "status": st})
    return recs


def binarize_variants(cfg: TuneConfig) -> list[tuple[str, float | None]]:
    """(method, threshold or None): the threshold grid applies to ``threshold`` only."""
    return [(m, t) for m in cfg.binarize for t in (cfg.thresholds if m == "threshold" else [None])]


def score_postprocessing(sal: torch.Tensor, ti: TuneImages, gt: GroundTruth, cfg: TuneConfig) -> list[dict]:
    """Every postprocessing combination on one set of saliency maps → one row of mean metrics each."""
    rows = []
    for method, thr in binarize_variants(cfg):
        bin_ = binarize(sal, method, 0.5 if thr is None else thr, image=ti.images01)
        for k in cfg.components:
            kept = largest_components(bin_.mask, k)
            for mode, e in itertools.product(cfg.box_mode, cfg.expand):
                recs = boxes_records(ti, kept.mask, bin_.status, mode, e)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "annotated images not in the manifest": we score a subset
                    s = evaluate_manifest(recs, gt).summary
                rows.append({"binarize": method, "threshold": thr, "components": k, "box_mode": mode, "expand": e,
                             "n": s["n"], **{m: s[m] for m in ("precision", "recall", "dice", "iou")},
                             "n_failed": s["n_failed"]})
    return rows


def is_default_row(row: dict, default_layer: int) -> bool:
    """Whether a row is what `mwm localize` does with every option at its default."""
    d = LocalizeConfig.model_fields
    return (row["layer"] == default_layer and row["beta"] == M2IBConfig().beta
            and row["binarize"] == d["binarize"].default and row["components"] == d["components"].default
            and row["box_mode"] == d["box_mode"].default and row["expand"] == d["expand"].default)


def choose(rows: list[dict], objective: str) -> dict:
    """The row with the highest mean ``objective``; ties: the first in grid order. None means count as -inf."""
    return max(rows, key=lambda r: -np.inf if r[objective] is None else r[objective])


def best_localize_fragment(cfg: TuneConfig, best: dict) -> dict:
    """The chosen settings as a :class:`LocalizeConfig` fragment (everything but ``data`` and ``out``)."""
    def local(spec: str) -> str:  # a local VLM folder / weights file: absolute, so best.yaml works from anywhere
        return str(Path(spec).resolve()) if Path(spec).exists() else spec

    frag: dict = {"vlm": local(cfg.vlm)}
    if cfg.vlm_pretrained is not None:
        frag["vlm_pretrained"] = local(cfg.vlm_pretrained)
    if cfg.prompt is not None:
        frag["prompt"] = cfg.prompt
    if cfg.prompts_file is not None:
        frag["prompts_file"] = str(Path(cfg.prompts_file).resolve())
    if cfg.ensemble != "mean":
        frag["ensemble"] = cfg.ensemble
    frag["m2ib"] = cfg.m2ib.model_copy(update={"layer": int(best["layer"]), "beta": float(best["beta"])}).model_dump(mode="json")
    frag.update(binarize=best["binarize"], components=int(best["components"]), box_mode=best["box_mode"],
                expand=float(best["expand"]), resize=cfg.resize, read=cfg.read.model_dump(mode="json"))
    if best["threshold"] is not None:
        frag["threshold"] = float(best["threshold"])
    return frag


# -- tables -------------------------------------------------------------------------------------------
METRIC_COLUMNS = ("precision", "recall", "dice", "iou")


def _cell(v, metric: bool = True) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return "" if np.isnan(v) else f"{v:.4f}" if metric else f"{v:g}"
    return str(v)


def table_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(TABLE_COLUMNS)
    for r in rows:
        wr.writerow([_cell(r.get(c), c in METRIC_COLUMNS) for c in TABLE_COLUMNS])
    return buf.getvalue()


def table_md(rows: list[dict], objective: str) -> str:
    """Markdown, best first (by ``objective``, then grid order)."""
    ordered = sorted(rows, key=lambda r: r["rank"])
    head = "| " + " | ".join(TABLE_COLUMNS) + " |\n|" + "---|" * len(TABLE_COLUMNS) + "\n"
    body = "".join("| " + " | ".join(_cell(r.get(c), c in METRIC_COLUMNS) for c in TABLE_COLUMNS) + " |\n" for r in ordered)
    return f"Sorted by mean {objective} on the tuning images (rank 1 = chosen).\n\n" + head + body


def _rank(rows: list[dict], objective: str) -> None:
    order = sorted(range(len(rows)), key=lambda i: (-(rows[i][objective] if rows[i][objective] is not None else -np.inf), i))
    for r, i in enumerate(order, 1):
        rows[i]["rank"] = r


# -- the run ------------------------------------------------------------------------------------------
def tune(cfg: TuneConfig, progress=None, log=None) -> dict:
    """Run the grid; write the tables, ``best.yaml`` and ``tune.json`` in ``cfg.out``; return a summary dict.

    ``progress(n)`` is called per saliency batch (n images); ``log(msg)`` after each (layer, β).
    """
    from .vlm import load_vlm

    t0 = time.perf_counter()
    out = Path(cfg.out)
    if "crf" in cfg.binarize:
        require_crf()
    with lock_folder(out, what="localize-tune run"):
        src = open_source(cfg.data, cfg.read)
        gt_path = cfg.gt or cfg.data
        try:
            gt = load_ground_truth(gt_path)
        except DataError as e:
            raise DataError(f"{e} (localize-tune needs masks: pass --gt MASKS.npz or a folder of masks)") from None
        cands = src.indices(cfg.split)
        if not cands:
            raise DataError(f"{cfg.data}: no images in split '{cfg.split}'")
        idx = select_images(src.ids, cands, gt, cfg.n, cfg.seed)
        if not idx:
            raise DataError(f"{cfg.data}: no image of split '{cfg.split}' has a non-empty valid mask in {gt_path}; "
                            "tune on a split with annotations (--split) or give --gt")

        device = pick_device(cfg.device)
        vlm = load_vlm(cfg.vlm, device=str(device), pretrained=cfg.vlm_pretrained)
        n_blocks = len(vlm.stages.blocks)
        layers = cfg.layers if cfg.layers is not None else default_layers(n_blocks)
        for layer in layers:
            resolve_layer(layer, n_blocks)  # a clear error before any work
        default_layer = resolve_layer(None, n_blocks)
        ti = prepare_images(src, idx, vlm, cfg, device)

        rows: list[dict] = []
        timings = []
        for layer, beta in itertools.product(layers, cfg.betas):
            t1 = time.perf_counter()
            m2 = cfg.m2ib.model_copy(update={"layer": layer, "beta": beta})
            sal = saliency_maps(vlm, ti, m2, cfg.batch_size, progress, reduce=cfg.ensemble)
            t_sal = time.perf_counter() - t1
            part = score_postprocessing(sal, ti, gt, cfg)
            for r in part:
                r.update(layer=layer, beta=beta)
                r["is_default"] = is_default_row(r, default_layer)
            rows.extend(part)
            timings.append({"layer": layer, "beta": beta, "saliency_s": round(t_sal, 2),
                            "postprocess_s": round(time.perf_counter() - t1 - t_sal, 2)})
            if log is not None:
                b = choose(part, cfg.objective)
                log(f"layer {layer}, β {beta}: saliency {t_sal:.1f}s; best {cfg.objective} {_cell(b[cfg.objective])} "
                    f"({b['binarize']}{'' if b['threshold'] is None else ' ' + str(b['threshold'])}, "
                    f"{b['components']} comp., expand {b['expand']})")

        _rank(rows, cfg.objective)
        best = choose(rows, cfg.objective)
        default = next((r for r in rows if r["is_default"]), None)
        frag = best_localize_fragment(cfg, best)
        LocalizeConfig.model_validate({**frag, "data": cfg.data, "out": out / "localize"})  # fail here, not in `localize`

        atomic_write_text(out / "table.csv", table_csv(rows))
        atomic_write_text(out / "table.md", table_md(rows, cfg.objective))
        header = (f"# mwm localize-tune: the best of {len(rows)} settings by mean {cfg.objective} "
                  f"({_cell(best[cfg.objective])}) on {len(idx)} annotated images of {cfg.data} (split {cfg.split}).\n"
                  f"# Use: mwm localize DATA --config {out / 'best.yaml'} --out DIR   (CLI options override these)\n")
        atomic_write_text(out / "best.yaml", header + yaml.safe_dump(frag, sort_keys=False))
        summary = {"best": best, "default": default, "n_images": len(idx), "n_rows": len(rows), "layers": layers,
                   "objective": cfg.objective, "images": ti.ids, "timings": timings,
                   "seconds": round(time.perf_counter() - t0, 2), "best_yaml": str(out / "best.yaml")}
        atomic_write_text(out / "tune.json", json.dumps({"config": cfg.model_dump(mode="json"), **summary}, indent=2))
    return summary


__all__ = ["TuneConfig", "tune", "default_layers", "select_images", "saliency_maps", "score_postprocessing",
           "boxes_records", "choose", "best_localize_fragment", "REFERENCE_LAYERS", "REFERENCE_BETAS"]
