"""`mwm segment`: the UNet decoder on timm feature pyramids, the metrics, weight loading, training and the CLI."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from mwm.errors import DataError, MWMError
from mwm.weights import BackboneSpec, resolve_weights
from mwm.transfer.segment import (SegmentConfig, build_model, load_segmenter, overlap_counts, paired_augment,
                                  segment, segmentation_loss, summarize)
from tests.conftest import one_thread, shared_file

METRIC_KEYS = {"dice", "iou", "dice_pooled", "iou_pooled", "dice_fg", "n_test", "n_test_empty", "best_epoch",
               "val_dice", "train_dice", "seconds", "history", "size", "arch"}


_single_thread = pytest.fixture(autouse=True)(one_thread)


def _cfg(data, out, **kw) -> SegmentConfig:
    base = dict(data=data, out=out, weights="none", arch="resnet18", size=32, epochs=1, batch_size=16,
                decoder_channels=32, device="cpu", examples=3, save_model=False)
    return SegmentConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def saved_encoder(tmp_path_factory):
    """A resnet18 encoder.pth + encoder.json as `mwm pretrain` writes them, with recognisable weights."""
    import timm

    d = tmp_path_factory.mktemp("enc")
    torch.manual_seed(123)
    sd = timm.create_model("resnet18").state_dict()
    sd["conv1.weight"] = torch.randn_like(sd["conv1.weight"]) * 0.05 + 0.01
    torch.save(sd, d / "encoder.pth")
    (d / "encoder.json").write_text(json.dumps({"arch": "resnet18", "timm_kwargs": {}, "size": 32,
                                                "normalize": {"mean": [0.5] * 3, "std": [0.25] * 3}}))
    return d / "encoder.pth", sd


# -- model ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["resnet18", "convnext_atto"])
@pytest.mark.parametrize("size", [32, 64])
def test_decoder_output_matches_input_size(arch, size):
    model = build_model(BackboneSpec(arch=arch), decoder_channels=32).eval()
    with torch.no_grad():
        y = model(torch.randn(2, 3, size, size))
    assert y.shape == (2, 1, size, size)
    strides = model.encoder.feature_info.reduction()
    assert len(model.decoder.blocks) == (len(strides) - 1) + int(np.log2(min(strides)))
    if arch == "resnet18":
        assert strides[0] == 2  # the stride-2 stem is a skip level


def test_decoder_handles_sizes_off_the_stride_grid():
    model = build_model(BackboneSpec(arch="resnet18"), decoder_channels=16).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 48, 40)).shape == (1, 1, 48, 40)


def test_pretrained_encoder_weights_are_loaded(saved_encoder):
    path, sd = saved_encoder
    spec = resolve_weights(path)
    assert spec.arch == "resnet18" and spec.size == 32 and spec.mean == (0.5, 0.5, 0.5)
    model = build_model(spec, decoder_channels=16)
    assert torch.equal(model.encoder.conv1.weight, sd["conv1.weight"])
    assert torch.equal(model.encoder.layer4[1].conv2.weight, sd["layer4.1.conv2.weight"])
    # a wrong arch for these weights is refused with a message
    with pytest.raises(MWMError, match="resnet18"):
        resolve_weights(path, arch="resnet50")


# -- metrics, loss, augmentation -----------------------------------------------------------------------------

def test_dice_iou_exact_values_and_empty_cases():
    g = torch.zeros(5, 4, 4, dtype=torch.bool)
    p = torch.zeros_like(g)
    g[0, :2, :2] = True                    # 4 px
    p[0, :2, :] = True                     # 8 px, 4 shared → Dice 8/12, IoU 4/8
    g[1, 0, 0] = True; p[1, 0, 0] = True   # noqa: E702  identical → 1, 1
    # image 2: both empty → 1, 1 (the stated rule)
    p[3, 3, 3] = True                      # empty GT, one false positive → 0, 0
    g[4, 1, 1] = True                      # missed lesion → 0, 0
    c = overlap_counts(p, g)
    assert c.tolist() == [[4, 8, 4], [1, 1, 1], [0, 0, 0], [0, 1, 0], [0, 0, 1]]
    s = summarize(c)
    assert s["dice"] == pytest.approx((8 / 12 + 1 + 1 + 0 + 0) / 5)
    assert s["iou"] == pytest.approx((0.5 + 1 + 1 + 0 + 0) / 5)
    # pooled: I = 5, P = 10, G = 6
    assert s["dice_pooled"] == pytest.approx(10 / 16)
    assert s["iou_pooled"] == pytest.approx(5 / 11)
    assert s["dice_fg"] == pytest.approx((8 / 12 + 1 + 0) / 3)
    assert (s["n"], s["n_empty"]) == (5, 2)
    # all empty and all right: everything 1, no foreground images
    z = summarize(overlap_counts(torch.zeros(3, 4, 4), torch.zeros(3, 4, 4)))
    assert (z["dice"], z["iou"], z["dice_pooled"], z["iou_pooled"], z["dice_fg"]) == (1, 1, 1, 1, None)


def test_loss_prefers_the_right_mask():
    y = torch.zeros(2, 1, 8, 8)
    y[:, :, 2:6, 2:6] = 1
    good, bad = (y * 2 - 1) * 6, -(y * 2 - 1) * 6
    for kind in ("dice_bce", "dice", "bce"):
        assert segmentation_loss(good, y, kind) < 0.1 < segmentation_loss(bad, y, kind)


def test_paired_augment_moves_image_and_mask_together():
    g = torch.Generator().manual_seed(0)
    m = torch.zeros(4, 1, 32, 32)
    m[:, :, 4:14, 6:20] = 1
    x = m.repeat(1, 3, 1, 1)
    # pure flip: exact
    xf, mf = paired_augment(x, m, g, scale=(1, 1), ratio=(1, 1), hflip=1.0)
    assert torch.equal(mf, m.flip(-1)) and torch.allclose(xf, x.flip(-1))
    # random crops: the image's content follows the mask (bilinear vs nearest differ only at edges)
    xa, ma = paired_augment(x, m, g, scale=(0.4, 0.9))
    assert set(ma.unique().tolist()) <= {0.0, 1.0}
    agree = ((xa[:, :1] > 0.5) == (ma > 0.5)).float().mean()
    assert agree > 0.95 and not torch.equal(ma, m)


# -- runs ----------------------------------------------------------------------------------------------------

def test_run_on_phantoms_writes_outputs(phantoms_npz, tmp_path, saved_encoder):
    path, sd = saved_encoder
    events = []
    m = segment(_cfg(phantoms_npz, tmp_path / "seg", weights=str(path), arch=None, size=None, epochs=2,
                     freeze_encoder=True, save_model=True),
                progress=lambda kind, *a: events.append(kind))
    assert METRIC_KEYS <= set(m)
    assert m["size"] == 32  # the encoder's pretraining size (encoder.json)
    assert m["encoder_lr_scale"] == 0.0 and m["n_test"] == 9 and m["n_test_empty"] == 3
    for k in ("dice", "iou", "dice_pooled", "iou_pooled"):
        assert 0 <= m[k] <= 1
    assert m["iou"] <= m["dice"] + 1e-9
    # the best val epoch was restored: its val Dice is the best of the history
    vals = [r["val_dice"] for r in m["history"]]
    assert m["val_dice"] == max(vals) and m["best_epoch"] == int(np.argmax(vals)) + 1
    saved = json.loads((tmp_path / "seg" / "metrics.json").read_text())
    assert METRIC_KEYS <= set(saved) and saved["dice"] == m["dice"]
    assert (tmp_path / "seg" / "config.yaml").is_file()
    from PIL import Image

    im = Image.open(tmp_path / "seg" / "examples.png")
    assert im.mode == "RGB" and im.width > 3 * 32 and im.height > 3 * 32
    assert {"decode", "start", "step", "epoch", "end"} <= set(events)
    # the frozen encoder is still the saved one, in the written model too
    model, meta = load_segmenter(tmp_path / "seg" / "model.pt")
    assert torch.equal(model.encoder.conv1.weight, sd["conv1.weight"]) and meta["size"] == 32


def test_tiny_overfit_raises_train_dice(phantoms_npz, tmp_path):
    m = segment(_cfg(phantoms_npz, tmp_path / "seg", epochs=20, batch_size=8, train_limit=8, include_empty=False,
                     augment={"enabled": False}, patience=0, lr=3e-3, warmup_epochs=2, freeze_encoder=True,
                     decoder_channels=64, examples=0))
    losses = [r["loss"] for r in m["history"]]
    assert m["n_train"] == 8 and len(losses) == 20
    assert losses[-1] < 0.7 * losses[0]
    assert m["train_dice"] > 0.6, m


def test_masks_without_mask_valid_keep_the_empty_ones(phantoms_npz, tmp_path):
    """An npz with a mask per image and no mask_valid: empty masks are negatives (no lesion), not "unannotated";
    the phantoms' test split holds 3 of them."""
    z = dict(np.load(phantoms_npz))
    p = tmp_path / "novalid.npz"
    np.savez(p, **{k: v for k, v in z.items() if k != "mask_valid"})
    m = segment(_cfg(p, tmp_path / "seg", train_limit=4, examples=0))
    assert m["n_test"] == 9 and m["n_test_empty"] == 3


