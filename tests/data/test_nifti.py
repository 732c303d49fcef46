"""NIfTI loader: canonical orientation, display orientation, 4D, slice ranges, empty slices,
per-volume scaling, caching, corrupt files, folder reading.

Uses nibabel's bundled test files and volumes written here.
"""

from __future__ import annotations

import gzip
import os
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path

from mwm.data import nifti
from mwm.data.files import folder_source
from mwm.data.nifti import LOADER
from mwm.data.types import ReadOptions
from mwm.errors import ReadError

AUTO = ReadOptions()
MINMAX = ReadOptions(window="minmax")
DATA = Path(data_path)


def radiological(s: np.ndarray) -> np.ndarray:
    """Reference display: rows = second axis reversed, columns = first axis reversed."""
    return np.rot90(s)[:, ::-1]


def save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def suffixes(path: Path, options: ReadOptions) -> list[str]:
    return [s for s, _ in LOADER.expand(path, options)]


@pytest.fixture(autouse=True)
def _fresh_cache():
    nifti._cached_volume.cache_clear()
    yield
    nifti._cached_volume.cache_clear()


# -- items -----------------------------------------------------------------------------
def test_example4d_header_only_ids():
    path = DATA / "example4d.nii.gz"  # (128, 96, 24, 2), LAS
    ids = suffixes(path, AUTO)
    assert len(ids) == 2 * 24
    assert ids[:2] == ["#t000-z0000", "#t000-z0001"] and ids[-1] == "#t001-z0023"
    assert nifti._cached_volume.cache_info().currsize == 0  # expand decoded no voxels
    assert len(suffixes(path, ReadOptions(nifti_axis=0))) == 2 * 128
    assert suffixes(path, ReadOptions(nifti_axis=1))[-1] == "#t001-y0095"


def test_nifti2_and_3d_ids():
    assert len(suffixes(DATA / "example_nifti2.nii.gz", AUTO)) == 2 * 12  # (32, 20, 12, 2)
    ids = suffixes(DATA / "anatomical.nii", ReadOptions(nifti_axis=0))  # (33, 41, 25)
    assert ids == [f"#x{k:04d}" for k in range(33)]


def test_written_4d_count_ids_and_per_timepoint_scale(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 100, size=(6, 5, 4)).astype(np.float32)
    vol = np.stack([base, 10 * base + 7, base - 50], axis=-1)  # (6, 5, 4, 3)
    path = save(tmp_path / "v4.nii.gz", vol)
    parts = LOADER.expand(path, MINMAX)
    assert len(parts) == 3 * 4
    assert [s for s, _ in parts][:5] == ["#t000-z0000", "#t000-z0001", "#t000-z0002", "#t000-z0003", "#t001-z0000"]
    assert len(LOADER.expand(path, ReadOptions(nifti_axis=0))) == 3 * 6
    images = {s: LOADER.load(path, key, MINMAX) for s, key in parts}
    ref = radiological((base[:, :, 2] - base.min()) / (base.max() - base.min()))
    for t in range(3):  # each time point is scaled by its own min–max, so all three match
        img = images[f"#t{t:03d}-z0002"]
        assert img.shape == (5, 6) and img.dtype == np.float32 and img.flags.c_contiguous
        np.testing.assert_allclose(img, ref, atol=1e-5)


def test_minmax_is_per_volume_not_per_slice(tmp_path):
    vol = np.zeros((4, 4, 3), np.float32)
    vol[..., 0], vol[..., 1], vol[..., 2] = 0, 50, 100
    vol[0, 0, 1] = 60
    path = save(tmp_path / "ramp.nii", vol)
    mid = LOADER.load(path, LOADER.expand(path, MINMAX)[1][1], MINMAX)
    assert mid.min() == pytest.approx(0.5) and mid.max() == pytest.approx(0.6)


def test_2d_nifti_is_one_image(tmp_path):
    data = np.arange(7 * 9, dtype=np.float32).reshape(7, 9)
    path = save(tmp_path / "flat.nii", data)
    parts = LOADER.expand(path, ReadOptions(nifti_axis=0, slice_start=3))  # axis / range ignored for 2D
    assert [s for s, _ in parts] == [""]
    np.testing.assert_allclose(LOADER.load(path, parts[0][1], MINMAX), radiological(data / data.max()), atol=1e-6)


