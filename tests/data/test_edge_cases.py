"""Edge cases of real data (issue 10): npz files with no images, NaN/inf pixels, negative labels, and masks
given without ``mask_valid``."""

from __future__ import annotations

import json
import warnings

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mwm.data import DataError, ReadOptions, decode, open_source
from mwm.data.inspect import inspect_source


def _warnings(fn):
    """Call ``fn()``; return (its result, the warning messages it raised)."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(x.message) for x in w]


# -- npz with no images ----------------------------------------------------------------------------------------

def _empty_shared(path):
    np.savez(path, images=np.zeros((0, 16, 16), np.uint8), labels=np.zeros(0, np.int64),
             label_names=np.array(["a", "b"]), split=np.array([], dtype=str))
    return path


def _empty_medmnist(path):
    np.savez(path, train_images=np.zeros((0, 28, 28), np.uint8), train_labels=np.zeros((0, 1), np.int64))
    return path


@pytest.mark.parametrize("make", [_empty_shared, _empty_medmnist])
def test_npz_without_images_is_a_data_error_naming_the_file(tmp_path, make):
    p = make(tmp_path / "empty.npz")
    with pytest.raises(DataError, match=r"empty\.npz.*(no images|'images' is empty)"):
        open_source(p)


@pytest.mark.parametrize("cmd", [["data", "inspect"], ["pretrain"], ["finetune"], ["localize"], ["segment"],
                                 ["detect"]])
def test_commands_on_an_npz_without_images_give_one_line(tmp_path, cmd):
    from mwm.cli import app

    p = _empty_shared(tmp_path / "empty.npz")
    extra = ["--out", str(tmp_path / "o")] if cmd[0] != "data" else []
    if cmd[0] in ("finetune", "segment", "detect"):
        extra += ["--weights", "none", "--arch", "resnet18"]
    r = CliRunner().invoke(app, [*cmd, str(p), *extra])
    assert r.exit_code == 2, r.output
    assert "error:" in r.output and "empty.npz" in r.output and "Traceback" not in r.output
    assert not isinstance(r.exception, ValueError) or isinstance(r.exception, SystemExit)


# -- NaN / inf pixels ------------------------------------------------------------------------------------------

def test_float_npz_with_nan_warns_once_with_counts_and_reads_zeros(tmp_path):
    imgs = np.random.default_rng(0).random((5, 8, 8)).astype(np.float32) * 100 + 10
    imgs[1, 0, :3] = np.nan
    imgs[3, 2, 2] = np.inf
    imgs[3, 4, 4] = -np.inf
    p = tmp_path / "f.npz"
    np.savez(p, images=imgs)
    src, msgs = _warnings(lambda: open_source(p))
    assert len(msgs) == 1, msgs
    assert "f.npz" in msgs[0] and "2 of 5 images" in msgs[0] and "5 pixels" in msgs[0] and "set to 0" in msgs[0]
    s1 = src.read(1)
    assert np.isfinite(s1.image).all() and (s1.image[0, :3] == 0).all() and s1.image.max() == pytest.approx(1.0)
    assert (src.read(3).image[[2, 4], [2, 4]] == 0).all()
    ds, msgs = _warnings(lambda: decode(src, 8))
    assert msgs == []  # once per source: the open already said it
    assert inspect_source(src)["nonfinite"] == {"images": 2, "pixels": 5}


def test_float_tiff_with_nan_and_a_window_is_not_propagated(tmp_path):
    for k in range(3):
        a = np.full((8, 8), 40.0 * k, np.float32)
        if k:
            a[:k, 0] = np.nan
        Image.fromarray(a).save(tmp_path / f"s{k}.tif")
    src = open_source(tmp_path, ReadOptions(window_center=40.0, window_width=80.0))
    ds, msgs = _warnings(lambda: decode(src, 8))
    assert len(msgs) == 1 and "2 of 3 images" in msgs[0] and "3 pixels" in msgs[0], msgs
    assert str(tmp_path) in msgs[0]
    assert ds.images[2, 0, 0, 0] == 0 and ds.images[2, 0, 3, 3] == 255 and ds.images[1, 0, 3, 3] == 128


def test_nifti_with_nan_warns_with_counts(tmp_path):
    vol = np.arange(4 * 4 * 3, dtype=np.float32).reshape(4, 4, 3)
    vol[0, 0, 1] = np.nan
    vol[1:3, 0, 2] = np.nan
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "v.nii.gz"))
    src = open_source(tmp_path / "v.nii.gz", ReadOptions(window="minmax"))
    ds, msgs = _warnings(lambda: decode(src, 4))
    assert len(msgs) == 1 and "2 of 3 images" in msgs[0] and "3 pixels" in msgs[0] and "v.nii.gz" in msgs[0], msgs
    # random access (what `mwm localize` does) warns once too, however many images are read
    src = open_source(tmp_path / "v.nii.gz", ReadOptions(window="minmax"))
    _, msgs = _warnings(lambda: [src.read(i) for i in range(3)])
    assert len(msgs) == 1 and "v.nii.gz" in msgs[0], msgs
    assert src.nonfinite_summary() == {"images": 2, "pixels": 3}


def test_float_dicom_with_nan_names_the_file(tmp_path):
    import pydicom
    from pydicom.data import get_testdata_file

    ct = get_testdata_file("CT_small.dcm", download=False)
    if ct is None:
        pytest.skip("CT_small.dcm is not bundled with this pydicom")
    ds = pydicom.dcmread(ct)
    a = np.linspace(-1000, 1000, 128 * 128, dtype=np.float32).reshape(128, 128)
    a[0, :5] = np.nan
    del ds.PixelData
    for k in ("PixelRepresentation", "RescaleSlope", "RescaleIntercept"):
        delattr(ds, k)
    ds.FloatPixelData, ds.BitsAllocated, ds.BitsStored, ds.HighBit = a.tobytes(), 32, 32, 31
    ds.save_as(tmp_path / "f.dcm")
    src = open_source(tmp_path / "f.dcm", ReadOptions(window="lung"))
    s, msgs = _warnings(lambda: src.read(0))
    assert len(msgs) == 1 and str(tmp_path / "f.dcm") in msgs[0] and "5 non-finite" in msgs[0], msgs
    assert np.isfinite(s.image).all() and (s.image[0, :5] == 0).all() and s.image[-1, -1] == 1.0


def test_inspect_and_convert_count_nonfinite_in_files(tmp_path):
    a = np.ones((8, 8), np.float32)
    a[0, 0] = np.nan
    Image.fromarray(a).save(tmp_path / "x.tif")
    Image.fromarray(np.ones((8, 8), np.float32)).save(tmp_path / "y.tif")
    from mwm.cli import app

    r = CliRunner().invoke(app, ["data", "inspect", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["nonfinite"] == {"images": 1, "pixels": 1}
    r = CliRunner().invoke(app, ["data", "convert", str(tmp_path), str(tmp_path / "o.npz"), "--size", "8"])
    assert r.exit_code == 0 and "1 NaN/inf pixels in 1 images were set to 0" in " ".join(r.output.split()), r.output


# -- negative labels -------------------------------------------------------------------------------------------

def test_negative_labels_left_out_of_classification_are_counted(tmp_path):
    from mwm.transfer.data import load_labelled

    labels = np.array([0, 1, -1, 0, 1, -1, 0, 1, -1, 0, 1, 0])
    p = tmp_path / "l.npz"
    np.savez(p, images=np.zeros((12, 8, 8), np.uint8), labels=labels, label_names=np.array(["a", "b"]),
             split=np.array(["train", "val", "test"] * 4))
    _, msgs = _warnings(lambda: load_labelled(p, 8))
    hits = [m for m in msgs if "unlabelled" in m]
    assert len(hits) == 1 and "l.npz" in hits[0] and "3 of 12 images" in hits[0] and "left out" in hits[0], msgs
    _, msgs = _warnings(lambda: load_labelled(p, 8, need_labels=False))
    assert not [m for m in msgs if "unlabelled" in m]  # segmentation/detection do not use labels


def test_every_negative_npz_label_is_unlabelled(tmp_path):
    p = tmp_path / "n.npz"
    np.savez(p, images=np.zeros((4, 8, 8), np.uint8), labels=np.array([-2, -1, 0, 1]),
             label_names=np.array(["a", "b"]))
    src = open_source(p)
    assert src.labels == [-1, -1, 0, 1]
    assert inspect_source(src)["splits"]["none"]["per_class"] == {"unlabelled": 2, "a": 1, "b": 1}


def test_csv_blank_label_is_unlabelled_not_a_class(tmp_path):
    for name in ["x1.png", "x2.png", "x3.png"]:
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / name)
    (tmp_path / "l.csv").write_text("path,label\nx1.png,tumor\nx2.png,\nx3.png,normal\n")
    src = open_source(tmp_path / "l.csv")
    assert src.label_names == ["normal", "tumor"] and src.labels == [1, -1, 0]
    (tmp_path / "i.csv").write_text("path,label\nx1.png,1\nx2.png,\nx3.png,0\n")
    src = open_source(tmp_path / "i.csv")
    assert src.label_names == ["0", "1"] and src.labels == [1, -1, 0]


# -- masks without mask_valid ----------------------------------------------------------------------------------

@pytest.fixture
def masks_npz(tmp_path):
    """6 images with a mask each, no mask_valid; images 0, 2, 4 have an empty mask (no lesion)."""
    masks = np.zeros((6, 16, 16), np.uint8)
    for i in (1, 3, 5):
        masks[i, 4:8, 4:8] = 1
    p = tmp_path / "m.npz"
    np.savez(p, images=np.zeros((6, 16, 16), np.uint8), labels=np.array([0, 1] * 3),
             label_names=np.array(["no", "yes"]), split=np.array(["train", "val", "test"] * 2),
             filenames=np.array([f"i{k}.png" for k in range(6)]), masks=masks)
    return p


def test_masks_without_mask_valid_are_all_annotations(masks_npz):
    src = open_source(masks_npz)
    assert src.mask_valid.tolist() == [True] * 6 and src.has_masks()
    assert src.read(0).mask is not None and src.read(0).mask.sum() == 0  # annotated, no lesion
    assert src.read(1).mask.sum() == 16
    assert inspect_source(src)["masks"]["valid"] == 6
    ds = decode(src, 16)
    assert ds.mask_valid.all() and ds.masks[[0, 2, 4]].sum() == 0 and ds.masks[1].sum() == 16
    ds.save_npz(masks_npz.with_name("c.npz"))  # what `mwm data convert` writes: mask_valid explicit
    with np.load(masks_npz.with_name("c.npz")) as z:
        assert z["mask_valid"].dtype == bool and z["mask_valid"].all()


def test_consumers_of_masks_without_mask_valid(masks_npz):
    from mwm.rois.gt_rois import gt_rois
    from mwm.localize.metrics import evaluate_manifest, load_ground_truth

    recs = gt_rois(masks_npz)
    assert [r["status"] for r in recs] == ["no_gt", "ok"] * 3  # an empty valid mask gives no ROI
    gt = load_ground_truth(masks_npz)
    assert np.asarray(gt.valid).all()
    s = evaluate_manifest(recs, gt).summary  # localize-eval: annotated-empty images are counted as such
    assert s["n"] == 3 and s["n_empty_gt"] == 3 and s["n_no_gt"] == 0 and s["dice"] > 0.5
