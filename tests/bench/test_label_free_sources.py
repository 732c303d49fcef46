"""Bench ROI sources that need no text: ``reconstruction-error`` (a pretraining run's hard regions), ``foreground``
``kind: brain`` and ``generic-prompt`` (``mwm localize`` with a target-agnostic prompt) — validated with the bench
file, built once, reused while their identity holds, rebuilt when the run / VLM / prompt changes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

import mwm.localize.pipeline as pipeline
from mwm.bench import BenchConfig
from mwm.bench.parts import PartStore, identity_hash, rois_identity
from mwm.bench.runner import _arm_rois, check_bench
from mwm.rois.manifest import read_manifest
from tests.conftest import one_thread, tiny_pretrain_run

_single_thread = pytest.fixture(autouse=True, scope="module")(one_thread)
MWM = {"strategy": "roi", "ratio_in": 0.8, "ratio_out": 0.2}


@pytest.fixture(scope="module")
def ph64(tmp_path_factory) -> Path:
    from mwm.data.synthetic import PhantomConfig, generate

    path = tmp_path_factory.mktemp("lfb") / "ph64.npz"
    generate(PhantomConfig(n=8, size=64, seed=5)).save_npz(path)
    return path


@pytest.fixture(scope="module")
def tiny_run(ph64, tmp_path_factory) -> Path:
    return tiny_pretrain_run(ph64, tmp_path_factory.mktemp("lfb") / "run", mask_stride=16)


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> Path:
    from mwm.localize.vlm import export_vlm
    from mwm.localize.vlm_train import TinyClipConfig

    torch.manual_seed(0)
    cfg = TinyClipConfig(width=32, layers=3, heads=2, text_width=32, text_layers=1, embed_dim=32).model_cfg(32)
    pp = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "size": [32, 32]}
    return export_vlm(open_clip.CLIP(**cfg), cfg, pp, tmp_path_factory.mktemp("lfb") / "vlm")


def _bench(data, out, rois) -> BenchConfig:
    return BenchConfig.model_validate({
        "name": "lf", "data": str(data), "out": str(out), "seeds": [0], "device": "cpu", "rois": rois,
        "arms": [{"name": "random", "masking": {"strategy": "random", "ratio": 0.6}},
                 {"name": "mwm", "masking": MWM}]})


@pytest.mark.parametrize("rois, match", [
    ({"source": "reconstruction-error"}, "needs rois.run"),
    ({"source": "generic-prompt"}, "needs rois.vlm"),
    ({"source": "generic-prompt", "vlm": "v", "options": {"binarise": "otsu"}}, r"options\.binarise"),
    ({"source": "generic-prompt", "vlm": "v", "options": {"prompt": "x"}}, r"must not set \['prompt'\]"),
    ({"source": "generic-prompt", "vlm": "v", "prompt": ""}, "prompt"),
    ({"source": "foreground", "options": {"binarize": "otsu"}}, "need rois.source 'generic-prompt'"),
    ({"source": "reconstruction-error", "run": "r", "level": "voxel"}, "level"),
    ({"source": "reconstruction-error", "run": "r", "ratio": 1.0}, "ratio"),
    ({"source": "foreground", "kind": "liver"}, "'lungs', 'body' or 'brain'"),
])
def test_bad_label_free_sources_fail_at_load(ph64, tmp_path, rois, match):
    with pytest.raises(ValueError, match=match):
        _bench(ph64, tmp_path, rois)


def test_a_missing_run_fails_before_anything_runs(ph64, tmp_path):
    cfg = _bench(ph64, tmp_path / "b", {"source": "reconstruction-error", "run": str(tmp_path / "nope")})
    with pytest.raises(Exception, match="checkpoints/last.pt"):
        check_bench(cfg)
    assert not (tmp_path / "b").exists()


def test_reconstruction_error_manifest_is_built_reused_and_rebuilt_when_the_run_changes(ph64, tiny_run, tmp_path):
    out = tmp_path / "b"
    logs: list[str] = []
    src = {"source": "reconstruction-error", "run": str(tiny_run), "masks": 2, "expand": 0.0}
    cfg = _bench(ph64, out, src)
    path = _arm_rois(cfg, PartStore(out, logs.append))["mwm"]
    assert path == out / "rois.jsonl"
    recs = read_manifest(path)
    assert len(recs) == 8 and {r["prompt"] for r in recs} == {"reconstruction-error"}
    first = path.read_bytes()
    # the same config: reused as is
    _arm_rois(cfg, PartStore(out, logs.append))
    assert path.read_bytes() == first and not (out / "stale").exists()
    # a scoring option changes the identity: rebuilt, the old one moved aside
    cfg2 = _bench(ph64, out, {**src, "masks": 3})
    _arm_rois(cfg2, PartStore(out, logs.append))
    assert len(list((out / "stale").iterdir())) == 1
    # new weights in the run (same folder, same options): the identity follows the checkpoint's content
    before = identity_hash(rois_identity(ph64, cfg2.rois))
    ckpt_path = tiny_run / "checkpoints" / "last.pt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    key = next(k for k, v in ckpt["model"].items() if v.is_floating_point() and "decoder" in k)
    ckpt["model"][key] = ckpt["model"][key] + 0.5
    torch.save(ckpt, ckpt_path)
    assert identity_hash(rois_identity(ph64, cfg2.rois)) != before
    _arm_rois(cfg2, PartStore(out, logs.append))
    assert len(list((out / "stale").iterdir())) == 2
    assert any("moved it to" in m for m in logs)


def test_brain_foreground_is_a_bench_source(ph64, tmp_path):
    out = tmp_path / "b"
    cfg = _bench(ph64, out, {"source": "foreground", "kind": "brain"})
    recs = read_manifest(_arm_rois(cfg, PartStore(out, print))["mwm"])
    assert len(recs) == 8 and {r["prompt"] for r in recs} == {"foreground:brain"}
    assert rois_identity(ph64, cfg.rois)["kind"] == "brain"


def test_generic_prompt_localizes_once_per_identity(ph64, tiny_vlm, tmp_path, monkeypatch):
    calls: list = []
    real = pipeline.localize

    def spy(lc, *a, **k):
        calls.append((lc.prompt, lc.split))
        return real(lc, *a, **k)

    monkeypatch.setattr(pipeline, "localize", spy)
    out = tmp_path / "b"
    src = {"source": "generic-prompt", "vlm": str(tiny_vlm), "prompt": "an abnormality", "split": "train",
           "options": {"m2ib": {"layer": 1, "steps": 2, "noise_copies": 2}, "batch_size": 8, "gallery": 0}}
    cfg = _bench(ph64, out, src)
    path = _arm_rois(cfg, PartStore(out, print))["mwm"]
    h = identity_hash(rois_identity(ph64, cfg.rois))
    assert path == out / "rois" / h[:12] / "rois.jsonl" and calls == [("an abnormality", "train")]
    z = np.load(ph64)
    assert [r["image"] for r in read_manifest(path)] == [str(f) for f, s in zip(z["filenames"], z["split"])
                                                         if s == "train"]
    assert json.loads((path.parent / "summary.json").read_text())
    # done: not localized again; a run-only option (batch size) changes nothing
    _arm_rois(_bench(ph64, out, {**src, "options": {**src["options"], "batch_size": 4}}), PartStore(out, print))
    assert len(calls) == 1
    # another prompt, or new VLM weights: another folder, localized anew
    p2 = _arm_rois(_bench(ph64, out, {**src, "prompt": "a lesion"}), PartStore(out, print))["mwm"]
    assert p2 != path and calls[-1] == ("a lesion", "train")
    before = rois_identity(ph64, cfg.rois)["vlm"]
    (Path(tiny_vlm) / "open_clip_pytorch_model.bin").write_bytes(
        (Path(tiny_vlm) / "open_clip_pytorch_model.bin").read_bytes() + b"\0")
    assert rois_identity(ph64, cfg.rois)["vlm"] != before
