"""Optimizer, the learning-rate rule and the schedules (per optimizer step).

The rule is stated once and applied here: ``lr = base_lr × effective_batch / 256`` with
``effective_batch = batch_size × accumulate × world_size``, unless an absolute ``lr`` is given, which is then used
unchanged. (The SparK reference computes the scaled lr into ``args.lr`` even when ``--lr`` was passed, silently
discarding it; here an explicit lr always reaches the optimizer.)

Pretraining schedule (:func:`build_pretrain_scheduler`): SparK's ``lr_wd_annealing``
(``pretrain/utils/lr_control.py``), evaluated at optimizer step ``t = 0 … T−1`` with ``W`` warmup steps::

    lr(t) = peak · (s + (1 − s) · t / W)                                   t < W
    lr(t) = peak · (f + (1 − f) · ½ (1 + cos(π · (t − W) / (T − 1 − W))))  t ≥ W
    wd(t) = wd_end + (wd − wd_end) · ½ (1 + cos(π · t / (T − 1)))

``s`` = ``warmup_start_ratio``, ``f`` = ``final_lr_ratio``, ``wd`` → ``wd_end`` = ``weight_decay`` →
``weight_decay_end``. Unset (None) they take the method's reference values (:data:`SCHEDULE_DEFAULTS`): SparK
0.005, 0.001 and 0.04 → 0.2; MAE (``main_pretrain.py``/``util/lr_sched.py``) 0, 0 and a constant weight decay.
The last step runs at ``f · peak`` and ``wd_end``. The weight decay applies to the decaying group only
(biases, norms, tokens stay at 0, as SparK's ``weight_decay_scale`` 0).

Transfer tasks' :func:`build_scheduler` (warmup ``(t+1)/W``, cosine to ``final_ratio`` at ``T``) lives in
:mod:`mwm.engine.schedules` and is re-exported here.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..engine.schedules import build_scheduler, lr_factor  # noqa: F401  (transfer's, re-exported)
from .config import PretrainConfig

__all__ = ["effective_batch", "resolve_lr", "param_groups", "build_optimizer", "lr_factor", "build_scheduler",
           "SCHEDULE_DEFAULTS", "resolve_schedule", "spark_lr_factor", "spark_weight_decay", "SparKSchedule",
           "LrWdScheduler", "build_pretrain_scheduler"]

# Parameters that must not shrink towards zero: learned tokens and position embeddings (as MAE/SparK).
_NO_DECAY_NAMES = ("mask_token", "cls_token", "pos_embed", "reg_token", "dist_token")

# The reference schedules per MIM method (SparK: pretrain/utils/lr_control.py + arg_util.py wd/wde; MAE:
# util/lr_sched.py warms up from 0 and decays to min_lr 0, weight decay constant). weight_decay_end None = constant.
SCHEDULE_DEFAULTS: dict[str, dict[str, float | None]] = {
    "spark": {"warmup_start_ratio": 0.005, "final_lr_ratio": 0.001, "weight_decay_end": 0.2},
    "mae": {"warmup_start_ratio": 0.0, "final_lr_ratio": 0.0, "weight_decay_end": None},
}


def effective_batch(cfg: PretrainConfig, world_size: int) -> int:
    """Images per optimizer step over all ranks."""
    return cfg.batch_size * cfg.accumulate * world_size


def resolve_lr(cfg: PretrainConfig, world_size: int) -> tuple[float, str]:
    """(peak lr, a sentence saying which rule gave it)."""
    eff = effective_batch(cfg, world_size)
    if cfg.lr is not None:
        return float(cfg.lr), f"lr {cfg.lr:g} given explicitly (effective batch {eff}; base_lr not used)"
    lr = cfg.base_lr * eff / 256
    return lr, (f"lr = base_lr {cfg.base_lr:g} × effective batch {eff} / 256 = {lr:.4g} "
                f"(batch {cfg.batch_size} × accumulate {cfg.accumulate} × {world_size} rank(s))")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights with decay; biases, norm parameters (ndim ≤ 1) and tokens/position embeddings
    without. ``wd_scale`` (1 / 0) tells :class:`LrWdScheduler` which group its weight-decay schedule drives.
    Frozen parameters (``requires_grad=False``, e.g. MAE's fixed sin-cos position embedding) are left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or any(k in name for k in _NO_DECAY_NAMES) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "wd_scale": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "wd_scale": 0.0}]


def build_optimizer(model: nn.Module, cfg: PretrainConfig, world_size: int) -> tuple[torch.optim.Optimizer, float, str]:
    """AdamW or LAMB (timm) over :func:`param_groups` at the resolved peak lr. → (optimizer, lr, rule)."""
    lr, rule = resolve_lr(cfg, world_size)
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "lamb":
        from timm.optim import Lamb

        # max_grad_norm=None: clipping is ours (clip_grad, after unscaling under 16-mixed), not a second one inside
        # (SparK's LAMB clips inside at 5.0, the same global-norm rule as our clip_grad default)
        opt = Lamb(groups, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay, max_grad_norm=None)
    else:
        opt = torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return opt, lr, rule


# -- transfer tasks' schedule: mwm.engine.schedules (re-exported here) -------------------------------------------

# -- the pretraining schedule (SparK's lr_wd_annealing) ---------------------------------------------------------

def _method_schedule(method: str) -> dict[str, float | None]:
    """The reference schedule ends of ``method``: its class's ``schedule_defaults`` (mwm.train.methods), else
    :data:`SCHEDULE_DEFAULTS` (SparK's for methods that name none)."""
    from .methods import METHODS

    spec = METHODS.get(method)
    own = getattr(spec.factory, "schedule_defaults", None) if spec is not None else None
    return own or SCHEDULE_DEFAULTS.get(method, SCHEDULE_DEFAULTS["spark"])


def resolve_schedule(cfg: PretrainConfig) -> dict[str, float]:
    """``warmup_start_ratio``, ``final_lr_ratio``, ``weight_decay`` and ``weight_decay_end`` of this run: the
    config's values, unset ones from :data:`SCHEDULE_DEFAULTS` of ``cfg.model.method``."""
    ref = _method_schedule(cfg.model.method)

    def pick(name: str):
        v = getattr(cfg, name)
        return ref[name] if v is None else v

    wd_end = pick("weight_decay_end")
    return {"warmup_start_ratio": float(pick("warmup_start_ratio")), "final_lr_ratio": float(pick("final_lr_ratio")),
            "weight_decay": float(cfg.weight_decay),
            "weight_decay_end": float(cfg.weight_decay if wd_end is None else wd_end)}


def spark_lr_factor(step: int, total: int, warmup: int, start_ratio: float = 0.005,
                    final_ratio: float = 0.001) -> float:
    """SparK's lr multiplier at optimizer step ``step`` of ``total`` (0-based; see the module doc)."""
    if step < warmup:
        return start_ratio + (1 - start_ratio) * step / warmup
    t = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def spark_weight_decay(step: int, total: int, start: float = 0.04, end: float = 0.2) -> float:
    """SparK's weight decay at optimizer step ``step``: cosine from ``start`` (step 0) to ``end`` (last step)."""
    t = min(1.0, step / max(1, total - 1))
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))