# -- orientation -------------------------------------------------------------------------
def test_reorientation_and_radiological_display(tmp_path):
    vol = np.zeros((4, 5, 6), np.float32)
    vol[0, 4, 2] = 1.0  # stored i = 0 is the patient's far right under an LAS affine; j = 4 most anterior
    path = save(tmp_path / "las.nii.gz", vol, np.diag([-1.0, 1.0, 1.0, 1.0]))
    axial = LOADER.load(path, (2, 0, 2), MINMAX)
    assert axial.shape == (5, 4)
    assert axial[0, 0] == 1.0 and axial.sum() == 1.0  # anterior at top, patient right at image left
    sag_parts = dict(LOADER.expand(path, ReadOptions(nifti_axis=0)))
    sagittal = LOADER.load(path, sag_parts["#x0003"], MINMAX)  # RAS x = 3 is the far right
    assert sagittal.shape == (6, 5)
    assert sagittal[6 - 1 - 2, 0] == 1.0 and sagittal.sum() == 1.0  # superior at top, anterior at left
    coronal = LOADER.load(path, dict(LOADER.expand(path, ReadOptions(nifti_axis=1)))["#y0004"], MINMAX)
    assert coronal.shape == (6, 4) and coronal[3, 0] == 1.0


def test_anatomical_matches_canonical_percentile_window():
    path = DATA / "anatomical.nii"
    canon = nib.as_closest_canonical(nib.load(str(path))).get_fdata()
    lo, hi = np.percentile(canon, [0.5, 99.5])
    parts = dict(LOADER.expand(path, AUTO))
    img = LOADER.load(path, parts["#z0012"], AUTO)
    np.testing.assert_allclose(img, radiological(np.clip((canon[:, :, 12] - lo) / (hi - lo), 0, 1)), atol=1e-5)


# -- options -----------------------------------------------------------------------------
def test_slice_start_stop(tmp_path):
    path = DATA / "anatomical.nii"  # 25 axial slices
    assert suffixes(path, ReadOptions(slice_start=5, slice_stop=9)) == ["#z0005", "#z0006", "#z0007", "#z0008"]
    assert suffixes(path, ReadOptions(slice_start=20, slice_stop=100)) == [f"#z{k:04d}" for k in range(20, 25)]
    assert suffixes(path, ReadOptions(slice_stop=2)) == ["#z0000", "#z0001"]
    assert suffixes(path, ReadOptions(slice_start=30)) == []
    four = suffixes(DATA / "example4d.nii.gz", ReadOptions(slice_start=22))
    assert four == ["#t000-z0022", "#t000-z0023", "#t001-z0022", "#t001-z0023"]


def test_skip_empty_slices(tmp_path):
    vol = np.full((8, 8, 10), -5.0, np.float32)  # background = the volume minimum
    vol[:4, :, 2:6] = 3.0  # slices 2–5: half foreground
    vol[1, 1, 7] = 9.0  # slice 7: 1/64 ≈ 1.6 % foreground
    path = save(tmp_path / "sparse.nii.gz", vol)
    assert len(suffixes(path, AUTO)) == 10
    assert suffixes(path, ReadOptions(skip_empty_slices=True)) == ["#z0002", "#z0003", "#z0004", "#z0005", "#z0007"]
    kept = suffixes(path, ReadOptions(skip_empty_slices=True, empty_fraction=0.05))
    assert kept == ["#z0002", "#z0003", "#z0004", "#z0005"]
    # along x, rows 0–3 carry the block, row 1 also the single voxel
    assert suffixes(path, ReadOptions(skip_empty_slices=True, nifti_axis=0)) == [f"#x{k:04d}" for k in range(4)]
    assert suffixes(path, ReadOptions(skip_empty_slices=True, slice_start=4)) == ["#z0004", "#z0005", "#z0007"]


def test_ct_window_on_scaled_values_exact(tmp_path):
    raw = np.zeros((4, 4, 2), np.int16)
    raw[1, 2, 0] = 300
    path = save(tmp_path / "ct.nii", raw)
    with open(path, "r+b") as f:  # stored int16 with scl_slope 2, scl_inter -1024: HU = 2 raw - 1024
        hdr = nib.Nifti1Header.from_fileobj(f)
        hdr.set_slope_inter(2.0, -1024.0)
        f.seek(0)
        hdr.write_to(f)
    img = LOADER.load(path, (2, 0, 0), ReadOptions(window="lung"))
    lo = -600 - 1500 / 2
    disp_row, disp_col = 4 - 1 - 2, 4 - 1 - 1  # radiological display of voxel (x=1, y=2)
    assert img[disp_row, disp_col] == pytest.approx((-424 - lo) / 1500, abs=1e-6)
    assert img[0, 0] == pytest.approx((-1024 - lo) / 1500, abs=1e-6)
    custom = LOADER.load(path, (2, 0, 0), ReadOptions(window_center=-424, window_width=10))
    assert custom[disp_row, disp_col] == pytest.approx(0.5) and custom[0, 0] == 0.0


