"""`PretrainMethod`: what a pretraining method is to the trainer (:class:`mwm.train.loop.Trainer`).

A method owns its model (and masking, momentum targets, …) and answers a few small hooks; the trainer owns the
run: folder, data, optimizer and schedule, Fabric, gradient accumulation and clipping, logging, checkpoints,
export. One micro-step is::

    views = method.views(batch)                 # (x, boxes, valid[, saliency]) from the loader → model inputs
    loss, logs = method.training_step(views)    # forward through method.net (Fabric-wrapped); logs: 0-d tensors
    fabric.backward(loss / accumulate)
    … after `accumulate` micro-steps: clip, optimizer.step(), scheduler.step(), then
    method.on_after_optimizer_step(step)        # EMA / momentum targets, per-step schedules of the method

The base class keeps the run's weight EMA (``--ema``: ``encoder()`` exports it), the input normalization and
the checkpoint entries ``model`` / ``ema``. A method without a keep-mask (contrastive, two views, a momentum
target) overrides ``views``/``training_step``/``on_after_optimizer_step``/``state_dict`` and leaves
``preview_set`` returning None (no reconstruction pictures).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from ...errors import MWMError

if TYPE_CHECKING:
    from ...weights import InitWeights
    from ..config import PretrainConfig
    from ..data import PretrainData

__all__ = ["PretrainMethod", "MethodContext", "input_stats"]


@dataclass
class MethodContext:
    """What the trainer hands a method when it places it on its device (:meth:`PretrainMethod.prepare`).

    device: this rank's device. generator: this rank's stream for the method's own draws (masks, views), seeded by
    (seed, rank) and checkpointed with the rank's RNG states. data: the decoded run data (ROIs, saliency maps).
    sync_bn: convert BatchNorm for multi-GPU training (several CUDA ranks with ``sync_bn``)."""

    device: torch.device
    generator: torch.Generator
    data: "PretrainData"
    sync_bn: bool = False


def _pretrained_cfg(model: nn.Module) -> dict:
    enc = getattr(model, "encoder", None)
    for m in (getattr(enc, "model", None), enc, model):
        cfg = getattr(m, "pretrained_cfg", None)
        if cfg:
            return cfg
    return {}


def input_stats(model: nn.Module, normalize: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) (1, 3, 1, 1) of the timm arch's pretrained config, or (0, 1) when not normalizing."""
    if not normalize:
        return torch.zeros(1, 3, 1, 1, device=device), torch.ones(1, 3, 1, 1, device=device)
    cfg = _pretrained_cfg(model)
    mean = cfg.get("mean", (0.485, 0.456, 0.406))
    std = cfg.get("std", (0.229, 0.224, 0.225))
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1))


