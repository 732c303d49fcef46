"""What the loss-guided MIM methods share (HPM: :mod:`.hpm`; AnatoMask: :mod:`.anatomask`): an EMA teacher of the
whole model scores every mask cell by how hard it is to reconstruct, and the student masks the hardest
``⌊M·α_t⌋`` of its ``M`` masked cells plus the rest at random (:func:`mwm.masking.policies.hard_then_random_keep`).

Schedules, as in the official code:

* hard share ``α_t = α_max·(t + 1)/T`` for epoch ``t`` (0-based) of ``T``, α_max = 0.5 — HPM's
  ``generate_mask(..., epoch, total_epoch=args.epochs)`` (``Haochen-Wang409/HPM``, ``models_mae_learn_loss.py``:
  ``keep_ratio = (epoch + 1) / total_epoch * 0.5``, ``len_loss = int((L - len_keep) * keep_ratio)``). AnatoMask calls
  the same rule with ``total_epoch = epochs - 1`` (``pretrain_AntoMask.py``), which reaches 0.5·T/(T−1) at the last
  epoch; we use HPM's ``T`` for both (at T = 1 theirs divides by zero).
* teacher EMA decay ramped linearly ``0.999 → 0.9999`` over the first ``R`` epochs, then constant, set per epoch:
  HPM's ``train_one_epoch`` (``engine_pretrain.py``: ``decay = 0.999 + epoch / 100 * (0.9999 - 0.999)`` while
  ``epoch < 100``; R = 100 epochs whatever the run's length); AnatoMask's training script (R = ``epochs // 4``). The
  teacher is updated after every optimizer step (timm ``ModelEma`` there, :class:`timm.utils.ModelEmaV3` here,
  without warm-up) and runs in eval mode (BatchNorm on running statistics), as timm's EMA copies do.

The teacher is separate from the run's optional ``--ema`` (the exported weights); both are checkpointed.

The parts are mixins so SparK and MAE share them: :class:`EMATeacherMixin` (the teacher, its per-epoch decay, its
checkpoint entry; AttMask, :mod:`.attmask`, uses only this) and :class:`LossGuidedMixin` (α_t and the
hard-then-random keep-mask from :meth:`teacher_scores`), combined with :class:`~.mim.SparKMethod`
(:class:`TeacherGuidedSparK`: HPM, AnatoMask) or :class:`~.mim.MAEMethod` (:class:`TeacherGuidedMAE`: HPM on MAE,
:mod:`.hpm_mae`); the configs likewise (:class:`TeacherEMAFields`, :class:`HardShareFields`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ...errors import MWMError
from ...mim import MAEConfig, SparKConfig
from ...mim.loss import patchify
from .base import PretrainMethod
from .mim import MAEMethod, MaskedViews, SparKMethod

if TYPE_CHECKING:
    from torch import nn

    from ..config import PretrainConfig
    from .base import MethodContext

__all__ = ["TeacherEMAFields", "HardShareFields", "GuidedSparKConfig", "GuidedMAEConfig", "EMATeacherMixin",
           "LossGuidedMixin", "TeacherGuidedSparK", "TeacherGuidedMAE", "hard_share", "hard_count", "ramp_decay",
           "patch_errors", "spark_part", "mae_part", "model_part"]


class HardShareFields(BaseModel):
    """The hard-patch share's field (a config mixin, listed before :class:`TeacherEMAFields`)."""

    model_config = ConfigDict(extra="forbid")

    alpha_max: float = Field(default=0.5, ge=0, le=1, description="hard share of the masked cells at the last "
                             "epoch: α_t = alpha_max·(epoch+1)/epochs (HPM, AnatoMask: 0.5)")


class TeacherEMAFields(BaseModel):
    """The EMA teacher's decay schedule (a config mixin; the method's reference fills ``ema_ramp_epochs=None``)."""

    model_config = ConfigDict(extra="forbid")

    ema: tuple[float, float] = Field(default=(0.999, 0.9999), description="the teacher's EMA decay at the first "
                                     "epoch and after the ramp (HPM, AnatoMask: 0.999 → 0.9999)")
    ema_ramp_epochs: int | None = Field(default=None, ge=0, description="epochs of the linear decay ramp; None: "
                                        "the method's reference (HPM 100, AnatoMask a quarter of the run)")

    @field_validator("ema")
    @classmethod
    def _ema(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= d < 1 for d in v):
            raise ValueError(f"ema decays must lie in [0, 1), got {v}")
        return v


