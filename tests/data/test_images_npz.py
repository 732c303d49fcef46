"""Image folders, ImageFolder trees, CSV lists and npz files (ours and MedMNIST)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mwm.data import DataError, ReadError, ReadOptions, open_source
from mwm.data.inspect import inspect_source

from ..conftest import shared_file


def _png(path, arr, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path)
    return path


def test_folder_recursive_8bit_16bit_rgb(tmp_path):
    g8 = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    g16 = (np.arange(8 * 8, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    rgb = np.zeros((6, 7, 3), np.uint8)
    rgb[..., 0] = 255
    _png(tmp_path / "a.png", g8)
    _png(tmp_path / "sub" / "b.png", g16)
    _png(tmp_path / "sub" / "deeper" / "c.jpg", rgb)
    Image.fromarray(g8).save(tmp_path / "d.bmp")
    Image.fromarray(g8).save(tmp_path / "e.tif")
    (tmp_path / "notes.txt").write_text("not an image")
    src = open_source(tmp_path)
    assert src.ids == ["a.png", "d.bmp", "e.tif", "sub/b.png", "sub/deeper/c.jpg"]
    assert src.ignored_files == 1
    a = src.read(0).image
    assert a.dtype == np.float32 and a.shape == (12, 10)
    np.testing.assert_allclose(a, g8 / 255.0, atol=1e-6)
    b = src.read(3).image  # 16-bit: min–max scaled, not divided by 255
    assert b.min() == 0.0 and b.max() == 1.0
    np.testing.assert_allclose(b, g16 / g16.max(), atol=1e-6)
    c = src.read(4).image
    assert c.shape == (6, 7, 3) and c[..., 0].mean() > 0.9 and c[..., 1].mean() < 0.1


def test_corrupt_png_skipped_or_strict(tmp_path):
    _png(tmp_path / "ok.png", np.full((8, 8), 7, np.uint8))
    good = tmp_path / "trunc.png"
    _png(good, (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8))
    good.write_bytes(good.read_bytes()[:200])  # header survives, pixel data cut
    (tmp_path / "garbage.png").write_bytes(b"\x00" * 50)
    src = open_source(tmp_path)
    # the garbage file fails at header level (skipped while listing), the truncated one at decode time
    assert [s.path for s in src.skipped] == [str(tmp_path / "garbage.png")]
    with pytest.warns(UserWarning, match="trunc.png"):
        read = list(src.iter_samples())
    assert [s.id for s in read] == ["ok.png"]
    assert sorted(s.path.split("/")[-1] for s in src.skipped) == ["garbage.png", "trunc.png"]
    with pytest.raises(ReadError, match="garbage.png"):
        open_source(tmp_path, ReadOptions(strict=True))
    (tmp_path / "garbage.png").unlink()
    with pytest.raises(ReadError, match="trunc.png"):
        list(open_source(tmp_path, ReadOptions(strict=True)).iter_samples())


def test_empty_and_missing(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        open_source(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        open_source(tmp_path / "empty")
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("x")
    with pytest.raises(DataError, match="1 not images"):
        open_source(tmp_path / "txt")


def test_imagefolder_with_and_without_splits(tmp_path):
    px = np.zeros((4, 4), np.uint8)
    for cls in ["cat_b", "a_cls"]:
        for k in range(2):
            _png(tmp_path / "flat" / cls / f"{k}.png", px)
    src = open_source(tmp_path / "flat", ReadOptions(labels="folders"))
    assert src.label_names == ["a_cls", "cat_b"]
    assert src.labels == [0, 0, 1, 1] and src.splits == [""] * 4
    for split in ["train", "valid", "test"]:
        for cls in ["n", "p"]:
            _png(tmp_path / "split" / split / cls / "x.png", px)
    src = open_source(tmp_path / "split", ReadOptions(labels="folders"))
    assert src.splits == ["test", "test", "train", "train", "val", "val"]
    assert src.labels == [0, 1, 0, 1, 0, 1]
    assert src.ids[0] == "test/n/x.png"


def test_csv_labels_and_errors(tmp_path):
    px = np.zeros((4, 4), np.uint8)
    for name in ["x1.png", "x2.png", "x3.png"]:
        _png(tmp_path / "img" / name, px)
    (tmp_path / "l.csv").write_text("path,label,split\nimg/x1.png,pneumonia,train\nimg/x2.png,normal,val\nimg/x3.png,pneumonia,test\n")
    src = open_source(tmp_path / "l.csv")
    assert src.label_names == ["normal", "pneumonia"] and src.labels == [1, 0, 1]
    assert src.splits == ["train", "val", "test"]
    (tmp_path / "bad.csv").write_text("path,label\nimg/x1.png,0\nimg/missing.png,1\n")
    with pytest.raises(DataError, match=r"1 of 2 listed files do not exist.*missing.png"):
        open_source(tmp_path / "bad.csv")
    (tmp_path / "nohdr.csv").write_text("file,y\nimg/x1.png,0\n")
    with pytest.raises(DataError, match="path,label"):
        open_source(tmp_path / "nohdr.csv")


def _shared_npz(path, n=6, **extra):
    rng = np.random.default_rng(0)
    np.savez_compressed(path, images=rng.integers(0, 255, (n, 16, 16), dtype=np.uint8),
                        labels=np.arange(n) % 2, label_names=np.array(["no", "yes"]),
                        split=np.array(["train", "val", "test"] * (n // 3)), **extra)
    return path


def test_npz_shared_format_masks_and_ids(tmp_path):
    masks = np.zeros((6, 16, 16), np.uint8)
    masks[1, 2:5, 2:5] = 1
    valid = np.array([False, True, False, False, True, False])
    p = _shared_npz(tmp_path / "d.npz", masks=masks, mask_valid=valid,
                    filenames=np.array([f"f{i}.png" for i in range(6)]))
    src = open_source(p)
    assert src.ids[1] == "f1.png" and src.has_masks()
    s1 = src.read(1)
    assert s1.mask.sum() == 9 and s1.label == 1 and s1.split == "val"
    assert src.read(4).mask.sum() == 0  # annotated and empty
    assert src.read(0).mask is None  # not annotated
    info = inspect_source(src)
    assert info["count"] == 6 and info["masks"]["valid"] == 2
    assert info["splits"]["train"] == {"count": 2, "per_class": {"no": 1, "yes": 1}}


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "k.npz", pixels=np.zeros((2, 4, 4)))
    with pytest.raises(DataError, match="needs an 'images' array"):
        open_source(tmp_path / "k.npz")
    _shared_npz(tmp_path / "m.npz", masks=np.zeros((5, 16, 16), np.uint8))
    with pytest.raises(DataError, match="'masks' has 5 entries but 'images' has 6"):
        open_source(tmp_path / "m.npz")
    (tmp_path / "c.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        open_source(tmp_path / "c.npz")


def test_medmnist_format(tmp_path):
    np.savez(tmp_path / "pneumoniamnist.npz",
             train_images=np.zeros((5, 28, 28), np.uint8), train_labels=np.array([[0], [1], [1], [0], [1]]),
             val_images=np.zeros((2, 28, 28), np.uint8), val_labels=np.array([[0], [1]]),
             test_images=np.full((3, 28, 28), 255, np.uint8), test_labels=np.array([[1], [1], [0]]))
    src = open_source(tmp_path / "pneumoniamnist.npz")
    assert len(src) == 10 and src.kind == "medmnist"
    assert src.splits.count("val") == 2 and src.labels[-3:] == [1, 1, 0]
    assert src.read(9).image.max() == 1.0


@pytest.mark.parametrize("name,n,masks,per_split", [
    ("br35h.npz", 2999, 801, {"train": 2129, "val": 429, "test": 441}),
    ("kermany_cxr.npz", 5200, 1338, {"train": 3630, "val": 745, "test": 825}),
    ("chest_ct.npz", 791, 0, {"train": 516, "val": 62, "test": 213}),
])
def test_shared_datasets(name, n, masks, per_split):
    info = inspect_source(open_source(shared_file(name)))
    assert info["count"] == n and info["masks"]["valid"] == masks
    assert {k: v["count"] for k, v in info["splits"].items()} == per_split
    if name == "br35h.npz":
        assert info["splits"]["train"]["per_class"] == {"no_tumor": 1086, "tumor": 1043}
        assert info["masks"]["valid_per_split"] == {"train": 500, "val": 201, "test": 100}
