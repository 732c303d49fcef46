"""ROI sources that need no text: reconstruction-error boxes (where a pretraining run reconstructs worst) and the
brain foreground; `mwm data gt-rois --source reconstruction-error|foreground` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mwm.cli import app
from mwm.rois.foreground import foreground_boxes
from mwm.localize.gt_rois import write_gt_rois
from mwm.rois.manifest import read_manifest
from mwm.localize.recon_error import (ReconRun, draw_keep, error_maps, maps_to_boxes, patch_errors, pixel_errors,
                                      recon_error_records)
from mwm.mim.loss import masked_mse
from tests.conftest import one_thread, tiny_pretrain_run

_single_thread = pytest.fixture(autouse=True, scope="module")(one_thread)
runner = CliRunner()


@pytest.fixture(scope="module")
def data64(tmp_path_factory) -> Path:
    """8 phantoms at 64 px (train/val/test splits, lesion masks)."""
    from mwm.data.synthetic import PhantomConfig, generate

    path = tmp_path_factory.mktemp("lf") / "ph64.npz"
    generate(PhantomConfig(n=8, size=64, seed=3)).save_npz(path)
    return path


@pytest.fixture(scope="module")
def tiny_run(data64, tmp_path_factory) -> Path:
    """A one-step resnet18 @ 64 px pretraining run on 4 images (random masking, 8 × 8 mask grid)."""
    return tiny_pretrain_run(data64, tmp_path_factory.mktemp("lf") / "run", mask_stride=8)


class _Zero(torch.nn.Module):
    """Predicts 0 everywhere: with per-patch normalized targets, the error of a patch is ≈ 1 where it has
    texture and 0 where it is flat, so we know where the error is."""

    def forward(self, x, keep):
        return {"pred": torch.zeros_like(x)}


def _zero_run(size=64, grid=(8, 8)) -> ReconRun:
    z = torch.zeros(1, 3, 1, 1)
    return ReconRun(path=Path("."), model=_Zero(), size=size, resize="pad", read={}, mean=z, std=z + 1, grid=grid,
                    method="spark", sha256="0", norm_pix=True, eps=1e-6)


def test_patch_errors_are_the_loss_terms():
    g = torch.Generator().manual_seed(0)
    x, pred = torch.rand(3, 3, 64, 64, generator=g), torch.randn(3, 3, 64, 64, generator=g)
    keep = torch.rand(3, 1, 8, 8, generator=g) > 0.6
    err = patch_errors(x, pred, keep)
    hid = (~keep[:, 0]).float()
    torch.testing.assert_close((err * hid).sum() / hid.sum(), masked_mse(x, pred, keep))
    # the pixel map's patch means are the patch errors
    pix = pixel_errors(x, pred, keep)
    torch.testing.assert_close(pix.view(3, 8, 8, 8, 8).mean((2, 4)), err)


def test_masks_are_exact_and_seeded_by_image_id():
    a = draw_keep(["a", "b", "c"], 8, 0.6, (8, 8), seed=0)
    assert a.shape == (24, 1, 8, 8) and (a.flatten(1).sum(1) == round(64 * 0.4)).all()
    # an image's masks do not depend on its batch neighbours or order
    assert torch.equal(draw_keep(["c"], 8, 0.6, (8, 8), seed=0), a[16:])
    assert not torch.equal(draw_keep(["c"], 8, 0.6, (8, 8), seed=1), a[16:])
    assert not torch.equal(a[:8], a[8:16])


@pytest.mark.parametrize("level", ["patch", "pixel"])
def test_the_box_lands_on_the_one_textured_region(level):
    rng = np.random.default_rng(0)
    img = np.full((2, 3, 64, 64), 0.4, np.float32)
    # image 0: texture in cells (row 1-2, col 5-6) of the 8 × 8 grid; image 1: in cells (5, 1)-(6, 2)
    img[0, :, 8:24, 40:56] = rng.random((16, 16))
    img[1, :, 40:56, 8:24] = rng.random((16, 16))
    maps = error_maps(_zero_run(), torch.from_numpy(img), ["a", "b"], masks=8, ratio=0.6, level=level)
    for m, (y0, x0) in zip(maps, [(8, 40), (40, 8)]):  # the hardest place is the textured one
        r, c = np.unravel_index(int(m.argmax()), m.shape)
        assert y0 <= r < y0 + 16 and x0 <= c < x0 + 16
    boxes, status = maps_to_boxes(maps, "otsu")
    assert status == ["ok", "ok"]
    for (box,), (y0, x0) in zip(boxes, [(8, 40), (40, 8)]):
        # the box lies within a patch (8 px) of the textured 16 × 16 square, centred on it; the patch map's box
        # covers it whole (single pixels of the texture can be easy: the pixel map's largest component may not)
        if level == "patch":
            assert box[0] <= x0 / 64 + 1e-6 and box[2] >= (x0 + 16) / 64 - 1e-6
            assert box[1] <= y0 / 64 + 1e-6 and box[3] >= (y0 + 16) / 64 - 1e-6
        assert x0 <= (box[0] + box[2]) / 2 * 64 <= x0 + 16 and y0 <= (box[1] + box[3]) / 2 * 64 <= y0 + 16
        assert box[0] >= (x0 - 8) / 64 - 1e-6 and box[2] <= (x0 + 24) / 64 + 1e-6
        assert box[1] >= (y0 - 8) / 64 - 1e-6 and box[3] <= (y0 + 24) / 64 + 1e-6
    # the hardest 10 % of pixels sit on the texture as well
    ((qbox,),), _ = maps_to_boxes(maps[:1], "quantile", quantile=0.9)
    assert qbox[0] >= 32 / 64 and qbox[3] <= 32 / 64


def test_a_flat_image_gets_no_roi():
    maps = error_maps(_zero_run(), torch.full((1, 3, 64, 64), 0.3), ["flat"], masks=4)
    assert maps_to_boxes(maps, "otsu")[1] == ["empty_roi"]
    assert maps_to_boxes(maps, "quantile")[1] == ["empty_roi"]


def test_records_from_a_pretraining_run(data64, tiny_run, tmp_path):
    out = tmp_path / "rois.jsonl"
    meta = write_gt_rois(data64, out, 0.0, source="reconstruction-error", seed=0,
                         recon={"run": tiny_run, "masks": 4, "ratio": 0.6, "maps_out": tmp_path / "maps.npz"})
    recs = read_manifest(out)
    ids = [str(s) for s in np.load(data64)["filenames"]]
    assert [r["image"] for r in recs] == ids  # every image, in data order
    for r in recs:
        assert r["status"] in ("ok", "empty_roi") and r["prompt"] == "reconstruction-error"
        assert (r["width"], r["height"]) == (64, 64)
        for x0, y0, x1, y1 in r["boxes"]:
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
    assert any(r["status"] == "ok" for r in recs)
    assert meta["run_sha256"] and meta["masks"] == 4 and meta["n_images"] == len(ids)
    maps = np.load(tmp_path / "maps.npz")
    assert list(maps["ids"]) == ids and maps["maps"].shape == (len(ids), 64, 64)
    # same seed → the same manifest byte for byte; another seed → other masks, other maps
    write_gt_rois(data64, tmp_path / "again.jsonl", 0.0, source="reconstruction-error", seed=0,
                  recon={"run": tiny_run, "masks": 4, "ratio": 0.6})
    assert (tmp_path / "again.jsonl").read_bytes() == out.read_bytes()
    other = recon_error_records(data64, tiny_run, masks=4, seed=1, indices=[0])
    first = recon_error_records(data64, tiny_run, masks=4, seed=0, indices=[0])
    assert first[0] == recs[0]  # a subset gives the same record as the whole run
    assert other[0]["image"] == recs[0]["image"]


def test_cli_reconstruction_error_split_and_errors(data64, tiny_run, tmp_path):
    out = tmp_path / "r.jsonl"
    res = runner.invoke(app, ["data", "gt-rois", str(data64), str(out), "--source", "reconstruction-error",
                              "--run", str(tiny_run), "--masks", "2", "--split", "train", "--expand", "0"])
    assert res.exit_code == 0, res.output
    z = np.load(data64)
    assert [r["image"] for r in read_manifest(out)] == [str(f) for f, s in zip(z["filenames"], z["split"])
                                                       if s == "train"]
    assert json.loads((tmp_path / "r.meta.json").read_text())["split"] == "train"
    res = runner.invoke(app, ["data", "gt-rois", str(data64), str(out), "--source", "reconstruction-error"])
    assert res.exit_code != 0 and "--run RUN" in res.output
    res = runner.invoke(app, ["data", "gt-rois", str(data64), str(out), "--source", "reconstruction-error",
                              "--run", str(tmp_path)])
    assert res.exit_code != 0 and "checkpoints/last.pt" in res.output
    res = runner.invoke(app, ["data", "gt-rois", str(data64), str(out), "--source", "reconstruction-error",
                              "--run", str(tiny_run), "--level", "voxel"])
    assert res.exit_code != 0 and "level must be one of" in res.output
    res = runner.invoke(app, ["data", "gt-rois", str(data64), str(out), "--split", "holdout"])
    assert res.exit_code != 0 and "no images in split 'holdout'" in res.output


# -- brain foreground ---------------------------------------------------------------------------------------
S = 64


def _disk(r, cy=32, cx=32):
    y, x = np.mgrid[:S, :S] + 0.5
    return (y - cy) ** 2 + (x - cx) ** 2 <= r * r


def _box(m):
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    return [cols[0] / S, rows[0] / S, (cols[-1] + 1) / S, (rows[-1] + 1) / S]


def _head(n=2, seed=0):
    """Bright scalp (r 27–30), dark skull (r 23–27), grey brain (r < 23) with a dark ventricle, on black air."""
    rng = np.random.default_rng(seed)
    img = np.where(_disk(30), 0.9, 0.0)
    img = np.where(_disk(27), 0.08, img)
    img = np.where(_disk(23), 0.55, img)
    img = np.where(_disk(5, 30, 34), 0.2, img)
    return np.clip(img[None] + rng.normal(0, 0.02, (n, S, S)), 0, 1)


def test_brain_kind_boxes_the_brain_not_the_head():
    imgs = _head()
    brain = foreground_boxes(imgs, "brain")
    assert brain.status == ["ok", "ok"]
    for (b,) in brain.boxes:  # the brain disk (r 23), not the head (r 30) and not a shrunken core
        np.testing.assert_allclose(b, _box(_disk(23)), atol=1.5 / S)
    assert brain.masks[0][32, 34]  # the ventricle is inside (holes filled)
    assert foreground_boxes(np.zeros((1, S, S)), "brain").status == ["no_foreground"]


def test_foreground_cli_brain_with_split(tmp_path):
    from mwm.data.arrays import ArrayDataset

    imgs = (_head(4) * 255).astype(np.uint8)[:, None]
    ArrayDataset(ids=[f"s{i}" for i in range(4)], images=imgs, labels=np.zeros(4, np.int64), label_names=["x"],
                 split=np.array(["train", "test", "test", "train"])).save_npz(tmp_path / "heads.npz")
    out = tmp_path / "brain.jsonl"
    res = runner.invoke(app, ["data", "gt-rois", str(tmp_path / "heads.npz"), str(out), "--source", "foreground",
                              "--kind", "brain", "--split", "test", "--expand", "0"])
    assert res.exit_code == 0, res.output
    recs = read_manifest(out)
    assert [r["image"] for r in recs] == ["s1", "s2"] and all(r["prompt"] == "foreground:brain" for r in recs)
    np.testing.assert_allclose(recs[0]["boxes"][0], _box(_disk(23)), atol=2.5 / S)
