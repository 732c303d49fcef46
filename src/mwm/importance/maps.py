"""Per-pixel importance maps → a saliency-map manifest, the form `mwm pretrain --masking saliency_topk|saliency_soft`
(and ``saliency_topk_diverse``) masks by.

Importance sources that are computed once per image with a frozen model or a fixed filter (MedIM's report attention,
M&M's Meijering response) write what ``mwm localize --save-saliency`` writes, so pretraining reads them with no new
code: ``OUT/rois.jsonl`` (one record per image: ``image``, ``width``, ``height`` of the scan as read, ``boxes: []``,
``prompt``, ``status``, and ``saliency: "saliency/<name>.png"`` when the image has a map), ``OUT/saliency/*.png``
(8-bit gray, 0–255 = importance 0–1, named by localize's own helper) and ``OUT/meta.json``, whose ``config.resize``
tells pretraining how the maps were fitted to the scans (:func:`mwm.train.data._localize_resize`) and whose
``settings`` are what a rerun must match.

The output folder is the cache: a rerun with the same settings finds the finished manifest and does no work (an
iterator of map batches is not consumed); other settings are refused unless ``overwrite``, which first deletes what
an earlier run wrote. The folder is locked while writing (:func:`mwm.io.lock_folder`); every file is written
atomically and the manifest last, so an interrupted run leaves no manifest (it is redone from the start).
"""

from __future__ import annotations

import json
import platform
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import MWMError
from ..io import atomic_write_text, lock_folder

__all__ = ["MANIFEST", "META", "MAP_DIR", "write_map_manifest", "finished_manifest", "check_output", "clear_outputs",
           "read_settings"]

MANIFEST = "rois.jsonl"
META = "meta.json"
MAP_DIR = "saliency"
_WHAT = "importance-map run"


def _canonical(settings: dict) -> dict:
    """Settings as JSON gives them back (tuples → lists, Paths → str): a stored and a fresh dict compare equal."""
    return json.loads(json.dumps(settings, default=str, sort_keys=True))


def read_settings(out: str | Path) -> dict | None:
    """The ``settings`` of the run in ``out`` (its meta.json), or None when there is none."""
    meta = Path(out) / META
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text(encoding="utf-8")).get("settings")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise MWMError(f"{meta}: unreadable ({e}); delete the folder or pass --overwrite") from e


def finished_manifest(out: str | Path, settings: dict) -> Path | None:
    """``OUT/rois.jsonl`` when ``out`` holds a finished run made with exactly ``settings``, else None."""
    out = Path(out)
    stored = read_settings(out)
    if stored is not None and (out / MANIFEST).is_file() and stored == _canonical(settings):
        return out / MANIFEST
    return None


