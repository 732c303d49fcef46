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


# -- SparK's schedule: lr warmup from 0.005 × peak, cosine to 0.001 × peak; weight decay 0.04 → 0.2 by cosine ----

def spark_lr_wd(peak_lr, wd, wd_end, cur_it, wp_it, max_it):
    """SparK's pretrain/utils/lr_control.py lr_wd_annealing, written out (the values it assigns)."""
    wp_it = round(wp_it)
    if cur_it < wp_it:
        cur_lr = 0.005 * peak_lr + 0.995 * peak_lr * cur_it / wp_it
    else:
        ratio = (cur_it - wp_it) / (max_it - 1 - wp_it)
        cur_lr = 0.001 * peak_lr + 0.999 * peak_lr * (0.5 + 0.5 * math.cos(math.pi * ratio))
    ratio = cur_it / (max_it - 1)
    cur_wd = wd_end + (wd - wd_end) * (0.5 + 0.5 * math.cos(math.pi * ratio))
    return cur_lr, cur_wd


def run_schedule(c, total, warmup, steps=None):
    """(lr, wd of the decay group, wd of the no-decay group) each optimizer step uses, as the loop steps it."""
    from mwm.train.optim import build_pretrain_scheduler

    model = Tiny()
    opt, _, _ = build_optimizer(model, c, world_size=1)
    sched = build_pretrain_scheduler(opt, c, total, warmup)
    seen = []
    for _ in range(total if steps is None else steps):
        g = opt.param_groups
        seen.append((g[0]["lr"], g[0]["weight_decay"], g[1]["weight_decay"]))
        model.conv.weight.grad = torch.ones_like(model.conv.weight)
        opt.step()
        sched.step()
    return seen, opt, sched


@pytest.mark.parametrize("optimizer", ["lamb", "adamw"])
def test_spark_schedule_matches_lr_wd_annealing(optimizer):
    c = cfg(lr=0.1, optimizer=optimizer)  # spark method; every schedule end left at SparK's
    total, warmup = 11, 4
    seen, _, _ = run_schedule(c, total, warmup)
    for it in (0, warmup - 1, warmup, (warmup + total - 1) // 2, total - 1):  # start, warmup end, middle, last
        lr, wd = spark_lr_wd(0.1, 0.04, 0.2, it, warmup, total)
        assert seen[it][0] == pytest.approx(lr, rel=1e-12), it
        assert seen[it][1] == pytest.approx(wd, rel=1e-12), it
        assert seen[it][2] == 0.0  # biases, norms, tokens: never decayed
    assert seen[0][0] == pytest.approx(0.0005) and seen[warmup][0] == pytest.approx(0.1)
    assert seen[-1][0] == pytest.approx(0.0001)
    assert seen[0][1] == pytest.approx(0.04) and seen[-1][1] == pytest.approx(0.2)
    assert seen[(total - 1) // 2][1] == pytest.approx(0.12)  # the weight decay's cosine midpoint of 0.04 → 0.2


def test_schedule_options_and_mae_defaults():
    from mwm.train.optim import resolve_schedule

    c = cfg(lr=1.0, weight_decay=0.05, weight_decay_end=0.5, warmup_start_ratio=0.1, final_lr_ratio=0.2)
    seen, _, _ = run_schedule(c, 6, 2)
    assert [round(s[0], 12) for s in (seen[0], seen[1], seen[2], seen[-1])] == [0.1, 0.55, 1.0, 0.2]
    assert seen[0][1] == pytest.approx(0.05) and seen[-1][1] == pytest.approx(0.5)
    mae = PretrainConfig(data="x.npz", out="run", model={"arch": "vit_tiny_patch16_224", "size": 32},
                         weight_decay=0.05)
    assert resolve_schedule(mae) == {"warmup_start_ratio": 0.0, "final_lr_ratio": 0.0, "weight_decay": 0.05,
                                     "weight_decay_end": 0.05}  # MAE: from 0, to 0, constant weight decay
    assert resolve_schedule(cfg()) == {"warmup_start_ratio": 0.005, "final_lr_ratio": 0.001, "weight_decay": 0.04,
                                       "weight_decay_end": 0.2}


@pytest.mark.parametrize("new_total", [11, 21])
def test_schedule_resume_keeps_position_and_takes_the_new_length(new_total):
    """A resumed scheduler continues where the checkpoint stopped; when epochs changed, lr and wd follow the new
    length from the current step (what the loop relies on)."""
    from mwm.train.optim import build_pretrain_scheduler

    c = cfg(lr=0.1)
    _, opt, sched = run_schedule(c, 11, 4, steps=6)
    state, opt_state = sched.state_dict(), opt.state_dict()
    model = Tiny()
    opt2, _, _ = build_optimizer(model, c, world_size=1)
    sched2 = build_pretrain_scheduler(opt2, c, new_total, 4)
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(state)
    lr, wd = spark_lr_wd(0.1, 0.04, 0.2, 6, 4, new_total)
    assert sched2.last_epoch == 6 and sched2.get_last_lr()[0] == pytest.approx(lr, rel=1e-12)
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-12)
    assert opt2.param_groups[0]["weight_decay"] == pytest.approx(wd, rel=1e-12)
    assert opt2.param_groups[1]["weight_decay"] == 0.0
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(spark_lr_wd(0.1, 0.04, 0.2, 7, 4, new_total)[0], rel=1e-12)
    torch.save(state, io := __import__("io").BytesIO())  # checkpoints are read with weights_only=True
    io.seek(0)
    assert torch.load(io, weights_only=True)["last_epoch"] == 6
