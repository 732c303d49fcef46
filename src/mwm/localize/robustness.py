"""`mwm localize-robustness`: how much does the wording of the prompt move the ROI, and does an ensemble help?

Mask What Matters names it as its first limitation: "the robustness of MWM to variations in prompt style,
vocabulary, or noise has not been systematically examined". This study examines it for one target:

* a **variants file** (YAML) gives a ``reference`` prompt and named **families** of alternatives — short
  phrases, descriptive sentences, synonyms, lay wording, irrelevant context, a wrong target, negation, …
  (:class:`VariantsFile`); two **noise families** are generated from the reference and the ``short`` family,
  reproducibly from a seed (``typos``, ``dropout``: :mod:`mwm.localize.prompt_noise`);
* every variant localizes every image exactly as `mwm localize --prompt VARIANT` would (same M2IB noise keys,
  binarization, components, boxes and margin:
  :func:`~mwm.localize.pipeline.saliency_to_rois`), all prompts of a batch of images in one M2IB pass
  (:func:`~mwm.localize.ensemble.ensemble_saliency`), in memory;
* each family with two or more prompts also gets its **ensemble** row: the pixel-wise mean (``ensemble``:
  or median) of its members' maps before binarization (:mod:`mwm.localize.ensemble`), as
  `mwm localize --prompt "a;b;c"` computes it;
* every row is scored against the masks as `mwm localize-eval` scores a manifest (occlusion precision and
  recall, Dice, IoU: :func:`~mwm.localize.metrics.evaluate_manifest`), plus the share of images whose ROI
  **changed** against the reference prompt's (ROI IoU < ``changed_iou``, 0.5); across rows, the pairwise mean
  ROI IoU (agreement matrix) and each family's spread (mean, std, min, max) of every metric.

ROI IoU compares the union of an image's boxes rasterized on a :data:`IOU_GRID` × :data:`IOU_GRID` grid of the
normalized image (two empty ROIs agree: IoU 1; one empty: 0).

Outputs in ``out`` (each written atomically; the folder is locked while the study runs; a new run replaces
them): ``robustness.csv`` and ``robustness.md`` (one row per variant and per family ensemble),
``summary.json`` (config, variants, per-family spread, ensemble vs single prompts, agreement matrix,
timings), ``robustness.png`` (Dice and recall per family), ``gallery.png`` (a row per image, a column per
selected prompt, ROI boxes over the scan with the ground truth tinted).
"""

from __future__ import annotations

import csv
import io
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..data import ReadOptions, open_source
from ..data.transforms import to_tensor
from ..errors import DataError, ReadError
from ..io import atomic_path, atomic_write_text, lock_folder
from .ensemble import SEPARATOR, Reduce, ensemble_saliency, reduce_maps
from .m2ib import M2IBConfig, resolve_layer
from .metrics import GroundTruth, evaluate_manifest, load_ground_truth, strip_ext
from .postprocess import BinarizeMethod, BoxMode, boxes_to_masks, require_crf
from .prompt_noise import noisy_variants, parse_noise

#: ROIs are compared on this grid over the normalized image
IOU_GRID = 64
#: family names the study makes itself
RESERVED_FAMILIES = ("reference", "typos", "dropout")
METRICS = ("precision", "recall", "dice", "iou")


