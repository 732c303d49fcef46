"""Checkpoints that resume a run exactly: RUN/checkpoints/last.pt, written atomically by rank 0.

Contents (all plain tensors / Python containers, so ``torch.load(weights_only=True)`` reads it):
``format``, ``config`` (the resolved config as JSON-able dict), ``epoch`` (epochs completed), ``step`` (optimizer
steps done), ``world_size``, ``data`` (fingerprint of the ids), ``model``, ``optimizer``, ``scheduler``, ``ema``
(or None), ``precision`` (the GradScaler under 16-mixed), ``data_order`` (the sampler's (seed, epoch) and
generator state) and ``rng``: one dict per rank with the torch CPU, CUDA, numpy and Python RNG states and that
rank's mask generator.
"""

from __future__ import annotations

import errno
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from ..config import flatten
from ..errors import MWMError
from ..io import atomic_path
from .config import RESUME_MAY_CHANGE, PretrainConfig

__all__ = ["FORMAT", "checkpoint_path", "capture_rng", "restore_rng", "save_checkpoint", "load_checkpoint",
           "check_resumable", "save_or_explain", "clean_orphans"]

FORMAT = "mwm.pretrain/1"


def checkpoint_path(out: str | Path) -> Path:
    return Path(out) / "checkpoints" / "last.pt"


def capture_rng(mask_generator: torch.Generator | None = None) -> dict:
    """This process's RNG states as tensors and lists (numpy's key array → tensor; Python's state → lists)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "python": [int(py_version), list(py_internal), py_gauss],
        "mask": mask_generator.get_state() if mask_generator is not None else None,
    }
    return state


def restore_rng(state: dict, mask_generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if mask_generator is not None and state.get("mask") is not None:
        mask_generator.set_state(state["mask"])


def save_checkpoint(path: str | Path, state: dict, out: str | Path | None = None) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename: a kill never leaves half a checkpoint.
    A full disk is an :class:`MWMError` naming ``out`` (the run folder; default: the file's folder), see
    :func:`save_or_explain`."""
    path = Path(path)
    save_or_explain({"format": FORMAT, **state}, path, out)
    return path


def _is_disk_full(e: BaseException) -> bool:
    # torch's zip writer reports a short write as RuntimeError "... unexpected pos N vs M" or "file write failed"
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(e)
    return isinstance(e, RuntimeError) and ("unexpected pos" in text or "file write failed" in text)


def _free(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "? free"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            return f"{free:.0f} {unit} free" if unit == "B" else f"{free:.1f} {unit} free"
        free /= 1024
    return ""


def save_or_explain(obj, path: str | Path, out: str | Path | None = None) -> None:
    """``torch.save(obj)`` atomically to ``path``; a full disk (``ENOSPC``, or the RuntimeError torch's writer
    raises for a short write) becomes an :class:`MWMError` naming the folder, the free space and what to do.
    The temporary file is removed either way, so a full disk leaves the previous file intact."""
    path = Path(path)
    try:
        with atomic_path(path, suffix=path.suffix or ".pt") as tmp:
            torch.save(obj, tmp)
    except (OSError, RuntimeError) as e:
        if not _is_disk_full(e):
            raise
        where = Path(out) if out is not None else path.parent
        raise MWMError(f"the disk holding {where} is full ({_free(path.parent)}) while writing {path}; free some "
                       "space (or choose another --out) and continue with --resume from the last checkpoint") from e


def clean_orphans(out: str | Path) -> list[str]:
    """Remove the temporary checkpoint files (``checkpoints/.last.pt*.pt``, :func:`mwm.io.atomic_path`'s names)
    a killed run left behind; only call it while holding the run folder's lock. Returns the names removed."""
    folder = checkpoint_path(out).parent
    removed = []
    for f in sorted(folder.glob(".last.pt*.pt")) if folder.is_dir() else []:
        try:
            f.unlink()
            removed.append(f.name)
        except OSError:
            pass
    return removed


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise MWMError(f"{path}: no checkpoint to resume from; run without --resume to start this run, or point "
                       "--out at the run folder that holds checkpoints/last.pt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which and what to do
        raise MWMError(f"{path}: not a readable mwm checkpoint ({type(e).__name__}: {e}); delete it to start "
                       "over") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise MWMError(f"{path}: not an mwm pretraining checkpoint (format {ckpt.get('format') if isinstance(ckpt, dict) else '?'}, "
                       f"expected {FORMAT})")
    return ckpt


def check_resumable(saved: dict, cfg: PretrainConfig, path: Path) -> None:
    """Raise :class:`MWMError` naming every option that differs from the checkpoint's config in a way that would
    make the continuation a different run (anything outside :data:`RESUME_MAY_CHANGE`); warn when ``epochs``
    changed (the cosine schedule is recomputed for the new length)."""
    now = flatten(cfg.model_dump(mode="json"))
    before = flatten(saved)
    diff = sorted(k for k in set(now) | set(before)
                  if k.split(".")[0] not in RESUME_MAY_CHANGE and now.get(k) != before.get(k))
    if diff:
        lines = ", ".join(f"{k}: {before.get(k)!r} → {now.get(k)!r}" for k in diff[:8])
        raise MWMError(f"{path}: cannot resume with a different config ({lines}). Resume with the run's options "
                       "(they are in its config.yaml: --config RUN/config.yaml --resume), or start a new run "
                       "with another --out")
    if saved.get("epochs") != cfg.epochs:
        warnings.warn(f"resuming with epochs {cfg.epochs} instead of {saved.get('epochs')}: the cosine schedule is "
                      "recomputed for the new length from the current step", stacklevel=2)