# base order: the model's fields first, then alpha_max, ema, ema_ramp_epochs (pydantic lists bases' fields in
# reversed MRO order)
class GuidedSparKConfig(TeacherEMAFields, HardShareFields, SparKConfig):
    """SparK's fields plus the loss-guided schedules (a base: :class:`~.hpm.HPMConfig`,
    :class:`~.anatomask.AnatoMaskConfig` name the method)."""


class GuidedMAEConfig(TeacherEMAFields, HardShareFields, MAEConfig):
    """MAE's fields plus the loss-guided schedules (a base: :class:`~.hpm_mae.HPMMAEConfig` names the method)."""


def model_part(cfg: BaseModel, base: type[BaseModel]) -> BaseModel:
    """The plain model config (``base``: SparKConfig / MAEConfig) inside a method's config, its own fields
    dropped: the model is ``base``'s."""
    return base.model_validate(cfg.model_dump(include=set(base.model_fields) - {"method"}))


def spark_part(cfg: GuidedSparKConfig) -> SparKConfig:
    """The SparK model config inside a guided config (its own fields dropped): the model is SparK's."""
    return model_part(cfg, SparKConfig)


def mae_part(cfg: BaseModel) -> MAEConfig:
    """The MAE model config inside an MAE-based method's config (HPM-MAE, AttMask)."""
    return model_part(cfg, MAEConfig)


def base_model(cfg: BaseModel, kind: type[BaseModel]) -> "nn.Module":
    """The plain MIM model (SparK or MAE, ``kind``) inside a guided method's config; a config timm or the model
    refuses → :class:`MWMError` (one line, no traceback)."""
    from ...mim import create_mim_model

    try:
        return create_mim_model(model_part(cfg, kind))
    except ValueError as e:
        raise MWMError(str(e)) from e


def hard_share(epoch: int, epochs: int, alpha_max: float = 0.5) -> float:
    """α_t = alpha_max·(epoch + 1)/epochs (HPM's ``generate_mask`` with ``guide=True``), epoch 0-based."""
    return alpha_max * (epoch + 1) / epochs


def hard_count(n_mask: int, alpha: float) -> int:
    """⌊n_mask·α⌋ hard cells (HPM / AnatoMask: ``int((L - len_keep) * keep_ratio)``)."""
    return int(n_mask * alpha)


def ramp_decay(epoch: int, start: float, end: float, ramp_epochs: int) -> float:
    """``start + epoch/ramp·(end − start)`` while ``epoch < ramp``, then ``end`` (set once per epoch)."""
    if epoch >= ramp_epochs:
        return end
    return start + epoch / ramp_epochs * (end - start)


def patch_errors(x: torch.Tensor, pred: torch.Tensor, grid: tuple[int, int], norm_pix: bool = True,
                 eps: float = 1e-6) -> torch.Tensor:
    """Per-cell reconstruction error (B, h·w): the mean over a cell's pixels of (pred − target)², the target being
    the cell's pixels normalized by their own mean and unbiased std when ``norm_pix`` (SparK's / MAE's loss per
    patch, :func:`mwm.mim.loss.masked_mse` before its masked mean), in float32."""
    p = x.shape[-1] // grid[1]
    target = patchify(x.float(), p)
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + eps).sqrt()
    return (patchify(pred.float(), p) - target).pow(2).mean(-1)


def _autocast(precision: str, device: torch.device):
    """The run's mixed precision for the teacher's forward (it is not the Fabric-wrapped model)."""
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
    return torch.autocast(device.type, dtype=dtype, enabled=precision != "32-true")


