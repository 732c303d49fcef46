"""`mwm localize` end to end on a tiny random VLM: manifest contract, statuses, resume, shards, gallery."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from typer.testing import CliRunner

from mwm.cli import app
from mwm.rois.manifest import read_manifest
from mwm.localize.pipeline import LocalizeConfig, append_lines, localize
from mwm.localize.vlm import export_vlm
from mwm.localize.vlm_train import TinyClipConfig

from ..conftest import shared_file

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    torch.manual_seed(0)
    cfg = TinyClipConfig(width=32, layers=3, heads=2, text_width=32, text_layers=1, embed_dim=32).model_cfg(32)
    model = open_clip.CLIP(**cfg)
    pp = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "size": [32, 32]}
    return export_vlm(model, cfg, pp, tmp_path_factory.mktemp("vlm") / "tiny")


def _cfg(data, out, vlm, **kw):
    m2ib = {"layer": 1, "steps": 2, "noise_copies": 2}
    return LocalizeConfig(data=data, out=out, vlm=str(vlm), prompt="bright lesion", m2ib=m2ib, batch_size=8,
                          gallery=4, device="cpu", **kw)


def test_manifest_contract_and_gallery(phantoms_npz, tiny_vlm, tmp_path):
    out = tmp_path / "rois"
    summary = localize(_cfg(phantoms_npz, out, tiny_vlm, limit=20, save_saliency=True))
    recs = read_manifest(out / "rois.jsonl")
    assert summary["processed"] == 20 and len(recs) == 20
    for r in recs:
        assert {"image", "width", "height", "boxes", "prompt", "status"} <= set(r)
        assert r["width"] == r["height"] == 32 and r["prompt"] == "bright lesion"
        if r["status"] == "ok":
            assert r["boxes"] and all(0 <= v <= 1 for b in r["boxes"] for v in b)
            assert all(b[2] > b[0] and b[3] > b[1] for b in r["boxes"])
            assert (out / r["saliency"]).is_file()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["config"]["m2ib"]["layer"] == 1 and meta["vlm"]["grid"] == [4, 4]
    html = (out / "index.html").read_text()
    assert html.count("<figure>") == 4 and "gallery/" in html
    assert len(list((out / "gallery").glob("*.png"))) == 4


def test_resume_after_kill_gives_same_manifest(phantoms_npz, tiny_vlm, tmp_path):
    full = tmp_path / "full"
    localize(_cfg(phantoms_npz, full, tiny_vlm, limit=24))
    ref = (full / "rois.jsonl").read_text()
    # a run killed after its first batch: 8 whole lines and half of the ninth
    part = tmp_path / "part"
    part.mkdir()
    lines = ref.splitlines(keepends=True)
    (part / "rois.jsonl").write_text("".join(lines[:8]) + lines[8][:25])
    with pytest.warns(UserWarning):
        s = localize(_cfg(phantoms_npz, part, tiny_vlm, limit=24))
    assert s["skipped_done"] == 8 and s["processed"] == 16
    assert (part / "rois.jsonl").read_text() == ref


def test_shards_merge_to_the_unsharded_manifest(phantoms_npz, tiny_vlm, tmp_path):
    ref_dir = tmp_path / "ref"
    localize(_cfg(phantoms_npz, ref_dir, tiny_vlm, limit=12))
    out = tmp_path / "sharded"
    s0 = localize(_cfg(phantoms_npz, out, tiny_vlm, limit=12, shard="0/2"))
    assert s0["processed"] == 6 and not (out / "rois.jsonl").exists()
    localize(_cfg(phantoms_npz, out, tiny_vlm, limit=12, shard="1/2"))
    assert (out / "rois.jsonl").read_text() == (ref_dir / "rois.jsonl").read_text()


def test_bad_inputs(phantoms_npz, tiny_vlm, tmp_path):
    from mwm.errors import MWMError

    with pytest.raises(MWMError, match="give a prompt"):
        localize(_cfg(phantoms_npz, tmp_path / "a", tiny_vlm, limit=2).model_copy(update={"prompt": None}))
    with pytest.raises(Exception, match="empty"):
        localize(_cfg(phantoms_npz, tmp_path / "b", tiny_vlm, limit=2).model_copy(update={"prompt": "  "}))
    with pytest.raises(ValueError, match="i/n"):
        _cfg(phantoms_npz, tmp_path / "c", tiny_vlm, shard="2")
    # images smaller than the VLM's patch grid and constant images: a status per image, no crash
    np.savez(tmp_path / "odd.npz", images=np.stack([np.zeros((3, 3), np.uint8)] * 2),
             labels=np.zeros(2, np.int64), label_names=np.array(["x"]), split=np.array(["test"] * 2))
    localize(_cfg(tmp_path / "odd.npz", tmp_path / "odd", tiny_vlm))
    assert {r["status"] for r in read_manifest(tmp_path / "odd" / "rois.jsonl")} == {"too_small"}
    np.savez(tmp_path / "flat.npz", images=np.full((2, 32, 32), 100, np.uint8), labels=np.zeros(2, np.int64),
             label_names=np.array(["x"]), split=np.array(["test"] * 2))
    localize(_cfg(tmp_path / "flat.npz", tmp_path / "flat", tiny_vlm))
    recs = read_manifest(tmp_path / "flat" / "rois.jsonl")
    assert len(recs) == 2 and all(r["status"] in ("ok", "constant_saliency") for r in recs)


def test_prompts_file_per_class_and_image(phantoms_npz, tiny_vlm, tmp_path):
    pf = tmp_path / "p.json"
    pf.write_text(json.dumps({"normal": "the head", "default": "a lesion", "phantom_000001.png": "dark lesion"}))
    localize(_cfg(phantoms_npz, tmp_path / "o", tiny_vlm, limit=6).model_copy(update={"prompt": None, "prompts_file": pf}))
    from mwm.data import open_source

    src = open_source(phantoms_npz)
    recs = {r["image"]: r for r in read_manifest(tmp_path / "o" / "rois.jsonl")}
    for i in range(6):
        want = "dark lesion" if src.ids[i] == "phantom_000001.png" else (
            "the head" if src.label_names[src.labels[i]] == "normal" else "a lesion")
        assert recs[src.ids[i]]["prompt"] == want


def test_append_lines_starts_fresh_line_after_partial(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"image": "a"')
    append_lines(p, [{"image": "b"}])
    assert p.read_text().splitlines()[1] == '{"image":"b"}'


def test_cli_localize_then_eval(phantoms_npz, tiny_vlm, tmp_path):
    out = tmp_path / "cli"
    r = runner.invoke(app, ["localize", str(phantoms_npz), "--prompt", "lesion", "--vlm", str(tiny_vlm), "--out", str(out),
                            "--limit", "10", "--layer", "1", "--steps", "1", "--noise-copies", "2", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert (out / "config.yaml").is_file() and (out / "index.html").is_file()
    r = runner.invoke(app, ["localize-eval", str(out / "rois.jsonl"), "--gt", str(phantoms_npz), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert {"n", "precision", "recall", "dice", "iou"} <= set(res)


def test_localize_br35h_test_split(tiny_vlm, tmp_path):
    path = shared_file("br35h.npz")
    s = localize(_cfg(path, tmp_path / "b", tiny_vlm, split="test", limit=8))
    assert s["processed"] == 8 and len(read_manifest(tmp_path / "b" / "rois.jsonl")) == 8
