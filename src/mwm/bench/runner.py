"""Run a :class:`BenchConfig`: ROIs once, then every arm × seed (pretrain → each task), reusing finished parts.

Layout under ``OUT``::

    config.yaml                   the resolved bench config
    .mwm.lock                     held for the whole run (a second bench into OUT fails naming the holder)
    rois.jsonl                    gt-boxes / foreground manifest (when rois.source is one) + rois.bench_part.json
    rois-<arm>.jsonl              an arm's own gt-boxes / foreground manifest (when the arm sets rois)
    rois/<hash12>/rois.jsonl      a generic-prompt source's `mwm localize` folder (one per VLM, prompt, options)
    runs/<arm>/seed<k>/pretrain/  a `mwm pretrain` run folder (summary.json once finished)
    runs/<arm>/seed<k>/<task>/    a transfer run folder (metrics.json once finished)
    stale/<part>-<hash8>/         parts made with another config, moved aside (never deleted)
    ARCHIVE/<arm>/seed<k>/*.json  with ``archive:``, each finished part's identity and numbers (committable;
                                  an arm x seed archived whole is not run again, see :mod:`mwm.bench.archive`)
    results.csv, results.md, plots/*.png

Every part stores the identity it was made with (``bench_part.json``, see :mod:`mwm.bench.parts`): the
resolved config minus settings that cannot change results, its ROI manifest / encoder by content hash. A part
is done when that identity equals the one now asked for and its ``summary.json`` / ``metrics.json`` (or
manifest) exists; with the same identity but no marker a pretraining folder resumes from its checkpoint. A part
whose identity differs (or that has none: made by an older mwm) is moved to ``OUT/stale/`` and run again, and
so is what depends on it: a rebuilt ROI manifest with new content changes the guided arms' pretraining identity,
a new encoder changes its tasks' identity. So a killed bench restarts where it stopped, adding a seed or an arm
runs only that, and a changed setting reruns exactly the parts it affects — a table never mixes configs.

The bench config is validated whole before anything runs (:func:`check_bench`): the PretrainConfig of every
arm and the task config of every task are built by the same functions the runner uses
(:func:`pretrain_config`, :func:`task_config`).
"""

from __future__ import annotations

import functools
import importlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Collection

from pydantic import BaseModel, ValidationError

from ..config import ConfigError, save_config
from ..errors import MWMError
from ..io import file_sha256
from .archive import Archive
from .config import BASELINE_ALIAS, ArmConfig, BenchConfig, ChoiceConfig, RoiSourceConfig, TaskConfig, run_dir
from .parts import (Part, PartStore, identity_hash, pretrain_identity, rois_identity, saliency_identity, same_settings,
                    task_identity)

__all__ = ["run_bench", "check_bench", "pretrain_config", "task_config", "TASKS", "run_dir"]

# kind → (module, config class, entry function, extra config fields)
TASKS: dict[str, tuple[str, str, str, dict]] = {
    "linear": ("mwm.transfer.classify", "FinetuneConfig", "finetune", {"mode": "linear"}),
    "full": ("mwm.transfer.classify", "FinetuneConfig", "finetune", {"mode": "full"}),
    "segment": ("mwm.transfer.segment", "SegmentConfig", "segment", {}),
    "detect": ("mwm.transfer.detect", "DetectConfig", "detect", {}),
}


# -- configs of the parts (one place, used by validation and by the runner) ----------------------------------

def _guided(arm: ArmConfig, cfg: BenchConfig | None = None) -> bool:
    """The arm pretrains on an ROI manifest: a guided strategy, or a map target (``model.target``: the manifest's
    maps are what it reconstructs)."""
    from ..masking import NEEDS_ROI

    return arm.pretrain and (arm.strategy in NEEDS_ROI or cfg is not None and cfg.map_target(arm))


def roi_sources(cfg: BenchConfig) -> dict[str, tuple[RoiSourceConfig, Path] | None]:
    """Arm name → (its ROI source, the manifest path it pretrains on); None for arms that use no ROIs."""
    out: dict[str, tuple[RoiSourceConfig, Path] | None] = {}
    for arm in cfg.arms:
        src = cfg.rois_for(arm)
        if not _guided(arm, cfg):
            out[arm.name] = None
        elif src.source == "manifest":
            out[arm.name] = (src, Path(src.path))
        elif src.source == "reconstruction-error" and not (Path(src.run) / "checkpoints" / "last.pt").is_file():
            raise MWMError(f"rois.run {src.run}: no checkpoints/last.pt; reconstruction-error needs a finished "
                           "`mwm pretrain` run folder (a few epochs of random masking on the same data)")
        elif src.source in ("generic-prompt", "meijering"):
            # one folder per identity (VLM content, prompt, options; filter scales): never overwritten
            h = identity_hash(rois_identity(cfg.data, src, cfg.size))[:12]
            out[arm.name] = (src, cfg.out_dir / "rois" / h / "rois.jsonl")
        else:
            out[arm.name] = (src, cfg.out_dir / ("rois.jsonl" if arm.rois is None else f"rois-{arm.name}.jsonl"))
    return out


