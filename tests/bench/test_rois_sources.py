"""Bench ROI sources beyond plain gt-boxes: degraded gt boxes (``perturb`` + ``seed``) and classical ``foreground``
boxes — validated with the bench file, part of the manifest's identity (a changed setting rebuilds it), and an
older manifest made before these options existed is kept while they hold their defaults."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from mwm.bench import BenchConfig, run_bench
from mwm.bench.config import RoiSourceConfig
from mwm.bench.parts import PartStore, identity_hash, rois_identity
from mwm.bench.runner import _arm_rois, pretrain_count
from mwm.rois.manifest import read_manifest

from .test_parts import _raw as _bench_raw

MWM = {"strategy": "roi", "ratio_in": 1.0, "ratio_out": 0.25}


def _raw(data, out, **arm_rois) -> dict:
    return {"name": "r", "data": str(data), "out": str(out), "seeds": [0], "device": "cpu",
            "rois": {"source": "gt-boxes", "expand": 0.1},
            "arms": [{"name": "random", "masking": {"strategy": "random", "ratio": 0.5}},
                     {"name": "mwm", "masking": MWM},
                     {"name": "mwm-deg", "masking": MWM, "rois": {"source": "gt-boxes", **arm_rois}}]}


def test_bench_config_takes_perturb_seed_and_foreground(phantoms_npz, tmp_path):
    cfg = BenchConfig.model_validate(_raw(phantoms_npz, tmp_path, perturb={"precision": 0.3, "recall": 0.9}, seed=3))
    src = cfg.rois_for(cfg.arms[2])
    assert src.perturb.precision == 0.3 and src.perturb.recall == 0.9 and src.seed == 3
    raw = _raw(phantoms_npz, tmp_path)
    raw["rois"] = {"source": "foreground", "kind": "lungs"}
    assert BenchConfig.model_validate(raw).rois.source == "foreground"  # a source guided arms may train on


@pytest.mark.parametrize("rois, match", [
    ({"source": "manifest", "path": "x.jsonl", "perturb": {"place": "random"}}, "perturb .* needs rois.source"),
    ({"source": "foreground", "perturb": {"place": "random"}}, "perturb .* needs rois.source 'gt-boxes'"),
    ({"source": "gt-boxes", "perturb": {"precision": 0.3}}, "both precision and recall"),
    ({"source": "gt-boxes", "perturb": {"precision": 0.3, "recall": 0.9}, "box_mode": "per_component"},
     "use box_mode 'union'"),
    ({"source": "gt-boxes", "perturb": {"precision": 0.3, "recall": 0.9, "shift": 2}}, r"perturb\.shift"),
    ({"source": "foreground", "kind": "liver"}, "'lungs', 'body' or 'brain'"),
])
def test_bad_roi_sources_fail_at_load(phantoms_npz, tmp_path, rois, match):
    raw = _raw(phantoms_npz, tmp_path)
    raw["rois"] = rois
    with pytest.raises(ValueError, match=match):
        BenchConfig.model_validate(raw)


def test_rois_identity_follows_perturb_seed_and_kind(phantoms_npz):
    def ident(**kw):
        return identity_hash(rois_identity(phantoms_npz, RoiSourceConfig(**kw)))

    plain = ident(source="gt-boxes")
    deg = ident(source="gt-boxes", perturb={"precision": 0.3, "recall": 0.9})
    assert len({plain, deg, ident(source="gt-boxes", perturb={"precision": 0.3, "recall": 0.8}),
                ident(source="gt-boxes", perturb={"precision": 0.3, "recall": 0.9}, seed=1),
                ident(source="gt-boxes", perturb={"place": "random"})}) == 5
    # settings that cannot change the manifest change nothing
    assert ident(source="gt-boxes", seed=5) == plain and ident(source="gt-boxes", kind="body") == plain
    assert ident(source="foreground", kind="lungs") != ident(source="foreground", kind="body")


def test_bench_builds_a_perturbed_manifest_and_rebuilds_it_when_perturb_changes(phantoms_npz, tmp_path):
    out = tmp_path / "b"
    logs: list[str] = []
    cfg = BenchConfig.model_validate(_raw(phantoms_npz, out, perturb={"precision": 0.3, "recall": 0.9}, seed=1))
    paths = _arm_rois(cfg, PartStore(out, logs.append))
    own, shared = read_manifest(paths["mwm-deg"]), read_manifest(paths["mwm"])
    assert paths["mwm-deg"] == out / "rois-mwm-deg.jsonl"
    assert all("perturb" in r for r in own if r["status"] == "ok") and not any("perturb" in r for r in shared)
    meta = json.loads((out / "rois-mwm-deg.meta.json").read_text())["perturb"]
    assert meta["achieved_recall"] == pytest.approx(0.9, abs=0.05) and meta["seed"] == 1
    # the same config again: reused, nothing retired
    _arm_rois(cfg, PartStore(out, logs.append))
    assert not (out / "stale").exists()
    # another target: the old manifest moves to stale/, a new one is written
    cfg2 = BenchConfig.model_validate(_raw(phantoms_npz, out, perturb={"precision": 0.5, "recall": 0.7}, seed=1))
    _arm_rois(cfg2, PartStore(out, logs.append))
    assert any("perturb" in line and "stale" in line for line in logs), logs
    meta2 = json.loads((out / "rois-mwm-deg.meta.json").read_text())["perturb"]
    assert meta2["precision"] == 0.5 and read_manifest(paths["mwm-deg"]) != own
    assert read_manifest(paths["mwm"]) == shared  # the bench's plain gt-boxes are untouched


def test_manifest_made_before_these_options_is_kept_at_their_defaults(phantoms_npz, tmp_path):
    out = tmp_path / "b"
    raw = _raw(phantoms_npz, out)
    raw["arms"] = raw["arms"][:2]
    cfg = BenchConfig.model_validate(raw)
    _arm_rois(cfg, PartStore(out, print))
    record = out / "rois.bench_part.json"
    rec = json.loads(record.read_text())
    del rec["identity"]["perturb"]  # as an mwm before `perturb` wrote it
    rec["hash"] = identity_hash(rec["identity"])
    record.write_text(json.dumps(rec))
    logs: list[str] = []
    _arm_rois(cfg, PartStore(out, logs.append))
    assert not (out / "stale").exists() and logs == []
    # but the same old record is not taken for a perturbed manifest
    raw["rois"] = {"source": "gt-boxes", "expand": 0.1, "perturb": {"place": "random"}}
    rec["hash"] = "0" * 64
    record.write_text(json.dumps(rec))
    _arm_rois(BenchConfig.model_validate(raw), PartStore(out, logs.append))
    assert (out / "stale").exists() and any("perturb" in line for line in logs)


def test_meijering_source_builds_the_maps_once_for_both_mm_readings(phantoms_npz, tmp_path, spy):
    """rois: {source: meijering} (M&M): the bench makes the ridge maps of the pretraining images at its size, once
    for every arm with the same filter (reading (a): saliency_topk masking; reading (b): the ridge target); a rerun
    builds nothing; other sigmas are another folder and retrain only the arms that use them."""
    raw = _bench_raw(phantoms_npz, tmp_path / "b")
    raw["tasks"] = raw["tasks"][:1]
    mm = {"source": "meijering"}
    raw["arms"] = [{"name": "mm-topk", "masking": {"strategy": "saliency_topk", "ratio": 0.5}, "rois": mm},
                   {"name": "mm-target", "model": {"target": "meijering"},
                    "masking": {"strategy": "random", "ratio": 0.5}, "rois": mm},
                   {"name": "random", "masking": {"strategy": "random", "ratio": 0.5}}]
    log: list[str] = []
    rows = run_bench(BenchConfig.model_validate(raw), log=log.append)
    assert {r["arm"] for r in rows} == {"mm-topk", "mm-target", "random"}
    folders = [p.parent for p in (tmp_path / "b" / "rois").glob("*/rois.jsonl")]
    assert len(folders) == 1 and sum(m.startswith("Meijering maps") for m in log) == 1
    meta = json.loads((folders[0] / "meta.json").read_text())
    recs = [json.loads(line) for line in (folders[0] / "rois.jsonl").read_text().splitlines()]
    assert meta["settings"]["size"] == 64 and meta["settings"]["sigmas"] == [1.0, 2.0, 3.0]
    assert len(recs) == pretrain_count(phantoms_npz, {}) and all(r["status"] == "ok" for r in recs)
    spy.clear()
    run_bench(BenchConfig.model_validate(raw), log=log.append)
    assert spy == []
    raw["arms"][0]["rois"] = {"source": "meijering", "sigmas": [1.0, 2.0]}
    run_bench(BenchConfig.model_validate(raw), log=log.append)
    assert ("pretrain", "mm-topk") in spy and ("pretrain", "mm-target") not in spy
    assert len(list((tmp_path / "b" / "rois").glob("*/rois.jsonl"))) == 2
    with pytest.raises(ValidationError, match="sigmas / black_ridges set the Meijering filter"):
        BenchConfig.model_validate({**raw, "rois": {"source": "gt-boxes", "sigmas": [2.0]}})
