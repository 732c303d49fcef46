"""Saliency maps as a masking source in pretraining: loading a `mwm localize --save-saliency` manifest's maps onto the
decoded images (same geometry as the image), the paired augmentation of image + map, the errors, a 1-step run,
and the previews / mask examples that call the masker too."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from mwm.data.transforms import to_tensor
from mwm.errors import MWMError
from mwm.train import PretrainConfig, pretrain
from mwm.train.augment import paired_crop_with_map, paired_random_resized_crop
from mwm.train.config import AugmentConfig
from mwm.train.data import PretrainDataset, collate, fit_saliency, join_saliency, load_pretrain_data

from .conftest import small_pretrain, write_manifest

SALIENCY = {"strategy": "saliency_topk", "ratio": 0.5}


def _blob(size: int, cx: float, cy: float, sigma: float = 0.25) -> np.ndarray:
    """A smooth saliency blob (every pixel a distinct-ish value) centred at (cx, cy), normalized coordinates."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    return np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma ** 2)).astype(np.float32)


def saliency_manifest(npz: Path, folder: Path, map_size: int = 32, without: tuple[str, ...] = ()) -> Path:
    """rois.jsonl (boxes around the lesions) whose records name saliency PNGs as `mwm localize --save-saliency`
    writes them (8-bit gray, ``saliency/<name>.png`` beside the manifest): a blob on each lesion (the image centre
    when there is none); the ids in ``without`` get no ``saliency`` field."""
    folder.mkdir(parents=True, exist_ok=True)
    rois = folder / "rois.jsonl"
    write_manifest(npz, rois)
    z = np.load(npz)
    recs = [json.loads(line) for line in rois.read_text().splitlines()]
    (folder / "saliency").mkdir(exist_ok=True)
    for k, rec in enumerate(recs):
        if rec["image"] in without:
            continue
        b = rec["boxes"][0] if rec["boxes"] else [0.4, 0.4, 0.6, 0.6]
        m = _blob(map_size, (b[0] + b[2]) / 2, (b[1] + b[3]) / 2)
        name = f"saliency/{k:03d}.png"
        Image.fromarray((m * 255 + 0.5).astype(np.uint8)).save(folder / name)
        rec["saliency"] = name
    assert len(recs) == len(z["filenames"])
    rois.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return rois


# -- geometry --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("map_policy,policy", [("pad", "pad"), ("pad", "crop"), ("pad", "stretch"),
                                               ("stretch", "pad"), ("crop", "crop")])
def test_map_lands_where_the_image_does(map_policy, policy):
    """A 40 × 80 scan localized at 32 px with one resize policy and pretrained at 64 px with another: the map of
    the scan itself, fitted by ``fit_saliency``, equals the training image (up to resampling)."""
    yy, xx = np.mgrid[0:40, 0:80]
    scan = (0.5 + 0.5 * np.sin(xx / 9.0) * np.cos(yy / 7.0)).astype(np.float32)  # asymmetric, smooth
    smap = to_tensor(scan, 32, 1, map_policy)[0].numpy()  # what the localizer saw, as its saliency square
    got = fit_saliency(smap, 40, 80, map_policy, 64, policy)
    want = to_tensor(scan, 64, 1, policy)[0]
    assert got.shape == (64, 64)
    assert float((got - want).abs().mean()) < 0.03, float((got - want).abs().mean())


def test_localize_resize_policy_read_from_meta_json(tiny_npz, tmp_path):
    rois = saliency_manifest(tiny_npz, tmp_path / "loc")
    z = np.load(tiny_npz)
    ids = [str(s) for s in z["filenames"]][:3]
    sizes = np.array([[64, 64]] * 3)
    assert join_saliency(ids, sizes, rois, 64, "pad")[1]["resize"] == "pad"  # no meta.json: localize's default
    (tmp_path / "loc" / "meta.json").write_text(json.dumps({"config": {"resize": "crop"}}))
    maps, stats = join_saliency(ids, sizes, rois, 64, "pad")
    assert stats["resize"] == "crop" and stats["with_saliency"] == 3
    assert maps.dtype == np.uint8 and maps.shape == (3, 64, 64)