def budget_epochs(images: int, n: int) -> int:
    """Epochs that show about ``images`` images from a set of ``n``: ``max(1, round(images / n))``."""
    return max(1, round(images / max(n, 1)))


def pretrain_count(data: Path, opts: dict) -> int:
    """How many images a pretraining run with these options reads: its split (``split``, default train when the
    data has one) after ``limit``. Raises :class:`mwm.errors.DataError` for data that cannot be opened."""
    return _count(str(data), opts.get("split"), opts.get("limit"), json.dumps(opts.get("read") or {}, sort_keys=True))


@functools.lru_cache(maxsize=16)
def _count(data: str, split: str | None, limit: int | None, read: str) -> int:
    from ..data import ReadOptions, open_source, pick_split

    src = open_source(data, ReadOptions.model_validate(json.loads(read)))
    split = pick_split(src, split)
    n = len(src.indices(None if split == "all" else split))
    return n if limit is None else min(n, limit)


def pretrain_config(cfg: BenchConfig, arm: ArmConfig, seed: int, rois: Path | None, resume: bool = False):
    """The PretrainConfig of ``arm`` × ``seed``: the bench's ``pretrain`` options, then the arm's ``options``
    and ``masking``, the arm's method and model options (:meth:`BenchConfig.arm_model`), and the bench's data /
    seed / device. Raises pydantic's ValidationError."""
    from ..train import PretrainConfig

    opts = {**cfg.pretrain, **arm.options}
    opts.pop("model", None)
    if cfg.pretrain_images is not None:
        opts["epochs"] = budget_epochs(cfg.pretrain_images, pretrain_count(cfg.data, opts))
    model = cfg.arm_model(arm)  # the arm's method and its options (an arm without `method:` is SparK, as before)
    guided = _guided(arm, cfg)
    return PretrainConfig.model_validate({
        **opts, "data": cfg.data, "out": run_dir(cfg, arm.name, seed) / "pretrain", "seed": seed, "model": model,
        "masking": arm.masking, "rois": rois if guided else None,
        "allow_missing_rois": guided or opts.get("allow_missing_rois", False), "resume": resume,
        **({"accelerator": cfg.device} if cfg.device != "auto" and "accelerator" not in opts else {})})


def task_config(cfg: BenchConfig, task: TaskConfig, seed: int, weights: str, out: Path,
                arch: str | None = None) -> BaseModel:
    """The config of ``task`` (FinetuneConfig / SegmentConfig / DetectConfig) for one arm's ``weights`` and
    ``seed``, written to ``out``; ``arch``: the arm's encoder (:meth:`BenchConfig.arch_of`; default the bench's).
    Raises pydantic's ValidationError."""
    module, cls_name, _, extra = TASKS[task.kind]
    cls = getattr(importlib.import_module(module), cls_name)
    return cls.model_validate({
        "size": cfg.size, **task.options, **extra, "data": cfg.data, "out": out, "weights": weights,
        "arch": arch or cfg.arch, "seed": seed, **({"device": cfg.device} if cfg.device != "auto" else {})})


def _weights(cfg: BenchConfig, arm: ArmConfig, seed: int) -> str:
    return str(run_dir(cfg, arm.name, seed) / "pretrain" / "encoder.pth") if arm.pretrain else "none"


def _pretrain_key(cfg: BenchConfig, arm: ArmConfig, loc: tuple) -> str:
    """Where in the bench file a PretrainConfig error's field comes from."""
    key = ".".join(str(p) for p in loc)
    top = loc[0] if loc else None
    if top == "masking":
        return f"arms[{arm.name}].masking" + key[len("masking"):]
    if top == "model" and len(loc) > 1 and (loc[1] in arm.model or loc[1] == "method" and arm.method is not None):
        return f"arms[{arm.name}].{'method' if loc[1] == 'method' else 'model' + key[len('model'):]}"
    if top in arm.options:
        return f"arms[{arm.name}].options.{key}"
    if top in cfg.pretrain:
        return f"pretrain.{key}"
    if top == "model":
        return f"arch/size ({key})"
    return key or f"arms[{arm.name}] (masking + options)"