# -- the variants file ---------------------------------------------------------------------------------
class VariantsFile(BaseModel):
    """A prompt-variants file: ``reference`` (one prompt) and ``families`` (name → list of prompts), e.g.

    .. code-block:: yaml

        target: lesion
        reference: a lesion
        families:
          short: [lesion, a bright lesion]
          wrong_target: [the skull]
          negation: [no lesion]
    """

    model_config = ConfigDict(extra="forbid")

    reference: str
    families: dict[str, list[str]] = Field(min_length=1)
    ensembles: dict[str, list[str]] = Field(default_factory=dict, description="extra ensemble rows pooling several "
                                            "families: name → [family, …] (reference, typos, dropout allowed)")
    target: str | None = None
    modality: str | None = None
    description: str | None = None

    @field_validator("reference")
    @classmethod
    def _reference(cls, v: str) -> str:
        return _check_prompt(v)

    @field_validator("families")
    @classmethod
    def _families(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, prompts in v.items():
            if not str(name).strip():
                raise ValueError("a family name is empty")
            if name in RESERVED_FAMILIES:
                raise ValueError(f"family {name!r} is made by the study itself ({', '.join(RESERVED_FAMILIES)} are "
                                 "reserved: the reference prompt, and the --noise families); rename it")
            if not prompts:
                raise ValueError(f"family {name!r} has no prompts")
        return {str(k): [_check_prompt(p) for p in ps] for k, ps in v.items()}

    @model_validator(mode="after")
    def _ensembles(self):
        known = {*self.families, *RESERVED_FAMILIES}
        for name, fams in self.ensembles.items():
            if name in known:
                raise ValueError(f"ensembles: {name!r} is also a family name; name the pooled ensemble otherwise")
            missing = [f for f in fams if f not in known]
            if not fams or missing:
                raise ValueError(f"ensembles: {name!r} must list families of this file (or reference, typos, "
                                 f"dropout); unknown: {missing or '(none listed)'}")
        return self


def _check_prompt(p: str) -> str:
    if not p.strip():
        raise ValueError("a prompt is empty")
    if SEPARATOR in p:
        raise ValueError(f"prompt {p!r} contains {SEPARATOR!r} (an ensemble); the study builds each family's "
                         "ensemble itself, so list the prompts one by one")
    return p.strip()


def load_variants(path: str | Path) -> VariantsFile:
    """Read and check a variants YAML; raises :class:`DataError` naming the file (and the key) when it is wrong."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(f"{path}: cannot read the variants file ({e.strerror or e})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a valid YAML variants file ({e})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: a variants file is a YAML mapping with 'reference' (a prompt) and 'families' "
                        "(name: [prompts]); e.g. configs/prompts/phantoms_variants.yaml")
    try:
        return VariantsFile.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        more = f" (and {len(e.errors()) - 1} more problem(s))" if len(e.errors()) > 1 else ""
        raise DataError(f"{path}: key '{key}': {err['msg']}{more}. A variants file has 'reference: PROMPT' and "
                        "'families: {NAME: [PROMPT, …]}' (optional 'target', 'modality', 'description')") from None


# -- config ------------------------------------------------------------------------------------------------
class RobustnessConfig(BaseModel):
    """`mwm localize-robustness`: the data, the variants, and the localization settings every variant shares
    (the same options, with the same defaults, as :class:`~mwm.localize.pipeline.LocalizeConfig`)."""

    model_config = ConfigDict(extra="forbid")

    data: Path
    out: Path
    prompts: Path = Field(description="the variants YAML (reference + families)")
    gt: Path | None = Field(default=None, description="masks (npz with masks + mask_valid, or a folder); default: data")
    vlm: str = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    vlm_pretrained: str | None = None
    split: str | None = None
    limit: int | None = Field(default=None, ge=1, description="only the first N images of the split")
    noise: dict[str, float] = Field(default={"typos": 0.1, "dropout": 0.1},
                                    description="noise families: kind → rate ('typos=0.1,dropout=0.1'; 'none')")
    noise_samples: int = Field(default=1, ge=1, description="noisy versions per source prompt and kind")
    seed: int = Field(default=0, description="seed of the noisy prompts")
    ensemble: Reduce = "mean"
    changed_iou: float = Field(default=0.5, ge=0, le=1, description="an ROI 'changed' when its IoU with the "
                               "reference prompt's ROI is below this")
    m2ib: M2IBConfig = M2IBConfig()
    binarize: BinarizeMethod = "kmeans"
    threshold: float = Field(default=0.5, ge=0, le=1)
    components: int = Field(default=1, ge=1)
    box_mode: BoxMode = "union"
    expand: float = Field(default=0.1, ge=0)
    resize: Literal["pad", "stretch", "crop"] = "pad"
    read: ReadOptions = ReadOptions()
    batch_size: int = Field(default=8, ge=1, description="images localized together")
    pairs_per_pass: int = Field(default=64, ge=1, description="(image, prompt) pairs per M2IB pass at most (memory: "
                                "each pair is noise_copies sequences through the blocks after the bottleneck)")
    device: str = "auto"
    gallery: int = Field(default=6, ge=0, description="images (rows) in gallery.png")
    gallery_columns: int = Field(default=16, ge=1, description="prompts (columns) in gallery.png at most")

    @field_validator("noise", mode="before")
    @classmethod
    def _noise(cls, v):
        return parse_noise(v)


# -- rows: single variants and family ensembles ---------------------------------------------------------
@dataclass
class Row:
    """One line of the table: a single prompt (``members`` = its own index into the distinct prompts) or a
    family ensemble (``members`` = the family's prompts)."""

    family: str
    kind: Literal["single", "ensemble"]
    label: str
    members: list[int]
    over: list[str] = field(default_factory=list)  # an ensemble's families (its own, or those it pools)
    records: list[dict] = field(default_factory=list)


def build_rows(variants: VariantsFile, noise: dict[str, float], seed: int, samples: int) -> tuple[list[str], list[Row]]:
    """(distinct prompts, rows): the reference, each file family, the noise families (from the reference and
    the ``short`` family), one ensemble row per family with two or more prompts, then the file's pooled
    ``ensembles`` (all prompts of the families each names), in that order."""
    fams: dict[str, list[str]] = {"reference": [variants.reference], **variants.families}
    sources = [variants.reference] + [p for p in variants.families.get("short", []) if p != variants.reference]
    fams.update(noisy_variants(sources, noise, seed, samples))
    distinct: list[str] = list(dict.fromkeys(p for ps in fams.values() for p in ps))
    index = {p: i for i, p in enumerate(distinct)}
    rows = [Row(f, "single", p, [index[p]]) for f, ps in fams.items() for p in ps]
    rows += [Row(f, "ensemble", f"[{f} ensemble]", [index[p] for p in ps], [f])
             for f, ps in fams.items() if len(ps) > 1]
    for name, over in variants.ensembles.items():
        over = [f for f in over if f in fams]  # a noise family absent without --noise pools nothing
        rows.append(Row(name, "ensemble", f"[{name}: {' + '.join(over)}]", [index[p] for f in over for p in fams[f]],
                        over))
    return distinct, rows


# -- ROI agreement ---------------------------------------------------------------------------------------
def roi_masks(records: list[dict], grid: int = IOU_GRID) -> torch.Tensor:
    """The records' ROIs (union of boxes) rasterized on the normalized image: bool (N, grid, grid)."""
    return boxes_to_masks([r["boxes"] for r in records], grid, grid)


def pairwise_iou(masks: torch.Tensor) -> torch.Tensor:
    """masks: bool (R, N, G, G), R rows × N images → float64 (R, R, N) ROI IoU per image (both empty: 1)."""
    m = masks.flatten(2).float()  # (R, N, M)
    inter = torch.einsum("anm,bnm->abn", m, m).double()
    area = m.sum(-1).double()  # (R, N)
    union = area[:, None] + area[None] - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))


