"""End-to-end pretraining on CPU (resnet18 at 64 px: a 2 × 2 mask grid): learning, the lr reaching the
optimizer, outputs (encoder.pth for timm, Detectron2 names, recon PNG, metrics, TensorBoard) and exact resume."""

from __future__ import annotations

import pytest
import timm
import torch
from PIL import Image

from mwm.errors import MWMError
from mwm.train import PretrainConfig, pretrain
from mwm.train.checkpoint import load_checkpoint
from mwm.train.metrics import COLUMNS, TIMING, read_metrics

from .conftest import write_manifest

LR = 5e-3


def small(data, out, **kw):
    base = dict(data=data, out=out, model={"arch": "resnet18", "size": 64}, accelerator="cpu", workers=0,
                batch_size=4, log_every=1, masking={"strategy": "random", "ratio": 0.5})
    return PretrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def overfit(tiny_npz, tmp_path_factory):
    """The same 4 images (no augmentation) for 16 steps at an explicit lr, no warmup, one checkpoint (at the end:
    a ResNet-18 checkpoint costs about as much as a training step here)."""
    out = tmp_path_factory.mktemp("overfit") / "run"
    cfg = small(tiny_npz, out, limit=4, epochs=16, augment={"enabled": False}, lr=LR, warmup_epochs=0,
                optimizer="adamw", recon_every=8, checkpoint_every=100)
    return cfg, pretrain(cfg)


def test_loss_decreases_when_overfitting(overfit):
    _, s = overfit
    rows = read_metrics(s["metrics"])
    assert len(rows) == 16 and [r["step"] for r in rows] == list(range(1, 17))
    first = sum(r["loss"] for r in rows[:3]) / 3
    last = sum(r["loss"] for r in rows[-3:]) / 3
    assert last < 0.85 * first, (first, last)  # ≈ 0.99 → 0.73 on this data
    assert s["first_loss"] == rows[0]["loss"] and s["final_loss"] == rows[-1]["loss"]


def test_explicit_lr_reaches_the_optimizer(overfit):
    cfg, s = overfit
    assert s["lr"] == LR and "explicitly" in s["lr_rule"]
    rows = read_metrics(s["metrics"])
    assert rows[0]["lr"] == LR  # no warmup: the first step runs at the peak
    assert rows[-1]["lr"] < LR  # then cosine
    ckpt = load_checkpoint(cfg.out / "checkpoints" / "last.pt")
    assert {g["initial_lr"] for g in ckpt["optimizer"]["param_groups"]} == {LR}


def test_outputs_metrics_tensorboard_recon(overfit):
    cfg, s = overfit
    out = cfg.out
    assert (out / "config.yaml").is_file() and (out / "summary.json").is_file()
    assert (out / "metrics.csv").read_text().splitlines()[0] == ",".join(COLUMNS)
    row = read_metrics(out / "metrics.csv")[0]
    assert row["mask_ratio"] == 0.5 and row["mask_ratio_in"] is None and row["images_per_s"] > 0
    assert any((out / "tb").glob("events.out.tfevents.*"))
    assert s["recon"] == [str(out / "recon" / "epoch_008.png"), str(out / "recon" / "epoch_016.png")]
    im = Image.open(s["recon"][-1])
    assert im.mode == "RGB" and im.width > 3 * 128 and im.height > 4 * 128  # 4 rows × (input, masked, recon)


def test_encoder_loads_into_timm_with_only_classifier_missing(overfit):
    cfg, s = overfit
    sd = torch.load(s["encoder"], map_location="cpu", weights_only=True)
    model = timm.create_model("resnet18", pretrained=False)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    trained = load_checkpoint(cfg.out / "checkpoints" / "last.pt")["model"]
    assert torch.equal(sd["layer4.1.conv2.weight"], trained["encoder.model.layer4.1.conv2.weight"])
    d2 = torch.load(s["encoder_d2"], map_location="cpu", weights_only=True)
    assert torch.equal(d2["model"]["stem.conv1.weight"], sd["conv1.weight"]) and "res5.1.conv2.norm.weight" in d2["model"]


def test_resume_equals_uninterrupted(tiny_npz, tmp_path):
    """2 epochs straight == 1 epoch, stop, resume for the 2nd: same weights, EMA, optimizer state and metrics.
    Exercises the ROI masker, augmentation, accumulation, LAMB, warmup + cosine and EMA on the way."""
    rois = tmp_path / "rois.jsonl"
    write_manifest(tiny_npz, rois)
    kw = dict(limit=8, batch_size=2, accumulate=2, epochs=2, ema=0.9, warmup_epochs=1, recon_every=1, rois=rois,
              masking={"strategy": "roi", "ratio_in": 0.75, "ratio_out": 0.25})
    a = small(tiny_npz, tmp_path / "a", **kw)
    b = small(tiny_npz, tmp_path / "b", **kw)
    pretrain(a)
    first = pretrain(b, stop_at_epoch=1)
    assert first["epochs_done"] == 1 and first["steps"] == 2
    with pytest.raises(MWMError, match="already holds a run"):
        pretrain(b)
    with pytest.raises(MWMError, match="seed"):
        pretrain(b.model_copy(update={"resume": True, "seed": 5}))
    s = pretrain(b.model_copy(update={"resume": True}))
    assert s["resumed_from_epoch"] == 1 and s["steps"] == 4

    ca = load_checkpoint(a.out / "checkpoints" / "last.pt")
    cb = load_checkpoint(b.out / "checkpoints" / "last.pt")
    assert ca["step"] == cb["step"] == 4
    for part in ("model", "ema"):
        assert ca[part].keys() == cb[part].keys()
        bad = [k for k in ca[part] if not torch.equal(ca[part][k], cb[part][k])]
        assert not bad, f"{part} differs: {bad[:5]}"
    for sa, sb in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values()):
        assert all(torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])) for k in sa)
    assert torch.equal(ca["rng"][0]["mask"], cb["rng"][0]["mask"])

    ra, rb = read_metrics(a.out / "metrics.csv"), read_metrics(b.out / "metrics.csv")
    strip = [{k: v for k, v in r.items() if k not in TIMING} for r in ra], \
            [{k: v for k, v in r.items() if k not in TIMING} for r in rb]
    assert len(ra) == 4 and strip[0] == strip[1]
    guided = [r for r in ra if r["mask_ratio_in"] is not None]
    assert len(guided) >= 3 and all(r["mask_ratio_in"] > r["mask_ratio_out"] for r in guided)
    sda = torch.load(a.out / "encoder.pth", weights_only=True)
    sdb = torch.load(b.out / "encoder.pth", weights_only=True)
    assert all(torch.equal(sda[k], sdb[k]) for k in sda)


def test_mae_vit_path_exports_for_timm(tiny_npz, tmp_path):
    """The ViT path (token dropping with the visible count passed in, no host sync) trains a step and exports
    weights that timm's ViT at the pretraining img_size loads with only the head missing."""
    cfg = small(tiny_npz, tmp_path / "mae", model={"arch": "vit_tiny_patch16_224", "size": 32}, limit=4, epochs=1,
                warmup_epochs=0, recon_images=0, masking={"strategy": "random", "ratio": 0.75})
    s = pretrain(cfg)
    assert cfg.model.method == "mae" and s["steps"] == 1 and s["encoder_d2"] is None
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32)
    missing, unexpected = model.load_state_dict(torch.load(s["encoder"], weights_only=True), strict=False)
    assert set(missing) == {"head.weight", "head.bias"} and not unexpected