def _errors(e: ValidationError, where: Callable[[tuple], str]) -> list[str]:
    return [f"{where(tuple(err['loc']))}: {err['msg']}" for err in e.errors()]


def check_bench(cfg: BenchConfig) -> None:
    """Build every arm's PretrainConfig and every task's config before anything runs; every invalid one is
    reported in one :class:`ConfigError` naming the arm or task and the key."""
    seed = cfg.seeds[0]  # seeds are validated by BenchConfig; no other setting depends on the seed
    rois = roi_sources(cfg)
    lines: list[str] = []
    for arm in cfg.arms:
        if arm.pretrain:
            try:
                pretrain_config(cfg, arm, seed, None if rois[arm.name] is None else rois[arm.name][1])
            except ValidationError as e:
                # the bench's shared `pretrain:` block is named once, not once per arm
                lines += [m if m.startswith("pretrain.") else f"arm '{arm.name}': {m}"
                          for m in _errors(e, lambda loc: _pretrain_key(cfg, arm, loc))]
    for task in cfg.tasks:
        for arm in cfg.arms:
            if not task.runs_on(arm.name, chosen=_any_choice(cfg, arm.name)):
                continue
            try:
                task_config(cfg, task, seed, _weights(cfg, arm, seed), run_dir(cfg, arm.name, seed) / task.label,
                            cfg.arch_of(arm))
            except ValidationError as e:
                def where(loc: tuple, task: TaskConfig = task) -> str:
                    key = ".".join(str(p) for p in loc)
                    return f"options.{key}" if loc and loc[0] in task.options else (key or "options")
                lines += [f"task '{task.label}': {m}" for m in _errors(e, where)]
    if lines:
        lines = list(dict.fromkeys(lines))  # one line per problem, not per arm it concerns
        raise ConfigError(f"invalid bench config '{cfg.name}' (nothing ran):\n" + "\n".join(f"  {s}" for s in lines))


# -- the parts ---------------------------------------------------------------------------------------------

def _prepare_rois(cfg: BenchConfig, src: RoiSourceConfig, path: Path, store: PartStore, build: bool) -> Path | None:
    """The manifest for one ROI source: ``rois.path`` as given, or gt-boxes (perturbed or not) / foreground boxes
    (+ fallback) written to ``path`` unless a current one is there. ``build=False`` (tables only): None when it
    is not current, or missing and costly to make (a gt-boxes / foreground manifest is made: seconds, and the
    same bytes every time)."""
    if src.source == "manifest":
        if not path.is_file():
            if not build:
                return None
            raise MWMError(f"rois.path {path}: no such manifest; run `mwm localize` first")
        return path
    if src.source == "generic-prompt":
        return _prepare_prompt_rois(cfg, src, path, store, build)
    if src.source == "meijering":
        return _prepare_meijering(cfg, src, path, store, build)
    from ..localize.gt_rois import write_gt_rois

    if src.fallback is not None and not Path(src.fallback).is_file():
        raise MWMError(f"rois.fallback {src.fallback}: no such manifest; run `mwm localize` first")
    # config=src: a record made before an option existed (perturb, seed, kind) is kept while it holds its default
    part = Part(f"ROI manifest {path.name}", path, path, rois_identity(cfg.data, src),
                extra=[path.with_name(path.stem + ".meta.json")], config=src)
    state = store.check(part, retire=build)
    if state == "done":
        return path
    # tables only: a missing manifest of a cheap, deterministic source is made (it identifies the guided arms' parts,
    # e.g. in an archive-only bench); anything else is not
    if not build and not (state == "missing" and src.source in ("gt-boxes", "foreground")):
        return None
    recon = None
    if src.source == "reconstruction-error":
        recon = {"run": src.run, "masks": src.masks, "ratio": src.ratio, "level": src.level,
                 "binarize": src.binarize, "quantile": src.quantile, "components": src.components,
                 "device": _device(cfg.device)}
    write_gt_rois(cfg.data, path, expand=src.expand, box_mode=src.box_mode, fallback=src.fallback,
                  source=src.source, perturb=src.perturb, seed=src.seed, kind=src.kind, split=src.split,
                  recon=recon)
    store.write_record(part)
    return path