class SparKSchedule:
    """The lr lambda of :class:`LrWdScheduler` and its weight-decay rule. Plain numbers only: LambdaLR saves a
    callable object's ``__dict__`` in its state_dict, and checkpoints are read with ``weights_only=True``."""

    def __init__(self, total: int, warmup: int, warmup_start_ratio: float, final_lr_ratio: float,
                 weight_decay: float, weight_decay_end: float):
        self.total, self.warmup = int(total), int(warmup)
        self.warmup_start_ratio, self.final_lr_ratio = float(warmup_start_ratio), float(final_lr_ratio)
        self.weight_decay, self.weight_decay_end = float(weight_decay), float(weight_decay_end)

    def __call__(self, step: int) -> float:
        return spark_lr_factor(step, self.total, self.warmup, self.warmup_start_ratio, self.final_lr_ratio)

    def weight_decay_at(self, step: int) -> float:
        return spark_weight_decay(step, self.total, self.weight_decay, self.weight_decay_end)


class LrWdScheduler(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR over a :class:`SparKSchedule` that also sets the weight decay of every param group carrying a
    ``wd_scale`` (:func:`param_groups`) to ``wd(t) · wd_scale``, as SparK's ``lr_wd_annealing`` does each step.

    Stepped once per optimizer step, after ``optimizer.step()``: after ``k`` steps the groups hold lr and wd of
    step ``k``. Its :meth:`state_dict` is the position only (``last_epoch``, ``base_lrs``, …): the schedule itself
    comes from the run's config, so a resumed run with another ``epochs`` gets its own length. :meth:`load_state_dict`
    restores the position and re-applies lr and wd for the current step (a checkpoint that also holds the lambda's
    numbers, as written before issue 13, has them ignored).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: SparKSchedule):
        super().__init__(optimizer, schedule)

    @property
    def schedule(self) -> SparKSchedule:
        return self.lr_lambdas[0]

    def step(self, epoch=None) -> None:  # noqa: D102 - LambdaLR's, plus the weight decay
        super().step() if epoch is None else super().step(epoch)
        self._set_weight_decay()

    def _set_weight_decay(self) -> None:
        wd = self.schedule.weight_decay_at(self.last_epoch)
        for g in self.optimizer.param_groups:
            if "wd_scale" in g:
                g["weight_decay"] = wd * g["wd_scale"]

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.pop("lr_lambdas", None)  # the schedule is the config's, not the checkpoint's
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        position = {k: v for k, v in state_dict.items() if k != "lr_lambdas"}
        torch.optim.lr_scheduler.LRScheduler.load_state_dict(self, position)  # __dict__ update, lambdas untouched
        f = self.schedule(self.last_epoch)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * f
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        self._set_weight_decay()


def build_pretrain_scheduler(optimizer: torch.optim.Optimizer, cfg: PretrainConfig, total_steps: int,
                             warmup_steps: int) -> LrWdScheduler:
    """SparK's lr + weight-decay annealing for ``cfg`` (unset values from the method's reference)."""
    s = resolve_schedule(cfg)
    return LrWdScheduler(optimizer, SparKSchedule(total_steps, warmup_steps, s["warmup_start_ratio"],
                                                  s["final_lr_ratio"], s["weight_decay"], s["weight_decay_end"]))
