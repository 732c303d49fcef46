"""`mwm localize-tune`: the grid, the choice, best.yaml, and that its scores are what localize + localize-eval give."""

from __future__ import annotations

import csv
import itertools
import sys

import numpy as np
import open_clip
import pytest
import torch
import yaml
from typer.testing import CliRunner

from mwm.cli import app
from mwm.errors import DataError, MWMError
from mwm.io import lock_folder
from mwm.localize.metrics import GroundTruth, evaluate_manifest
from mwm.localize.pipeline import LocalizeConfig, localize
from mwm.localize.tune import TuneConfig, choose, default_layers, select_images, tune
from mwm.localize.vlm import export_vlm
from mwm.localize.vlm_train import TinyClipConfig

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    torch.manual_seed(0)
    cfg = TinyClipConfig(width=32, layers=3, heads=2, text_width=32, text_layers=1, embed_dim=32).model_cfg(32)
    pp = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "size": [32, 32]}
    return export_vlm(open_clip.CLIP(**cfg), cfg, pp, tmp_path_factory.mktemp("vlm") / "tiny")


# a 2 (layers) × 2 (β) grid; postprocessing: kmeans + threshold 0.3, 1 or 2 components, expand 0 or 0.1
GRID = ["--layers", "1,2", "--betas", "0.1,1", "--binarize", "kmeans,threshold", "--thresholds", "0.3",
        "--components", "1,2", "--expand", "0,0.1"]
FAST = ["--steps", "2", "--noise-copies", "2", "--device", "cpu", "--batch-size", "4"]


@pytest.fixture(scope="module")
def tuned(phantoms_npz, tiny_vlm, tmp_path_factory):
    """One CLI run on the 7 val phantoms that have a lesion (n larger than that: all of them)."""
    out = tmp_path_factory.mktemp("tune") / "t"
    r = runner.invoke(app, ["localize-tune", str(phantoms_npz), "--vlm", str(tiny_vlm), "--prompt", "bright lesion",
                            "--out", str(out), "--n", "100", *GRID, *FAST])
    assert r.exit_code == 0, r.output
    return out


def _rows(out):
    with open(out / "table.csv") as f:
        return list(csv.DictReader(f))


def test_table_has_every_row_and_best_is_the_max(tuned):
    rows = _rows(tuned)
    got = {(r["layer"], r["beta"], r["binarize"], r["threshold"], r["components"], r["expand"]) for r in rows}
    want = {(l, b, m, t, k, e) for l, b, (m, t), k, e in itertools.product(
        ["1", "2"], ["0.1", "1"], [("kmeans", ""), ("threshold", "0.3")], ["1", "2"], ["0", "0.1"])}
    assert len(rows) == 32 and got == want
    assert all(r["n"] == "7" for r in rows)  # the 7 val phantoms with a lesion
    dice = [float(r["dice"]) for r in rows]
    best = next(r for r in rows if r["rank"] == "1")
    assert float(best["dice"]) == max(dice)
    assert len({r["dice"] for r in rows}) > 1  # the grid changes something, so "the max" means something
    # exactly one row is `mwm localize` with defaults (layer 1 of 3 blocks, β 0.1, kmeans, 1 comp., expand 0.1)
    defaults = [r for r in rows if r["is_default"] == "yes"]
    assert [(r["layer"], r["beta"], r["binarize"], r["components"], r["expand"]) for r in defaults] == [
        ("1", "0.1", "kmeans", "1", "0.1")]
    md = (tuned / "table.md").read_text()
    assert md.count("\n| ") == 33  # header + 32 rows


