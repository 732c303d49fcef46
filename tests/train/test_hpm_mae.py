"""HPM on MAE (ViT): the transformer loss predictor (shape, the decoder's own size, fed the decoder's input), the
relative loss training it, the teacher's hardest predicted patches masked with equal visible counts, the α_t / EMA
schedules, and one step of an `mwm bench` arm beside AttMask and MAE. The registry contract (a step, exact resume,
export) runs in tests/train/test_method_contract.py."""

from __future__ import annotations

import json

import pytest
import torch

from mwm.masking.policies import hard_then_random_keep
from mwm.mim.loss import masked_mse
from mwm.mim.mae import MAE
from mwm.train import PretrainConfig
from mwm.train.methods import create_method
from mwm.train.methods.hpm import relative_loss
from mwm.train.methods.hpm_mae import HPMMAE, HPMMAEMethod

from .helpers import assert_pretrained_once, prepared_method

TINY_VIT = {"arch": "vit_tiny_patch16_224", "size": 32, "patch_size": 8}  # 4 × 4 tokens


@pytest.fixture(scope="module")
def hpm(tmp_path_factory):
    cfg = PretrainConfig(data="unused.npz", out=tmp_path_factory.mktemp("hpm_mae") / "r", epochs=4,
                         model={"method": "hpm_mae", **TINY_VIT, "decoder_dim": 64, "decoder_depth": 3,
                                "ema_ramp_epochs": 2},
                         masking={"strategy": "random", "ratio": 0.75})
    return prepared_method(cfg)


def _x(seed: int, b: int = 3) -> torch.Tensor:
    return torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_predictor_is_a_decoder_of_the_maes_size(hpm):
    """The predictor has the MAE decoder's depth, width and heads and gives one scalar per patch, both in the
    student's pass (masked input) and in the teacher's (every token)."""
    model = hpm.model
    assert isinstance(hpm, HPMMAEMethod) and isinstance(model, HPMMAE) and hpm.grid == (4, 4) and hpm.n_mask == 12
    assert len(model.predictor.blocks) == len(model.decoder.blocks) == 3
    blk, dblk = model.predictor.blocks[0], model.decoder.blocks[0]
    assert blk.attn.qkv.in_features == dblk.attn.qkv.in_features == 64 and blk.attn.num_heads == dblk.attn.num_heads
    assert model.predictor.pred.out_features == 1
    x = hpm.normalize(_x(1))
    keep = hard_then_random_keep(torch.rand(3, 4, 4), 0.75, 0, torch.Generator().manual_seed(2))
    out = model(x, keep, n_visible=4)
    assert out["loss_pred"].shape == (3, 4, 4) and out["pred"].shape == x.shape
    assert hpm.teacher.module.predict_loss(x).shape == (3, 4, 4)
    # the predictor reads the decoder's input: the same tensor the reconstructor's blocks start from
    tokens, ids = model.encoder(x, keep, 4)
    expect = model.predictor(model.decoder.inputs(tokens, ids)).view(3, 4, 4)
    assert torch.allclose(out["loss_pred"], expect, atol=1e-6)


def test_reconstruction_term_is_maes_and_the_rank_loss_reaches_the_encoder(hpm):
    """recon_loss is exactly plain MAE's loss with the same encoder/decoder; loss = recon + rank; the relative
    loss trains the predictor, the encoder and the decoder's embedding, not the reconstructor's blocks."""
    model = hpm.model
    x = hpm.normalize(_x(3, 2))
    keep = hard_then_random_keep(torch.rand(2, 4, 4), 0.75, 3, torch.Generator().manual_seed(4))
    out = model(x, keep, n_visible=4)
    plain = MAE(model.encoder, model.decoder, model.norm_pix, model.eps)(x, keep, 4)
    assert torch.allclose(out["recon_loss"], plain["loss"], atol=1e-6)
    assert torch.allclose(out["recon_loss"], masked_mse(x, out["pred"], keep), atol=1e-6)
    assert torch.allclose(out["loss"], out["recon_loss"] + out["rank_loss"])
    model.zero_grad()
    out["rank_loss"].backward()
    assert model.predictor.pred.weight.grad.abs().sum() > 0
    assert model.encoder.model.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.decoder.embed.weight.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.decoder.blocks.parameters())
    model.zero_grad()


