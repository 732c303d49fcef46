"""`mwm pretrain` robustness (issue 10 A): the run-folder lock, ROI-guided masking with too few ROIs, clear errors
instead of tracebacks (unknown arch, method/arch mismatch, --out a file, full disk, --ratio 0), orphaned temporary
checkpoints, ROIs a strategy ignores, and resume refusing changed image content."""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from typer.testing import CliRunner

from mwm.cli import app
from mwm.errors import MWMError
from mwm.io import lock_folder
from mwm.train import pretrain
from mwm.train.checkpoint import save_checkpoint
from mwm.train.data import join_rois, load_pretrain_data

from .conftest import small_pretrain, write_manifest

runner = CliRunner()


def failed_manifest(npz, path, status="empty_roi", boxes=()):
    """Every image has a record but no usable ROI (``boxes`` are written as they are, status as given)."""
    ids = [str(s) for s in np.load(npz)["filenames"]]
    path.write_text("".join(json.dumps({"image": i, "width": 64, "height": 64, "boxes": list(boxes), "prompt": "x",
                                        "status": status}) + "\n" for i in ids))
    return path


# -- A1: one run per folder ---------------------------------------------------------------------------------------

def test_second_run_into_a_locked_folder_names_the_holder(tiny_npz, tmp_path):
    out = tmp_path / "run"
    with lock_folder(out, what="pretraining run"):
        with pytest.raises(MWMError, match=f"pid {os.getpid()}") as e:
            pretrain(small_pretrain(tiny_npz, out))
        assert "pretraining run" in str(e.value)
    assert not (out / "checkpoints").exists()  # the refused run wrote nothing


# -- A2 + orphans: a run whose ROIs all failed warns and records it; leftover temp checkpoints are removed ---------

def test_roi_masking_without_rois_warns_records_and_cleans_orphans(tiny_npz, tmp_path):
    rois = failed_manifest(tiny_npz, tmp_path / "rois.jsonl")
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    orphan = out / "checkpoints" / ".last.ptk3j_x9a.pt"  # atomic_path's temp name for checkpoints/last.pt
    orphan.write_bytes(b"half a checkpoint")
    other = out / "checkpoints" / "epoch_1.pt"  # not ours to delete
    other.write_bytes(b"x")
    cfg = small_pretrain(tiny_npz, out, rois=rois, masking={"strategy": "roi", "ratio_in": 0.8, "ratio_out": 0.2})
    with pytest.warns(UserWarning, match="only 0 of 4 images"):
        s = pretrain(cfg)
    assert s["roi_stats"]["share"] == 0 and s["roi_stats"]["with_roi"] == 0
    assert len(s["warnings"]) == 1 and "min_roi_share 50%" in s["warnings"][0]
    assert json.loads((out / "summary.json").read_text())["warnings"] == s["warnings"]
    assert not orphan.exists() and other.exists()
    assert any(".last.ptk3j_x9a.pt" in n for n in s["notes"])
    # --strict turns the warning into an error, before any training
    strict = small_pretrain(tiny_npz, tmp_path / "strict", rois=rois, read={"strict": True},
                   masking={"strategy": "roi", "ratio_in": 0.8, "ratio_out": 0.2})
    with pytest.raises(MWMError, match="--strict"):
        pretrain(strict)
    assert not (tmp_path / "strict" / "checkpoints").exists()


def test_roi_share_threshold_and_boxes_that_are_no_roi(tiny_npz, tmp_path, monkeypatch):
    """Zero-area, NaN and infinite boxes with status ok are no ROI (whatever the manifest reader lets through: the
    records are handed to join_rois directly); a share above min_roi_share is quiet."""
    ids = ["a", "b", "c", "d"]
    boxes = [[[0.1, 0.1, 0.5, 0.5]], [[0.3, 0.3, 0.3, 0.6]], [[float("nan"), 0.1, 0.5, 0.5]],
             [[0.1, 0.1, float("inf"), 0.5]]]
    recs = [{"image": i, "width": 64, "height": 64, "boxes": b, "prompt": "", "status": "ok"}
            for i, b in zip(ids, boxes)]
    monkeypatch.setattr("mwm.rois.manifest.read_manifest", lambda path: recs)
    boxes, stats = join_rois(ids, np.full((4, 2), 64), tmp_path / "r.jsonl", 64, "pad")
    assert stats["with_roi"] == 1 and stats["without_roi"] == 3 and stats["share"] == 0.25
    assert [len(b) for b in boxes] == [1, 0, 0, 0]
    monkeypatch.undo()
    # the fixture's manifest: most train images have a lesion box → no warning at the default 0.5 …
    good = tmp_path / "good.jsonl"
    write_manifest(tiny_npz, good)
    d = load_pretrain_data(small_pretrain(tiny_npz, tmp_path / "x", rois=good, limit=None, masking={"strategy": "roi"}))
    assert d.roi_stats["share"] > 0.5 and d.warnings == []
    # … but a warning at min_roi_share 1.0
    d = load_pretrain_data(small_pretrain(tiny_npz, tmp_path / "x", rois=good, limit=None, min_roi_share=1.0,
                                 masking={"strategy": "roi"}))
    assert len(d.warnings) == 1 and "min_roi_share 100%" in d.warnings[0]