def _stats(values: list[float | None]) -> dict:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if not len(v):
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max()), "n": len(v)}


def family_spread(rows: list[dict]) -> dict:
    """Per family (single prompts only, and ``all`` of them): mean, std (population), min, max of each metric
    and of the changed share."""
    singles = [r for r in rows if r["kind"] == "single"]
    fams = list(dict.fromkeys(r["family"] for r in singles))
    out = {}
    for f in [*fams, "all"]:
        rs = [r for r in singles if f == "all" or r["family"] == f]
        out[f] = {k: _stats([r[k] for r in rs]) for k in (*METRICS, "changed_share")}
    return out


def ensemble_effect(rows: list[dict]) -> dict:
    """Per ensemble row: its metrics next to the mean, worst and best single prompt of the families it pools, and
    whether it beats the mean / raises the worst case (Dice, recall, precision)."""
    out = {}
    for e in (r for r in rows if r["kind"] == "ensemble"):
        over = e.get("over") or [e["family"]]
        singles = [r for r in rows if r["kind"] == "single" and r["family"] in over]
        d = {"n_prompts": len(singles), "families": over}
        for k in ("dice", "recall", "precision"):
            s = _stats([r[k] for r in singles])
            d[k] = {"ensemble": e[k], "single_mean": s["mean"], "single_worst": s["min"], "single_best": s["max"],
                    "beats_mean": None if e[k] is None or s["mean"] is None else e[k] > s["mean"],
                    "raises_worst": None if e[k] is None or s["min"] is None else e[k] > s["min"]}
        out[e["family"]] = d
    return out


