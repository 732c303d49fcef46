"""A bench's archive keeps every finished part's identity and numbers outside OUT: an arm x seed archived whole is
tabulated without running, even when OUT is gone; a part is never taken from the archive under another identity."""

from __future__ import annotations

import json
import shutil

from mwm.bench import BenchConfig, run_bench

from .test_parts import _raw


def _run(raw, spy):
    spy.clear()
    rows = run_bench(BenchConfig.model_validate(raw), log=lambda s: None)
    return rows, set(spy)


def _key(rows):
    cols = ("arm", "seed", "task", "accuracy", "auroc", "pretrain_seconds", "pretrain_final_loss", "mask_grid",
            "realised_mask_ratio", "realised_mask_ratio_in", "roi_precision", "roi_recall")
    return sorted(tuple(r.get(c) for c in cols) for r in rows)


def test_archive_survives_a_lost_output_folder(phantoms_npz, tmp_path, spy):
    raw = _raw(phantoms_npz, tmp_path / "b")
    raw["tasks"] = raw["tasks"][:1]
    raw["archive"] = str(tmp_path / "evidence")
    rows, ran = _run(raw, spy)
    assert ran == {("pretrain", "random"), ("pretrain", "mwm"), ("linear", "random"), ("linear", "mwm"),
                   ("linear", "scratch")}
    arch = tmp_path / "evidence"
    assert sorted(p.relative_to(arch).as_posix() for p in arch.rglob("*.json")) == [
        "mwm/seed0/linear.json", "mwm/seed0/pretrain.json", "random/seed0/linear.json",
        "random/seed0/pretrain.json", "scratch/seed0/linear.json"]
    assert (arch / "results.md").read_text() == (tmp_path / "b" / "results.md").read_text()
    rec = json.loads((arch / "random/seed0/pretrain.json").read_text())
    assert rec["payload"]["summary"]["mask_grid"] == [2, 2] and len(rec["payload"]["encoder_sha256"]) == 64

    # the scratch space is lost (a new machine, a new session): the tables come back from the archive alone (the
    # gt-boxes manifest that identifies the guided arm is remade), and a full run trains nothing
    shutil.rmtree(tmp_path / "b")
    tables = run_bench(BenchConfig.model_validate(raw), log=lambda s: None, only_tables=True)
    assert _key(tables) == _key(rows) and not (tmp_path / "b" / "runs").exists()
    again, ran = _run(raw, spy)
    assert ran == set() and _key(again) == _key(rows)

    # a new task needs the encoder: the arm pretrains again (fixed seed: the same bytes, so its archived linear
    # probe still belongs to it and is not rerun); the other arms stay archived
    raw["tasks"].append({"kind": "linear", "name": "probe2", "arms": ["random"], "options": {"epochs": 3}})
    _, ran = _run(raw, spy)
    assert ran == {("pretrain", "random"), ("probe2", "random")}

    # another setting: the archived part is not adopted, it runs and its record is replaced
    old = json.loads((arch / "mwm/seed0/pretrain.json").read_text())["hash"]
    raw["arms"][2]["masking"]["ratio_out"] = 0.5
    shutil.rmtree(tmp_path / "b")
    _, ran = _run(raw, spy)
    assert ran == {("pretrain", "mwm"), ("linear", "mwm")}
    assert json.loads((arch / "mwm/seed0/pretrain.json").read_text())["hash"] != old