def _device(spec: str) -> str:
    if spec != "auto":
        return spec
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _folder_rois(cfg: BenchConfig, src: RoiSourceConfig, path: Path, store: PartStore, build: bool, label: str,
                 make: Callable[[Path], dict], in_tables: bool = False) -> Path | None:
    """An ROI source made into ``path``'s folder (named by the identity hash, so other settings get their own
    folder) by ``make(folder)``, whose returned dict becomes ``summary.json``, the part's finish marker.
    ``in_tables``: tables-only makes it too when missing (cheap, deterministic sources that identify parts)."""
    from ..io import atomic_write_text

    folder = path.parent
    part = Part(label, folder, folder / "summary.json", rois_identity(cfg.data, src, cfg.size), config=src)
    state = store.check(part, retire=build)
    if state == "done":
        return path
    if not build and not (in_tables and state == "missing"):
        return None
    store.write_record(part)
    atomic_write_text(folder / "summary.json", json.dumps(make(folder), indent=1, default=str))
    return path


def _prepare_prompt_rois(cfg: BenchConfig, src: RoiSourceConfig, path: Path, store: PartStore,
                         build: bool) -> Path | None:
    """generic-prompt: ``mwm localize`` with ``src.vlm`` and ``src.prompt``. A killed run resumes (localize skips
    the images already in its manifest)."""
    from ..localize.pipeline import localize

    def make(folder: Path) -> dict:
        lc = src.localize_config(cfg.data, folder)
        if cfg.device != "auto" and "device" not in src.options:
            lc = lc.model_copy(update={"device": cfg.device})
        store.log(f"localize with {src.prompt!r} ({src.vlm}) into {folder}")
        return localize(lc, log=store.log)

    return _folder_rois(cfg, src, path, store, build, f"ROI manifest {path.parent.name} (generic prompt "
                        f"{src.prompt!r})", make)


def _prepare_meijering(cfg: BenchConfig, src: RoiSourceConfig, path: Path, store: PartStore,
                       build: bool) -> Path | None:
    """meijering: M&M ridge maps of the pretraining images at the bench's size (``mwm importance meijering``).
    Deterministic and about a minute for 2,000 images, so tables-only makes them too (they identify the arms'
    parts)."""
    from ..importance.meijering import write_meijering_manifest

    def make(folder: Path) -> dict:
        store.log(f"Meijering maps (sigmas {src.sigmas}) into {folder}")
        return write_meijering_manifest(cfg.data, folder, sigmas=src.sigmas, black_ridges=src.black_ridges,
                                        split=src.split, size=cfg.size, resize=cfg.pretrain.get("resize", "pad"),
                                        read=cfg.pretrain.get("read"), overwrite=True)

    return _folder_rois(cfg, src, path, store, build, f"Meijering maps {path.parent.name}", make, in_tables=True)


def _arm_rois(cfg: BenchConfig, store: PartStore | None = None, build: bool = True) -> dict[str, Path | None]:
    """Arm name → its ROI manifest (prepared once per path; only guided arms get one)."""
    store = store or PartStore(cfg.out_dir, print)
    ready: dict[Path, Path | None] = {}
    out: dict[str, Path | None] = {}
    for name, sp in roi_sources(cfg).items():
        if sp is not None and sp[1] not in ready:
            ready[sp[1]] = _prepare_rois(cfg, sp[0], sp[1], store, build)
        out[name] = None if sp is None else ready[sp[1]]
    return out


def roi_quality(cfg: BenchConfig, manifest: Path) -> dict:
    """Mean occlusion precision / recall of a manifest's ROIs on the images with a non-empty mask (the x-axis of
    the benefit-vs-ROI-quality curve); {} when the data have no masks or the manifest no boxes. The manifest covers
    the pretraining images only, so the masks of val / test images are expected to have no ROI: no warning."""
    from ..errors import DataError
    from ..localize.metrics import evaluate_manifest
    from ..rois.manifest import read_manifest

    records = read_manifest(manifest)
    if not any(r["boxes"] for r in records):  # importance maps (Meijering, MedIM): no boxes to score
        return {}
    try:
        s = evaluate_manifest(records, cfg.data, warn_missing=False).summary
    except DataError:
        return {}
    return {"roi_precision": s.get("precision"), "roi_recall": s.get("recall")}


class _Hashes:
    """Content hashes of inputs, once per path and run (a manifest or an encoder read by many parts)."""

    def __init__(self):
        self._cache: dict[Any, str] = {}

    def __call__(self, path: Path) -> str:
        if path not in self._cache:
            self._cache[path] = file_sha256(path)
        return self._cache[path]

    def tensors(self, path: Path) -> str:
        """An encoder by its tensors (names, dtypes, shapes, values), not its file: ``torch.save`` writes a fresh
        serialization id into every file, so a fixed-seed rerun's identical encoder has other file bytes."""
        key = ("tensors", path)
        if key not in self._cache:
            import torch

            from ..weights import tensors_sha256

            sd = torch.load(path, map_location="cpu", weights_only=True)
            ok = isinstance(sd, dict) and all(isinstance(v, torch.Tensor) for v in sd.values())
            self._cache[key] = tensors_sha256(sd) if ok else file_sha256(path)
        return self._cache[key]