class EMATeacherMixin:
    """An EMA teacher of the whole model, beside a MIM method (listed before it: ``class M(EMATeacherMixin,
    MAEMethod)``): the teacher is a :class:`timm.utils.ModelEmaV3` copy taken in :meth:`prepare`, updated after
    every optimizer step with this epoch's decay (:func:`ramp_decay`, set in :meth:`on_epoch_start`), checkpointed
    as ``teacher``. The keep-masks are the method's own (``--masking random --ratio R`` gives only the ratio; the
    random strategy also draws the reconstruction pictures' masks); the masked count is that strategy's.

    Class attribute ``reference_ramp_epochs``: the decay ramp when the config leaves ``ema_ramp_epochs`` unset
    (None: ``epochs // 4``, AnatoMask's)."""

    reference_ramp_epochs: int | None = 100

    def __init__(self, cfg: "PretrainConfig", model: "nn.Module"):
        from ...masking import create_masker, visible_count

        PretrainMethod.__init__(self, cfg, model)  # (MaskedImageModeling builds a plain MIM model from cfg.model)
        self.grid = model.grid(cfg.size)
        self.masker = create_masker(cfg.masking)
        self.wants_outputs, self._prev_outputs = False, None
        n = self.grid[0] * self.grid[1]
        self.n_mask = n - visible_count(cfg.masking, n)
        self.teacher = None
        self.on_epoch_start(0)

    @classmethod
    def check_config(cls, cfg: "PretrainConfig") -> None:
        super().check_config(cfg)
        if cfg.masking.strategy != "random":
            raise ValueError(f"method '{cfg.model.method}' draws its own masks (from its EMA teacher); give only the "
                             f"ratio with --masking random --ratio R (got --masking {cfg.masking.strategy})")
        if getattr(cfg.model, "target", "pixels") != "pixels":
            raise ValueError(f"method '{cfg.model.method}' reconstructs the pixels (its teacher ranks the cells); "
                             f"model.target {cfg.model.target} is for spark / mae")

    # -- schedules -------------------------------------------------------------------------------------------------
    def ramp_epochs(self) -> int:
        m = self.cfg.model
        if m.ema_ramp_epochs is not None:
            return m.ema_ramp_epochs
        return self.reference_ramp_epochs if self.reference_ramp_epochs is not None else self.cfg.epochs // 4

    def on_epoch_start(self, epoch: int) -> None:
        m = self.cfg.model
        self.epoch = epoch
        self.decay = ramp_decay(epoch, m.ema[0], m.ema[1], self.ramp_epochs())
        if self.teacher is not None:
            self.teacher.decay = self.decay

    # -- the teacher -----------------------------------------------------------------------------------------------
    def prepare(self, ctx: "MethodContext") -> None:
        from timm.utils import ModelEmaV3

        # the copy before the base converts BatchNorm for multi-GPU (no process groups in it), as the run's EMA
        self.model = self.model.to(ctx.device)
        self.teacher = ModelEmaV3(self.model, decay=self.decay)
        self.teacher.module.requires_grad_(False)  # moved by the EMA only
        super().prepare(ctx)

    def on_after_optimizer_step(self, step: int) -> None:
        super().on_after_optimizer_step(step)
        self.teacher.update(self.model)  # decay = this epoch's (no step: no timm warm-up)

    # -- state -----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "teacher": self.teacher.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any], source: str = "the checkpoint") -> None:
        super().load_state_dict(state, source)
        if state.get("teacher") is None:
            raise MWMError(f"{source} has no teacher weights (not a '{self.cfg.model.method}' run?); start a new run "
                           "or resume the run that wrote it")
        self.teacher.module.load_state_dict(state["teacher"])


class LossGuidedMixin(EMATeacherMixin):
    """Keep-masks from the EMA teacher's per-cell hardness scores: the hardest ``⌊M·α_t⌋`` of the ``M`` masked cells
    plus the rest at random (:func:`~mwm.masking.policies.hard_then_random_keep`; every image keeps ``N − M``
    cells, so MAE's token gather holds). Subclasses implement :meth:`teacher_scores`."""

    def on_epoch_start(self, epoch: int) -> None:
        m = self.cfg.model
        self.alpha = hard_share(epoch, self.cfg.epochs, m.alpha_max)
        self.n_hard = hard_count(self.n_mask, self.alpha)
        super().on_epoch_start(epoch)

    def teacher_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scores (B, h, w), eligible bool (B, h, w) or None) for the normalized images ``x``, under no_grad."""
        raise NotImplementedError

    def views(self, batch: tuple[torch.Tensor, ...]) -> MaskedViews:
        from ...masking.policies import hard_then_random_keep, realised_ratios

        x = self.normalize(batch[0])
        with torch.no_grad(), _autocast(self.cfg.precision, x.device):
            scores, eligible = self.teacher_scores(x)
        keep = hard_then_random_keep(scores.float(), self.cfg.masking.ratio, self.n_hard, self.ctx.generator,
                                     eligible)
        return MaskedViews(x, keep, realised_ratios(keep))

    def summary_fields(self, rows: list[dict]) -> dict:
        out = super().summary_fields(rows)
        out["masking"] = f"{self.cfg.model.method}: the hardest α_t of the masked cells by its EMA teacher + random"
        return out


class TeacherGuidedSparK(LossGuidedMixin, SparKMethod):
    """SparK whose keep-masks come from an EMA teacher's per-cell hardness scores instead of the masking strategy
    (HPM, AnatoMask). Subclasses implement :meth:`teacher_scores`."""


class TeacherGuidedMAE(LossGuidedMixin, MAEMethod):
    """MAE whose keep-masks come from an EMA teacher's per-cell hardness scores (HPM on MAE); the visible count
    is the random strategy's (``MAEMethod.forward_kwargs``), which :func:`hard_then_random_keep` keeps exactly."""