class PretrainMethod:
    """A pretraining method: ``model`` (the trained ``nn.Module``: optimized, wrapped by Fabric, checkpointed) plus
    the hooks the trainer calls. Subclasses build the model in ``__init__(cfg)`` (the trainer seeds first) and
    implement :meth:`views` and :meth:`training_step`.

    Class attributes: ``schedule_defaults`` (warmup start, final lr ratio, weight-decay end used when the config
    leaves them unset; None: SparK's, see :func:`mwm.train.optim.resolve_schedule`)."""

    schedule_defaults: ClassVar[dict[str, float | None] | None] = None

    def __init__(self, cfg: "PretrainConfig", model: nn.Module):
        self.cfg = cfg
        self.model = model
        self.net: nn.Module = model  # forward through this: the trainer sets the Fabric-wrapped model (wrap)
        self.ema = None
        self.ctx: MethodContext | None = None
        self.mean = self.std = None

    # -- configuration -------------------------------------------------------------------------------------------
    @classmethod
    def check_config(cls, cfg: "PretrainConfig") -> None:
        """Raise ``ValueError`` when ``cfg`` cannot run with this method (called while validating PretrainConfig)."""

    def timm_kwargs(self) -> dict:
        """The ``timm.create_model`` kwargs the exported encoder needs (``--init`` weights are checked with them)."""
        from ..export import timm_kwargs

        return timm_kwargs(self.model)

    def apply_init(self, init: "InitWeights") -> dict:
        """Load ``--init`` weights into the encoder; returns summary.json's ``init`` record. Default: the model's
        ``encoder.model`` (a timm model) by name (:func:`mwm.train.init.apply_init`)."""
        from ..init import apply_init

        return apply_init(self.model, init)

    def prepare(self, ctx: MethodContext) -> None:
        """Move to ``ctx.device``, take the EMA copy (before sync-BN conversion: no process groups in it), convert
        BatchNorm for multi-GPU and resolve the input normalization."""
        self.ctx = ctx
        self.model = self.net = self.model.to(ctx.device)
        if self.cfg.ema is not None:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=self.cfg.ema)
        if ctx.sync_bn and hasattr(self.model, "convert_sync_batchnorm"):
            # the model's own conversion (SparK keeps BatchNorm masked); CUDA only (DDP refuses it on CPU modules)
            self.model.convert_sync_batchnorm()
        self.mean, self.std = input_stats(self.model, self.cfg.normalize, ctx.device)

    def wrap(self, net: nn.Module) -> None:
        """The trainer's Fabric-wrapped ``model``: forward passes go through it (DDP gradient sync, precision)."""
        self.net = net

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    # -- training ------------------------------------------------------------------------------------------------
    def views(self, batch: tuple[torch.Tensor, ...]) -> Any:
        """The model inputs of one loader batch ``(x in [0, 1] as augmented, boxes, valid[, saliency])``."""
        raise NotImplementedError

    def training_step(self, views: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, named logs): the loss to backpropagate and 0-d tensors to average over a logging interval (no
        ``.item()``: the trainer reads them back once per interval). ``loss`` itself is logged as ``loss``."""
        raise NotImplementedError

    def on_epoch_start(self, epoch: int) -> None:
        """Before epoch ``epoch`` (0-based, of ``cfg.epochs``; also the first epoch of a resume): per-epoch schedules
        of the method (HPM / AnatoMask: the hard-patch share and the teacher's EMA decay). Default: nothing."""

    def on_after_optimizer_step(self, step: int) -> None:
        """After each optimizer step (``step`` = optimizer steps done): the EMA of the weights."""
        if self.ema is not None:
            self.ema.update(self.model, step=step)

    def log_row(self, means: dict[str, float]) -> dict[str, Any]:
        """metrics.csv columns from an interval's averaged logs (:data:`mwm.train.metrics.COLUMNS`)."""
        return {"loss": means["loss"]}

    def hook_info(self, views: Any) -> dict:
        """What the tests' ``hook("step", info)`` sees of the first batch (MIM: the keep-mask)."""
        return {}

    # -- state ---------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Checkpoint entries identical on every rank (rank 0's are saved): the weights, the EMA."""
        return {"model": self.model.state_dict(), "ema": self.ema.module.state_dict() if self.ema is not None else None}

    def load_state_dict(self, state: dict[str, Any], source: str = "the checkpoint") -> None:
        """Restore :meth:`state_dict`'s entries (``state``: the checkpoint; other entries are ignored)."""
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            if state.get("ema") is None:
                raise MWMError(f"{source} has no EMA weights; resume without --ema")
            self.ema.module.load_state_dict(state["ema"])

    def rank_state_dict(self) -> dict[str, Any]:
        """This rank's own entries (e.g. a stateful masking strategy): saved as one list per key, by rank."""
        return {}

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`rank_state_dict`'s entries for this rank (keys an older checkpoint lacks are absent)."""

    # -- outputs -------------------------------------------------------------------------------------------------
    def encoder(self) -> nn.Module:
        """The module exported as encoder.pth: its ``encoder_state_dict()`` (else ``state_dict()``) in timm names."""
        return self.ema.module if self.ema is not None else self.model

    def export_extra(self) -> dict:
        """encoder.json fields besides arch and timm kwargs."""
        cfg = self.cfg
        return {"size": cfg.size, "method": cfg.model.method, "ema": cfg.ema is not None,
                "normalize": {"mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}
                if cfg.normalize else None}

    def summary_fields(self, rows: list[dict]) -> dict:
        """summary.json's method fields: ``masking``, ``mask_grid``, ``mask_ratios`` (None without a mask)."""
        return {"masking": None, "mask_grid": None, "mask_ratios": None}

    def preview_set(self, data: "PretrainData", k: int) -> Any | None:
        """A fixed batch of ``k`` images to picture every few epochs (rank 0), or None: no pictures."""
        return None

    def reconstruct(self, previews: Any) -> np.ndarray:
        """One uint8 (H, W, 3) panel for :meth:`preview_set`'s batch with the current weights."""
        raise NotImplementedError(f"{type(self).__name__} draws no reconstructions")