def _pretrain_part(cfg: BenchConfig, arm: ArmConfig, seed: int, rois: Path, sha: _Hashes) -> Part:
    """The pretraining part of ``arm`` × ``seed`` (its run folder, marker and identity)."""
    from ..masking import NEEDS_SALIENCY

    pc = pretrain_config(cfg, arm, seed, rois)
    out = Path(pc.out)
    reads_maps = arm.strategy in NEEDS_SALIENCY or cfg.map_target(arm)
    maps = saliency_identity(Path(pc.rois)) if pc.rois is not None and reads_maps else None
    return Part(f"pretrain {arm.name} seed {seed}", out, out / "summary.json",
                pretrain_identity(pc, None if pc.rois is None else sha(Path(pc.rois)), maps), config=pc)


def _pretrain(cfg: BenchConfig, arm: ArmConfig, seed: int, rois: Path | None, store: PartStore, sha: _Hashes,
              log: Callable, build: bool, quiet: bool = False) -> tuple[dict | None, Part | None]:
    """(the arm's finished pretraining summary — running or resuming it when ``build`` — else None; its part)."""
    from .. import train

    if _guided(arm, cfg) and rois is None:
        return None, None  # tables only, and the ROI manifest is missing or not current
    part = _pretrain_part(cfg, arm, seed, rois, sha)
    pc, out = part.config, part.path
    state = store.check(part, retire=build, quiet=quiet)
    if state == "done":
        return json.loads(part.marker.read_text()), part
    if not build:
        return None, part
    resume = state == "partial" and (out / "checkpoints" / "last.pt").is_file()
    store.write_record(part)
    how = pc.model.method + (f", {pc.masking.strategy}" if cfg.strategy_of(arm) else "")
    log(f"pretrain {arm.name} seed {seed} ({how}, {pc.epochs} epochs{', resuming' if resume else ''})")
    return train.pretrain(pc.model_copy(update={"resume": resume})), part


def _task_part(cfg: BenchConfig, task: TaskConfig, arm: str, weights: str, encoder_sha: str | None, seed: int,
               out: Path, arch: str | None = None) -> Part:
    """The part of ``task`` on one arm × seed's encoder (``encoder_sha``; None: random init)."""
    tc = task_config(cfg, task, seed, weights, out, arch)
    return Part(f"{task.label} on {arm} seed {seed}", out, out / "metrics.json",
                task_identity(task.kind, tc, encoder_sha), config=tc)


def _task(part: Part, kind: str, store: PartStore, log: Callable, build: bool, quiet: bool = False) -> dict | None:
    """The task's finished metrics (running it when ``build``), else None."""
    state = store.check(part, retire=build, quiet=quiet)
    if state == "done":
        return json.loads(part.marker.read_text())
    if not build:
        return None
    store.write_record(part)
    module, _, fn_name, _ = TASKS[kind]
    log(part.label)
    return getattr(importlib.import_module(module), fn_name)(part.config)


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


def _archived_rows(cfg: BenchConfig, arm: ArmConfig, seed: int, rois: Path | None, sha: _Hashes, archive: Archive,
                   quality: dict | None, chosen: dict[str, str]) -> list[dict] | None:
    """Every row of one arm × seed from the archive, or None when any of its parts is not archived under the
    identity asked for now (then it runs, or is read from OUT, as usual)."""
    from .tables import result_row

    summary: dict[str, Any] = {}
    ratios: dict = {}
    encoder_sha = None
    if arm.pretrain:
        if _guided(arm, cfg) and rois is None:
            return None
        rec = archive.get(_pretrain_part(cfg, arm, seed, rois, sha), arm.name, seed, "pretrain")
        if rec is None:
            return None
        summary, ratios, encoder_sha = rec["summary"], rec["mask_ratios"], rec["encoder_sha256"]
    rows = []
    for task in cfg.tasks:
        if not task.runs_on(arm.name, seed, chosen):
            continue
        part = _task_part(cfg, task, arm.name, _weights(cfg, arm, seed), encoder_sha, seed,
                          run_dir(cfg, arm.name, seed) / task.label, cfg.arch_of(arm))
        rec = archive.get(part, arm.name, seed, task.label)
        if rec is None:
            return None
        rows.append(result_row(arm, seed, task, rec["metrics"], summary, ratios, rec["metrics"].get("seconds", 0.0),
                               quality or {}, method=cfg.method_of(arm), strategy=cfg.strategy_of(arm)))
    return rows


