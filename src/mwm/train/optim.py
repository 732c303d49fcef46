"""Optimizer, the learning-rate rule and the warmup + cosine schedule (per optimizer step).

The rule is stated once and applied here: ``lr = base_lr × effective_batch / 256`` with
``effective_batch = batch_size × accumulate × world_size``, unless an absolute ``lr`` is given, which is then used
unchanged. (The SparK reference computes the scaled lr into ``args.lr`` even when ``--lr`` was passed, silently
discarding it; here an explicit lr always reaches the optimizer.)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import PretrainConfig

__all__ = ["effective_batch", "resolve_lr", "param_groups", "build_optimizer", "lr_factor", "build_scheduler"]

# Parameters that must not shrink towards zero: learned tokens and position embeddings (as MAE/SparK).
_NO_DECAY_NAMES = ("mask_token", "cls_token", "pos_embed", "reg_token", "dist_token")


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
    without."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or any(k in name for k in _NO_DECAY_NAMES) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: PretrainConfig, world_size: int) -> tuple[torch.optim.Optimizer, float, str]:
    """AdamW or LAMB (timm) over :func:`param_groups` at the resolved peak lr. → (optimizer, lr, rule)."""
    lr, rule = resolve_lr(cfg, world_size)
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "lamb":
        from timm.optim import Lamb

        # max_grad_norm=None: clipping is ours (clip_grad, after unscaling under 16-mixed), not a second one inside
        opt = Lamb(groups, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay, max_grad_norm=None)
    else:
        opt = torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return opt, lr, rule


def lr_factor(step: int, total: int, warmup: int, final_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warmup ``(step+1)/warmup`` for
    ``step < warmup`` (never 0, so the first step learns), then cosine from 1 to ``final_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * t))


class _Factor:
    """A picklable lr lambda (LambdaLR stores callable objects' state in its state_dict)."""

    def __init__(self, total: int, warmup: int, final_ratio: float):
        self.total, self.warmup, self.final_ratio = total, warmup, final_ratio

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.total, self.warmup, self.final_ratio)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                    final_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step warmup + cosine as a LambdaLR (stepped once per optimizer step)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _Factor(total_steps, warmup_steps, final_ratio))