def test_best_yaml_is_a_localize_config_and_reproduces_the_tuned_score(tuned, phantoms_npz, tmp_path):
    frag = yaml.safe_load((tuned / "best.yaml").read_text())
    assert "data" not in frag and "out" not in frag
    cfg = LocalizeConfig.model_validate({**frag, "data": phantoms_npz, "out": tmp_path / "loc"})
    best = next(r for r in _rows(tuned) if r["rank"] == "1")
    assert (cfg.m2ib.layer, cfg.m2ib.beta, cfg.binarize, cfg.components, cfg.expand) == (
        int(best["layer"]), float(best["beta"]), best["binarize"], int(best["components"]), float(best["expand"]))
    assert (cfg.m2ib.steps, cfg.m2ib.noise_copies) == (2, 2)  # the saliency settings it was tuned with travel along
    # `mwm localize --config best.yaml` on the same images, then localize-eval's scoring: the tuned numbers
    r = runner.invoke(app, ["localize", str(phantoms_npz), "--config", str(tuned / "best.yaml"), "--split", "val",
                            "--out", str(tmp_path / "loc"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    with pytest.warns(UserWarning):  # the other splits' annotated images are not in this manifest
        s = evaluate_manifest(tmp_path / "loc" / "rois.jsonl", phantoms_npz).summary
    assert s["n"] == 7
    for k in ("precision", "recall", "dice", "iou"):
        assert s[k] == pytest.approx(float(best[k]), abs=1e-4), k


def test_every_postprocessing_row_is_what_localize_gives(tuned, phantoms_npz, tiny_vlm, tmp_path):
    """Each row of one (layer, β) — all binarize / threshold / components / expand combinations — scores what
    `mwm localize` with those settings + localize-eval's scoring give on the tuning images."""
    rows = [r for r in _rows(tuned) if (r["layer"], r["beta"]) == ("2", "1")]
    assert len(rows) == 8
    for j, r in enumerate(rows):
        cfg = LocalizeConfig(data=phantoms_npz, out=tmp_path / str(j), vlm=str(tiny_vlm), prompt="bright lesion",
                             split="val", device="cpu", gallery=0,
                             m2ib={"layer": 2, "beta": 1.0, "steps": 2, "noise_copies": 2},
                             binarize=r["binarize"], threshold=float(r["threshold"] or 0.5),
                             components=int(r["components"]), expand=float(r["expand"]))
        localize(cfg, log=lambda *_: None)
        with pytest.warns(UserWarning):
            s = evaluate_manifest(cfg.out / "rois.jsonl", phantoms_npz).summary
        assert [round(s[k], 4) for k in ("precision", "recall", "dice")] == [
            pytest.approx(float(r[k]), abs=1e-4) for k in ("precision", "recall", "dice")], r


def test_objective_choice_and_ties():
    rows = [{"dice": 0.2, "recall": 0.9}, {"dice": 0.5, "recall": 0.1}, {"dice": 0.5, "recall": 0.3},
            {"dice": None, "recall": None}]
    assert choose(rows, "dice") is rows[1]  # ties: the first in grid order
    assert choose(rows, "recall") is rows[0]


def test_default_layers_follow_mwm_grid():
    assert default_layers(12) == [7, 8, 9]  # MedCLIP-SAMv2's --hyper-opt layers on BiomedCLIP
    assert default_layers(24) == [14, 15, 16]  # the default layer (7/12 of the depth) and the next two
    assert default_layers(6) == [2, 3, 4]  # never the last block: only the head runs after it
    assert default_layers(3) == [0, 1]
    assert default_layers(1) == [0]


def test_select_images_only_annotated_seeded():
    masks = np.zeros((8, 4, 4), np.uint8)
    masks[[1, 2, 4, 5, 7], 1, 1] = 1
    valid = np.ones(8, bool)
    valid[7] = False  # a mask that is not an annotation
    ids = [f"im{i}.png" for i in range(8)]
    gt = GroundTruth(ids, masks, valid)
    assert select_images(ids, list(range(8)), gt, 10, 0) == [1, 2, 4, 5]
    a = select_images(ids, list(range(8)), gt, 2, 0)
    assert len(a) == 2 and set(a) <= {1, 2, 4, 5} and a == sorted(a) == select_images(ids, list(range(8)), gt, 2, 0)
    assert select_images(ids, [0, 3, 6], gt, 5, 0) == []


def _cfg(data, out, vlm, **kw):
    base = dict(data=data, out=out, vlm=str(vlm), prompt="bright lesion", layers=[1], betas=[0.1],
                binarize=["kmeans"], components=[1], expand=[0.1], device="cpu",
                m2ib={"steps": 1, "noise_copies": 1})
    return TuneConfig(**{**base, **kw})


def test_errors(phantoms_npz, tiny_vlm, tmp_path, monkeypatch):
    from PIL import Image

    (tmp_path / "masks").mkdir()  # a mask folder naming none of the images
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "masks" / "nothing.png")
    with pytest.raises(DataError, match="no image of split 'train' has a non-empty valid mask"):
        tune(_cfg(phantoms_npz, tmp_path / "a", tiny_vlm, gt=tmp_path / "masks", split="train"))
    with pytest.raises(MWMError, match="outside the vision tower's 3 blocks"):
        tune(_cfg(phantoms_npz, tmp_path / "b", tiny_vlm, layers=[5]))
    with lock_folder(tmp_path / "c", what="test"), pytest.raises(MWMError, match="in use by another test"):
        tune(_cfg(phantoms_npz, tmp_path / "c", tiny_vlm))
    monkeypatch.setitem(sys.modules, "pydensecrf", None)  # as if the optional package were not installed
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    with pytest.raises(MWMError, match=r"pip install 'mwm\[crf\]'"):
        tune(_cfg(phantoms_npz, tmp_path / "d", tiny_vlm, binarize=["kmeans", "crf"]))
    assert not (tmp_path / "d" / "table.csv").exists()


def test_tune_on_br35h_val(tiny_vlm, tmp_path):
    from ..conftest import shared_file

    path = shared_file("br35h.npz")
    s = tune(_cfg(path, tmp_path / "br", tiny_vlm, n=3, expand=[0.0, 0.1]))
    assert s["n_images"] == 3 and s["n_rows"] == 2
    z = np.load(path)
    annotated_val = set(z["filenames"][(z["split"] == "val") & z["mask_valid"]].tolist())
    assert set(s["images"]) <= annotated_val  # val images with a mask (br35h's official Mask-RCNN VAL)
    assert (tmp_path / "br" / "best.yaml").is_file()


@pytest.mark.parametrize("reduce", ["mean", "median"])
def test_ensemble_prompt_is_tuned_as_localize_ensembles_it(phantoms_npz, tiny_vlm, tmp_path, reduce):
    """An ensemble prompt "a;b;c" is tuned on the maps `mwm localize` makes of it (each member embedded once, maps
    combined by `ensemble`), not on the embedding of the literal string "a;b;c"; best.yaml carries the mode."""
    prompt = "bright lesion;a lesion;dark lesion"
    out = tmp_path / "t"
    tune(_cfg(phantoms_npz, out, tiny_vlm, prompt=prompt, ensemble=reduce, n=100), log=lambda *_: None)
    row = _rows(out)[0]
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["prompt"] == prompt and best.get("ensemble", "mean") == reduce
    cfg = LocalizeConfig(data=phantoms_npz, out=tmp_path / "loc", split="val", device="cpu", gallery=0,
                         **{k: v for k, v in best.items() if k not in ("data", "out")})
    localize(cfg, log=lambda *_: None)
    with pytest.warns(UserWarning):
        s = evaluate_manifest(cfg.out / "rois.jsonl", phantoms_npz).summary
    assert round(s["dice"], 4) == pytest.approx(float(row["dice"]), abs=1e-4)