# -- paired augmentation -----------------------------------------------------------------------------------------


def test_map_equal_to_the_image_stays_equal_after_crop_and_flip():
    """The map rides through the image's own crop + resize + flip: a map that equals the image (one channel) still
    equals it afterwards, for crops that do change the image; the image is what the map-less call gives."""
    g0 = torch.Generator().manual_seed(0)
    img = torch.rand(3, 64, 64, generator=g0)
    img[:, :, :20] *= 0.2  # left/right asymmetric, so a flip the map missed would show
    changed = 0
    for seed in range(20):
        for hflip in (0.5, 1.0):  # 1.0: every draw flipped
            g, g_ref = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
            out, _, smap = paired_crop_with_map(img, torch.zeros(0, 4), img[1].clone(), g, scale=(0.3, 1.0),
                                                hflip=hflip)
            ref, _ = paired_random_resized_crop(img, torch.zeros(0, 4), g_ref, scale=(0.3, 1.0), hflip=hflip)
            assert torch.equal(smap, out[1]) and torch.equal(out, ref)
            changed += not torch.allclose(out, img)
    assert changed >= 30


def test_dataset_pairs_maps_and_collate_stacks_them():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    ds = PretrainDataset(images, [np.zeros((0, 4), np.float32)] * 4, AugmentConfig(crop_scale=(0.3, 1.0)),
                         saliency=images[:, 2].copy())
    items = [ds[(i, 100 + i)] for i in range(4)]
    for img, _, smap in items:
        assert torch.equal(smap, img[2])
    x, boxes, valid, maps = collate(items)
    assert x.shape == (4, 3, 32, 32) and maps.shape == (4, 32, 32) and torch.equal(maps, x[:, 2])
    assert len(collate([it[:2] for it in items])) == 3  # no maps: the old 3-tuple


# -- errors ------------------------------------------------------------------------------------------------------


def test_manifest_without_saliency_names_it_and_the_fix(tiny_npz, tmp_path):
    rois = tmp_path / "rois.jsonl"
    write_manifest(tiny_npz, rois)
    with pytest.raises(MWMError) as e:
        load_pretrain_data(small_pretrain(tiny_npz, tmp_path / "run", rois=rois, masking=SALIENCY))
    assert str(rois) in str(e.value) and "--save-saliency" in str(e.value)


def test_missing_map_file_is_named(tiny_npz, tmp_path):
    rois = saliency_manifest(tiny_npz, tmp_path / "loc")
    gone = sorted((tmp_path / "loc" / "saliency").iterdir())
    for p in gone:
        p.unlink()
    with pytest.raises(MWMError, match="does not exist") as e:
        load_pretrain_data(small_pretrain(tiny_npz, tmp_path / "run", rois=rois, masking=SALIENCY))
    assert any(str(p) in str(e.value) for p in gone)


def test_saliency_strategy_without_rois_is_a_config_error(tiny_npz, tmp_path):
    with pytest.raises(ValidationError, match="save-saliency"):
        PretrainConfig(data=tiny_npz, out=tmp_path / "run", model={"arch": "resnet18", "size": 64}, masking=SALIENCY)


# -- end to end --------------------------------------------------------------------------------------------------


def test_one_step_pretrain_masks_salient_patches_more(tiny_npz, tmp_path):
    """A 1-step resnet18 run on phantoms whose manifest names saliency maps (one image has none): the maps are
    loaded (counted in summary.json), the salient half is masked more than the rest, the preview renders."""
    z = np.load(tiny_npz)
    first_train = [str(s) for s, sp in zip(z["filenames"], z["split"]) if sp == "train"][:4]
    rois = saliency_manifest(tiny_npz, tmp_path / "loc", without=(first_train[0],))
    steps = []
    cfg = small_pretrain(tiny_npz, tmp_path / "run", rois=rois, masking=SALIENCY, recon_images=2,
                         model={"arch": "resnet18", "size": 64, "mask_stride": 8}, min_roi_share=0.0)
    s = pretrain(cfg, hook=lambda ev, info: steps.append(info["keep"]) if ev == "step" else None)
    assert s["saliency_stats"]["with_saliency"] == 3 and s["saliency_stats"]["without_saliency"] == 1
    r = s["mask_ratios"]
    assert r["mask_ratio"] == pytest.approx(0.5) and "saliency" in r["in_means"]
    # 3 of 4 images: top-k masks exactly their salient half; the map-less one is masked uniformly
    assert r["mask_ratio_in"] > 0.8 and r["mask_ratio_out"] < 0.2, r
    assert steps and steps[0].shape == (4, 1, 8, 8) and (steps[0].flatten(1).sum(1) == 32).all()
    assert len(s["recon"]) == 1 and Path(s["recon"][0]).is_file()