def _arm_rows(cfg: BenchConfig, arm: ArmConfig, seed: int, rois: Path | None, store: PartStore, sha: _Hashes,
              log: Callable, build: bool, quiet: bool = False, quality: dict | None = None,
              archive: Archive | None = None, chosen: dict[str, str] | None = None) -> list[dict]:
    """Pretrain one arm × seed (if it pretrains), run its tasks; one result row per finished task. With an
    ``archive``: an arm × seed archived whole is read from it; finished parts are archived. ``chosen``: the
    choices made so far (:func:`chosen_arms`), for tasks that run on a chosen arm."""
    from .tables import result_row

    chosen = chosen or {}
    if archive is not None:
        rows = _archived_rows(cfg, arm, seed, rois, sha, archive, quality, chosen)
        if rows is not None:
            return rows
    base = run_dir(cfg, arm.name, seed)
    summary: dict[str, Any] = {}
    ratios: dict = {}
    weights, encoder_sha = "none", None
    if arm.pretrain:
        summary, part = _pretrain(cfg, arm, seed, rois, store, sha, log, build, quiet)
        if summary is None:
            return []
        weights = _weights(cfg, arm, seed)
        if not Path(weights).is_file():
            raise MWMError(f"{weights} is missing although {base / 'pretrain' / 'summary.json'} says the run "
                           f"finished; delete {base / 'pretrain'} to pretrain this arm again")
        encoder_sha = sha.tensors(Path(weights))
        ratios = _mask_ratios(base / "pretrain")
        if archive is not None:
            archive.put(part, arm.name, seed, "pretrain",
                        {"summary": summary, "mask_ratios": ratios, "encoder_sha256": encoder_sha})
    rows = []
    for task in cfg.tasks:
        if not task.runs_on(arm.name, seed, chosen):
            continue
        t0 = time.perf_counter()
        part = _task_part(cfg, task, arm.name, weights, encoder_sha, seed, base / task.label, cfg.arch_of(arm))
        metrics = None if archive is None else (archive.get(part, arm.name, seed, task.label) or {}).get("metrics")
        if metrics is None:
            metrics = _task(part, task.kind, store, log, build, quiet)
            if metrics is not None and archive is not None:
                archive.put(part, arm.name, seed, task.label, {"metrics": metrics})
        if metrics is not None:
            rows.append(result_row(arm, seed, task, metrics, summary, ratios, time.perf_counter() - t0,
                                   quality or {}, method=cfg.method_of(arm), strategy=cfg.strategy_of(arm)))
    return rows


def _any_choice(cfg: BenchConfig, arm: str) -> dict[str, str]:
    """Every choice ``arm`` could be (to validate the tasks it may run)."""
    fixed = {} if cfg.baseline_from else {BASELINE_ALIAS: cfg.baseline_arm}
    return {**fixed, **{c.name: arm for c in cfg.choices if arm in c.among}}


def chosen_arms(cfg: BenchConfig, rows: list[dict]) -> dict[str, str]:
    """Choice name → arm for every choice made (the fixed baseline counts as made)."""
    from .tables import choice_made

    made = {} if cfg.baseline_from or cfg.baseline_arm is None else {BASELINE_ALIAS: cfg.baseline_arm}
    for c in cfg.choices:
        arm = choice_made(cfg, c, rows)
        if arm is not None:
            made[c.name] = arm
    return made


def choice_runs(cfg: BenchConfig, choice: ChoiceConfig, arm_name: str) -> list[tuple[int, ArmConfig]]:
    """``(seed, arm)`` to run once ``choice`` picked ``arm_name``: its own seeds when a task runs on the choice
    (those tasks could not run before it was made), then the choice's extra seeds."""
    arm = next(a for a in cfg.arms if a.name == arm_name)
    own = cfg.seeds_of(arm) if any(choice.name in (t.arms or []) for t in cfg.tasks) else []
    return [(s, arm) for s in own] + [(s, arm) for s in choice.seeds if s not in cfg.seeds_of(arm)]


def extra_seed_runs(cfg: BenchConfig, rows: list[dict]) -> list[tuple[int, ArmConfig]]:
    """The extra seeds of every choice made so far (the baseline's ``baseline_seeds``, each ``choose:`` entry's
    ``seeds``)."""
    made = chosen_arms(cfg, rows)
    return [(s, arm) for c in cfg.choices if c.name in made for s, arm in choice_runs(cfg, c, made[c.name])
            if s not in cfg.seeds_of(arm)]


