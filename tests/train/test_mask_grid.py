"""The fine mask grid as a normal option (issue 11): `mwm pretrain --mask-stride 8` at 64 px draws 8 × 8 masks,
records ``"mask_grid": [8, 8]`` in summary.json, shows the fine mask in the reconstruction PNG, exports the plain
timm encoder, refuses a resume at another stride, and passes through a bench file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from mwm.cli import app

from .conftest import small_pretrain, write_manifest

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_cli_pretrain_mask_stride_8(tiny_npz, tmp_path):
    rois = tmp_path / "rois.jsonl"
    write_manifest(tiny_npz, rois)
    out = tmp_path / "run"
    r = run("pretrain", tiny_npz, "--out", out, "--arch", "resnet18", "--size", 64, "--mask-stride", 8,
            "--epochs", 1, "--batch-size", 4, "--limit", 4, "--accelerator", "cpu", "--workers", 0,
            "--warmup-epochs", 0, "--rois", rois, "--masking", "roi", "--ratio-in", 0.75, "--ratio-out", 0.25,
            "--recon-every", 1, "--json", "--quiet")
    assert r.exit_code == 0, r.output
    s = json.loads((out / "summary.json").read_text())
    assert s["mask_grid"] == [8, 8]
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["mask_stride"] == 8
    assert (out / "recon" / "epoch_001.png").is_file()
    meta = json.loads((out / "encoder.json").read_text())
    assert meta["timm_kwargs"] == {"in_chans": 3}  # the encoder is the plain timm model: no trace of the stride
    # a resume at another mask stride would change what is learned mid-run: refused
    r = run("pretrain", tiny_npz, "--config", out / "config.yaml", "--resume", "--mask-stride", 16, "--quiet")
    assert r.exit_code == 2 and "mask_stride" in r.output
    r = run("pretrain", tiny_npz, "--out", tmp_path / "bad", "--arch", "resnet18", "--size", 64, "--mask-stride", 12)
    assert r.exit_code == 2 and "must divide" in r.output


def test_default_and_mae_runs_record_their_mask_grid(tiny_npz, tmp_path):
    from mwm.train import pretrain

    s = pretrain(small_pretrain(tiny_npz, tmp_path / "spark"))
    assert s["mask_grid"] == [2, 2]  # resnet18 at 64 px, SparK's own grid
    cfg = small_pretrain(tiny_npz, tmp_path / "mae", optimizer="adamw",
                         model={"method": "mae", "arch": "vit_tiny_patch16_224", "size": 64, "patch_size": 8,
                                "decoder_dim": 64, "decoder_depth": 1})
    s = pretrain(cfg)
    assert s["mask_grid"] == [8, 8]
    assert json.loads((tmp_path / "mae" / "encoder.json").read_text())["timm_kwargs"]["patch_size"] == 8


def test_recon_png_shows_the_fine_mask(tiny_npz):
    """The masked panel is flat gray exactly on the masked 8-px cells and the input elsewhere."""
    from mwm.masking import MaskingConfig, create_masker
    from mwm.mim import SparKConfig, create_mim_model
    from mwm.train.recon import MASKED_GRAY, ReconSet, render_recon

    z = np.load(tiny_npz)
    images = np.repeat(z["images"][:2, None], 3, 1).astype(np.uint8)  # (2, 3, 64, 64)
    boxes = [np.zeros((0, 4), np.float32)] * 2
    model = create_mim_model(SparKConfig(arch="resnet18", size=64, mask_stride=8))
    masker = create_masker(MaskingConfig(strategy="random", ratio=0.5))
    rs = ReconSet(images, boxes, 2, masker, model.grid(64), seed=0, has_rois=False)
    assert rs.keep.shape == (2, 1, 8, 8)
    zero, one = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    panel = render_recon(model, rs, zero, one, "cpu", min_side=64)  # no upscaling: 1 px = 1 image pixel
    masked = panel[:64, 64 + 4:128 + 4, 0]  # row 0, second panel (after a 4-px gap)
    x = images[0, 0]
    gray = round(MASKED_GRAY * 255)
    for i in range(8):
        for j in range(8):
            cell = masked[i * 8:(i + 1) * 8, j * 8:(j + 1) * 8]
            if rs.keep[0, 0, i, j]:
                assert np.abs(cell.astype(int) - x[i * 8:(i + 1) * 8, j * 8:(j + 1) * 8]).max() <= 1
            else:
                assert (cell == gray).all()


def test_mask_examples_at_stride_8():
    from mwm.report.masks import mask_examples

    img = np.full((1, 1, 64, 64), 255, np.uint8)
    grid = mask_examples(img, [[[0.0, 0.0, 0.5, 0.5]]], {"r": {"strategy": "random", "ratio": 0.5}}, stride=8,
                         min_side=64)
    panel = grid[:, 64 + 4:, 0]
    cells = panel.reshape(8, 8, 8, 8).transpose(0, 2, 1, 3).reshape(64, 64)
    assert ((cells == 255).all(1) | (cells < 255).all(1)).all()  # each 8-px cell is all visible or all masked
    assert int((cells < 255).all(1).sum()) == 32  # half of the 64 cells masked


def test_bench_file_passes_mask_stride(tiny_npz, tmp_path):
    from mwm.bench import BenchConfig
    from mwm.bench.runner import check_bench, pretrain_config
    from mwm.config import ConfigError

    raw = {"name": "t", "data": str(tiny_npz), "out": str(tmp_path / "b"), "arch": "resnet18", "size": 64,
           "seeds": [0], "device": "cpu", "rois": {"source": "gt-boxes"},
           "pretrain": {"epochs": 1, "model": {"mask_stride": 8}},
           "arms": [{"name": "random", "masking": {"strategy": "random", "ratio": 0.6}},
                    {"name": "mwm", "masking": {"strategy": "roi_overall", "ratio": 0.4}}],
           "tasks": [{"kind": "linear"}]}
    cfg = BenchConfig.model_validate(raw)
    check_bench(cfg)
    for arm in cfg.arms:
        pc = pretrain_config(cfg, arm, 0, tmp_path / "rois.jsonl")
        assert pc.model.mask_stride == 8 and pc.model.arch == "resnet18" and pc.model.size == 64
    bad = BenchConfig.model_validate({**raw, "pretrain": {"epochs": 1, "model": {"mask_stride": 12}}})
    with pytest.raises(ConfigError, match="mask stride 12"):
        check_bench(bad)
