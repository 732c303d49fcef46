"""HPM (hard patches mining) on SparK: the relative loss, the α_t / EMA schedules, the hard-then-random mask, the
model's two heads, and one step of an `mwm bench` arm. The registry contract (a step, exact resume, export) runs
in tests/train/test_method_contract.py for every registered method, hpm and anatomask included."""

from __future__ import annotations

import math
import types

import pytest
import torch

from mwm.masking.policies import hard_then_random_keep
from mwm.mim.loss import masked_mse
from mwm.train import PretrainConfig
from mwm.train.methods import MethodContext, create_method
from mwm.train.methods.guided import hard_count, hard_share, ramp_decay
from mwm.train.methods.hpm import HPMMethod, relative_loss

from .helpers import assert_pretrained_once


def _official_relative(pred, target):
    """HPM's forward_learning_loss(relative=True), literally (models_mae_learn_loss.py), all patches valid."""
    pos = target.unsqueeze(1) > target.unsqueeze(2)
    neg = target.unsqueeze(1) < target.unsqueeze(2)
    m = pred.unsqueeze(1) - pred.unsqueeze(2)
    loss = -pos.int() * torch.log(torch.sigmoid(m) + 1e-6) - neg.int() * torch.log(1 - torch.sigmoid(m) + 1e-6)
    return loss.sum() / (pos + neg).sum()


def test_relative_loss_by_hand():
    """Three masked patches, targets 1 < 2 = 2 (one tie), predictions 0, 1, 0.5: the untied ordered pairs are
    (0,1), (0,2) and their mirrors, each −log σ(p_hi − p_lo); a fourth, unmasked patch takes no part."""
    pred = torch.tensor([[0.0, 1.0, 0.5, 100.0]])
    target = torch.tensor([[1.0, 2.0, 2.0, 0.0]])
    valid = torch.tensor([[True, True, True, False]])
    hand = (2 * -math.log(1 / (1 + math.exp(-1.0))) + 2 * -math.log(1 / (1 + math.exp(-0.5)))) / 4
    assert relative_loss(pred, target, valid).item() == pytest.approx(hand, abs=1e-6)
    assert relative_loss(pred[:, :3], target[:, :3], valid[:, :3]).item() == pytest.approx(
        _official_relative(pred[:, :3], target[:, :3]).item(), abs=1e-5)
    # a perfect ranking costs less than the reversed one; nothing valid → 0, not NaN
    t = torch.tensor([[0.1, 0.5, 0.9]])
    ok = torch.ones_like(t, dtype=torch.bool)
    assert relative_loss(t * 10, t, ok) < relative_loss(-t * 10, t, ok)
    assert relative_loss(t, t, ~ok).item() == 0.0


def test_relative_loss_matches_the_official_batched():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 12, generator=g), torch.rand(3, 12, generator=g)
    ours = relative_loss(pred, target, torch.ones(3, 12, dtype=torch.bool))
    assert ours.item() == pytest.approx(_official_relative(pred, target).item(), rel=1e-5)


def test_alpha_and_ema_schedules():
    """α_t = 0.5·(t+1)/T (HPM's generate_mask), ⌊M·α_t⌋ hard cells; decay 0.999 → 0.9999 linearly over 100 epochs."""
    assert [hard_share(t, 10) for t in (0, 4, 9)] == pytest.approx([0.05, 0.25, 0.5])
    assert hard_count(48, hard_share(0, 10)) == 2 and hard_count(48, hard_share(9, 10)) == 24
    assert hard_count(3, 0.3) == 0  # int(0.9): random masking
    assert ramp_decay(0, 0.999, 0.9999, 100) == 0.999
    assert ramp_decay(50, 0.999, 0.9999, 100) == pytest.approx(0.99945)
    assert ramp_decay(100, 0.999, 0.9999, 100) == ramp_decay(400, 0.999, 0.9999, 100) == 0.9999


def test_hard_patches_are_masked_exact_counts():
    """The n_hard highest-scoring cells are masked in every image, M in all, the rest at random (not the next
    highest scores)."""
    B, h, w, ratio = 64, 8, 8, 0.75  # M = 48
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(B, h, w, generator=g)
    keep = hard_then_random_keep(scores, ratio, 10, torch.Generator().manual_seed(1))
    masked = ~keep.flatten(1)
    assert keep.shape == (B, 1, h, w) and keep.dtype == torch.bool
    assert (masked.sum(1) == 48).all()
    order = scores.flatten(1).argsort(1, descending=True)
    assert masked.gather(1, order[:, :10]).all()  # the 10 hardest, in every image
    # the rest is random: the 11th–48th hardest are not simply all masked (a top-48 rule would mask them)
    assert not masked.gather(1, order[:, 10:48]).all()
    assert masked.gather(1, order[:, 48:]).any()
    # n_hard = 0 is uniform random masking at the same count; n_hard ≥ M is top-M
    assert (~hard_then_random_keep(scores, ratio, 0, g)).flatten(1).sum(1).eq(48).all()
    top = ~hard_then_random_keep(scores, ratio, 99, g).flatten(1)
    assert top.gather(1, order[:, :48]).all()