def run_order(cfg: BenchConfig) -> list[tuple[int, ArmConfig]]:
    """Every (seed, arm) of the bench in the order they run: phase by phase, and within a phase seed by seed, so a
    stopped bench has whole seeds of its main arms."""
    phases = sorted({a.phase for a in cfg.arms})
    return [(seed, arm) for p in phases for seed in cfg.all_seeds for arm in cfg.arms
            if arm.phase == p and seed in cfg.seeds_of(arm)]


def progress_note(cfg: BenchConfig, rows: list[dict], chosen: dict[str, str]) -> str:
    """One line on what the bench still lacks: results done of those expected now (every arm × seed × task of
    the run order, plus the extra seeds of the choices made), the arm × seeds with a result missing (the next
    ones in run order), and the choices still waiting for their candidates."""
    have = {(r["arm"], r["seed"], r["task"]) for r in rows}
    runs = run_order(cfg) + [x for c in cfg.choices if c.name in chosen for x in choice_runs(cfg, c, chosen[c.name])]
    want = {(a.name, s, t.label) for s, a in runs for t in cfg.tasks if t.runs_on(a.name, s, chosen)}
    missing = {(a, s) for a, s, _ in want - have}
    todo = list(dict.fromkeys((a.name, s) for s, a in runs if (a.name, s) in missing))
    waiting = [c.name for c in cfg.choices if c.name not in chosen]
    note = f"{len(want & have)} of {len(want)} results done"
    if todo:  # in run order: the next ones first
        note += f"; {len(todo)} arm x seed(s) to run, next " + ", ".join(f"{a} seed {s}" for a, s in todo[:3])
        note += _time_left(cfg, rows, todo)
    if waiting:
        note += f"; choices waiting for their candidates: {waiting}"
    return note


def _time_left(cfg: BenchConfig, rows: list[dict], todo: list[tuple[str, int]]) -> str:
    """The progress note's estimate: the arm x seeds still to pretrain (no result row yet) times the mean
    pretraining time of the finished ones ("" before any has finished). The finished runs' seconds were measured
    under the bench's own sharing of the machine, so the estimate is machine time that the shards split."""
    pretrains = {a.name for a in cfg.arms if a.pretrain}
    started = {(r["arm"], r["seed"]) for r in rows}
    seconds = {(r["arm"], r["seed"]): r["pretrain_seconds"] for r in rows if r.get("pretrain_seconds")}
    left = [x for x in todo if x[0] in pretrains and x not in started]
    if not left or not seconds:
        return ""
    per = sum(seconds.values()) / len(seconds)
    return (f"; ≈ {_duration(len(left) * per)} of pretraining left ({len(left)} runs × {_duration(per)}, the mean "
            f"so far; shards split it)")


def _duration(seconds: float) -> str:
    """e.g. "1.5 h", "15 min", "40 s"."""
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _check_phases(cfg: BenchConfig, phases: Collection[int] | None) -> None:
    """``--phases`` must name phases that some arm has."""
    have = sorted({a.phase for a in cfg.arms})
    unknown = sorted(set(phases or ()) - set(have))
    if unknown:
        raise ConfigError(f"--phases {','.join(map(str, unknown))}: no arm of bench {cfg.name!r} has "
                          f"{'that phase' if len(unknown) == 1 else 'those phases'}; its arms' phases are {have}")


