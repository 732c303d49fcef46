"""Data for pretraining: split choice, ROI join by id (errors, --allow-missing-rois, box mapping), sharding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from mwm.data import Fit
from mwm.errors import MWMError
from mwm.train import PretrainConfig
from mwm.train.data import EpochSampler, collate, join_rois, load_pretrain_data

from .conftest import write_manifest


def cfg(npz, tmp_path, **kw):
    return PretrainConfig(data=npz, out=tmp_path / "run", model={"arch": "resnet18", "size": 64}, **kw)


def test_default_split_is_train_and_rois_joined(tiny_npz, tmp_path):
    rois = tmp_path / "rois.jsonl"
    write_manifest(tiny_npz, rois)
    d = load_pretrain_data(cfg(tiny_npz, tmp_path, rois=rois, masking={"strategy": "roi"}))
    z = np.load(tiny_npz)
    assert d.split == "train" and len(d) == int((z["split"] == "train").sum())
    assert d.images.dtype == np.uint8 and d.images.shape[1:] == (3, 64, 64)
    assert d.has_rois and d.roi_stats["with_roi"] + d.roi_stats["without_roi"] == len(d)
    assert d.roi_stats["with_roi"] > 0 and all(b.shape[1] == 4 for b in d.boxes)
    all_d = load_pretrain_data(cfg(tiny_npz, tmp_path, split="all", limit=5))
    assert len(all_d) == 5 and not all_d.has_rois


def test_missing_ids_listed_unless_allowed(tiny_npz, tmp_path):
    rois = tmp_path / "rois.jsonl"
    left_out = write_manifest(tiny_npz, rois, drop=3)
    with pytest.raises(MWMError) as e:
        load_pretrain_data(cfg(tiny_npz, tmp_path, rois=rois, masking={"strategy": "roi"}))
    msg = str(e.value)
    assert "3 of" in msg and all(repr(i) in msg for i in left_out) and "--allow-missing-rois" in msg
    assert str(rois) in msg
    d = load_pretrain_data(cfg(tiny_npz, tmp_path, rois=rois, masking={"strategy": "roi"}, allow_missing_rois=True))
    assert d.roi_stats["missing"] == 3
    for i, sid in enumerate(d.ids):
        if sid in left_out:
            assert d.boxes[i].shape == (0, 4)  # no ROI: masked uniformly at --ratio


def test_manifest_of_other_data_is_an_error_even_when_allowed(tmp_path):
    rois = tmp_path / "rois.jsonl"
    rois.write_text('{"image": "other.png", "width": 8, "height": 8, "boxes": [], "prompt": "", "status": "ok"}\n')
    with pytest.raises(MWMError, match="none of the 2 image ids"):
        join_rois(["a.png", "b.png"], np.array([[8, 8], [8, 8]]), rois, 64, "pad", allow_missing=True)


def test_boxes_mapped_from_original_coordinates(tmp_path):
    """A 100 × 200 (h × w) original padded to 64 px: the box moves down by the padding and shrinks."""
    rois = tmp_path / "rois.jsonl"
    rois.write_text('{"image": "a", "width": 200, "height": 100, "boxes": [[0.0, 0.0, 0.5, 1.0]], "prompt": "", '
                    '"status": "ok"}\n'
                    '{"image": "b", "width": 200, "height": 100, "boxes": [[0.1, 0.1, 0.2, 0.2]], "prompt": "", '
                    '"status": "nan_saliency"}\n')
    boxes, stats = join_rois(["a", "b"], np.array([[100, 200], [100, 200]]), rois, 64, "pad")
    want = Fit.of(100, 200, 64, "pad").box([0.0, 0.0, 0.5, 1.0], 100, 200, 64)
    assert np.allclose(boxes[0], [want]) and np.allclose(want, [0.0, 0.25, 0.5, 0.75])
    assert boxes[1].shape == (0, 4) and stats == {"with_roi": 1, "without_roi": 1, "missing": 0, "share": 0.5}


def test_roi_strategy_without_rois_is_a_config_error(tiny_npz, tmp_path):
    with pytest.raises(ValidationError, match="needs --rois"):
        cfg(tiny_npz, tmp_path, masking={"strategy": "roi"})
    with pytest.raises(ValidationError, match="roi_overall"):
        PretrainConfig(data=tiny_npz, out=tmp_path, model={"arch": "vit_tiny_patch16_224", "size": 64},
                       masking={"strategy": "roi"}, rois=tmp_path / "r.jsonl")
    c = PretrainConfig(data=tiny_npz, out=tmp_path, model={"arch": "vit_tiny_patch16_224", "size": 64})
    assert c.model.method == "mae"


def test_sampler_shards_disjoint_and_reproducible():
    a = EpochSampler(10, 4, world_size=2, rank=0, seed=1)
    b = EpochSampler(10, 4, world_size=2, rank=1, seed=1)
    ia, ib = [i for i, _ in a], [i for i, _ in b]
    assert len(ia) == len(ib) == 4 and not set(ia) & set(ib)
    assert list(a) == list(EpochSampler(10, 4, world_size=2, rank=0, seed=1))  # same (seed, epoch): same order
    a.use_epoch(1)
    assert [i for i, _ in a] != ia
    seeds = [s for _, s in a]
    assert len(set(seeds)) == 4


def test_collate_pads_boxes():
    x, boxes, valid = collate([(torch.zeros(3, 8, 8), torch.zeros(0, 4)), (torch.ones(3, 8, 8), torch.rand(2, 4))])
    assert x.shape == (2, 3, 8, 8) and boxes.shape == (2, 2, 4)
    assert valid.tolist() == [[False, False], [True, True]]