# -- caching -----------------------------------------------------------------------------
def test_slices_share_one_decode_and_edits_are_seen(tmp_path, monkeypatch):
    calls = []
    real = nifti._decode
    monkeypatch.setattr(nifti, "_decode", lambda p: calls.append(p) or real(p))
    path = save(tmp_path / "v.nii.gz", np.ones((5, 5, 6, 2), np.float32))
    parts = LOADER.expand(path, AUTO)
    for _, key in parts:
        LOADER.load(path, key, AUTO)
    assert len(calls) == 1
    save(path, np.arange(5 * 5 * 3, dtype=np.float32).reshape(5, 5, 3))  # rewritten file → new key
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    img = LOADER.load(path, (2, 0, 1), MINMAX)
    assert len(calls) == 2 and img.max() > img.min()


# -- corrupt files -----------------------------------------------------------------------
def test_truncated_gz_raises_read_error_naming_file(tmp_path):
    whole = (DATA / "example4d.nii.gz").read_bytes()
    half = tmp_path / "half.nii.gz"
    half.write_bytes(whole[: len(whole) // 2])  # header intact, voxel data cut
    parts = LOADER.expand(half, AUTO)
    assert len(parts) == 48
    with pytest.raises(ReadError) as e:
        LOADER.load(half, parts[0][1], AUTO)
    assert e.value.path == str(half) and "half.nii.gz" in str(e.value)
    with pytest.raises(ReadError, match="half.nii.gz"):
        LOADER.expand(half, ReadOptions(skip_empty_slices=True))  # needs the voxels
    stub = tmp_path / "stub.nii.gz"
    stub.write_bytes(whole[:60])  # not even a header
    with pytest.raises(ReadError, match="stub.nii.gz"):
        LOADER.expand(stub, AUTO)
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(gzip.compress(b"not nifti" * 100))
    with pytest.raises(ReadError, match="junk.nii.gz"):
        LOADER.expand(junk, AUTO)


# -- through folder_source ---------------------------------------------------------------
def test_folder_source_ids_and_skips(tmp_path):
    save(tmp_path / "a.nii.gz", np.random.default_rng(1).normal(size=(4, 3, 2, 2)).astype(np.float32))
    save(tmp_path / "sub" / "b.nii", np.random.default_rng(2).normal(size=(4, 3, 5)).astype(np.float32))
    (tmp_path / "sub" / "c.nii.gz").write_bytes(b"\x1f\x8b broken")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        src = folder_source(tmp_path, ReadOptions(nifti_axis=1))
    assert src.ids == ["a.nii.gz#t000-y0000", "a.nii.gz#t000-y0001", "a.nii.gz#t000-y0002",
                       "a.nii.gz#t001-y0000", "a.nii.gz#t001-y0001", "a.nii.gz#t001-y0002",
                       "sub/b.nii#y0000", "sub/b.nii#y0001", "sub/b.nii#y0002"]
    assert [Path(s.path).name for s in src.skipped] == ["c.nii.gz"]
    s = src.read(src.ids.index("sub/b.nii#y0001"))
    assert s.image.shape == (5, 4) and s.source == str(tmp_path / "sub" / "b.nii")
    assert 0.0 <= s.image.min() and s.image.max() <= 1.0


def test_permuted_axes_header_shape_matches_decoded(tmp_path):
    # stored axes (i, j, k) point along (S, R, A): canonical shape is (j, k, i) = (5, 6, 4)
    affine = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)
    vol = np.random.default_rng(3).uniform(size=(4, 5, 6)).astype(np.float32)
    path = save(tmp_path / "perm.nii", vol, affine)
    for axis, n, shape in ((0, 5, (4, 6)), (1, 6, (4, 5)), (2, 4, (6, 5))):
        parts = LOADER.expand(path, ReadOptions(nifti_axis=axis))
        assert len(parts) == n
        assert LOADER.load(path, parts[-1][1], AUTO).shape == shape
    axial = LOADER.load(path, LOADER.expand(path, AUTO)[1][1], MINMAX)  # RAS z = 1 is stored i = 1
    np.testing.assert_allclose(axial, radiological((vol[1] - vol.min()) / (vol.max() - vol.min())), atol=1e-6)
