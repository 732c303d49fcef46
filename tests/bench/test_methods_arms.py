"""Bench arms that name their pretraining method (``method: mae``, a registered toy): validated when the bench file
loads, run on phantoms, named in the tables and the sweep plot — and an arm without ``method:`` keeps the identity
its finished parts were recorded with (a long bench resumes across the change)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Literal

import pytest
import timm
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from mwm.bench import BenchConfig, run_bench
from mwm.bench.config import run_dir
from mwm.bench.parts import identity_hash, pretrain_identity, task_identity
from mwm.bench.runner import _weights, check_bench, pretrain_config, task_config
from mwm.bench.tables import is_guided
from mwm.train.methods import METHODS, MethodConfig, PretrainMethod, register_method


# -- a toy method registered by the test: an autoencoder that draws no masks ----------------------------------------
class ToyConfig(MethodConfig):
    method: Literal["toy-ae"] = "toy-ae"


class ToyAE(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.encoder = timm.create_model(cfg.arch, num_classes=0, in_chans=cfg.in_chans)
        self.decoder = nn.Sequential(nn.Conv2d(self.encoder.num_features, cfg.in_chans, 1),
                                     nn.Upsample(size=(cfg.size, cfg.size)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.decoder(self.encoder.forward_features(x)), x)


class ToyMethod(PretrainMethod):
    def __init__(self, cfg):
        super().__init__(cfg, ToyAE(cfg.model))

    def views(self, batch):
        return self.normalize(batch[0])

    def training_step(self, x):
        return self.net(x), {}

    def encoder(self) -> nn.Module:
        return super().encoder().encoder


@pytest.fixture
def toy():
    register_method("toy-ae", ToyConfig, ToyMethod, help="toy autoencoder (bench tests)")
    yield "toy-ae"
    METHODS.pop("toy-ae", None)


# -- identity: arms without `method:` are the SparK arms they were ---------------------------------------------------
# the br35h-evidence shape (shared model.mask_stride, a guided arm, an arm's own options.model); hashes computed with
# the code before arms could name a method (commit d47f2da), ROI manifest / encoders by stand-in hashes
PINNED_BENCH = {
    "name": "pinned", "data": "scans.npz", "out": "bench", "arch": "resnet18", "size": 128, "seeds": [0, 3],
    "rois": {"source": "gt-boxes", "expand": 0.1},
    "pretrain": {"epochs": 12, "batch_size": 64, "lr": 4.0e-3, "warmup_epochs": 1, "workers": 0,
                 "min_roi_share": 0.2, "model": {"mask_stride": 16}},
    "arms": [{"name": "scratch", "pretrain": False},
             {"name": "random-0.6", "masking": {"strategy": "random", "ratio": 0.6}},
             {"name": "mwm-0.4", "masking": {"strategy": "roi_overall", "ratio": 0.4, "ratio_in": 0.8}},
             {"name": "random-0.6-s8", "masking": {"strategy": "random", "ratio": 0.6},
              "options": {"model": {"mask_stride": 8}, "ema": 0.999}}],
    "tasks": [{"kind": "linear"}, {"kind": "full", "options": {"epochs": 3}}]}
ADDED_SINCE = {"bn_stats": "as_loaded"}
PINNED_HASHES = {
    ("scratch", 0, "linear"): "3728483049722685290954f626923ace6fb78e3c4fb0de4aff93674e497d9165",
    ("scratch", 0, "full"): "050ec12c94fff42524f38ed0fc154b01a1bf1685f948d17db542f690c25be6ef",
    ("scratch", 3, "linear"): "cc436d766aabba16aadc5c89a9ea8a3b9c7a15033a7b4d71b136edf623b46ab7",
    ("scratch", 3, "full"): "1c0ab12147a3a1bc85f3d6dc8f396408bcc789217e8d136370d2c0e2f2decabb",
    ("random-0.6", 0, "pretrain"): "1b925253a3918e2cf2849551d8ea098fda64d0f9cc06959dc97418e7f4f34f40",
    ("random-0.6", 0, "linear"): "67247b41289418898f4258eb826e8698c75921ad86b6e2f85530520a27c1ee6b",
    ("random-0.6", 0, "full"): "c20c397ea66054a9dd7177d2846986e90c90393e3569a5b6362b2275e2bf547d",
    ("random-0.6", 3, "pretrain"): "b938b7dab86ad09de6ea1a557d9e40c0fb576d90d1fde43275d6b2f57fe95d39",
    ("random-0.6", 3, "linear"): "99229c0857e447cd3816e28980d66066eeb0844d85dd77fc1658a69e9d377342",
    ("random-0.6", 3, "full"): "3ce61a1e9bb1248354514e1722e0a7da35a6db43847816e2b900c804bba364a9",
    ("mwm-0.4", 0, "pretrain"): "faab0ee3894f96226cb198b81cf67ffcf8951704d72180f42d63bd3c43974de6",
    ("mwm-0.4", 3, "pretrain"): "af6102e0a10a988c635ca336c51c129822d3d63e6adc19d6ba140141041f36cf",
    ("random-0.6-s8", 0, "pretrain"): "684a4080748d3ed68a944df29d34525a7b6d82e401bf6d00ce5773b24656d7c6",
    ("random-0.6-s8", 3, "pretrain"): "fbb8923bff11576e32c4aa69b82e9d47e32560f54fd70f2ae7992633bfac11bf",
}


def _identities(bench: dict) -> dict:
    cfg = BenchConfig.model_validate(bench)
    out = {}
    for arm in cfg.arms:
        for seed in cfg.seeds:
            if arm.pretrain:
                rois = Path("bench/rois.jsonl") if arm.masking.get("strategy") != "random" else None
                pc = pretrain_config(cfg, arm, seed, rois)
                out[(arm.name, seed, "pretrain")] = identity_hash(pretrain_identity(pc, rois and "a" * 64))
            for task in cfg.tasks:
                w = _weights(cfg, arm, seed)
                tc = task_config(cfg, task, seed, w, run_dir(cfg, arm.name, seed) / task.label, cfg.arch_of(arm))
                ident = task_identity(task.kind, tc, None if w == "none" else "b" * 64)
                # options added since the pins, at the default that keeps the old behaviour: parts recorded
                # without them are adopted (same_settings; tests/transfer/test_config_dumps.py)
                ident = {k: v for k, v in ident.items() if ADDED_SINCE.get(k, ident) != v}
                out[(arm.name, seed, task.label)] = identity_hash(ident)
    return out


def test_arms_without_method_keep_their_identity():
    now = _identities(PINNED_BENCH)
    assert {k: now[k] for k in PINNED_HASHES} == PINNED_HASHES


def test_method_spark_named_is_the_same_part():
    """``method: spark`` spelled out is the default arm: the same pretraining and task identities."""
    named = {**PINNED_BENCH, "arms": [a if not a.get("pretrain", True) else {**a, "method": "spark"}
                                      for a in PINNED_BENCH["arms"]]}
    assert _identities(named) == _identities(PINNED_BENCH)


def test_bench_dump_of_old_arms_unchanged():
    """config.yaml (shards compare it) has no method / model keys for arms that do not set them."""
    cfg = BenchConfig.model_validate(PINNED_BENCH)
    assert [sorted(a) for a in cfg.model_dump(mode="json")["arms"]] == [
        sorted(["name", "pretrain", "masking", "rois", "options", "seeds"])] * 4
    mae = BenchConfig.model_validate({**PINNED_BENCH, "arms": [{"name": "m", "method": "mae",
                                                                "model": {"arch": "vit_tiny_patch16_224"}}]})
    arm = mae.model_dump(mode="json")["arms"][0]
    assert arm["method"] == "mae" and arm["model"] == {"arch": "vit_tiny_patch16_224"}


# -- validation when the file loads -------------------------------------------------------------------------------
def _bench(arms: list[dict], **kw) -> dict:
    return {"name": "m", "data": "scans.npz", "out": "b", "arch": "resnet18", "size": 64, "arms": arms, **kw}


def test_unknown_method_is_refused_at_load_listing_the_registered(toy):
    with pytest.raises(ValidationError, match=r"unknown pretraining method 'hmp'; choose one of \[.*'mae'.*"
                                              r"'spark'.*'toy-ae'"):
        BenchConfig.model_validate(_bench([{"name": "a", "method": "hmp"}]))
    with pytest.raises(ValidationError, match="unknown pretraining method 'nope'"):  # through the shared block too
        BenchConfig.model_validate(_bench([{"name": "a"}], pretrain={"model": {"method": "nope"}}))


def test_method_fields_are_checked_at_load(toy):
    with pytest.raises(ValidationError, match="draws no masks; remove its masking"):
        BenchConfig.model_validate(_bench([{"name": "a", "method": "toy-ae", "masking": {"ratio": 0.5}}]))
    with pytest.raises(ValidationError, match="does not pretrain"):
        BenchConfig.model_validate(_bench([{"name": "a", "pretrain": False, "method": "mae"}]))
    with pytest.raises(ValidationError, match="not model.method"):
        BenchConfig.model_validate(_bench([{"name": "a", "model": {"method": "mae"}}]))


def test_a_method_option_error_names_the_arm_key(toy):
    """The method's own options are validated by its config class before anything runs; an error names the arm's
    key (a SparK field on the toy, a typo), and a shared SparK key the toy lacks is simply not given to it."""
    from mwm.config import ConfigError

    cfg = BenchConfig.model_validate(_bench([{"name": "t", "method": "toy-ae", "model": {"decoder_width": 64}}],
                                            pretrain={"model": {"mask_stride": 16}}))
    with pytest.raises(ConfigError, match=r"arm 't': arms\[t\]\.model\.decoder_width: Extra inputs"):
        check_bench(cfg)
    ok = BenchConfig.model_validate(_bench([{"name": "t", "method": "toy-ae"}],
                                           pretrain={"model": {"mask_stride": 16}}))
    check_bench(ok)
    assert ok.arm_model(ok.arms[0]) == {"arch": "resnet18", "size": 64, "method": "toy-ae"}
    typo = BenchConfig.model_validate(_bench([{"name": "t", "method": "toy-ae"}],
                                             pretrain={"model": {"mask_strid": 16}}))
    with pytest.raises(ConfigError, match=r"pretrain\.model\.mask_strid"):
        check_bench(typo)


# -- end to end on phantoms ---------------------------------------------------------------------------------------
def test_bench_runs_mae_and_a_registered_method(toy, phantoms_npz, tmp_path, monkeypatch):
    import mwm.bench.plots as plots

    monkeypatch.setattr(plots, "bench_plots", lambda *a, **k: None)  # time; the sweep lines are tested below
    cfg = BenchConfig.model_validate({
        "name": "methods", "data": str(phantoms_npz), "out": str(tmp_path / "b"), "arch": "resnet18", "size": 64,
        "seeds": [0], "device": "cpu",
        "pretrain": {"epochs": 1, "batch_size": 4, "limit": 8, "lr": 1e-3, "warmup_epochs": 0, "recon_images": 0,
                     "workers": 0, "model": {"mask_stride": 16}},
        "arms": [{"name": "spark-0.5", "masking": {"strategy": "random", "ratio": 0.5}},
                 {"name": "mae-0.5", "method": "mae", "model": {"arch": "vit_tiny_patch16_224", "decoder_depth": 1},
                  "masking": {"strategy": "random", "ratio": 0.5}},
                 {"name": "toy", "method": "toy-ae"}],
        "tasks": [{"kind": "linear", "options": {"epochs": 2}}]})
    rows = run_bench(cfg, log=lambda s: None)
    by = {r["arm"]: r for r in rows}
    assert {a: (r["method"], r["strategy"]) for a, r in by.items()} == {
        "spark-0.5": ("spark", "random"), "mae-0.5": ("mae", "random"), "toy": ("toy-ae", "none")}
    assert all(0 <= r["accuracy"] <= 1 for r in rows)
    out = tmp_path / "b"
    enc = torch.load(out / "runs/mae-0.5/seed0/pretrain/encoder.pth", weights_only=True)
    assert "cls_token" in enc  # a ViT was pretrained, and its linear probe built the ViT (arch_of)
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table] == ["spark", "mae", "toy-ae"]
    md = (out / "results.md").read_text()
    assert "| arm | method |" in md and "| mae-0.5 | mae |" in md and "| toy | toy-ae |" in md
    assert "no masks" in md.split("| toy | toy-ae |")[1].splitlines()[0]
    assert by["spark-0.5"]["mask_grid"] == "4x4" and by["toy"]["mask_grid"] is None


def test_sweep_plot_has_a_line_per_method_and_strategy(monkeypatch, tmp_path):
    import mwm.bench.plots as plots

    cfg = BenchConfig.model_validate(_bench(
        [{"name": f"{m}-{r}", "method": m, "masking": {"strategy": "random", "ratio": r}}
         for m in ("spark", "mae") for r in (0.5, 0.75)], out=str(tmp_path), tasks=[{"kind": "linear"}]))
    rows = [{"arm": a.name, "seed": s, "task": "linear", "accuracy": 0.5 + 0.1 * s, "realised_mask_ratio":
             a.masking["ratio"]} for a in cfg.arms for s in (0, 1)]
    seen = {}
    monkeypatch.setattr(plots, "ratio_sweep", lambda pts, path, *a, **k: seen.update(pts) or Path(path))
    for name in ("metric_bars", "loss_curves", "roi_quality_curve"):
        monkeypatch.setattr(plots, name, lambda *a, **k: None)
    plots.bench_plots(cfg, rows, tmp_path / "plots")
    assert sorted(seen) == ["mae random", "spark random"]
    assert [p[0] for p in seen["mae random"]] == [0.5, 0.75]


def test_a_meijering_target_arm_pretrains_on_its_maps(tmp_path):
    """``model: {target: meijering}`` (M&M reading (b)) needs a manifest of maps; the arm then gets it even with
    random masking, and its identity includes the maps by content."""
    with pytest.raises(ValidationError, match=r"reconstruct Meijering maps .*\{source: meijering\}"):
        BenchConfig.model_validate(_bench([{"name": "mm", "model": {"target": "meijering"}}]))
    manifest = tmp_path / "maps" / "rois.jsonl"
    cfg = BenchConfig.model_validate(_bench(
        [{"name": "r", "masking": {"strategy": "random", "ratio": 0.5}},
         {"name": "mm", "model": {"target": "meijering"}, "masking": {"strategy": "random", "ratio": 0.5},
          "rois": {"source": "manifest", "path": str(manifest)}}], out=str(tmp_path / "b")))
    assert [cfg.map_target(a) for a in cfg.arms] == [False, True]
    assert [is_guided(cfg, a) for a in cfg.arms] == [False, True]  # the ridge target is the field's method, not random
    pc = pretrain_config(cfg, cfg.arms[1], 0, manifest)
    assert pc.rois == manifest and pc.model.target == "meijering"
    assert pretrain_config(cfg, cfg.arms[0], 0, manifest).rois is None  # a pixel arm still ignores it


def test_the_answer_names_every_arm_beyond_plain_random_masking():
    """Guided masking, loss- / attention-guided methods and contrastive methods are what the answer is about;
    random masking on SparK or MAE and no pretraining are not."""
    cfg = BenchConfig.model_validate(_bench(
        [{"name": "scratch", "pretrain": False},
         {"name": "spark", "masking": {"strategy": "random", "ratio": 0.6}},
         {"name": "mae", "method": "mae", "model": {"arch": "vit_tiny_patch16_224"}, "masking": {"ratio": 0.75}},
         {"name": "mwm", "masking": {"strategy": "roi_overall", "ratio": 0.4, "ratio_in": 0.8}},
         {"name": "hpm", "method": "hpm", "masking": {"strategy": "random", "ratio": 0.6}},
         {"name": "byol", "method": "byol"}], rois={"source": "gt-boxes"}))
    assert [a.name for a in cfg.arms if is_guided(cfg, a)] == ["mwm", "hpm", "byol"]
