"""Run a :class:`BenchConfig`: ROIs once, then every arm × seed (pretrain → each task), resuming finished parts.

Layout under ``OUT``::

    config.yaml                   the resolved bench config
    rois.jsonl                    gt-boxes manifest (when rois.source = gt-boxes)
    rois-<arm>.jsonl              an arm's own gt-boxes manifest (when the arm sets rois)
    runs/<arm>/seed<k>/pretrain/  a `mwm pretrain` run folder (summary.json once finished)
    runs/<arm>/seed<k>/<task>/    a transfer run folder (metrics.json once finished)
    results.csv, results.md, plots/*.png

A part is done when its ``summary.json`` / ``metrics.json`` exists; a pretraining folder without one resumes
from its checkpoint. So a killed bench restarts where it stopped, and adding a seed or an arm runs only that.
"""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path
from typing import Callable

from ..config import save_config
from ..errors import MWMError
from .config import ArmConfig, BenchConfig, RoiSourceConfig, TaskConfig

__all__ = ["run_bench", "TASKS", "run_dir"]

# kind → (module, config class, entry function, extra config fields)
TASKS: dict[str, tuple[str, str, str, dict]] = {
    "linear": ("mwm.transfer.classify", "FinetuneConfig", "finetune", {"mode": "linear"}),
    "full": ("mwm.transfer.classify", "FinetuneConfig", "finetune", {"mode": "full"}),
    "segment": ("mwm.transfer.segment", "SegmentConfig", "segment", {}),
    "detect": ("mwm.transfer.detect", "DetectConfig", "detect", {}),
}


def run_dir(cfg: BenchConfig, arm: str, seed: int) -> Path:
    return cfg.out_dir / "runs" / arm / f"seed{seed}"


def _prepare_rois(cfg: BenchConfig, rois: RoiSourceConfig, path: Path) -> Path | None:
    """The manifest for one ROI source: ``rois.path`` as given, or gt-boxes (+ fallback) written to ``path``."""
    if rois.source == "none":
        return None
    if rois.source == "manifest":
        if not Path(rois.path).is_file():
            raise MWMError(f"rois.path {rois.path}: no such manifest; run `mwm localize` first")
        return Path(rois.path)
    from ..localize.gt_rois import write_gt_rois

    if rois.fallback is not None and not Path(rois.fallback).is_file():
        raise MWMError(f"rois.fallback {rois.fallback}: no such manifest; run `mwm localize` first")
    if not path.is_file():
        write_gt_rois(cfg.data, path, expand=rois.expand, box_mode=rois.box_mode, fallback=rois.fallback)
    return path


def _arm_rois(cfg: BenchConfig) -> dict[str, Path | None]:
    """Arm name → its ROI manifest (prepared once per source; only guided arms get one)."""
    from ..masking import NEEDS_ROI

    shared: Path | None | bool = False  # not prepared yet
    out: dict[str, Path | None] = {}
    for arm in cfg.arms:
        if not (arm.pretrain and arm.strategy in NEEDS_ROI):
            out[arm.name] = None
        elif arm.rois is not None:
            out[arm.name] = _prepare_rois(cfg, arm.rois, cfg.out_dir / f"rois-{arm.name}.jsonl")
        else:
            if shared is False:
                shared = _prepare_rois(cfg, cfg.rois, cfg.out_dir / "rois.jsonl")
            out[arm.name] = shared  # type: ignore[assignment]
    return out


def _pretrain(cfg: BenchConfig, arm: ArmConfig, seed: int, rois: Path | None, log: Callable) -> dict:
    from ..masking import NEEDS_ROI
    from ..train import PretrainConfig, pretrain

    out = run_dir(cfg, arm.name, seed) / "pretrain"
    done = out / "summary.json"
    if done.is_file():
        return json.loads(done.read_text())
    opts = {**cfg.pretrain, **arm.options}
    model = {"arch": cfg.arch, "size": cfg.size, **opts.pop("model", {})}
    guided = arm.strategy in NEEDS_ROI
    pc = PretrainConfig.model_validate({
        **opts, "data": cfg.data, "out": out, "seed": seed, "model": model, "masking": arm.masking,
        "rois": rois if guided else None, "allow_missing_rois": guided or opts.get("allow_missing_rois", False),
        "resume": (out / "checkpoints" / "last.pt").is_file(),
        **({"accelerator": cfg.device} if cfg.device != "auto" and "accelerator" not in opts else {})})
    log(f"pretrain {arm.name} seed {seed} ({pc.masking.strategy}, {pc.epochs} epochs)")
    return pretrain(pc)


def _task(cfg: BenchConfig, task: TaskConfig, arm: str, weights: str, seed: int, out: Path, log: Callable) -> dict:
    done = out / "metrics.json"
    if done.is_file():
        return json.loads(done.read_text())
    module, cls_name, fn_name, extra = TASKS[task.kind]
    mod = importlib.import_module(module)
    tc = getattr(mod, cls_name).model_validate({
        "size": cfg.size, **task.options, **extra, "data": cfg.data, "out": out, "weights": weights,
        "arch": cfg.arch, "seed": seed, **({"device": cfg.device} if cfg.device != "auto" else {})})
    log(f"{task.label} on {arm} seed {seed}")
    return getattr(mod, fn_name)(tc)


def _mask_ratios(pretrain_dir: Path) -> dict:
    """Mean realised mask ratios over the last epoch's metric rows (NaN-free; None when not logged)."""
    from ..train.metrics import read_metrics

    path = pretrain_dir / "metrics.csv"
    if not path.is_file():
        return {}
    rows = read_metrics(path)
    if not rows:
        return {}
    last = max(r["epoch"] for r in rows if r.get("epoch") is not None)
    rows = [r for r in rows if r.get("epoch") == last]
    out = {}
    for k in ("mask_ratio", "mask_ratio_in", "mask_ratio_out"):
        vals = [r[k] for r in rows if r.get(k) is not None]
        out[k] = sum(vals) / len(vals) if vals else None
    return out


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print, only_tables: bool = False) -> list[dict]:
    """Run (or resume) everything and write the tables and plots; returns the result rows."""
    from ..report.plots import bench_plots
    from .tables import result_row, write_tables

    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    rois = {} if only_tables else _arm_rois(cfg)
    rows: list[dict] = []
    for seed in cfg.seeds:
        for arm in cfg.arms:
            base = run_dir(cfg, arm.name, seed)
            summary: dict = {}
            if arm.pretrain:
                pdir = base / "pretrain"
                if only_tables:
                    if not (pdir / "summary.json").is_file():
                        continue
                    summary = json.loads((pdir / "summary.json").read_text())
                else:
                    summary = _pretrain(cfg, arm, seed, rois[arm.name], log)
                weights = str(pdir / "encoder.pth")
            else:
                weights = "none"
            for task in cfg.tasks:
                tdir = base / task.label
                if not task.runs_on(arm.name) or only_tables and not (tdir / "metrics.json").is_file():
                    continue
                t0 = time.perf_counter()
                metrics = _task(cfg, task, arm.name, weights, seed, tdir, log)
                rows.append(result_row(arm, seed, task, metrics, summary,
                                       _mask_ratios(base / "pretrain") if arm.pretrain else {},
                                       time.perf_counter() - t0))
    write_tables(cfg, rows)
    bench_plots(cfg, rows, out / "plots")
    return rows