def test_mask_examples_and_recon_set_with_saliency():
    from mwm.masking import MaskingConfig, create_masker
    from mwm.report.masks import mask_examples
    from mwm.train.recon import ReconSet

    images = np.zeros((2, 3, 32, 32), np.uint8)
    sal = np.zeros((2, 32, 32), np.uint8)
    sal[:, :16] = 255  # the top half is salient
    panel = mask_examples(images, [[], []], {"s": SALIENCY, "r": {"strategy": "random", "ratio": 0.5}}, stride=8,
                          saliency=sal)
    assert panel.dtype == np.uint8 and panel.ndim == 3
    rs = ReconSet(images, [np.zeros((0, 4), np.float32)] * 2, 2, create_masker(MaskingConfig(**SALIENCY)), (4, 4),
                  seed=0, has_rois=True, saliency=sal)
    assert not rs.keep[:, 0, :2].any() and rs.keep[:, 0, 2:].all()  # top-k at 0.5: the salient half masked


def test_bench_arm_passes_the_strategy_and_manifest_through(tmp_path):
    """A bench arm with a saliency strategy and a `mwm localize --save-saliency` manifest validates, and its
    pretraining config trains on that manifest with the strategy (the bench treats it as ROI-guided)."""
    from mwm.bench.config import BenchConfig
    from mwm.bench.runner import check_bench, pretrain_config, roi_sources

    cfg = BenchConfig.model_validate({
        "name": "t", "data": str(tmp_path / "x.npz"), "out": str(tmp_path / "bench"),
        "arms": [{"name": "random-0.6", "masking": {"strategy": "random", "ratio": 0.6}},
                 {"name": "saliency-topk-0.6", "masking": {"strategy": "saliency_topk", "ratio": 0.6},
                  "rois": {"source": "manifest", "path": str(tmp_path / "loc" / "rois.jsonl")}}]})
    check_bench(cfg)
    arm = cfg.arms[1]
    pc = pretrain_config(cfg, arm, 0, roi_sources(cfg)[arm.name][1])
    assert pc.masking.strategy == "saliency_topk" and pc.masking.ratio == 0.6
    assert pc.rois == tmp_path / "loc" / "rois.jsonl"


def test_bench_saliency_arm_needs_a_manifest_and_its_maps_are_part_of_the_identity(tmp_path):
    """A saliency arm on boxes (gt-boxes) is refused when the bench file loads, not when the arm starts; and the
    arm's identity follows the maps' content, so maps re-drawn in place rerun it (the manifest alone would not)."""
    import pytest
    from pydantic import ValidationError

    from mwm.bench.config import BenchConfig
    from mwm.bench.parts import saliency_identity

    with pytest.raises(ValidationError, match="save-saliency"):
        BenchConfig.model_validate({
            "name": "t", "data": str(tmp_path / "x.npz"), "rois": {"source": "gt-boxes"},
            "arms": [{"name": "sal", "masking": {"strategy": "saliency_soft", "ratio": 0.6}}]})
    loc = tmp_path / "loc"
    (loc / "saliency").mkdir(parents=True)
    (loc / "rois.jsonl").write_text("")
    (loc / "saliency" / "a.png").write_bytes(b"map one")
    first = saliency_identity(loc / "rois.jsonl")
    assert saliency_identity(loc / "rois.jsonl") == first
    (loc / "saliency" / "a.png").write_bytes(b"map two")
    assert saliency_identity(loc / "rois.jsonl") != first
