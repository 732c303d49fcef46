"""DICOM loader: frames, modality LUT, windows, MONOCHROME1, colour, errors, folder reading.

Uses the small files pydicom ships (never the ones it would download) and files written here.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from mwm.data.dicom import LOADER, NO_PIXELS, PIP_HINT
from mwm.data.files import folder_source, loader_for
from mwm.data.types import ReadOptions
from mwm.errors import ReadError

AUTO = ReadOptions()
LUNG = ReadOptions(window="lung")
MINMAX = ReadOptions(window="minmax")


def shipped(name: str) -> Path:
    """A test file bundled inside pydicom (download=False: never wait on the network)."""
    p = get_testdata_file(name, download=False)
    if p is None:
        pytest.skip(f"{name} is not bundled with pydicom {pydicom.__version__}")
    return Path(p)


def ct_copy(path: Path, raw: np.ndarray | None = None, **attrs) -> Path:
    """CT_small.dcm (128x128 int16, slope 1, intercept -1024) with new pixels / attributes, saved to ``path``."""
    ds = pydicom.dcmread(shipped("CT_small.dcm"))
    if raw is not None:
        if raw.ndim == 3:
            ds.NumberOfFrames = raw.shape[0]
        ds.PixelData = raw.astype(np.int16).tobytes()
    for k, v in attrs.items():
        setattr(ds, k, v)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path)
    return path


def minmax_ref(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return (x - x.min()) / (x.max() - x.min())


def window_ref(x: np.ndarray, center: float, width: float) -> np.ndarray:
    return np.clip((x.astype(np.float64) - (center - width / 2)) / width, 0, 1)


# -- single files ----------------------------------------------------------------------
def test_ct_small_single_frame_minmax_of_hu():
    path = shipped("CT_small.dcm")
    assert LOADER.expand(path, AUTO) == [("", None)]
    img = LOADER.load(path, None, AUTO)  # CT_small has no WindowCenter: auto → min–max
    assert img.dtype == np.float32 and img.shape == (128, 128) and img.flags.c_contiguous
    ds = pydicom.dcmread(path)
    np.testing.assert_allclose(img, minmax_ref(ds.pixel_array), atol=1e-6)


def test_lung_window_on_rescaled_values_exact(tmp_path):
    raw = np.zeros((128, 128), np.int16)
    raw[5, 7] = 300  # HU = 2 * 300 - 1024 = -424
    raw[9, 9] = 1000  # HU = 976 → above the lung window: 1
    path = ct_copy(tmp_path / "ct.dcm", raw, RescaleSlope=2, RescaleIntercept=-1024)
    img = LOADER.load(path, None, LUNG)
    lo = -600 - 1500 / 2  # lung preset (-600, 1500)
    assert img[5, 7] == pytest.approx((-424 - lo) / 1500, abs=1e-6)
    assert img[0, 0] == pytest.approx((-1024 - lo) / 1500, abs=1e-6)
    assert img[9, 9] == 1.0
    # explicit center/width override the preset, still on HU: -424 is the center → 0.5
    custom = LOADER.load(path, None, ReadOptions(window="lung", window_center=-424, window_width=100))
    assert custom[5, 7] == pytest.approx(0.5, abs=1e-6)
    assert custom[0, 0] == 0.0


def test_auto_uses_file_window_first_value(tmp_path):
    mr = shipped("MR_small.dcm")  # WindowCenter 600, WindowWidth 1600, no rescale
    ds = pydicom.dcmread(mr)
    np.testing.assert_allclose(LOADER.load(mr, None, AUTO), window_ref(ds.pixel_array, 600, 1600), atol=1e-6)
    np.testing.assert_allclose(LOADER.load(mr, None, MINMAX), minmax_ref(ds.pixel_array), atol=1e-6)

    raw = (np.arange(128 * 128).reshape(128, 128) % 2000).astype(np.int16)
    path = ct_copy(tmp_path / "multi.dcm", raw, WindowCenter=[40, -600], WindowWidth=[400, 1500])
    hu = raw.astype(np.float64) - 1024
    np.testing.assert_allclose(LOADER.load(path, None, AUTO), window_ref(hu, 40, 400), atol=1e-6)
    np.testing.assert_allclose(LOADER.load(path, None, MINMAX), minmax_ref(hu), atol=1e-6)


@pytest.mark.parametrize("options", [AUTO, LUNG, MINMAX], ids=["auto", "lung", "minmax"])
def test_monochrome1_is_inverted(tmp_path, options):
    mono2 = shipped("CT_small.dcm")
    mono1 = ct_copy(tmp_path / "mono1.dcm", PhotometricInterpretation="MONOCHROME1")
    a, b = LOADER.load(mono2, None, options), LOADER.load(mono1, None, options)
    np.testing.assert_allclose(b, 1.0 - a, atol=1e-6)
    assert not np.allclose(a, b)


def test_multiframe_written_frames_selected_by_key(tmp_path):
    frames = np.stack([np.full((128, 128), 524 + 100 * k, np.int16) for k in range(3)])
    frames[:, 0, 0] = 0  # one -1024 HU pixel per frame
    path = ct_copy(tmp_path / "mf.dcm", frames)
    parts = LOADER.expand(path, AUTO)
    assert parts == [("#f0000", 0), ("#f0001", 1), ("#f0002", 2)]
    for suffix, k in parts:
        img = LOADER.load(path, k, LUNG)
        assert img.shape == (128, 128)
        assert img[5, 5] == pytest.approx((100 * k + 850) / 1500, abs=1e-6)  # HU = 100 k - 500
        assert img[0, 0] == pytest.approx(326 / 1500, abs=1e-6)
    with pytest.raises(ReadError, match="frame 3"):
        LOADER.load(path, 3, AUTO)


def test_multiframe_shipped_rtdose():
    path = shipped("rtdose.dcm")  # 15 frames of 10x10
    parts = LOADER.expand(path, AUTO)
    assert len(parts) == 15 and parts[0] == ("#f0000", 0) and parts[-1] == ("#f0014", 14)
    arr = pydicom.dcmread(path).pixel_array
    for k in (0, 7, 14):
        np.testing.assert_allclose(LOADER.load(path, k, AUTO), minmax_ref(arr[k]), atol=1e-6)


def test_rgb_returns_three_channels_over_255(tmp_path):
    path = shipped("examples_rgb_color.dcm")  # uncompressed 8-bit RGB
    img = LOADER.load(path, None, LUNG)  # no window on colour
    assert img.shape == (240, 320, 3) and img.dtype == np.float32
    np.testing.assert_allclose(img, pydicom.dcmread(path).pixel_array / 255.0, atol=1e-6)
    ds = pydicom.dcmread(path)
    dim = (ds.pixel_array // 4 + 10).astype(np.uint8)  # 10..73: /255 keeps it dim, min–max would not
    ds.PixelData = dim.tobytes()
    ds.save_as(tmp_path / "dim.dcm")
    np.testing.assert_allclose(LOADER.load(tmp_path / "dim.dcm", None, AUTO), dim / 255.0, atol=1e-6)
    mf = shipped("SC_rgb_rle_2frame.dcm")  # RLE is decoded by pydicom itself
    parts = LOADER.expand(mf, AUTO)
    assert [s for s, _ in parts] == ["#f0000", "#f0001"]
    arr = pydicom.dcmread(mf).pixel_array
    np.testing.assert_allclose(LOADER.load(mf, 1, AUTO), arr[1] / 255.0, atol=1e-6)


# -- errors ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["dicomdirtests/DICOMDIR", "rtstruct.dcm", "test-SR.dcm"])
def test_no_pixel_data_refused_in_expand(name):
    path = shipped("CT_small.dcm").parent / name
    with pytest.raises(ReadError) as e:
        LOADER.expand(path, AUTO)
    assert e.value.reason == NO_PIXELS and e.value.path == str(path)


def test_garbage_and_truncated_files_name_the_file(tmp_path):
    bad = tmp_path / "garbage.dcm"
    bad.write_bytes(b"this is not a DICOM file" * 40)
    with pytest.raises(ReadError) as e:
        LOADER.expand(bad, AUTO)
    assert str(bad) in str(e.value)
    truncated = shipped("MR_truncated.dcm")  # header fine, pixel data short
    assert LOADER.expand(truncated, AUTO) == [("", None)]
    with pytest.raises(ReadError) as e:
        LOADER.load(truncated, None, AUTO)
    assert str(truncated) in str(e.value)


def test_missing_decoder_says_what_to_install():
    for module in ("libjpeg", "jpeg_ls", "jpeg_ls_hack", "gdcm"):
        try:
            __import__(module)
            pytest.skip(f"{module} is installed, JPEG-LS decodes here")
        except ImportError:
            pass
    path = shipped("MR_small_jpeg_ls_lossless.dcm")
    assert LOADER.expand(path, AUTO) == [("", None)]  # the header is fine
    with pytest.raises(ReadError) as e:
        LOADER.load(path, None, AUTO)
    assert PIP_HINT in str(e.value) and str(path) in str(e.value)


# -- through folder_source -------------------------------------------------------------
def test_folder_of_slices_and_extensionless_file(tmp_path):
    root = tmp_path / "scans"
    for k in range(3):
        raw = np.full((128, 128), 1000 + 10 * k, np.int16)
        raw[0, :] = 0
        ct_copy(root / "series" / f"slice{k:03d}.dcm", raw, InstanceNumber=k + 1)
    shutil.copy(shipped("MR_small.dcm"), root / "IM0001")  # no extension: found by the DICM magic
    shutil.copy(shipped("rtdose.dcm"), root / "dose.DCM")  # extension case ignored, 15 frames
    (root / "notes.txt").write_text("not a scan")
    assert loader_for(root / "IM0001") is LOADER
    src = folder_source(root, ReadOptions(window="lung"))
    expected = ["IM0001"] + [f"dose.DCM#f{k:04d}" for k in range(15)] + [f"series/slice{k:03d}.dcm" for k in range(3)]
    assert src.ids == expected
    assert src.ignored_files == 1 and not src.skipped
    s = src.read(src.ids.index("series/slice002.dcm"))
    assert s.image.shape == (128, 128) and s.source == str(root / "series" / "slice002.dcm")
    assert s.image[5, 5] == pytest.approx((1020 - 1024 + 1350) / 1500, abs=1e-6)
    np.testing.assert_allclose(src.read(0).image, LOADER.load(root / "IM0001", None, ReadOptions(window="lung")))


def test_folder_skips_non_image_dicom_and_garbage(tmp_path):
    shutil.copy(shipped("CT_small.dcm"), tmp_path / "ct.dcm")
    shutil.copy(shipped("CT_small.dcm").parent / "dicomdirtests" / "DICOMDIR", tmp_path / "DICOMDIR")
    (tmp_path / "broken.dcm").write_bytes(b"\x00" * 10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        src = folder_source(tmp_path, AUTO)
    assert src.ids == ["ct.dcm"]
    assert sorted(Path(s.path).name for s in src.skipped) == ["DICOMDIR", "broken.dcm"]
    assert any("skipped 2" in str(w.message) for w in caught)
    with pytest.raises(ReadError, match="DICOMDIR"):
        folder_source(tmp_path, ReadOptions(strict=True))
