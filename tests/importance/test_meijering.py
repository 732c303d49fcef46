"""M&M's Meijering-based masking, reading (a): per-pixel Meijering ridge maps (skimage) written as a saliency-map
manifest, masked by ``saliency_topk`` / ``saliency_soft`` (a cell's importance = its mean ridge response)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.draw import line_aa

from mwm.errors import MWMError
from mwm.importance.meijering import (DEFAULT_BLACK_RIDGES, framed_maps, meijering_maps, parse_sigmas,
                                      write_meijering_manifest)
from mwm.masking import MaskingConfig, create_masker, pool_importance
from tests.conftest import one_thread

_single_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


def line_image(r0=5, c0=0, r1=50, c1=63, size=64, seed=0, bright=True):
    """A slanted anti-aliased line on a noisy grey background, and the 8 × 8 cells it crosses (bool (8, 8))."""
    rng = np.random.default_rng(seed)
    img = (0.3 + rng.normal(0, 0.02, (size, size))).astype(np.float32)
    rr, cc, v = line_aa(r0, c0, r1, c1)
    img[rr, cc] = 0.3 + (0.6 if bright else -0.25) * v
    on = np.zeros((size, size), bool)
    on[rr, cc] = v > 0.5
    cell = size // 8
    return img, torch.from_numpy(on.reshape(8, cell, 8, cell).any((1, 3)))


@pytest.fixture(scope="module")
def ph64(tmp_path_factory) -> Path:
    """8 phantoms at 64 px (ids = npz filenames)."""
    from mwm.data.synthetic import PhantomConfig, generate

    path = tmp_path_factory.mktemp("meij") / "ph64.npz"
    generate(PhantomConfig(n=8, size=64, seed=3)).save_npz(path)
    return path


# -- the filter ---------------------------------------------------------------------------------------------------


def test_line_patches_ranked_first_and_topk_masks_exactly_them():
    """The M&M behaviour: a bright line's cells have the highest mean ridge response, so saliency_topk with the
    ratio equal to their share masks exactly the cells the line crosses (default settings: bright ridges)."""
    assert DEFAULT_BLACK_RIDGES is False
    img, crossed = line_image()
    maps = torch.from_numpy(meijering_maps(img[None]))
    imp = pool_importance(maps, (8, 8))[0]
    assert imp[crossed].min() > imp[~crossed].max()
    k = int(crossed.sum())
    assert 8 < k < 32  # a slanted line: more cells than one row, not a trivial share
    keep, _ = create_masker(MaskingConfig(strategy="saliency_topk", ratio=k / 64))(
        1, (8, 8), generator=torch.Generator().manual_seed(0), importance=maps)
    assert torch.equal(~keep[0, 0], crossed)


def test_black_ridges_selects_dark_lines():
    """black_ridges=True finds a dark line, and the bright-ridge default does not rank it first; negating the image
    and the flag gives the same map (skimage's definition)."""
    img, crossed = line_image(bright=False)
    dark = pool_importance(torch.from_numpy(meijering_maps(img[None], black_ridges=True)), (8, 8))[0]
    bright = pool_importance(torch.from_numpy(meijering_maps(img[None])), (8, 8))[0]
    assert dark[crossed].min() > dark[~crossed].max()
    assert not bright[crossed].min() > bright[~crossed].max()
    np.testing.assert_allclose(meijering_maps(1 - img[None], black_ridges=False),
                               meijering_maps(img[None], black_ridges=True), atol=1e-5)


def test_is_skimage_meijering_minmax_normalised():
    from skimage.filters import meijering

    img, _ = line_image(seed=1)
    ref = meijering(img, sigmas=(1.5, 4), black_ridges=False)
    ref = (ref - ref.min()) / (ref.max() - ref.min())
    got = meijering_maps(img[None], sigmas=(1.5, 4))[0]
    assert got.dtype == np.float32 and got.min() == 0 and got.max() == 1
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert not np.allclose(got, meijering_maps(img[None], sigmas=(1,))[0], atol=1e-2)  # sigmas are used


def test_deterministic_batch_and_thread_invariant():
    imgs = np.stack([line_image(seed=s, r0=3 * s)[0] for s in range(4)])
    a = meijering_maps(imgs)
    assert np.array_equal(a, meijering_maps(imgs))
    assert np.array_equal(a, meijering_maps(imgs, workers=2))
    assert np.array_equal(a[2], meijering_maps(imgs[2:3])[0])  # each image on its own
    u8 = (imgs * 255 + 0.5).astype(np.uint8)
    np.testing.assert_allclose(meijering_maps(u8), meijering_maps(u8.astype(np.float32) / 255), atol=1e-6)


def test_constant_image_gives_no_preference():
    m = meijering_maps(np.full((2, 16, 16), 0.4, np.float32))
    assert m.shape == (2, 16, 16) and not m.any()


def test_padding_is_not_filtered():
    """A 32 × 64 scan padded to 64 × 64: the map is the filter of the scan's own rows (the black bars' edges are not
    ridges) and 0 on the bars."""
    img, _ = line_image(seed=2)
    scan = img[:32]
    padded = np.zeros((1, 64, 64), np.float32)
    padded[0, 16:48] = scan
    got = framed_maps(padded, np.array([[32, 64]]), "pad", (1, 2, 3), False)
    assert not got[0, :16].any() and not got[0, 48:].any()
    np.testing.assert_allclose(got[0, 16:48], meijering_maps(scan[None])[0], atol=1e-6)
    # a batch of differently shaped scans: each on its own frame, threads or not
    both = np.concatenate([padded, img[None]])
    mixed = framed_maps(both, np.array([[32, 64], [64, 64]]), "pad", (1, 2, 3), False, workers=2)
    assert np.array_equal(mixed[0], got[0]) and np.array_equal(mixed[1], meijering_maps(img[None])[0])


@pytest.mark.parametrize("images, sigmas, match", [
    (np.zeros((16, 16)), (1,), r"\(N, H, W\)"),
    (np.zeros((1, 3, 16, 16)), (1,), r"\(N, H, W\)"),
    (np.full((1, 16, 16), np.nan), (1,), "NaN"),
    (np.zeros((1, 2, 16)), (1,), "too small"),
    (np.zeros((1, 16, 16)), (0,), "> 0"),
    (np.zeros((1, 16, 16)), (-1, 2), "> 0"),
    (np.zeros((1, 16, 16)), (), "at least one"),
    (np.zeros((1, 16, 16)), "1,x", "comma-separated"),
])
def test_bad_input_errors(images, sigmas, match):
    with pytest.raises(MWMError, match=match):
        meijering_maps(images, sigmas=sigmas)


def test_parse_sigmas():
    assert parse_sigmas("1, 2,3") == (1.0, 2.0, 3.0) and parse_sigmas([0.5]) == (0.5,)
    with pytest.raises(MWMError, match="inf"):
        parse_sigmas("1,inf")


# -- the manifest, read by pretraining ----------------------------------------------------------------------------


def test_manifest_round_trip_into_pretraining(ph64, tmp_path):
    """The written maps are what pretraining loads (join_saliency, up to 8-bit quantisation) and equal the filter of
    the decoded training images; a 1-step saliency_topk run trains on them and masks the ridge half more."""
    from mwm.data import decode, open_source
    from mwm.train import PretrainConfig, pretrain
    from mwm.train.data import join_saliency

    res = write_meijering_manifest(ph64, tmp_path / "meij", sigmas=(1, 2), size=64, split="all")
    manifest = Path(res["manifest"])
    assert manifest.is_file() and res["images"] == 8 and res["images_per_s"] > 0
    meta = json.loads((manifest.parent / "meta.json").read_text())
    assert meta["settings"]["source"] == "meijering" and meta["settings"]["sigmas"] == [1.0, 2.0]
    assert meta["settings"]["black_ridges"] is False and meta["config"]["resize"] == "pad"
    # the folder is the cache: same settings reuse the maps (nothing filtered); other settings are refused
    again = write_meijering_manifest(ph64, tmp_path / "meij", sigmas=(1, 2), size=64, split="all")
    assert again["cached"] and again["images"] is None and Path(again["manifest"]) == manifest
    with pytest.raises(MWMError, match="other settings"):
        write_meijering_manifest(ph64, tmp_path / "meij", sigmas=(1, 3), size=64, split="all")

    ds = decode(open_source(ph64), 64, 1, "pad")
    maps, stats = join_saliency(list(ds.ids), ds.orig_sizes, manifest, 64, "pad")
    assert stats["with_saliency"] == 8 and stats["resize"] == "pad"
    want = meijering_maps(ds.images[:, 0], sigmas=(1, 2))
    assert np.abs(maps.astype(np.float32) / 255 - want).max() <= 1 / 255 + 1e-6

    cfg = PretrainConfig(data=ph64, out=tmp_path / "run", model={"arch": "resnet18", "size": 64, "mask_stride": 8},
                         accelerator="cpu", workers=0, batch_size=4, limit=4, epochs=1, warmup_epochs=0,
                         recon_images=0, split="all", rois=manifest,
                         masking={"strategy": "saliency_topk", "ratio": 0.5})
    s = pretrain(cfg)
    assert s["saliency_stats"]["with_saliency"] == 4
    assert s["mask_ratios"]["mask_ratio"] == pytest.approx(0.5) and s["mask_ratios"]["mask_ratio_in"] > 0.8


def test_manifest_of_unknown_split_or_bad_size_is_an_error(ph64, tmp_path):
    with pytest.raises(MWMError, match="split"):
        write_meijering_manifest(ph64, tmp_path / "a", split="nope", size=64)
    with pytest.raises(MWMError, match="--size"):
        write_meijering_manifest(ph64, tmp_path / "b", size=4)
    with pytest.raises(MWMError, match="--resize"):
        write_meijering_manifest(ph64, tmp_path / "c", size=64, resize="zoom")


# -- the CLI ------------------------------------------------------------------------------------------------------


def test_cli(ph64, tmp_path):
    from typer.testing import CliRunner

    from mwm.cli import app

    runner = CliRunner()
    out = tmp_path / "cli"
    r = runner.invoke(app, ["importance", "meijering", str(ph64), "--out", str(out), "--sigmas", "1,2",
                            "--black-ridges", "--size", "64", "--split", "all"])
    assert r.exit_code == 0, r.output
    recs = [json.loads(line) for line in (out / "rois.jsonl").read_text().splitlines() if line.strip()]
    assert len(recs) == 8 and all((out / rec["saliency"]).is_file() for rec in recs)
    meta = json.dumps(json.loads((out / "meta.json").read_text()))
    assert '"black_ridges": true' in meta and "images/s" in r.output
    r = runner.invoke(app, ["importance", "meijering", str(ph64), "--out", str(tmp_path / "x"), "--sigmas", "0"])
    assert r.exit_code == 2 and "sigmas" in r.output and "Traceback" not in r.output