# -- tables, plot, gallery -------------------------------------------------------------------------------
CSV_COLUMNS = ["family", "kind", "variant", "n", "precision", "recall", "dice", "iou", "changed_share",
               "mean_iou_to_reference", "n_failed", "false_positive_rate"]


def _spread(d: dict) -> str:
    """``mean ± std [min, max]`` of one metric's spread over a family's prompts."""
    return f"{_fmt(d['mean'])} ± {_fmt(d['std'])} [{_fmt(d['min'])}, {_fmt(d['max'])}]"


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def table_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(CSV_COLUMNS)
    for r in rows:
        wr.writerow([_fmt(r.get(c), 6) for c in CSV_COLUMNS])
    return buf.getvalue()


def table_md(rows: list[dict], summary: dict) -> str:
    """The one table (family, variant, precision, recall, Dice, changed share), then the per-family spread and
    the ensemble's effect."""
    lines = [f"# Prompt robustness: {summary['n_images']} images of {summary['data']} "
             f"(split {summary['split']}), {summary['n_lesion_images']} with a lesion", "",
             f"Reference prompt: “{summary['reference']}”. Changed = ROI IoU with the reference prompt's ROI "
             f"< {summary['changed_iou']}. Ensemble rows: pixel-wise {summary['ensemble']} of the family's saliency "
             "maps before binarization.", "",
             "| family | variant | precision | recall | Dice | changed share |", "|---|---|---|---|---|---|"]
    for r in rows:
        v = r["variant"].replace("|", "\\|")
        lines.append(f"| {r['family']} | {v if r['kind'] == 'single' else '**' + v + '**'} | {_fmt(r['precision'])} | "
                     f"{_fmt(r['recall'])} | {_fmt(r['dice'])} | {_fmt(r['changed_share'])} |")
    lines += ["", "## Spread per family (single prompts)", "",
              "| family | prompts | Dice mean ± std [min, max] | recall mean ± std [min, max] | changed share mean |",
              "|---|---|---|---|---|"]
    for f, s in summary["spread"].items():
        lines.append(f"| {f} | {s['dice']['n']} | {_spread(s['dice'])} | {_spread(s['recall'])} | "
                     f"{_fmt(s['changed_share']['mean'])} |")
    if summary["ensemble_effect"]:
        lines += ["", "## Ensemble vs single prompts", "",
                  "| family | prompts | Dice: ensemble / mean single / worst single "
                  "| recall: ensemble / mean / worst |",
                  "|---|---|---|---|"]
        for f, e in summary["ensemble_effect"].items():
            d, rc = e["dice"], e["recall"]
            lines.append(f"| {f} | {e['n_prompts']} | {_fmt(d['ensemble'])} / {_fmt(d['single_mean'])} / "
                         f"{_fmt(d['single_worst'])} | {_fmt(rc['ensemble'])} / {_fmt(rc['single_mean'])} / "
                         f"{_fmt(rc['single_worst'])} |")
    return "\n".join(lines) + "\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _savefig(plt, fig, path: Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def plot_families(rows: list[dict], path: Path, metrics: tuple[str, ...] = ("dice", "recall")) -> Path:
    """A strip plot per metric: x = family, one dot per single prompt, a star for the family's ensemble, the
    reference prompt as a dashed line."""
    plt = _plt()
    fams = list(dict.fromkeys(r["family"] for r in rows))
    ref = next((r for r in rows if r["family"] == "reference"), None)
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(6.0, 0.65 * len(fams)) * len(metrics) / 1.4, 3.8),
                             dpi=110, squeeze=False)
    rng = np.random.default_rng(0)
    for ax, m in zip(axes[0], metrics):
        for x, f in enumerate(fams):
            ys = [r[m] for r in rows if r["family"] == f and r["kind"] == "single" and r[m] is not None]
            ax.scatter(x + rng.uniform(-0.15, 0.15, len(ys)), ys, s=18, color="tab:blue", alpha=0.75)
            es = [r[m] for r in rows if r["family"] == f and r["kind"] == "ensemble" and r[m] is not None]
            ax.scatter([x] * len(es), es, s=110, marker="*", color="tab:red", zorder=3)
        if ref is not None and ref[m] is not None:
            ax.axhline(ref[m], ls="--", lw=1, color="gray")
        ax.set_xticks(range(len(fams)))
        ax.set_xticklabels(fams, rotation=40, ha="right", fontsize=8)
        ax.set_ylabel({"dice": "Dice", "recall": "occlusion recall", "precision": "occlusion precision"}.get(m, m))
        ax.set_ylim(-0.02, 1.02)
        ax.grid(axis="y", alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", ls="", color="tab:blue", label="single prompt"),
               Line2D([], [], marker="*", ms=11, ls="", color="tab:red", label="family ensemble"),
               Line2D([], [], ls="--", color="gray", label="reference prompt")]
    fig.legend(handles=handles, loc="upper center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    _savefig(plt, fig, path)
    return path


def gallery_columns(rows: list[Row], k: int) -> list[int]:
    """Row indices shown in the gallery: the first prompt of every family, then the family ensembles, ≤ k."""
    firsts = [i for i, r in enumerate(rows) if r.kind == "single"
              and not any(q.family == r.family and q.kind == "single" for q in rows[:i])]
    ens = [i for i, r in enumerate(rows) if r.kind == "ensemble"]
    return (firsts + ens)[:k]


def plot_gallery(images: list[np.ndarray], gts: list[np.ndarray | None], rows: list[Row], cols: list[int],
                 picks: list[int], path: Path) -> Path:
    """A row per image (``picks``: positions in the rows' records), a column per prompt: the scan, its ground
    truth tinted red, the prompt's ROI boxes in green."""
    from matplotlib.patches import Rectangle

    plt = _plt()
    n_r, n_c = len(picks), len(cols)
    fig, axes = plt.subplots(n_r, n_c, figsize=(1.35 * n_c, 1.45 * n_r + 0.5), dpi=110, squeeze=False)
    for a, (img, gt) in enumerate(zip(images, gts)):
        for b, c in enumerate(cols):
            ax = axes[a][b]
            rec = rows[c].records[picks[a]]
            ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            if gt is not None and gt.any() and gt.shape == img.shape[:2]:
                over = np.zeros((*gt.shape, 4))
                over[gt.astype(bool)] = (1.0, 0.15, 0.15, 0.45)
                ax.imshow(over, interpolation="nearest")
            h, w = img.shape[:2]
            for x0, y0, x1, y1 in rec["boxes"]:
                ax.add_patch(Rectangle((x0 * w - 0.5, y0 * h - 0.5), (x1 - x0) * w, (y1 - y0) * h, fill=False,
                                       edgecolor="lime", lw=1.2))
            ax.set_xticks([])
            ax.set_yticks([])
            if a == 0:
                label = rows[c].label if len(rows[c].label) <= 22 else rows[c].label[:21] + "…"
                ax.set_title(f"{rows[c].family}\n{label}", fontsize=6)
            if b == 0:
                ax.set_ylabel(strip_ext(rec["image"])[-16:], fontsize=6)
    fig.tight_layout()
    _savefig(plt, fig, path)
    return path


# -- the run ---------------------------------------------------------------------------------------------
@dataclass
class _Image:
    index: int
    id: str
    image: np.ndarray
    status: str  # "ok", or why the study localizes nothing for it (as `mwm localize` would say)


def _read_images(src, idx: list[int], grid: tuple[int, int], strict: bool) -> list[_Image]:
    from .pipeline import _is_constant

    out = []
    for i in idx:
        try:
            s = src.read(i)
        except ReadError as e:
            if strict:
                raise
            warnings.warn(f"{e}; left out of the study", stacklevel=2)
            continue
        h, w = s.image.shape[:2]
        st = "too_small" if min(h, w) < max(grid) else "constant_saliency" if _is_constant(s.image) else "ok"
        out.append(_Image(i, s.id, s.image, st))
    return out


def run_study(cfg: RobustnessConfig, progress=None, log=None) -> dict:
    """Run the study and write its outputs in ``cfg.out``; returns ``summary.json``'s content.

    ``progress(n)`` is called after each batch of n images (every prompt done for them).
    """
    from .pipeline import pick_device, prompt_embeddings
    from .vlm import load_vlm

    t0 = time.perf_counter()
    variants = load_variants(cfg.prompts)  # a bad file fails before the lock, the data or the model
    if cfg.binarize == "crf":
        require_crf()
    out = Path(cfg.out)
    with lock_folder(out, what="localize-robustness run"):
        src = open_source(cfg.data, cfg.read)
        gt_path = cfg.gt or cfg.data
        try:
            gt = load_ground_truth(gt_path)
        except DataError as e:
            raise DataError(f"{e} (localize-robustness scores against masks: pass --gt MASKS.npz or a folder of "
                            "masks)") from None
        idx = src.indices(cfg.split)
        if not idx:
            raise DataError(f"{cfg.data}: no images in split '{cfg.split}'")
        idx = idx[: cfg.limit] if cfg.limit else idx
        distinct, rows = build_rows(variants, cfg.noise, cfg.seed, cfg.noise_samples)

        device = pick_device(cfg.device)
        vlm = load_vlm(cfg.vlm, device=str(device), pretrained=cfg.vlm_pretrained)
        layer = resolve_layer(cfg.m2ib.layer, len(vlm.stages.blocks))
        size = vlm.image_size[0]
        images = _read_images(src, idx, vlm.stages.grid, cfg.read.strict)
        if not images:
            raise DataError(f"{cfg.data}: no readable image in split '{cfg.split}'")
        text = prompt_embeddings(vlm, distinct)
        if log is not None:
            log(f"{len(images)} images × {len(distinct)} distinct prompts ({sum(r.kind == 'single' for r in rows)} "
                f"variants, {sum(r.kind == 'ensemble' for r in rows)} family ensembles)")

        t_loc = time.perf_counter()
        for b0 in range(0, len(images), cfg.batch_size):
            batch = images[b0: b0 + cfg.batch_size]
            _localize_batch(batch, rows, distinct, text, vlm, cfg, size, device)
            if progress is not None:
                progress(len(batch))
        t_loc = time.perf_counter() - t_loc

        summary, table = _score(rows, images, gt, cfg, variants, distinct)
        summary.update(vlm=vlm.name, m2ib_layer=layer, seconds_localize=round(t_loc, 2),
                       seconds=round(time.perf_counter() - t0, 2))
        atomic_write_text(out / "robustness.csv", table_csv(table))
        atomic_write_text(out / "robustness.md", table_md(table, summary))
        plot_families(table, out / "robustness.png")
        _gallery(rows, images, gt, cfg, out / "gallery.png")
        summary["seconds"] = round(time.perf_counter() - t0, 2)
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def _localize_batch(batch: list[_Image], rows: list[Row], distinct: list[str], text: dict, vlm, cfg, size: int,
                    device) -> None:
    """Every row's records for one batch of images: one M2IB pass over images × distinct prompts, then every
    row's map (a member's own, or its family's reduction) through the same postprocessing, in one call."""
    from .pipeline import saliency_to_rois

    ok = [im for im in batch if im.status == "ok"]
    per_row: list[list[dict]] = [[] for _ in rows]
    if ok:
        imgs01 = torch.stack([to_tensor(im.image, size, 3, cfg.resize) for im in ok]).to(device)
        pixels = vlm.preprocess(imgs01)
        # every image with every distinct prompt, keyed by image id as `mwm localize` keys them (so chunking the
        # prompts to bound memory changes no map): images × prompts per M2IB pass, at most pairs_per_pass pairs
        emb = torch.stack([text[p] for p in distinct]).to(device)  # (U, D)
        step = max(1, cfg.pairs_per_pass // len(ok))
        maps = torch.cat([ensemble_saliency(vlm.stages, pixels, emb[c: c + step].expand(len(ok), -1, -1), cfg.m2ib,
                                            keys=[im.id for im in ok], out_size=(size, size)).maps
                          for c in range(0, len(distinct), step)], 1)  # (B, U, S, S)
        sal = torch.cat([maps[:, r.members[0]] if r.kind == "single" else reduce_maps(maps[:, r.members], cfg.ensemble)
                         for r in rows])  # (R·B, S, S), row-major
        sizes = [im.image.shape[:2] for im in ok] * len(rows)
        rois = saliency_to_rois(sal, imgs01.repeat(len(rows), 1, 1, 1), sizes, cfg, size)
        for k in range(len(rows) * len(ok)):
            r, j = divmod(k, len(ok))
            h, w = ok[j].image.shape[:2]
            per_row[r].append({"image": ok[j].id, "width": int(w), "height": int(h), "boxes": rois.boxes[k],
                               "prompt": rows[r].label, "status": rois.status[k]})
    for r, row in enumerate(rows):
        got = iter(per_row[r])
        for im in batch:
            h, w = im.image.shape[:2]
            row.records.append(next(got) if im.status == "ok" else {"image": im.id, "width": int(w), "height": int(h),
                                                                     "boxes": [], "prompt": row.label,
                                                                     "status": im.status})


def _score(rows: list[Row], images: list[_Image], gt: GroundTruth, cfg: RobustnessConfig, variants: VariantsFile,
           distinct: list[str]) -> tuple[dict, list[dict]]:
    """Metrics per row, changed share, agreement and spreads → (summary, table rows)."""
    masks = torch.stack([roi_masks(r.records) for r in rows])  # (R, N, G, G)
    iou = pairwise_iou(masks)  # (R, R, N)
    ref = next(i for i, r in enumerate(rows) if r.family == "reference")
    table = []
    for i, r in enumerate(rows):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "annotated images not in the manifest": the study scores a subset
            s = evaluate_manifest(r.records, gt).summary
        table.append({"family": r.family, "kind": r.kind, "variant": r.label, "over": r.over, "n": s["n"],
                      **{m: s[m] for m in METRICS},
                      "changed_share": float((iou[ref, i] < cfg.changed_iou).double().mean()),
                      "mean_iou_to_reference": float(iou[ref, i].mean()), "n_failed": s["n_failed"],
                      "false_positive_rate": s["false_positive_rate"]})
    n_lesion = sum(1 for im in images if (k := gt.keys.get(strip_ext(im.id))) is not None and gt.valid[k]
                   and np.any(gt.masks[k]))
    summary = {
        "data": str(cfg.data), "split": cfg.split, "n_images": len(images), "n_lesion_images": n_lesion,
        "reference": variants.reference, "changed_iou": cfg.changed_iou, "ensemble": cfg.ensemble,
        "variants_file": str(cfg.prompts), "variants": variants.model_dump(mode="json"),
        "prompts": {f: [r.label for r in rows if r.family == f and r.kind == "single"]
                    for f in dict.fromkeys(r.family for r in rows)},
        "n_distinct_prompts": len(distinct), "rows": table, "spread": family_spread(table),
        "ensemble_effect": ensemble_effect(table),
        "agreement": {"labels": [f"{r.family}: {r.label}" for r in rows],
                      "mean_roi_iou": [[round(float(v), 4) for v in row] for row in iou.mean(-1)]},
        "config": cfg.model_dump(mode="json"),
    }
    return summary, table


def _gallery(rows: list[Row], images: list[_Image], gt: GroundTruth, cfg: RobustnessConfig, path: Path) -> None:
    """Rows: the first ``cfg.gallery`` images with a lesion (then others, if too few have one)."""
    if cfg.gallery <= 0:
        return

    def gt_mask(im: _Image):
        k = gt.keys.get(strip_ext(im.id))
        return None if k is None or not gt.valid[k] else np.asarray(gt.masks[k]) != 0

    order = sorted(range(len(images)), key=lambda j: not (gt_mask(images[j]) is not None and gt_mask(images[j]).any()))
    picks = sorted(order[: cfg.gallery])
    imgs = [images[j].image if images[j].image.ndim == 2 else images[j].image.mean(-1) for j in picks]
    cols = gallery_columns(rows, cfg.gallery_columns)
    plot_gallery(imgs, [gt_mask(images[j]) for j in picks], rows, cols, picks, path)


__all__ = ["VariantsFile", "load_variants", "RobustnessConfig", "run_study", "build_rows", "pairwise_iou",
           "roi_masks", "family_spread", "ensemble_effect", "IOU_GRID"]
