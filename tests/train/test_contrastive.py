"""The contrastive baselines (``simclr``, ``mocov2``, ``byol``; lightly heads and losses): BYOL's target follows
its cosine momentum schedule, MoCo's queue advances by the batch (and resumes), NT-Xent equals a hand computation,
the views of a gray scan stay gray and are reproducible from the generator, each method runs in ``mwm bench``.
The registry-wide contract (a step, exact resume, an encoder timm loads) runs them in test_method_contract.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from mwm.train import PretrainConfig, pretrain
from mwm.train.methods import MethodContext, create_method
from mwm.train.methods.augment import ViewAugmentConfig, augment_views


def _method(name: str, n_images: int = 8, **model):
    """The method ``name`` (resnet18 @ 64 px, batch 2, 3 epochs) placed on the CPU with a seeded generator."""
    cfg = PretrainConfig(data="x.npz", out="run", model={"method": name, "arch": "resnet18", "size": 64, **model},
                         batch_size=2, epochs=3, accelerator="cpu")
    torch.manual_seed(0)
    method = create_method(cfg)
    method.prepare(MethodContext(torch.device("cpu"), torch.Generator().manual_seed(0), [None] * n_images))
    return method


def _step(method, x: torch.Tensor, opt: torch.optim.Optimizer) -> None:
    loss, _ = method.training_step(method.views((x,)))
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_byol_target_follows_the_cosine_momentum_schedule():
    """After optimizer step k (1-based) of K: target = m·target_old + (1 − m)·online with BYOL's
    m = 1 − (1 − 0.996)(cos(π(k − 1)/(K − 1)) + 1)/2 (lightly's cosine_schedule: 1 at the last step)."""
    method = _method("byol")
    net = method.model
    assert method.total_steps == 12  # 8 images / batch 2 × 3 epochs
    assert all(not p.requires_grad for p in net.encoder_momentum.parameters())
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
    x = torch.rand(2, 3, 64, 64)
    for k, m in ((1, 0.996), (5, 1 - 0.004 * (math.cos(math.pi * 4 / 11) + 1) / 2), (12, 1.0)):
        _step(method, x, opt)
        old = copy.deepcopy(net.encoder_momentum.state_dict())
        online = {n: p.detach().clone() for n, p in net.encoder.named_parameters()}
        assert not all(torch.equal(online[n], old[n]) for n in online)  # the step moved the online net away
        method.on_after_optimizer_step(k)
        assert method.momentum_at(k) == pytest.approx(m, abs=1e-12)
        new = net.encoder_momentum.state_dict()
        for n in online:
            torch.testing.assert_close(new[n], m * old[n] + (1 - m) * online[n], rtol=1e-6, atol=1e-7)
    # the projector's target follows too; the predictor has none
    assert net.projection_momentum is not None and not hasattr(net, "prediction_momentum")


def test_moco_queue_advances_by_the_batch_and_resumes():
    method = _method("mocov2", queue_size=6)
    bank = method.criterion.memory_bank
    assert bank.bank.shape == (6, 128) and int(bank.bank_ptr) == 0
    before = bank.bank.clone()
    views = method.views((torch.rand(2, 3, 64, 64),))
    out = method.net(views.x0, views.x1)
    assert not out["k"].requires_grad and out["q"].requires_grad  # keys come from the momentum encoder
    method.loss(out)
    assert int(bank.bank_ptr) == 2
    torch.testing.assert_close(bank.bank[:2], F.normalize(out["k"], dim=1))  # the batch's keys, enqueued
    assert torch.equal(bank.bank[2:], before[2:])
    method.training_step(method.views((torch.rand(2, 3, 64, 64),)))
    assert int(bank.bank_ptr) == 4
    # the queue is a checkpoint entry: a fresh method restored from it holds the same queue and pointer
    state = method.state_dict()
    again = _method("mocov2", queue_size=6)
    assert not torch.equal(again.criterion.memory_bank.bank, bank.bank)
    again.load_state_dict(state)
    assert torch.equal(again.criterion.memory_bank.bank, bank.bank) and int(again.criterion.memory_bank.bank_ptr) == 4


def test_simclr_nt_xent_equals_a_hand_computation():
    """NT-Xent (SimCLR eq. 1): each of the 2B views against its partner over the other 2B − 1 views, mean."""
    method = _method("simclr", temperature=0.5)
    z0 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z1 = torch.tensor([[1.0, 1.0], [-1.0, 1.0]])
    z = F.normalize(torch.cat([z0, z1]), dim=1).tolist()
    n, terms = len(z), []
    for i in range(n):
        sims = [sum(a * b for a, b in zip(z[i], z[j])) / 0.5 for j in range(n)]
        pos = (i + n // 2) % n
        terms.append(-sims[pos] + math.log(sum(math.exp(s) for j, s in enumerate(sims) if j != i)))
    assert float(method.loss({"z0": z0, "z1": z1})) == pytest.approx(sum(terms) / n, rel=1e-6)
    # two identical views are a lower loss than two different ones
    assert float(method.loss({"z0": z0, "z1": z0})) < float(method.loss({"z0": z0, "z1": z1}))


def test_views_of_a_gray_scan_are_gray_in_range_and_reproducible():
    gray = torch.rand(4, 1, 64, 64).expand(4, 3, 64, 64).contiguous()
    cfg = ViewAugmentConfig(jitter_prob=1.0, blur_prob=(1.0, 1.0))
    v0, v1 = augment_views(gray, cfg, torch.Generator().manual_seed(3))
    for v in (v0, v1):
        assert torch.equal(v[:, 0], v[:, 1]) and torch.equal(v[:, 1], v[:, 2])  # no colour is invented
        assert v.min() >= 0 and v.max() <= 1 and not torch.allclose(v, gray)
    assert not torch.allclose(v0, v1)
    w0, w1 = augment_views(gray, cfg, torch.Generator().manual_seed(3))  # the generator fixes the views (resume)
    assert torch.equal(v0, w0) and torch.equal(v1, w1)
    assert not {"hue", "saturation", "grayscale", "solarize"} & set(ViewAugmentConfig.model_fields)


def test_views_with_every_operation_off_are_the_input():
    """Geometry composition check: full-image crop, no flip, no rotation, jitter or blur → the identity."""
    x = torch.rand(2, 3, 32, 32)
    off = ViewAugmentConfig(crop_scale=(1, 1), crop_ratio=(1, 1), hflip=0, rotate=0, jitter_prob=0, blur_prob=(0, 0))
    v0, _ = augment_views(x, off, torch.Generator().manual_seed(0))
    torch.testing.assert_close(v0, x, rtol=0, atol=1e-5)
    flip = off.model_copy(update={"hflip": 1.0})
    torch.testing.assert_close(augment_views(x, flip, torch.Generator())[0], x.flip(-1), rtol=0, atol=1e-5)
    rot = off.model_copy(update={"rotate": 90.0})  # ±90°: the centre pixel stays, a corner turns black or not
    r = augment_views(x, rot, torch.Generator().manual_seed(1))[0]
    assert not torch.allclose(r, x)


def test_contrastive_configs_refuse_what_cannot_run():
    with pytest.raises(ValueError, match="batch-size 2"):
        PretrainConfig(data="x.npz", out="run", model={"method": "simclr"}, batch_size=1)
    with pytest.raises(ValueError, match="trains timm CNNs"):
        PretrainConfig(data="x.npz", out="run", model={"method": "byol", "arch": "vit_tiny_patch16_224"})
    with pytest.raises(ValueError, match="hue"):
        PretrainConfig(data="x.npz", out="run", model={"method": "simclr", "views": {"hue": 0.1}})
    cfg = PretrainConfig(data="x.npz", out="run", model={"method": "byol"})
    assert cfg.model.views.blur_prob == (1.0, 0.1) and cfg.model.momentum == 0.996  # BYOL's own defaults
    assert PretrainConfig.model_validate(cfg.model_dump(mode="json")).model == cfg.model


def test_init_weights_reach_the_encoder_and_its_momentum_copy():
    """``--init``: the backbone gets the weights (timm names, classifier unused), the target starts from them."""
    import timm

    from mwm.weights import InitWeights

    method = _method("byol")
    sd = timm.create_model("resnet18", num_classes=5).state_dict()
    info = method.apply_init(InitWeights("test", "0" * 64, sd))
    assert info["unused"] == ["fc.bias", "fc.weight"] and info["tensors"] == len(sd) - 2
    for part in (method.model.encoder, method.model.encoder_momentum):
        own = part.state_dict()
        assert all(torch.equal(own[k], sd[k]) for k in own)


def test_moco_resume_restores_the_queue(tiny_npz, tmp_path):
    """Stopped after epoch 1 and resumed == straight through: the checkpoint's queue too (the contract test
    compares the weights)."""
    def config(out):
        return PretrainConfig(data=tiny_npz, out=out, model={"method": "mocov2", "arch": "resnet18", "size": 64,
                                                             "queue_size": 8}, accelerator="cpu", workers=0,
                              batch_size=2, limit=4, epochs=2, warmup_epochs=0, lr=1e-3, optimizer="adamw",
                              recon_images=0)

    a, b = config(tmp_path / "a"), config(tmp_path / "b")
    pretrain(a)
    pretrain(b, stop_at_epoch=1)
    pretrain(b.model_copy(update={"resume": True}))
    qa = torch.load(tmp_path / "a/checkpoints/last.pt", weights_only=True)["queue"]
    qb = torch.load(tmp_path / "b/checkpoints/last.pt", weights_only=True)["queue"]
    assert int(qa["ptr"]) == 0 and torch.equal(qa["bank"], qb["bank"])  # 4 steps × 2 keys filled the 8 slots


@pytest.mark.parametrize("method", ["simclr", "mocov2", "byol"])
def test_each_runs_as_a_bench_arm(method, phantoms_npz, tmp_path):
    from mwm.bench import BenchConfig, run_bench

    cfg = BenchConfig.model_validate({
        "name": "t", "data": str(phantoms_npz), "out": str(tmp_path / "b"), "arch": "resnet18", "size": 32,
        "seeds": [0], "device": "cpu", "rois": {"source": "gt-boxes"},
        "pretrain": {"epochs": 1, "batch_size": 8, "limit": 8, "lr": 1e-3, "warmup_epochs": 0, "recon_images": 2,
                     "workers": 0},
        "arms": [{"name": method, "method": method, "model": {"proj_dim": 16, "hidden_dim": 32}}],
        "tasks": [{"kind": "linear", "options": {"epochs": 1}}]})
    rows = run_bench(cfg, log=lambda s: None)
    assert len(rows) == 1 and 0 <= rows[0]["accuracy"] <= 1
    run = tmp_path / "b" / "runs" / method / "seed0" / "pretrain"
    assert (run / "encoder.pth").is_file() and not (run / "recon").exists()
    import yaml

    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["method"] == method