def test_random_masking_given_rois_warns_they_are_ignored(tiny_npz, tmp_path):
    good = tmp_path / "good.jsonl"
    write_manifest(tiny_npz, good)
    d = load_pretrain_data(small_pretrain(tiny_npz, tmp_path / "x", rois=good))
    assert len(d.warnings) == 1 and "does not use ROIs" in d.warnings[0] and "--masking roi" in d.warnings[0]


# -- A3: clear errors ---------------------------------------------------------------------------------------------

def test_config_errors_unknown_arch_and_nothing_masked(tiny_npz, tmp_path):
    with pytest.raises(ValidationError, match="timm has no model 'resnt18'; did you mean resnet18"):
        small_pretrain(tiny_npz, tmp_path, model={"arch": "resnt18", "size": 64})
    with pytest.raises(ValidationError, match="--ratio 0 masks nothing"):
        small_pretrain(tiny_npz, tmp_path, masking={"strategy": "random", "ratio": 0.0})
    with pytest.raises(ValidationError, match="ratio_in and ratio_out are both 0"):
        small_pretrain(tiny_npz, tmp_path, rois=tmp_path / "r.jsonl",
              masking={"strategy": "roi", "ratio_in": 0.0, "ratio_out": 0.0})


@pytest.mark.parametrize("method,arch,fits", [("mae", "resnet18", "--method spark"),
                                              ("spark", "vit_tiny_patch16_224", "--method mae")])
def test_method_of_the_wrong_family_is_a_clear_error(tiny_npz, tmp_path, method, arch, fits):
    cfg = small_pretrain(tiny_npz, tmp_path / "run", model={"method": method, "arch": arch, "size": 64})
    with pytest.raises(MWMError, match=fits):
        pretrain(cfg)


def test_out_that_is_a_file_is_a_clear_error(tiny_npz, tmp_path):
    f = tmp_path / "out.txt"
    f.write_text("x")
    with pytest.raises(MWMError, match="is a file"):
        pretrain(small_pretrain(tiny_npz, f))


@pytest.mark.parametrize("exc", [RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4416 vs "
                                              "4310"),
                                 OSError(errno.ENOSPC, "No space left on device")])
def test_full_disk_during_a_checkpoint_is_a_clear_error(tmp_path, monkeypatch, exc):
    def full(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise exc

    monkeypatch.setattr(torch, "save", full)
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    with pytest.raises(MWMError, match=r"the disk holding .*run is full \(.* free\)"):
        save_checkpoint(path, {"x": 1}, out=tmp_path / "run")
    assert list(path.parent.iterdir()) == []  # no temp file left behind
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("something else")))
    with pytest.raises(RuntimeError, match="something else"):  # other errors are not called a full disk
        save_checkpoint(path, {"x": 1})


def test_cli_errors_are_one_line(tiny_npz, tmp_path):
    def run(*args):
        return runner.invoke(app, ["pretrain", str(tiny_npz), "--accelerator", "cpu", *map(str, args)])

    r = run("--out", tmp_path / "a", "--arch", "resnt18")
    assert r.exit_code == 2 and "did you mean resnet18" in r.output and "Traceback" not in r.output
    r = run("--out", tmp_path / "b", "--method", "mae", "--arch", "resnet18", "--size", 64)
    assert r.exit_code == 2 and "--method spark" in r.output
    r = run("--out", tmp_path / "c", "--ratio", 0)
    assert r.exit_code == 2 and "masks nothing" in r.output


# -- resume fingerprint covers the pixels ------------------------------------------------------------------------

def test_resume_refuses_changed_image_content(tiny_npz, tmp_path):
    cfg = small_pretrain(tiny_npz, tmp_path / "run", epochs=2)
    pretrain(cfg, stop_at_epoch=1)
    z = dict(np.load(tiny_npz))
    z["images"] = (255 - z["images"]).astype(z["images"].dtype)  # same ids, other pixels
    changed = tmp_path / "changed.npz"
    np.savez(changed, **z)
    with pytest.raises(MWMError, match="other pixels"):
        pretrain(cfg.model_copy(update={"resume": True, "data": changed}))
    s = pretrain(cfg.model_copy(update={"resume": True}))  # the same data resumes
    assert s["resumed_from_epoch"] == 1 and s["epochs_done"] == 2