def _concordance(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> float:
    """Share of untied valid pairs the prediction orders as the target does."""
    dp = pred.unsqueeze(1) - pred.unsqueeze(2)
    dt = target.unsqueeze(1) - target.unsqueeze(2)
    pair = valid.unsqueeze(1) & valid.unsqueeze(2) & (dt != 0)
    return float(((dp * dt) > 0)[pair].float().mean())


def test_relative_loss_trains_the_predictor_to_rank_a_fixed_target(hpm):
    """On a fixed decoder input and fixed per-patch losses (masked patches only), Adam on the relative loss moves the
    predictor from chance ordering to nearly the target's."""
    torch.manual_seed(5)
    pred_mod = HPMMAE(hpm.model, heads=1).predictor  # a fresh predictor of the same size
    g = torch.Generator().manual_seed(6)
    dec_in = torch.randn(4, 17, 64, generator=g)  # 1 class token + 16 patches
    target = torch.rand(4, 16, generator=g)
    valid = torch.rand(4, 16, generator=g) < 0.75
    before = _concordance(pred_mod(dec_in).detach(), target, valid)
    opt = torch.optim.Adam(pred_mod.parameters(), lr=1e-3)
    for _ in range(60):
        loss = relative_loss(pred_mod(dec_in), target, valid)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _concordance(pred_mod(dec_in).detach(), target, valid)
    assert before < 0.75 and after > 0.95, (before, after)


def test_the_teachers_hardest_predictions_are_masked(hpm, monkeypatch):
    """views(): the teacher's predicted losses on the unmasked image pick the ⌊12·α_t⌋ hardest patches; every image
    keeps the same 4 tokens (the count MAE's gather is given), the rest of the masked ones at random."""
    B = 16
    scores = torch.rand(B, 4, 4, generator=torch.Generator().manual_seed(7))
    seen = {}

    def fake(x):
        seen["x"] = x
        return scores

    monkeypatch.setattr(hpm.teacher.module, "predict_loss", fake)
    hpm.on_epoch_start(3)  # α = 0.5 → 6 hard
    assert hpm.n_hard == 6
    x = _x(8, B)
    views = hpm.views((x, None, None))
    assert torch.equal(seen["x"], hpm.normalize(x))  # the whole image, normalized
    masked = ~views.keep.flatten(1)
    assert (masked.sum(1) == 12).all() and hpm.forward_kwargs() == {"n_visible": 4}
    order = scores.flatten(1).argsort(1, descending=True)
    assert masked.gather(1, order[:, :6]).all()
    assert not masked.gather(1, order[:, 6:12]).all()  # not a top-12 rule: the other 6 are random
    loss, logs = hpm.training_step(views)  # the student trains on that mask
    assert torch.isfinite(loss) and set(logs) >= {"recon_loss", "rank_loss", "mask_ratio"}
    assert logs["mask_ratio"].item() == pytest.approx(0.75)


def test_alpha_and_teacher_decay_follow_the_epoch(hpm):
    """n_hard = ⌊12·0.5·(t+1)/4⌋; decay 0.999 → 0.9999 over the 2-epoch ramp; the teacher moves (1 − decay) of the
    way to the student after a step."""
    got = []
    for t in range(4):
        hpm.on_epoch_start(t)
        got.append((hpm.n_hard, hpm.teacher.decay))
    assert [n for n, _ in got] == [1, 3, 4, 6]
    assert [d for _, d in got] == pytest.approx([0.999, 0.99945, 0.9999, 0.9999])
    hpm.on_epoch_start(0)
    w_t = hpm.teacher.module.predictor.pred.weight.detach().clone()
    with torch.no_grad():
        hpm.model.predictor.pred.weight.add_(1.0)
    w_s = hpm.model.predictor.pred.weight.detach().clone()
    hpm.on_after_optimizer_step(1)
    assert torch.allclose(hpm.teacher.module.predictor.pred.weight, 0.999 * w_t + 0.001 * w_s, atol=1e-7)
    assert set(hpm.state_dict()) >= {"model", "ema", "teacher"}


def test_hpm_mae_refuses_a_cnn_and_other_strategies():
    with pytest.raises(Exception, match="--method spark"):
        create_method(PretrainConfig(data="x.npz", out="r", model={"method": "hpm_mae", "arch": "resnet18",
                                                                   "size": 64}))
    with pytest.raises(ValueError, match="draws its own masks"):
        PretrainConfig(data="x.npz", out="r", model={"method": "hpm_mae", **TINY_VIT},
                       masking={"strategy": "topk", "ratio": 0.5}, rois="x.jsonl")


def test_hpm_mae_and_attmask_arms_run_in_bench(phantoms_npz, tmp_path):
    """One `mwm bench` run with an HPM-MAE and an AttMask-Hint arm beside MAE with random masking (one step each)."""
    from mwm.bench import BenchConfig, run_bench

    raw = {"name": "t", "data": str(phantoms_npz), "out": str(tmp_path / "b"), "arch": "vit_tiny_patch16_224",
           "size": 32, "seeds": [0], "device": "cpu", "rois": {"source": "gt-boxes"},
           "pretrain": {"epochs": 1, "batch_size": 8, "limit": 8, "lr": 1e-3, "warmup_epochs": 0,
                        "recon_images": 0, "workers": 0,
                        "model": {"method": "mae", "patch_size": 8, "decoder_dim": 64, "decoder_depth": 1}},
           "arms": [{"name": "random", "masking": {"strategy": "random", "ratio": 0.75}},
                    {"name": "hpm_mae", "method": "hpm_mae", "masking": {"ratio": 0.75}},
                    {"name": "attmask", "method": "attmask", "model": {"mode": "hint", "show_max": 0.25},
                     "masking": {"ratio": 0.75}}],
           "tasks": [{"kind": "linear", "options": {"epochs": 1}}]}
    rows = run_bench(BenchConfig.model_validate(raw), log=lambda s: None)
    assert sorted(r["arm"] for r in rows) == ["attmask", "hpm_mae", "random"]
    assert_pretrained_once(tmp_path / "b", ("hpm_mae", "attmask"))
    # AttMask-Hint: 12 of 16 masked, then int(0.25·0.75·16) = 3 of the top int(0.25·16) = 4 revealed → 9/16
    s = json.loads((tmp_path / "b" / "runs" / "attmask" / "seed0" / "pretrain" / "summary.json").read_text())
    assert s["mask_ratios"]["mask_ratio"] == pytest.approx(9 / 16)
