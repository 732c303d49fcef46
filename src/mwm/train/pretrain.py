"""Stage 2 entry point: ``pretrain(cfg)`` — (guided) masked image modeling on Lightning Fabric.

>>> from mwm.train import PretrainConfig, pretrain
>>> cfg = PretrainConfig(data="scans.npz", out="run/", model={"arch": "resnet18", "size": 64},
...                      masking={"strategy": "roi", "ratio_in": 0.8, "ratio_out": 0.2}, rois="rois/rois.jsonl")
>>> summary = pretrain(cfg)          # {"final_loss": …, "encoder": "run/encoder.pth", …}

Hardware is Fabric's: ``accelerator``/``devices``/``num_nodes``/``strategy``/``precision``. One process per
device; ``strategy="ddp"`` started from a plain command re-launches the command once per extra device (Fabric's
subprocess launcher), ``ddp_spawn`` spawns workers (the progress callback then stays silent: it cannot be sent
to them), and under ``torchrun`` (one or many nodes) Fabric reads the rank layout from the environment, e.g.

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-endpoint host:29500 -m mwm.cli pretrain DATA --devices 8 \\
        --num-nodes 2 --strategy ddp --out run/

(the run folder must be on storage every node sees: all ranks read the checkpoint when resuming).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError, MWMError
from .config import SPAWN_STRATEGIES, AugmentConfig, PretrainConfig

__all__ = ["PretrainConfig", "AugmentConfig", "pretrain", "make_fabric"]


def make_fabric(cfg: PretrainConfig):
    """A Lightning Fabric for the config's hardware options; a bad combination is an :class:`MWMError`."""
    from ..engine.runtime import make_fabric as fabric_for

    return fabric_for(cfg.accelerator, cfg.devices, cfg.num_nodes, cfg.strategy, cfg.precision)


def pretrain(cfg: PretrainConfig, progress=None, *, stop_at_epoch: int | None = None, hook=None) -> dict:
    """Pretrain and export the encoder; returns the summary (also written to OUT/summary.json).

    progress(kind, done, total, info): see :func:`mwm.train.loop.run` (rank 0 only).
    stop_at_epoch: end (after checkpointing) once this many epochs are done — a planned interruption for
    time-limited jobs; continue later with ``resume=True`` and the same config.
    hook(event, info): a picklable callable run on every rank (tests use it to inspect masks and weights).

    Writes OUT/config.yaml, OUT/checkpoints/last.pt, OUT/metrics.csv, OUT/tb/, OUT/recon/epoch_XXX.png,
    OUT/encoder.pth (timm state_dict), OUT/encoder_d2.pth (ResNets), OUT/encoder.json, OUT/summary.json.
    """
    from .loop import run

    if not Path(cfg.data).exists():
        raise DataError(f"{cfg.data}: no such file or folder")
    if cfg.rois is not None and not Path(cfg.rois).is_file():
        raise DataError(f"{cfg.rois}: no such manifest; give the rois.jsonl that `mwm localize --out DIR` wrote")
    fabric = make_fabric(cfg)
    if cfg.strategy in SPAWN_STRATEGIES:
        progress = None  # spawned workers receive pickled arguments; a UI callback does not survive that
    try:
        return fabric.launch(run, cfg, progress, stop_at_epoch, hook)
    except Exception as e:
        # a worker's MWMError arrives as ProcessRaisedException holding the remote traceback as text
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        if type(e).__name__ == "ProcessRaisedException" and lines and lines[-1].startswith("mwm."):
            raise MWMError(lines[-1].split(": ", 1)[-1]) from e
        raise
