"""Command-line smoke tests through typer's runner: every data command, and its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mwm import __version__
from mwm.cli import app

from .conftest import shared_file

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_help_and_version():
    r = run("--help")
    assert r.exit_code == 0 and "data" in r.output and "demo" in r.output
    r = run("--version")
    assert r.exit_code == 0 and r.output.strip() == f"mwm {__version__}"


def test_phantoms_inspect_roundtrip(tmp_path):
    out = tmp_path / "ph.npz"
    r = run("data", "phantoms", out, "--n", 30, "--size", 32, "--seed", 3)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "ph.config.yaml").is_file()
    r = run("data", "inspect", out, "--json")
    info = json.loads(r.stdout)
    assert info["count"] == 30 and info["num_classes"] == 3 and info["captions"] is True
    assert info["masks"]["valid"] == 30 and info["sizes"] == {"32x32": 30}


def test_convert_png_folder_and_inspect(tmp_path):
    rng = np.random.default_rng(0)
    for k in range(5):
        (tmp_path / "in" / f"p{k % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20 + k, 30), dtype=np.uint8)).save(tmp_path / "in" / f"p{k % 2}" / f"{k}.png")
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)
    r = run("data", "convert", tmp_path / "in", tmp_path / "o.npz", "--size", 16, "--channels", 3)
    assert r.exit_code == 0, r.output
    flat = " ".join(r.output.split())  # the console wraps long lines (tmp paths differ in length)
    assert "skipped 1 unreadable" in flat and "broken.png" in "".join(flat.split())
    z = np.load(tmp_path / "o.npz")
    assert z["images"].shape == (5, 16, 16, 3) and z["images"].dtype == np.uint8
    assert z["filenames"].tolist() == ["p0/0.png", "p0/2.png", "p0/4.png", "p1/1.png", "p1/3.png"]
    assert (tmp_path / "o.config.yaml").is_file()
    info = json.loads(run("data", "inspect", tmp_path / "o.npz", "--json").stdout)
    assert info["count"] == 5 and info["channels"] == {"3": 5}
    r = run("data", "convert", tmp_path / "in", tmp_path / "s.npz", "--strict")
    assert r.exit_code == 2 and "broken.png" in r.output


def test_convert_dicom_folder_and_nifti(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    nib = pytest.importorskip("nibabel")
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    (tmp_path / "dcm").mkdir()
    for k in range(3):
        ds.InstanceNumber = k
        ds.save_as(tmp_path / "dcm" / f"slice{k}.dcm")
    r = run("data", "convert", tmp_path / "dcm", tmp_path / "ct.npz", "--size", 32, "--window", "lung")
    assert r.exit_code == 0, r.output
    assert json.loads(run("data", "inspect", tmp_path / "ct.npz", "--json").stdout)["count"] == 3
    vol = np.zeros((8, 9, 5), np.float32)
    vol[2:6, 2:7, :] = np.arange(5, dtype=np.float32) + 1
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "v.nii.gz")
    info = json.loads(run("data", "inspect", tmp_path / "v.nii.gz", "--json").stdout)
    assert info["count"] == 5
    r = run("data", "convert", tmp_path / "v.nii.gz", tmp_path / "v.npz", "--size", 16)
    assert r.exit_code == 0, r.output
    assert json.loads(run("data", "inspect", tmp_path / "v.npz", "--json").stdout)["count"] == 5


def test_errors_are_one_clear_line(tmp_path):
    r = run("data", "inspect", tmp_path / "missing")
    assert r.exit_code == 2 and "no such file or folder" in r.output and "Traceback" not in r.output
    (tmp_path / "empty").mkdir()
    r = run("data", "inspect", tmp_path / "empty")
    assert r.exit_code == 2 and "no images" in r.output
    r = run("data", "convert", tmp_path / "empty", tmp_path / "x.npz", "--size", 2)
    assert r.exit_code == 2 and "size" in r.output


def test_inspect_br35h_json():
    path = shared_file("br35h.npz")
    info = json.loads(run("data", "inspect", path, "--json").stdout)
    assert info["count"] == 2999 and info["num_classes"] == 2 and info["masks"]["valid"] == 801
    assert {k: v["count"] for k, v in info["splits"].items()} == {"train": 2129, "val": 429, "test": 441}


def test_demo_rejects_bad_sizes(tmp_path):
    # the demo itself runs in tests/test_demo.py; here: its options are validated before anything runs
    r = run("demo", "--out", tmp_path / "demo", "--n", 30, "--size", 32)
    assert r.exit_code == 2 and "size" in r.output
    assert not (tmp_path / "demo").exists()
