"""The learning-rate rule (explicit lr wins; base_lr scales with the effective batch) and the schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mwm.train import PretrainConfig
from mwm.train.optim import build_optimizer, build_scheduler, lr_factor, param_groups, resolve_lr


def cfg(**kw):
    return PretrainConfig(data="x.npz", out="run", model={"arch": "resnet18", "size": 64}, **kw)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.mask_token = nn.Parameter(torch.zeros(1, 4, 1, 1))


def test_base_lr_scaled_by_effective_batch():
    c = cfg(batch_size=16, accumulate=4, base_lr=1e-4)
    lr, rule = resolve_lr(c, world_size=8)
    assert lr == pytest.approx(1e-4 * 16 * 4 * 8 / 256) and "512" in rule
    opt, lr2, _ = build_optimizer(Tiny(), c, world_size=8)
    assert lr2 == lr and all(g["lr"] == pytest.approx(lr) for g in opt.param_groups)


@pytest.mark.parametrize("optimizer", ["adamw", "lamb"])
def test_explicit_lr_reaches_the_optimizer(optimizer):
    c = cfg(lr=0.0123, base_lr=1.0, batch_size=64, optimizer=optimizer)  # base_lr would give 0.25
    opt, lr, rule = build_optimizer(Tiny(), c, world_size=4)
    assert lr == 0.0123 and "explicitly" in rule
    sched = build_scheduler(opt, total_steps=10, warmup_steps=0)
    assert [g["lr"] for g in opt.param_groups] == [0.0123, 0.0123]
    assert [g["initial_lr"] for g in opt.param_groups] == [0.0123, 0.0123]
    assert sched.get_last_lr()[0] == 0.0123
    assert type(opt).__name__ == {"adamw": "AdamW", "lamb": "Lamb"}[optimizer]


def test_no_decay_for_norms_biases_tokens():
    decay, no_decay = param_groups(Tiny(), 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) == 1 and decay["params"][0].ndim == 4  # conv weight only
    assert len(no_decay["params"]) == 4  # conv bias, bn weight/bias, mask token


def test_warmup_then_cosine():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, final_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(0, 100, 0) == 1.0
    vals = [lr_factor(s, 100, 10) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(vals, vals[1:])) and not math.isnan(sum(vals))
