"""`mwm bench` end to end on phantoms: every arm × seed × task runs once, finished parts are reused."""

from __future__ import annotations

import csv

import pytest
import yaml
from typer.testing import CliRunner

from mwm.bench import BenchConfig, run_bench
from mwm.cli import app


def _config(phantoms_npz, out) -> dict:
    return {"name": "t", "data": str(phantoms_npz), "out": str(out), "arch": "resnet18", "size": 64,
            "seeds": [0, 1], "device": "cpu", "rois": {"source": "gt-boxes", "expand": 0.1},
            "pretrain": {"epochs": 1, "batch_size": 8, "limit": 16, "lr": 1e-3, "warmup_epochs": 0,
                         "recon_images": 2, "workers": 0},
            "arms": [{"name": "scratch", "pretrain": False},
                     {"name": "random", "masking": {"strategy": "random", "ratio": 0.5}},
                     {"name": "mwm", "masking": {"strategy": "roi", "ratio_in": 1.0, "ratio_out": 0.25,
                                                 "ratio": 0.5}}],
            "tasks": [{"kind": "linear", "options": {"epochs": 5}}]}


def test_bench_runs_resumes_and_tabulates(phantoms_npz, tmp_path, monkeypatch):
    cfg = BenchConfig.model_validate(_config(phantoms_npz, tmp_path / "b"))
    rows = run_bench(cfg, log=lambda s: None)
    assert len(rows) == 3 * 2  # arms × seeds × tasks
    out = tmp_path / "b"
    assert (out / "rois.jsonl").is_file()
    for arm in ("random", "mwm"):
        for s in (0, 1):
            assert (out / "runs" / arm / f"seed{s}" / "pretrain" / "encoder.pth").is_file()
    assert not (out / "runs" / "scratch" / "seed0" / "pretrain").exists()
    by = {(r["arm"], r["seed"]): r for r in rows}
    # guided arm: realised ROI ratio logged from the pretraining metrics; random arm has none to compare with
    assert by[("mwm", 0)]["realised_mask_ratio_in"] is not None
    assert by[("scratch", 0)]["pretrain_seconds"] is None
    # the guided arm's ROIs are gt boxes (expand 0.1): full recall on the phantoms with a lesion, precision < 1
    assert by[("mwm", 0)]["roi_recall"] == 1.0 and 0 < by[("mwm", 0)]["roi_precision"] < 1
    assert "roi_precision" not in by[("random", 0)] and by[("random", 0)]["mask_grid"] == "2x2"
    assert all(0 <= r["accuracy"] <= 1 for r in rows)
    # seeds differ in pretraining, so the encoders differ
    import torch

    a = torch.load(out / "runs/random/seed0/pretrain/encoder.pth")["conv1.weight"]
    b = torch.load(out / "runs/random/seed1/pretrain/encoder.pth")["conv1.weight"]
    assert not torch.equal(a, b)
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 6
    md = (out / "results.md").read_text()
    assert "| mwm |" in md and "Δ accuracy vs random" in md
    assert (out / "plots" / "linear_accuracy.png").is_file() and (out / "plots" / "pretrain_loss.png").is_file()

    # a second run reuses every finished part: nothing may train again
    import mwm.train

    def boom(*a, **k):
        raise AssertionError("pretrain ran again")

    monkeypatch.setattr(mwm.train, "pretrain", boom)
    import mwm.transfer.classify as C

    monkeypatch.setattr(C, "finetune", boom)
    again = run_bench(cfg, log=lambda s: None)
    assert [r["accuracy"] for r in again] == [r["accuracy"] for r in rows]


def test_bench_cli_tables_only(phantoms_npz, tmp_path):
    cfg = _config(phantoms_npz, tmp_path / "c")
    cfg["seeds"] = [0]
    cfg["arms"] = cfg["arms"][:2]
    y = tmp_path / "bench.yaml"
    y.write_text(yaml.safe_dump(cfg))
    r = CliRunner().invoke(app, ["bench", str(y), "--tables-only"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "c" / "results.md").is_file()  # empty tables, nothing trained
    assert not (tmp_path / "c" / "runs").exists()
    r = CliRunner().invoke(app, ["bench", str(tmp_path / "nope.yaml")])
    assert r.exit_code == 2 and "no such bench config" in r.output


def test_task_arms_filter(phantoms_npz, tmp_path):
    """A task limited to some arms runs only on those; the others' rows lack it."""
    raw = _config(phantoms_npz, tmp_path / "f")
    raw["seeds"] = [0]
    raw["arms"] = raw["arms"][:2]  # scratch, random
    raw["tasks"] = [{"kind": "linear", "options": {"epochs": 3}},
                    {"kind": "linear", "name": "probe2", "arms": ["scratch"], "options": {"epochs": 3}}]
    rows = run_bench(BenchConfig.model_validate(raw), log=lambda s: None)
    assert sorted((r["arm"], r["task"]) for r in rows) == [("random", "linear"), ("scratch", "linear"),
                                                            ("scratch", "probe2")]
    assert not (tmp_path / "f" / "runs" / "random" / "seed0" / "probe2").exists()
    assert "## probe2" in (tmp_path / "f" / "results.md").read_text()


@pytest.mark.parametrize("bad", [{"rois": {"source": "none"}}, {"baseline": "x"},
                                 {"tasks": [{"kind": "linear", "arms": ["nope"]}]}])
def test_bench_config_rejects(phantoms_npz, tmp_path, bad):
    with pytest.raises(ValueError):
        BenchConfig.model_validate({**_config(phantoms_npz, tmp_path), **bad})


def test_arm_rois_override_and_fallback(phantoms_npz, tmp_path):
    """An arm's own ROI source gets its own manifest (gt-boxes + a localize fallback); the others share the
    bench's; unguided arms get none."""
    import json

    from mwm.bench.runner import _arm_rois
    from mwm.rois.gt_rois import gt_rois
    from mwm.rois.manifest import read_manifest

    loc = [{**r, "boxes": [[0.0, 0.0, 0.5, 0.5]], "status": "ok"} for r in gt_rois(phantoms_npz)]
    fb = tmp_path / "loc.jsonl"
    fb.write_text("".join(json.dumps(r) + "\n" for r in loc))
    raw = _config(phantoms_npz, tmp_path / "b")
    raw["arms"].append({"name": "mwm-loc", "masking": {"strategy": "roi", "ratio_in": 1.0, "ratio_out": 0.25},
                        "rois": {"source": "gt-boxes", "expand": 0.0, "fallback": str(fb)}})
    cfg = BenchConfig.model_validate(raw)
    paths = _arm_rois(cfg)
    assert paths["scratch"] is None and paths["random"] is None
    assert paths["mwm"] == tmp_path / "b" / "rois.jsonl"
    assert paths["mwm-loc"] == tmp_path / "b" / "rois-mwm-loc.jsonl"
    shared, own = read_manifest(paths["mwm"]), read_manifest(paths["mwm-loc"])
    assert all(r["status"] == "ok" for r in own)  # every image without a mask took the fallback box
    assert sum(r["status"] == "ok" for r in shared) < len(own)
    # an arm's ROI source may stand in for the bench's; a fallback needs gt-boxes
    raw2 = {**raw, "rois": {"source": "none"}, "arms": [raw["arms"][0], raw["arms"][3]]}
    assert BenchConfig.model_validate(raw2).arms[1].rois.fallback == fb
    with pytest.raises(ValueError, match="fallback"):
        BenchConfig.model_validate({**raw, "rois": {"source": "manifest", "path": str(fb), "fallback": str(fb)}})