def test_data_without_masks_is_a_clear_error(phantoms_npz, tmp_path):
    z = dict(np.load(phantoms_npz))
    no_masks = tmp_path / "nomasks.npz"
    np.savez(no_masks, **{k: v for k, v in z.items() if k not in ("masks", "mask_valid")})
    with pytest.raises(DataError, match="no masks"):
        segment(_cfg(no_masks, tmp_path / "a"))
    none_valid = tmp_path / "novalid.npz"
    np.savez(none_valid, **{**z, "mask_valid": np.zeros(len(z["images"]), bool)})
    with pytest.raises(DataError, match="no masks|no image has a valid mask"):
        segment(_cfg(none_valid, tmp_path / "b"))
    # masks, but none in the test split
    no_test = tmp_path / "notest.npz"
    np.savez(no_test, **{**z, "mask_valid": z["split"] != "test"})
    with pytest.raises(DataError, match="0 'test' image"):
        segment(_cfg(no_test, tmp_path / "c"))
    with pytest.raises(MWMError, match="no (encoder )?weights there"):
        segment(_cfg(phantoms_npz, tmp_path / "d", weights=str(tmp_path / "missing.pth")))


def test_config_validation():
    with pytest.raises(Exception, match="extra"):
        SegmentConfig(data="x.npz", out="o", weights="none", arch="resnet18", epoch=3)
    with pytest.raises(Exception, match="threshold"):
        SegmentConfig(data="x.npz", out="o", weights="none", threshold=1.5)