@pytest.fixture(scope="module")
def hpm(tiny_npz, tmp_path_factory):
    cfg = PretrainConfig(data=tiny_npz, out=tmp_path_factory.mktemp("hpm") / "r", epochs=4,
                         model={"method": "hpm", "arch": "resnet18", "size": 64, "mask_stride": 8,
                                "decoder_width": 64, "ema_ramp_epochs": 2},
                         masking={"strategy": "random", "ratio": 0.75})
    torch.manual_seed(0)
    method = create_method(cfg)
    data = types.SimpleNamespace(has_rois=False)
    method.prepare(MethodContext(torch.device("cpu"), torch.Generator().manual_seed(0), data))
    return method


def test_the_teachers_predicted_losses_pick_the_mask(hpm):
    """views(): the EMA teacher predicts the loss of every cell of the unmasked image; its ⌊48·α_t⌋ highest are
    masked; α_t and the teacher's decay follow the epoch."""
    assert isinstance(hpm, HPMMethod) and hpm.grid == (8, 8) and hpm.n_mask == 48
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    pred_loss = hpm.teacher.module.predict_loss(hpm.normalize(x))
    assert pred_loss.shape == (3, 8, 8)
    hpm.on_epoch_start(3)  # last of 4 epochs: α = 0.5 → 24 hard cells; decay past its 2-epoch ramp
    assert hpm.n_hard == 24 and hpm.teacher.decay == 0.9999
    views = hpm.views((x, None, None))
    masked = ~views.keep.flatten(1)
    hardest = pred_loss.flatten(1).argsort(1, descending=True)[:, :24]
    assert (masked.sum(1) == 48).all() and masked.gather(1, hardest).all()
    hpm.on_epoch_start(1)
    assert hpm.n_hard == 12 and hpm.teacher.decay == pytest.approx(0.99945)


def test_student_heads_and_gradients(hpm):
    """The reconstruction term is SparK's masked MSE; the relative loss trains the predictor and reaches the
    encoder (HPM detaches only the target losses); the total is their sum."""
    model = hpm.model
    x = hpm.normalize(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)))
    keep = hard_then_random_keep(torch.rand(2, 8, 8), 0.75, 4, torch.Generator().manual_seed(4))
    out = model(x, keep)
    assert out["loss_pred"].shape == (2, 8, 8)
    assert torch.allclose(out["recon_loss"], masked_mse(x, out["pred"], keep), atol=1e-6)
    assert torch.allclose(out["loss"], out["recon_loss"] + out["rank_loss"])
    model.zero_grad()
    out["rank_loss"].backward()
    assert model.predictor.head[-1].weight.grad.abs().sum() > 0
    assert model.encoder.model.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.decoder.blocks.parameters())


def test_teacher_follows_the_student_with_its_decay(hpm):
    """After an optimizer step the teacher moves (1 − decay) of the way to the student (timm EMA, no warm-up)."""
    hpm.on_epoch_start(0)
    w_t = hpm.teacher.module.predictor.head[-1].weight.detach().clone()
    with torch.no_grad():
        hpm.model.predictor.head[-1].weight.add_(1.0)
    w_s = hpm.model.predictor.head[-1].weight.detach().clone()
    hpm.on_after_optimizer_step(1)
    expect = 0.999 * w_t + 0.001 * w_s
    assert torch.allclose(hpm.teacher.module.predictor.head[-1].weight, expect, atol=1e-7)


def test_guided_methods_refuse_other_strategies(tiny_npz):
    with pytest.raises(ValueError, match="draws its own masks"):
        PretrainConfig(data=tiny_npz, out="r", model={"method": "hpm", "arch": "resnet18", "size": 64},
                       masking={"strategy": "topk", "ratio": 0.5}, rois="x.jsonl")


def test_hpm_and_anatomask_arms_run_in_bench(phantoms_npz, tmp_path):
    """One `mwm bench` run with an HPM and an AnatoMask arm beside random masking (one step each)."""
    from mwm.bench import BenchConfig, run_bench

    raw = {"name": "t", "data": str(phantoms_npz), "out": str(tmp_path / "b"), "arch": "resnet18", "size": 64,
           "seeds": [0], "device": "cpu", "rois": {"source": "gt-boxes"},
           "pretrain": {"epochs": 1, "batch_size": 8, "limit": 8, "lr": 1e-3, "warmup_epochs": 0,
                        "recon_images": 0, "workers": 0, "model": {"mask_stride": 16, "decoder_width": 64}},
           "arms": [{"name": "random", "masking": {"strategy": "random", "ratio": 0.75}},
                    {"name": "hpm", "method": "hpm", "masking": {"ratio": 0.75}},
                    {"name": "anatomask", "method": "anatomask", "model": {"teacher_ratio": 0.5},
                     "masking": {"ratio": 0.75}}],
           "tasks": [{"kind": "linear", "options": {"epochs": 1}}]}
    rows = run_bench(BenchConfig.model_validate(raw), log=lambda s: None)
    assert sorted(r["arm"] for r in rows) == ["anatomask", "hpm", "random"]
    assert_pretrained_once(tmp_path / "b", ("hpm", "anatomask"))
