"""`mwm detect`: masks → instances, encoder weights in the torchvision backbone, the COCO metric wrapper, short
Mask R-CNN runs on phantoms (API and CLI) and on Br35H, and the errors users see."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mwm.cli import app
from mwm.config import ConfigError, resolve
from mwm.errors import DataError, MWMError
from mwm.weights import resolve_weights
from mwm.transfer.detect import (METRIC_KEYS, DetectConfig, _hflip, _lr_factor, build_model, detect,
                                 detection_metrics, mask_to_instances)

from tests.conftest import shared_file

runner = CliRunner()
# CPU-sized runs: one step of 4 images, few RoIs and detections (each costs a mask-head pass), 2 val images
QUICK = {"batch_size": 4, "epochs": 1, "train_limit": 4, "val_limit": 2, "test_limit": 4, "roi_batch_size": 32,
         "detections_per_image": 5, "examples": 2, "log_every": 1, "device": "cpu"}


# -- targets ----------------------------------------------------------------------------------------------------

def test_mask_to_instances_components_boxes_and_min_area():
    m = np.zeros((20, 24), np.uint8)
    m[2:6, 3:8] = 1                  # rows 2..5, cols 3..7
    m[10, 10] = m[11, 11] = m[12, 12] = 1  # a diagonal line: one component under 8-connectivity
    m[18, 20] = 1                    # a single pixel: below min_area=2
    inst = mask_to_instances(m, min_area=2)
    assert inst["boxes"].dtype == np.float32 and inst["labels"].dtype == np.int64 and inst["masks"].dtype == np.uint8
    # [x0, y0, x1, y1] with exclusive x1/y1: the pixel extent, as COCO boxes of polygons
    np.testing.assert_array_equal(inst["boxes"], [[3, 2, 8, 6], [10, 10, 13, 13]])
    np.testing.assert_array_equal(inst["labels"], [1, 1])
    assert inst["masks"].shape == (2, 20, 24)
    assert inst["masks"][0].sum() == 20 and inst["masks"][0][2:6, 3:8].all()
    assert inst["masks"][1].sum() == 3 and inst["masks"][1][11, 11] == 1
    assert len(mask_to_instances(m, min_area=1)["boxes"]) == 3  # the pixel is kept at min_area=1: [20, 18, 21, 19]
    np.testing.assert_array_equal(mask_to_instances(m, min_area=1)["boxes"][2], [20, 18, 21, 19])


def test_empty_mask_gives_a_negative_with_the_right_shapes():
    inst = mask_to_instances(np.zeros((16, 12), np.uint8))
    assert inst["boxes"].shape == (0, 4) and inst["boxes"].dtype == np.float32
    assert inst["labels"].shape == (0,) and inst["labels"].dtype == np.int64
    assert inst["masks"].shape == (0, 16, 12) and inst["masks"].dtype == np.uint8


def test_hflip_moves_image_boxes_and_masks_together():
    m = np.zeros((16, 20), np.uint8)
    m[3:7, 2:9] = 1
    t = {k: torch.from_numpy(v) for k, v in mask_to_instances(m).items()}
    img = torch.from_numpy(np.stack([m] * 3).astype(np.float32))
    img_f, t_f = _hflip(img, t)
    expect = mask_to_instances(m[:, ::-1].copy())
    np.testing.assert_array_equal(t_f["boxes"].numpy(), expect["boxes"])  # [11, 3, 18, 7]
    np.testing.assert_array_equal(t_f["masks"].numpy(), expect["masks"])
    assert torch.equal(img_f[0], t_f["masks"][0].float())


def test_lr_schedule_warms_up_then_steps_down_and_default_lr_scales_with_batch(tmp_path):
    cfg = DetectConfig(data=tmp_path, out=tmp_path, warmup_iters=10, batch_size=8)
    f = [_lr_factor(cfg, s, 90) for s in range(90)]
    assert f[0] == pytest.approx(0.001) and f[5] == pytest.approx(0.5005) and f[10] == 1.0
    assert f[59] == 1.0 and f[60] == pytest.approx(0.1) and f[79] == pytest.approx(0.1) and f[80] == pytest.approx(0.01)
    assert cfg.peak_lr() == pytest.approx(0.01) and cfg.arch == "resnet18"  # 0.02 × 8 / 16
    assert DetectConfig(data=tmp_path, out=tmp_path, optimizer="adamw").peak_lr() == pytest.approx(1e-4)
    cos = DetectConfig(data=tmp_path, out=tmp_path, warmup_iters=0, schedule="cosine")
    assert _lr_factor(cos, 0, 100) == 1.0 and _lr_factor(cos, 50, 100) == pytest.approx(0.5)


# -- backbone ---------------------------------------------------------------------------------------------------

def _encoder(tmp_path, arch="resnet18", saved_as=None, normalize=None):
    import timm

    torch.manual_seed(1)
    sd = {k: v for k, v in timm.create_model(arch).state_dict().items() if not k.startswith("fc.")}
    sd["layer1.0.bn1.running_mean"] = torch.randn_like(sd["layer1.0.bn1.running_mean"])  # not the init value
    run = tmp_path / "run"
    run.mkdir()
    torch.save(sd, run / "encoder.pth")
    meta = {"arch": saved_as or arch}
    if normalize:
        meta["normalize"] = normalize
    (run / "encoder.json").write_text(json.dumps(meta))
    return run, sd


def test_encoder_weights_are_loaded_into_the_torchvision_backbone(tmp_path):
    from torchvision.ops.misc import FrozenBatchNorm2d

    run, sd = _encoder(tmp_path, normalize={"mean": [0.5] * 3, "std": [0.25] * 3})
    spec = resolve_weights(run)
    model = build_model(spec, size=64)
    body = model.backbone.body
    for key in ("conv1.weight", "layer3.0.conv1.weight", "layer4.1.conv2.weight", "layer2.0.downsample.0.weight"):
        assert torch.equal(body.get_submodule(key.rsplit(".", 1)[0]).weight, sd[key]), key
    assert isinstance(body.bn1, FrozenBatchNorm2d)  # torchvision's detection default for pretrained backbones
    assert torch.equal(body.layer1[0].bn1.running_mean, sd["layer1.0.bn1.running_mean"])
    # trainable_layers=3 (torchvision's default): stem and layer1 frozen, layer2..4 trained
    assert not body.conv1.weight.requires_grad and not body.layer1[0].conv1.weight.requires_grad
    assert body.layer2[0].conv1.weight.requires_grad and body.layer4[0].conv1.weight.requires_grad
    assert model.transform.image_mean == [0.5] * 3 and model.transform.image_std == [0.25] * 3
    assert model.transform.min_size == (64,) and model.transform.max_size == 64
    # a train step accepts a negative image (empty target) next to a positive one
    m = np.zeros((64, 64), np.uint8)
    m[10:30, 20:44] = 1
    tgts = [{k: torch.from_numpy(v) for k, v in mask_to_instances(x).items()} for x in (m, np.zeros_like(m))]
    model.train()
    losses = model([torch.rand(3, 64, 64), torch.rand(3, 64, 64)], tgts)
    assert set(losses) >= {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness"}
    assert all(torch.isfinite(v) for v in losses.values())
    # Detectron2's predictor init (mask logits N(0, 0.001)): the mask loss starts at ln 2, not near 3 as with
    # torchvision's Kaiming init, which made from-scratch runs diverge
    assert losses["loss_mask"] < 0.75


def test_head_budget_options_reach_the_model():
    """proposals_train/test and roi_batch_size set the RPN's post-NMS counts and the RoI sampler; eval keeps at
    most detections_per_image boxes."""
    model = build_model(resolve_weights("none", "resnet18"), size=64, roi_batch_size=32, detections_per_image=3,
                        proposals_train=64, proposals_test=40)
    assert model.rpn._post_nms_top_n == {"training": 64, "testing": 40}
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 32
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 64, 64)])
    assert len(out[0]["boxes"]) <= 3


def test_random_init_uses_trainable_batchnorm_and_a_wrong_encoder_is_refused(tmp_path):
    from torch import nn

    model = build_model(resolve_weights("none", "resnet18"), size=64)
    assert isinstance(model.backbone.body.bn1, nn.BatchNorm2d)
    assert all(p.requires_grad for p in model.backbone.body.parameters())
    assert model.roi_heads.mask_predictor.mask_fcn_logits.weight.std() < 0.01
    run, _ = _encoder(tmp_path, arch="resnet18", saved_as="resnet34")  # resnet18 weights labelled resnet34
    with pytest.raises(MWMError, match="does not fit torchvision 'resnet34'"):
        build_model(resolve_weights(run), size=64)


# -- metrics ----------------------------------------------------------------------------------------------------

def _gt(n=3, size=48):
    out = []
    for i in range(n):
        m = np.zeros((size, size), np.uint8)
        m[5 + i:25 + i, 8:28] = 1  # 20×20 squares
        out.append({k: torch.from_numpy(v) for k, v in mask_to_instances(m).items()})
    return out


def test_metrics_perfect_predictions_score_one():
    gt = _gt()
    preds = [{**t, "scores": torch.ones(len(t["boxes"])), "masks": t["masks"].bool()} for t in gt]
    m = detection_metrics(preds, gt)
    assert set(m) == set(METRIC_KEYS)
    assert all(v == pytest.approx(1.0) for v in m.values()), m


def test_metrics_shifted_predictions_lose_ap75_not_ap50():
    gt = _gt()
    preds = []
    for t in gt:  # 4 px to the right: IoU = 16·20 / (24·20) = 0.67, a hit at 0.5 and a miss at 0.75
        b = t["boxes"].clone()
        b[:, [0, 2]] += 4
        preds.append({"boxes": b, "labels": t["labels"], "scores": torch.ones(len(b)),
                      "masks": torch.roll(t["masks"], 4, dims=-1).bool()})
    m = detection_metrics(preds, gt)
    assert m["box_ap50"] == pytest.approx(1.0) and m["mask_ap50"] == pytest.approx(1.0)
    assert m["box_ap75"] < 0.5 and m["mask_ap75"] < 0.5 and m["box_ap"] < 1.0


# -- runs -------------------------------------------------------------------------------------------------------

def test_detect_one_epoch_on_phantoms(phantoms_npz, tmp_path):
    out = tmp_path / "det"
    cfg = DetectConfig(data=phantoms_npz, out=out, weights="none", arch="resnet18", size=64, **QUICK)
    events = []
    m = detect(cfg, progress=lambda kind, done, total, info: events.append(kind))
    saved = json.loads((out / "metrics.json").read_text())
    for k in (*METRIC_KEYS, "n_test", "best_epoch", "seconds", "seconds_per_epoch"):
        assert k in saved, k
    for k in METRIC_KEYS:
        assert saved[k] is None or 0.0 <= saved[k] <= 1.0
    assert saved["n_train"] == 4 and saved["n_val"] == 2 and saved["n_test"] == 4 and saved["best_epoch"] == 1
    assert saved["norm"] == "bn" and m["box_ap"] == saved["box_ap"]
    assert "val_box_ap" in saved["history"][0]
    assert (out / "config.yaml").is_file() and (out / "examples.png").is_file() and (out / "model.pth").is_file()
    assert events[0] == "start" and "step" in events and "epoch" in events and events[-1] == "end"


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="ResNet"):
        resolve(DetectConfig, options={"data": tmp_path, "out": tmp_path / "o", "arch": "convnext_tiny"})
    run, _ = _encoder(tmp_path, arch="resnet18")
    (run / "encoder.json").write_text(json.dumps({"arch": "vit_small_patch16_224"}))
    no_masks = tmp_path / "nomask.npz"
    rng = np.random.default_rng(0)
    np.savez(no_masks, images=rng.integers(0, 255, (6, 32, 32), dtype=np.uint8), labels=np.arange(6) % 2,
             label_names=np.array(["a", "b"]), split=np.array(["train", "train", "val", "val", "test", "test"]))
    with pytest.raises(MWMError, match="torchvision-style ResNet"):
        detect(DetectConfig(data=no_masks, out=tmp_path / "o", weights=str(run)))
    with pytest.raises(DataError, match="no masks"):
        detect(DetectConfig(data=no_masks, out=tmp_path / "o", size=32))


def test_cli_detect(phantoms_npz, tmp_path):
    out = tmp_path / "cli"
    r = runner.invoke(app, ["detect", str(phantoms_npz), "--weights", "none", "--arch", "resnet18", "--size", "64",
                            "--epochs", "1", "--batch-size", "2", "--train-limit", "2", "--device", "cpu", "--seed",
                            "3", "--lr", "0.005", "--out", str(out), "--set", "val_limit=2", "--set", "test_limit=2",
                            "--set", "save_model=false", "--set", "roi_batch_size=32",
                            "--set", "detections_per_image=5", "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(METRIC_KEYS) <= set(s) and s["n_test"] == 2 and s["n_train"] == 2
    assert "box" in r.stderr and "AP75" in r.stderr and "epoch 1/1" in r.stderr
    assert (out / "metrics.json").is_file() and not (out / "model.pth").exists()
    r = runner.invoke(app, ["detect", str(phantoms_npz), "--arch", "convnext_tiny", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "ResNet" in r.output
    r = runner.invoke(app, ["detect", str(phantoms_npz)])
    assert r.exit_code == 2 and "--out" in r.output


@pytest.mark.slow
def test_detect_br35h_small(tmp_path):
    data = shared_file("br35h.npz")
    m = detect(DetectConfig(data=data, out=tmp_path / "br", weights="none", arch="resnet18", size=64,
                            save_model=False, **QUICK))
    assert m["n_train"] == 4 and m["n_test"] == 4 and m["test_instances"] >= 4 and m["train_instances"] >= 4
    assert all(m[k] is None or 0.0 <= m[k] <= 1.0 for k in METRIC_KEYS)