def test_cli(phantoms_npz, tmp_path):
    from typer.testing import CliRunner

    from mwm.cli import app

    out = tmp_path / "seg"
    r = CliRunner().invoke(app, ["segment", str(phantoms_npz), "--weights", "none", "--arch", "resnet18", "--size",
                                 "32", "--epochs", "1", "--batch-size", "16", "--seed", "1", "--device", "cpu",
                                 "--set", "decoder_channels=32", "--set", "save_model=false", "--out", str(out),
                                 "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert METRIC_KEYS <= set(m) and m["encoder_lr_scale"] == 1.0
    assert (out / "metrics.json").is_file() and (out / "examples.png").is_file()
    assert "seed: 1" in (out / "config.yaml").read_text()
    bad = CliRunner().invoke(app, ["segment", str(phantoms_npz), "--weights", str(tmp_path / "nope.pth"),
                                   "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and re.search("no (encoder )?weights there", bad.output)
    no_w = CliRunner().invoke(app, ["segment", str(phantoms_npz), "--out", str(tmp_path / "y")])
    assert no_w.exit_code == 2 and "--weights" in no_w.output


def test_br35h_small_run(tmp_path):
    data = shared_file("br35h.npz")
    m = segment(_cfg(data, tmp_path / "seg", train_limit=32, epochs=1, freeze_encoder=True, examples=2))
    assert m["n_train"] == 32 and m["n_val"] == 201 and m["n_test"] == 100
    assert m["n_test_empty"] == 0 and 0 <= m["dice"] <= 1 and m["dice_fg"] == pytest.approx(m["dice"])