def _diff(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def check_output(out: str | Path, settings: dict, overwrite: bool = False) -> Path | None:
    """Call before slow work. Returns the manifest when ``out`` already holds this run (nothing to do); None when
    ``out`` is free (empty, absent, or holds another run and ``overwrite`` is set: that run is deleted when
    :func:`write_map_manifest` starts writing). Raises :class:`MWMError` naming the differing settings when ``out``
    holds a run with other settings and ``overwrite`` is not set, and when ``out`` is a file."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MWMError(f"--out {out} is a file; give a folder for the manifest and its maps")
    done = finished_manifest(out, settings)
    if done is not None:
        return done
    stored = read_settings(out)
    if stored is not None and stored != _canonical(settings) and not overwrite:
        changed = "; ".join(_diff(stored, _canonical(settings)))
        raise MWMError(f"{out} holds importance maps made with other settings ({changed}); "
                       "choose another --out, or pass --overwrite to replace them")
    return None


def clear_outputs(out: str | Path) -> None:
    """Delete what a map run wrote in ``out`` (manifest, meta.json, maps); other files are left alone."""
    out = Path(out)
    for name in (MANIFEST, META):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / MAP_DIR, ignore_errors=True)


def _batches(maps) -> Iterator[np.ndarray | torch.Tensor]:
    """An (N, H, W) array/tensor → itself as one batch; an iterable of batches → its batches."""
    if isinstance(maps, (np.ndarray, torch.Tensor)):
        yield maps
    else:
        yield from maps


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for p in ("torch", "open_clip_torch", "timm", "scikit-image"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    return out


def write_map_manifest(out: Path, ids: Sequence[str], sizes, maps: np.ndarray | torch.Tensor | Iterable,
                       settings: dict, resize: str, *, statuses: Sequence[str] | None = None,
                       prompts: Sequence[str] | str = "", notes: Sequence[str | None] | None = None,
                       overwrite: bool = False, meta: dict | None = None) -> Path:
    """Write per-image importance maps as a saliency-map manifest in ``out``; returns ``OUT/rois.jsonl``.

    Args:
        out: the output folder (created; locked while writing).
        ids: the images' ids, in order.
        sizes: (height, width) of each scan as read, (N, 2) (e.g. ``mwm.data.decode(...).orig_sizes``).
        maps: float (N, H, W) in [0, 1] (numpy or torch), or an iterable of such batches in ``ids`` order, each map
            drawn on the square the scan was fitted to by ``resize`` (or, when not square, over the whole scan). An
            iterable is consumed only when there is work to do, so the maps can be computed lazily.
        settings: what defines the maps (method, model, parameters, data); a rerun with equal settings returns the
            finished manifest at once, other settings are refused unless ``overwrite``.
        resize: ``pad``, ``stretch`` or ``crop``: how the scans were fitted to the maps' square (meta.json
            ``config.resize``, which pretraining reads to place the maps on its own crops).
        statuses: per image, ``ok`` or why it has no map (e.g. ``no_mesh_word``); its map entry is then ignored and
            no file is written. Default: ``ok``, except a map that is not finite anywhere (``nan_saliency``).
        prompts: the records' ``prompt`` (one string for all, or one per image): what the map answers.
        notes: optional per-image ``note``.
        overwrite: replace a run with other settings in ``out``.
        meta: extra keys for meta.json (e.g. the model's description).

    Raises:
        MWMError: ``out`` holds another run (without ``overwrite``), is locked by another job, or the maps do not
            match ``ids`` in number.
    """
    from .. import __version__
    from ..report.overlays import save_map_png

    out = Path(out)
    if resize not in ("pad", "stretch", "crop"):
        raise MWMError(f"resize {resize!r}: use pad, stretch or crop")
    ids = [str(i) for i in ids]
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    n = len(ids)
    if len(sizes) != n:
        raise MWMError(f"{len(sizes)} image sizes for {n} ids")
    if statuses is not None and len(statuses) != n:
        raise MWMError(f"{len(statuses)} statuses for {n} ids")
    prompt_of = [prompts] * n if isinstance(prompts, str) else [str(p) for p in prompts]
    if len(prompt_of) != n:
        raise MWMError(f"{len(prompt_of)} prompts for {n} ids")
    settings = _canonical(settings)
    if check_output(out, settings, overwrite) is not None:
        return out / MANIFEST
    with lock_folder(out, what=_WHAT):
        done = check_output(out, settings, overwrite)  # again under the lock: another run may have finished
        if done is not None:
            return done
        clear_outputs(out)
        info = {"settings": settings, "config": {**settings, "resize": resize}, "mwm": __version__, "n_images": n,
                "versions": _versions(), "python": platform.python_version(), **(meta or {})}
        atomic_write_text(out / META, json.dumps(info, indent=2, default=str))
        records: list[dict] = []
        k = 0
        for batch in _batches(maps):
            batch = torch.as_tensor(np.asarray(batch) if not isinstance(batch, torch.Tensor) else batch)
            if batch.ndim != 3:
                raise MWMError(f"importance maps must be (N, H, W), got a batch of shape {tuple(batch.shape)}")
            for m in batch.float().cpu():
                if k >= n:
                    raise MWMError(f"more importance maps than the {n} ids")
                h, w = (int(v) for v in sizes[k])
                st = statuses[k] if statuses is not None else "ok"
                if st == "ok" and not torch.isfinite(m).any():
                    st = "nan_saliency"
                rec = {"image": ids[k], "width": w, "height": h, "boxes": [], "prompt": prompt_of[k], "status": st}
                if st == "ok":
                    rec["saliency"] = save_map_png(out / MAP_DIR, ids[k], m)
                if notes is not None and notes[k]:
                    rec["note"] = notes[k]
                records.append(rec)
                k += 1
        if k != n:
            raise MWMError(f"{k} importance maps for {n} ids")
        atomic_write_text(out / MANIFEST, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
    return out / MANIFEST
