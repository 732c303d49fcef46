"""`mwm finetune`: linear probe (cached features, folded into a timm head) and full fine-tuning (best-on-val state
restored), metrics consistency, errors, the CLI, and a br35h run. Tiny sizes: resnet18 at 32 px on 60 phantoms."""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest
import timm
import torch
from typer.testing import CliRunner

from mwm.errors import MWMError
from mwm.transfer import classify
from mwm.transfer.classify import METRIC_KEYS, FinetuneConfig, finetune
from tests.conftest import one_thread, shared_file

MEAN, STD = (0.4, 0.45, 0.5), (0.2, 0.25, 0.3)  # not ImageNet's: proves encoder.json's normalization is used


_single_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """RUN/encoder.pth + encoder.json as `mwm pretrain` writes them (resnet18, pretrained at 32 px)."""
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(1)
    sd = {k: v for k, v in timm.create_model("resnet18").state_dict().items() if not k.startswith("fc.")}
    torch.save(sd, run / "encoder.pth")
    (run / "encoder.json").write_text(json.dumps({"arch": "resnet18", "timm_kwargs": {}, "size": 32,
                                                  "normalize": {"mean": MEAN, "std": STD}}))
    return run / "encoder.pth"


def cfg_for(data, out, weights, **kw) -> FinetuneConfig:
    return FinetuneConfig(**{"data": data, "out": out, "weights": str(weights), "device": "cpu", **kw})