def _check_shards(cfg: BenchConfig, shard: tuple[int, int]) -> None:
    """Shards of one bench share ``OUT`` (each holds its own lock); an unsharded bench does not run beside
    shards, and every shard must run the same bench config (a different one would retire the others' parts)."""
    import yaml

    from ..config import dump_config
    from ..io import describe_holder, live_locks, shard_lock_name

    out = cfg.out_dir
    for p, info in live_locks(out, shard_lock_name(shard)):
        if p.name.endswith(("-rois", "-config")):  # the shards' shared step locks, not a bench run
            continue
        sharded_peer = "-shard-" in p.name
        if (shard[1] > 1) != sharded_peer:
            raise MWMError(f"{out} is in use by a {'sharded' if sharded_peer else 'whole'} bench run: "
                           f"{describe_holder(info)}; run every part of one bench the same way (all with --shard "
                           f"i/n, or one run without), or wait for it. If that process is gone, delete {p}")
        saved = out / "config.yaml"
        # options added to mwm since that shard started count as equal while they are at their default
        if saved.is_file() and not same_settings(yaml.safe_load(saved.read_text()), yaml.safe_load(dump_config(cfg)),
                                                 cfg):
            raise MWMError(f"{out}: another shard ({describe_holder(info)}) runs this bench with another config "
                           f"({saved}); start every shard from the same bench file and options")


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print, only_tables: bool = False,
              shard: tuple[int, int] = (0, 1), phases: Collection[int] | None = None) -> list[dict]:
    """Run (or resume) everything and write the tables and plots; returns the result rows.

    ``only_tables``: run nothing, move nothing; tabulate the parts that are done under the current config.
    ``shard`` ``(i, n)``: run every n-th (seed, arm) of :func:`run_order` starting at i, so n processes (one
    core or GPU each) share one bench folder; each writes the tables of every part done so far, so the last
    one to finish leaves the complete tables. ``phases``: build only the arms of these phases (a choice's extra
    seeds count in its arm's phase), e.g. ``{0}`` to give every dataset's main arms their seeds before any
    secondary arm; the tables still show every finished part. Raises :class:`ConfigError` (before creating
    anything) when an arm's or task's config is invalid, and :class:`MWMError` when another bench holds ``OUT``.
    """
    from ..io import lock_folder, shard_lock_name
    from .plots import bench_plots
    from .tables import write_tables

    check_bench(cfg)
    _check_phases(cfg, phases)
    out = cfg.out_dir
    i, n = shard
    with lock_folder(out, name=shard_lock_name(shard), what="bench run"):
        # one shard at a time compares its config with the saved one and saves it: shards started together would
        # otherwise find their peer's lock before its config.yaml and refuse a config that is theirs
        with lock_folder(out, name=".mwm.lock-config", what="bench config check", wait_s=120):
            _check_shards(cfg, shard)
            save_config(cfg, out / "config.yaml")
        store, sha = PartStore(out, log), _Hashes()
        archive = Archive(cfg.archive) if cfg.archive is not None else None
        # shards build the shared ROI manifests one at a time (the second finds them done)
        with lock_folder(out, name=".mwm.lock-rois", what="bench ROI preparation", wait_s=6 * 3600):
            rois = _arm_rois(cfg, store, build=not only_tables)
        quality = {p: roi_quality(cfg, p) for p in set(rois.values()) if p is not None and p.is_file()}
        def build(order: list[tuple[int, ArmConfig]]) -> None:
            for k, (seed, arm) in enumerate(order):
                if k % n == i:
                    _arm_rows(cfg, arm, seed, rois[arm.name], store, sha, log, build=True, archive=archive,
                              chosen=chosen)

        def tabulate(order: list[tuple[int, ArmConfig]], quiet: bool = False) -> list[dict]:
            # after building: other shards finish parts while this one runs, and the last shard to finish must
            # see them all (another shard's part is only read, and not reported on)
            return [r for k, (seed, arm) in enumerate(order)
                    for r in _arm_rows(cfg, arm, seed, rois[arm.name], store, sha, log, build=False,
                                       quiet=quiet or k % n != i, quality=quality.get(rois[arm.name]),
                                       archive=archive, chosen=chosen)]

        order = run_order(cfg)
        candidates = [x for x in order if any(x[1].name in c.among for c in cfg.choices)]
        chosen: dict[str, str] = {}  # read by build / tabulate
        chosen = chosen_arms(cfg, tabulate(candidates, True))
        wanted = {a.phase for a in cfg.arms} if phases is None else set(phases)
        pending = list(cfg.choices)  # each choice's runs are built once, as soon as it is made
        for phase in ([] if only_tables else [*sorted({a.phase for a in cfg.arms}), None]):
            if phase is not None and phase in wanted:
                build([x for x in order if x[1].phase == phase])
            if pending:
                chosen = chosen_arms(cfg, tabulate(candidates, True))
            for c in [c for c in pending if c.name in chosen]:
                pending.remove(c)
                extra = [x for x in choice_runs(cfg, c, chosen[c.name]) if x[1].phase in wanted]
                added = [s for s, arm in extra if s not in cfg.seeds_of(arm)]
                if added:
                    log(f"{c.name} {chosen[c.name]} (best of {c.among} on val): seeds {added} added")
                build(extra)
        rows = tabulate(order)
        waiting = [c.name for c in cfg.choices if c.seeds and c.name not in chosen]
        if waiting and not only_tables:
            log(f"the extra seeds of {waiting} wait until every candidate has its seeds; run the bench again then")
        rows += tabulate(extra_seed_runs(cfg, rows))
        log(progress_note(cfg, rows, chosen_arms(cfg, rows)))
        write_tables(cfg, rows)
        if archive is not None:
            archive.copy_tables(out)
        bench_plots(cfg, rows, out / "plots")
    return rows