def history(out) -> list[dict]:
    with open(out / "history.csv") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def logits_from_saved(out, data, split: str) -> tuple[torch.Tensor, np.ndarray]:
    """Predictions of OUT/model.pth, fed as OUT/model.json says, on one split of ``data``."""
    from mwm.transfer import load_labelled

    meta = json.loads((out / "model.json").read_text())
    model = timm.create_model(meta["arch"], num_classes=meta["num_classes"], **meta["timm_kwargs"])
    model.load_state_dict(torch.load(out / "model.pth", weights_only=True))
    d = load_labelled(data, meta["size"])
    idx = d.indices(split)
    x = torch.from_numpy(d.images[idx]).float() / 255
    x = (x - torch.tensor(meta["normalize"]["mean"]).view(1, 3, 1, 1)) / torch.tensor(meta["normalize"]["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        return model.eval()(x), d.labels[idx]


@pytest.fixture(scope="module")
def linear(phantoms_npz, encoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("linear")
    cfg = cfg_for(phantoms_npz, out, encoder, mode="linear", epochs=150, patience=0, probe="path")
    return cfg, finetune(cfg)


def test_linear_metrics_json_complete_and_consistent(linear):
    cfg, m = linear
    on_disk = json.loads((cfg.out / "metrics.json").read_text())
    assert on_disk == m
    assert set(METRIC_KEYS) <= set(m)
    assert m["mode"] == "linear" and m["weights"] == str(cfg.weights) and m["features"] == "extracted"
    assert (m["n_train"], m["n_val"], m["n_test"]) == (41, 10, 9)
    cm = np.array(m["confusion_matrix"])
    assert cm.shape == (3, 3) and cm.sum() == m["n_test"]
    assert m["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    recall = np.diag(cm) / cm.sum(1)
    assert m["balanced_accuracy"] == pytest.approx(recall.mean())
    for k in ("accuracy", "balanced_accuracy", "macro_f1", "auroc"):
        assert 0 <= m[k] <= 1 and 0 <= m["val"][k] <= 1
    assert 1 <= m["best_epoch"] <= m["epochs_run"] == 150
    assert m["seconds"] > 0


def test_linear_takes_arch_size_and_normalization_from_encoder_json(linear):
    import yaml

    cfg, m = linear
    saved = yaml.safe_load((cfg.out / "config.yaml").read_text())
    assert saved["arch"] == "resnet18" and saved["size"] == 32 and m["size"] == 32
    assert saved["epochs"] == 150 and saved["lr"] == classify.MODE_DEFAULTS["linear"]["lr"]  # mode defaults filled
    meta = json.loads((cfg.out / "model.json").read_text())
    assert meta["normalize"] == {"mean": list(MEAN), "std": list(STD)} and meta["num_classes"] == 3


def test_linear_probe_overfits_train(linear):
    cfg, _ = linear
    rows = history(cfg.out)
    assert len(rows) == 150 and [r["epoch"] for r in rows] == list(range(1, 151))
    assert rows[0]["train_loss"] == pytest.approx(math.log(3), abs=1e-5)  # zero-initialised head
    assert rows[-1]["train_loss"] < 0.2 * rows[0]["train_loss"]
    z = np.load(cfg.out / "features.npz")
    assert z["train_x"].shape == (41, 512) and z["test_x"].shape == (9, 512)


def test_linear_selected_step_and_saved_model_reproduce_the_metrics(linear, phantoms_npz):
    cfg, m = linear
    rows = history(cfg.out)
    best = max(rows, key=lambda r: (r["val_macro_f1"], -r["val_loss"]))
    assert m["best_epoch"] == best["epoch"]
    assert m["val"]["macro_f1"] == pytest.approx(best["val_macro_f1"], abs=1e-6)
    assert m["val"]["loss"] == pytest.approx(best["val_loss"], abs=1e-5)
    # model.pth: encoder + the probe folded into timm's fc; it predicts what the probe reported on test and val
    for split, key in (("test", None), ("val", "val")):
        logits, y = logits_from_saved(cfg.out, phantoms_npz, split)
        got = classify.classification_metrics(logits, torch.from_numpy(y), 3)
        want = m if key is None else m["val"]
        assert got["accuracy"] == pytest.approx(want["accuracy"]) and got["macro_f1"] == pytest.approx(want["macro_f1"])
        assert got["auroc"] == pytest.approx(want["auroc"], abs=1e-4)
        if split == "test":
            assert got["confusion_matrix"] == m["confusion_matrix"]


def test_feature_cache_reused_then_invalidated(linear, monkeypatch):
    cfg, m = linear
    cache = cfg.out / "features.npz"
    mtime = cache.stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("features re-extracted / data re-decoded although the cache is valid")

    with monkeypatch.context() as mp:
        mp.setattr(classify, "extract_features", boom)
        mp.setattr(classify, "_load", boom)
        again = finetune(cfg)
    assert again["features"] == "cached" and cache.stat().st_mtime_ns == mtime
    for k in ("accuracy", "macro_f1", "auroc", "confusion_matrix", "best_epoch", "n_train"):
        assert again[k] == m[k]
    # a re-exported encoder (new mtime) invalidates the cache; so does another size
    weights = cfg.weights
    st = os.stat(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    calls = []
    real = classify.extract_features
    monkeypatch.setattr(classify, "extract_features", lambda *a, **k: calls.append(k["split"]) or real(*a, **k))
    third = finetune(cfg.model_copy(update={"epochs": 5}))
    assert third["features"] == "extracted" and calls == ["train", "val", "test"]


@pytest.fixture(scope="module")
def full(phantoms_npz, encoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    cfg = cfg_for(phantoms_npz, out, encoder, mode="full", epochs=2, batch_size=16, lr=3e-3, patience=0,
                  class_weights="balanced")
    return cfg, finetune(cfg)


def test_full_finetune_runs_and_reports_the_selected_model(full, phantoms_npz):
    cfg, m = full
    assert set(METRIC_KEYS) <= set(m) and m["mode"] == "full" and m["features"] is None
    assert json.loads((cfg.out / "metrics.json").read_text()) == m
    assert np.array(m["confusion_matrix"]).sum() == m["n_test"] == 9
    rows = history(cfg.out)
    assert [r["epoch"] for r in rows] == [1, 2] and m["epochs_run"] == 2
    best = max(rows, key=lambda r: (r["val_macro_f1"], -r["val_loss"]))
    assert m["best_epoch"] == best["epoch"]
    assert m["val"]["macro_f1"] == pytest.approx(best["val_macro_f1"], abs=1e-6)
    assert m["val"]["loss"] == pytest.approx(best["val_loss"], abs=1e-5)
    assert rows[0]["lr"] == 3e-3 and rows[1]["lr"] < 3e-3  # 4 steps: no warmup step, then cosine (head's lr)
    logits, y = logits_from_saved(cfg.out, phantoms_npz, "val")
    got = classify.classification_metrics(logits, torch.from_numpy(y), 3)
    assert got["macro_f1"] == pytest.approx(m["val"]["macro_f1"]) and got["loss"] == pytest.approx(m["val"]["loss"], abs=1e-4)


def test_full_restores_the_best_on_val_state(phantoms_npz, encoder, tmp_path, monkeypatch):
    """Make epoch 1 the best on val (a patched score), train 2 epochs: model.pth must be epoch 1's weights."""
    snaps = []
    real_predict, real_scores = classify._predict, classify._val_scores

    def predict(model, *a, **k):
        snaps.append({kk: v.detach().clone() for kk, v in model.state_dict().items()})
        return real_predict(model, *a, **k)

    def scores(*a, **k):
        s = real_scores(*a, **k)
        return {**s, "macro_f1": 1.0 if len(snaps) == 1 else 0.0}

    monkeypatch.setattr(classify, "_predict", predict)
    monkeypatch.setattr(classify, "_val_scores", scores)
    m = finetune(cfg_for(phantoms_npz, tmp_path, encoder, mode="full", epochs=2, batch_size=16, lr=3e-3, patience=0))
    assert m["best_epoch"] == 1 and m["epochs_run"] == 2
    saved = torch.load(tmp_path / "model.pth", weights_only=True)
    epoch1, epoch2 = snaps[0], snaps[1]  # snapshots taken at each epoch's val prediction
    assert all(torch.equal(saved[k], epoch1[k]) for k in saved)
    assert not torch.equal(saved["fc.weight"], epoch2["fc.weight"])
    assert all(torch.equal(snaps[2][k], epoch1[k]) for k in saved)  # the reported val/test ran on it too


def test_full_early_stopping(phantoms_npz, encoder, tmp_path, monkeypatch):
    monkeypatch.setattr(classify, "_val_scores", lambda *a, **k: {"loss": 1.0, "accuracy": 0.5, "macro_f1": 0.5})
    m = finetune(cfg_for(phantoms_npz, tmp_path, encoder, mode="full", epochs=10, batch_size=32, patience=1))
    assert m["best_epoch"] == 1 and m["epochs_run"] == 2


def test_full_resumes_after_a_kill_as_if_uninterrupted(full, phantoms_npz, encoder, tmp_path, monkeypatch):
    """Kill a full fine-tuning after epoch 1's checkpoint; the rerun continues from it and ends with the
    uninterrupted run's weights and metrics, to the bit; the checkpoint is gone after it; other settings refuse."""
    cfg, m = full
    killed = cfg.model_copy(update={"out": tmp_path / "k"})
    real = classify._write_history

    def die_after_first(path, rows):  # called right after each epoch's checkpoint
        real(path, rows)
        if len(rows) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(classify, "_write_history", die_after_first)
    with pytest.raises(KeyboardInterrupt):
        finetune(killed)
    assert (tmp_path / "k" / "checkpoint.pt").is_file() and len(history(tmp_path / "k")) == 1
    monkeypatch.setattr(classify, "_write_history", real)
    with pytest.raises(MWMError, match=r"other settings \(lr\); use another --out"):
        finetune(killed.model_copy(update={"lr": 1e-3}))
    epochs_seen = []
    resumed = finetune(killed, progress=lambda kind, done, *a: epochs_seen.append(done) if kind == "epoch" else None)
    assert epochs_seen == [2]  # epoch 1 came from the checkpoint
    assert not (tmp_path / "k" / "checkpoint.pt").exists() and not (cfg.out / "checkpoint.pt").exists()
    drop = {"seconds", "model"}
    assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in m.items() if k not in drop}
    assert history(tmp_path / "k") == history(cfg.out)
    a, b = torch.load(cfg.out / "model.pth"), torch.load(tmp_path / "k" / "model.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_weights_of_another_arch_is_a_clear_error(phantoms_npz, encoder, tmp_path):
    with pytest.raises(MWMError, match="resnet18.*--arch is 'resnet34'"):
        finetune(cfg_for(phantoms_npz, tmp_path / "a", encoder, arch="resnet34"))
    bare = tmp_path / "bare.pth"  # no encoder.json beside it: the key check names the mismatch
    bare.write_bytes(encoder.read_bytes())
    with pytest.raises(MWMError, match="does not fit timm 'resnet34'.*different --arch"):
        finetune(cfg_for(phantoms_npz, tmp_path / "b", bare, arch="resnet34"))
    with pytest.raises(MWMError, match="does not fit timm 'resnet50'"):  # shapes differ too (bottlenecks)
        finetune(cfg_for(phantoms_npz, tmp_path / "b", bare, arch="resnet50", mode="full"))
    with pytest.raises(MWMError, match="needs --arch"):
        finetune(cfg_for(phantoms_npz, tmp_path / "c", "none"))


def test_config_validation():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        FinetuneConfig(data="x", out="y", weights="none", mode="probe")
    with pytest.raises(ValidationError):
        FinetuneConfig(data="x", out="y", weights="none", bogus=1)
    with pytest.raises(ValidationError):
        FinetuneConfig(data="x", out="y", weights="none", crop_scale=(0.9, 0.8))
    c = FinetuneConfig(data="x", out="y", weights="none", mode="full")
    assert (c.epochs, c.label_smoothing) == (30, 0.1) and c.size is None


def test_augment_keeps_shape_and_flips():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    same = classify._augment(x, (1.0, 1.0), 0.0, g)
    # scale 1 and aspect in (3/4, 4/3) clamped to the image: the crop is at most the image itself
    assert same.shape == x.shape and torch.isfinite(same).all()
    flipped = classify._augment(x, (1.0, 1.0), 1.0, torch.Generator().manual_seed(0))
    assert torch.allclose(flipped, same.flip(-1), atol=1e-4)


def test_train_limit_is_a_stratified_seeded_subset(phantoms_npz, tmp_path):
    y = np.array([0] * 1086 + [1] * 1043)  # class-sorted, as br35h's train split: "the first 200" is one class
    k = classify.stratified_subset(y, 200, seed=0)
    assert len(k) == 200 and np.bincount(y[k]).tolist() == [102, 98] and (np.diff(k) > 0).all()
    assert not np.array_equal(k, classify.stratified_subset(y, 200, seed=1))
    assert np.bincount(y[classify.stratified_subset(y, 2, seed=0)]).tolist() == [1, 1]
    m = finetune(cfg_for(phantoms_npz, tmp_path, "none", arch="resnet18", size=32, train_limit=6, epochs=5))
    assert m["n_train"] == 6 and (m["n_val"], m["n_test"]) == (10, 9)
    z = np.load(tmp_path / "features.npz")
    assert np.bincount(z["train_y"]).tolist() == [2, 2, 2]


def test_cli_finetune_weights_none(phantoms_npz, tmp_path):
    from mwm.cli import app

    res = CliRunner().invoke(app, ["finetune", str(phantoms_npz), "--weights", "none", "--arch", "resnet18",
                                   "--size", "32", "--mode", "linear", "--epochs", "20", "--device", "cpu",
                                   "--out", str(tmp_path / "ft"), "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout.strip().splitlines()[-1])
    assert m["weights"] == "none" and m["mode"] == "linear" and m["epochs_run"] <= 20
    assert json.loads((tmp_path / "ft" / "metrics.json").read_text()) == m
    assert "balanced_accuracy" in res.output and "confusion matrix" in res.output


def test_cli_finetune_errors(phantoms_npz, encoder, tmp_path):
    from mwm.cli import app

    res = CliRunner().invoke(app, ["finetune", str(phantoms_npz), "--weights", str(encoder), "--arch", "resnet50",
                                   "--out", str(tmp_path)])
    assert res.exit_code == 2 and "error:" in res.output and "resnet50" in res.output
    res = CliRunner().invoke(app, ["finetune", str(phantoms_npz), "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--weights" in res.output


def test_br35h_linear_probe_small(tmp_path):
    path = shared_file("br35h.npz")
    m = finetune(FinetuneConfig(data=path, out=tmp_path, weights="none", arch="resnet18", size=32, train_limit=200,
                                device="cpu", epochs=200))
    assert (m["n_train"], m["n_val"], m["n_test"]) == (200, 429, 441)
    assert m["label_names"] == ["no_tumor", "tumor"]
    assert np.bincount(np.load(tmp_path / "features.npz")["train_y"]).tolist() == [102, 98]
    cm = np.array(m["confusion_matrix"])
    assert cm.shape == (2, 2) and cm.sum() == 441
    assert m["accuracy"] == pytest.approx(np.trace(cm) / 441)
    assert m["auroc"] > 0.6  # random resnet18 features still separate tumours a little


def test_linear_probe_sweep_keeps_the_best_penalty_on_val(phantoms_npz, encoder, tmp_path):
    """probe: sweep fits every penalty of the grid (largest first) and keeps the one with the best val score."""
    grid = [10.0, 1.0, 0.1, 0.01, 1e-3]
    cfg = cfg_for(phantoms_npz, tmp_path / "s", encoder, mode="linear", epochs=500, probe_grid=grid)
    assert cfg.probe == "sweep"
    m = finetune(cfg)
    rows = history(cfg.out)
    assert [r["weight_decay"] for r in rows] == pytest.approx(grid) and len(rows) == len(grid)
    best = max(rows, key=lambda r: (r["val_macro_f1"], -r["val_loss"]))
    assert m["best_epoch"] == best["epoch"] and m["probe_weight_decay"] == pytest.approx(best["weight_decay"])
    assert m["val"]["macro_f1"] == pytest.approx(best["val_macro_f1"], abs=1e-6)
    # stronger penalties fit the training set less well: the train loss falls along the grid
    losses = [r["train_loss"] for r in rows]
    assert all(a >= b - 1e-4 for a, b in zip(losses, losses[1:])) and losses[0] > losses[-1]


def test_recompute_bn_stats_averages_the_train_batches():
    """The first BatchNorm's running mean becomes the mean of its input over the images (equal batches), the
    weights do not move, and the model is left in eval mode."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=2)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    mean, std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    w = model.conv1.weight.clone()
    with torch.no_grad():
        want = model.conv1(images.float() / 255).mean((0, 2, 3))
    classify.recompute_bn_stats(model, images, SimpleNamespace(device=torch.device("cpu")), mean, std, batch_size=4)
    assert torch.allclose(model.bn1.running_mean, want, atol=1e-5) and not model.training
    assert torch.equal(model.conv1.weight, w) and model.bn1.num_batches_tracked.item() == 2
    assert model.layer4[1].bn2.running_var.ne(1).any()  # every layer, not only the first


def test_linear_probe_of_random_init_with_recomputed_bn_stats(phantoms_npz, tmp_path):
    """bn_stats recompute: the saved model carries the train statistics and still predicts what the probe
    reported; the features differ from the untouched random init's; full fine-tuning refuses the option."""
    outs = {}
    for mode in ("as_loaded", "recompute"):
        cfg = cfg_for(phantoms_npz, tmp_path / mode, "none", arch="resnet18", mode="linear", size=32, bn_stats=mode)
        outs[mode] = (cfg, finetune(cfg))
    cfg, m = outs["recompute"]
    sd = torch.load(cfg.out / "model.pth", weights_only=True)
    assert sd["bn1.running_mean"].abs().sum() > 0
    logits, y = logits_from_saved(cfg.out, phantoms_npz, "test")
    assert classify.classification_metrics(logits, torch.from_numpy(y), 3)["accuracy"] == pytest.approx(m["accuracy"])
    a, b = (np.load(tmp_path / mode / "features.npz")["train_x"] for mode in ("as_loaded", "recompute"))
    assert a.shape == b.shape and not np.allclose(a, b)
    with pytest.raises(ValueError, match="bn_stats recompute is for the frozen encoder"):
        FinetuneConfig(data="x", out="y", weights="none", mode="full", bn_stats="recompute")
