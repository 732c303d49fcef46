"""`mwm localize` into a folder that already holds a run: one configuration per folder (resume only with the
same settings, --overwrite to start over), folder locks for concurrent and sharded runs, collision-free
file names, constant images, and prompts files that are not UTF-8."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from mwm.cli import app
from mwm.errors import DataError, MWMError
from mwm.io import lock_folder
from mwm.localize.m2ib import M2IBConfig
from mwm.rois.manifest import read_manifest
from mwm.localize.pipeline import claim_settings, localize
from mwm.rois.manifest import safe_file_name as _safe_name
from tests.conftest import one_thread

from .test_pipeline import _cfg, tiny_vlm  # noqa: F401  (tiny_vlm: a module-scoped fixture)

_single_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


def _prompts(out):
    return {r["prompt"] for r in read_manifest(out / "rois.jsonl")}


# -- 1. one configuration per folder ------------------------------------------------------------
def test_other_settings_are_refused_naming_them_and_leave_the_folder_untouched(phantoms_npz, tiny_vlm, tmp_path):
    out = tmp_path / "rois"
    localize(_cfg(phantoms_npz, out, tiny_vlm, limit=8))
    before = {n: (out / n).read_bytes() for n in ("rois.jsonl", "meta.json", "config.yaml")}
    with pytest.raises(MWMError, match=r"other settings.*binarize: 'kmeans' there, 'otsu' now.*expand.*"
                                       r"prompt: 'bright lesion' there, 'dark lesion' now.*--overwrite"):
        localize(_cfg(phantoms_npz, out, tiny_vlm, limit=16, binarize="otsu", expand=0.3).model_copy(
            update={"prompt": "dark lesion"}))
    with pytest.raises(MWMError, match=r"m2ib\.steps: 2 there, 3 now"):
        localize(_cfg(phantoms_npz, out, tiny_vlm, limit=16).model_copy(
            update={"m2ib": M2IBConfig(layer=1, steps=3, noise_copies=2)}))
    assert {n: (out / n).read_bytes() for n in before} == before
    # run-only settings (batch size, device, gallery, limit, saliency files) do not block a resume
    s = localize(_cfg(phantoms_npz, out, tiny_vlm, limit=12).model_copy(update={"batch_size": 3, "gallery": 0,
                                                                                  "save_saliency": True}))
    assert (s["skipped_done"], s["processed"]) == (8, 4)
    assert _prompts(out) == {"bright lesion"} and len(read_manifest(out / "rois.jsonl")) == 12
    meta = json.loads((out / "meta.json").read_text())
    assert meta["settings"]["prompt"] == "bright lesion" and meta["settings"]["data"]["n_images"] == 60


def test_overwrite_starts_over(phantoms_npz, tiny_vlm, tmp_path):
    out = tmp_path / "rois"
    localize(_cfg(phantoms_npz, out, tiny_vlm, limit=8, save_saliency=True, save_masks=True))
    (out / "rois.part-0-of-2.jsonl").write_text("")  # a leftover shard part is deleted too
    s = localize(_cfg(phantoms_npz, out, tiny_vlm, limit=6, expand=0.0).model_copy(
        update={"prompt": "dark lesion"}), overwrite=True)
    assert (s["processed"], s["skipped_done"]) == (6, 0)
    recs = read_manifest(out / "rois.jsonl")
    assert len(recs) == 6 and _prompts(out) == {"dark lesion"}
    assert not (out / "saliency").exists() and not (out / "masks").exists()
    assert not (out / "rois.part-0-of-2.jsonl").exists()
    assert len(list((out / "gallery").glob("*.json"))) == 4  # only this run's panels
    assert json.loads((out / "meta.json").read_text())["settings"]["expand"] == 0.0


def test_prompts_file_content_is_part_of_the_settings(phantoms_npz, tiny_vlm, tmp_path):
    pf = tmp_path / "p.json"
    pf.write_text(json.dumps({"default": "a lesion"}))
    cfg = _cfg(phantoms_npz, tmp_path / "o", tiny_vlm, limit=4).model_copy(update={"prompt": None, "prompts_file": pf})
    localize(cfg)
    pf.write_text(json.dumps({"default": "the head"}))  # same path, other prompts
    with pytest.raises(MWMError, match="prompts_file: 'sha256:"):
        localize(cfg)


def test_folder_without_settings_is_checked_by_its_records_and_old_meta(phantoms_npz, tiny_vlm, tmp_path):
    out = tmp_path / "o"
    localize(_cfg(phantoms_npz, out, tiny_vlm, limit=4))
    meta = json.loads((out / "meta.json").read_text())
    del meta["settings"]  # a meta.json from before settings were recorded: its config is compared
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(MWMError, match=r"expand: 0\.1 there, 0\.5 now"):
        localize(_cfg(phantoms_npz, out, tiny_vlm, limit=4, expand=0.5))
    (out / "meta.json").unlink()  # no meta at all: the records' prompts still must match
    with pytest.raises(MWMError, match="was localized with the prompt 'bright lesion'.*'dark lesion'"):
        localize(_cfg(phantoms_npz, out, tiny_vlm, limit=4).model_copy(update={"prompt": "dark lesion"}))
    assert localize(_cfg(phantoms_npz, out, tiny_vlm, limit=6))["skipped_done"] == 4


def test_cli_refuses_other_settings_then_overwrites(phantoms_npz, tiny_vlm, tmp_path):
    out = tmp_path / "cli"
    args = ["localize", str(phantoms_npz), "--vlm", str(tiny_vlm), "--out", str(out), "--limit", "4", "--layer", "1",
            "--steps", "1", "--noise-copies", "2", "--device", "cpu", "--gallery", "0"]
    assert CliRunner().invoke(app, [*args, "--prompt", "lesion"]).exit_code == 0
    config = (out / "config.yaml").read_text()
    r = CliRunner().invoke(app, [*args, "--prompt", "dark lesion"])
    assert r.exit_code != 0 and "prompt: 'lesion' there, 'dark lesion' now" in " ".join(r.output.split())
    assert (out / "config.yaml").read_text() == config  # a refused run does not rewrite the config
    r = CliRunner().invoke(app, [*args, "--prompt", "dark lesion", "--overwrite"])
    assert r.exit_code == 0, r.output
    assert _prompts(out) == {"dark lesion"} and "dark lesion" in (out / "config.yaml").read_text()


# -- 2. concurrent writers ------------------------------------------------------------------------
def test_a_running_localize_locks_the_folder(phantoms_npz, tiny_vlm, tmp_path):
    out = tmp_path / "o"
    with lock_folder(out, what="localize run"):  # another (live) unsharded run holds the folder
        with pytest.raises(MWMError, match="in use by another localize run"):
            localize(_cfg(phantoms_npz, out, tiny_vlm, limit=4).model_copy(update={"prompt": "dark lesion"}))
        with pytest.raises(MWMError, match="in use by another localize run.*unsharded run"):
            localize(_cfg(phantoms_npz, out, tiny_vlm, limit=4, shard="0/2"))
    assert not (out / "rois.jsonl").exists() and not (out / "rois.part-0-of-2.jsonl").exists()
    localize(_cfg(phantoms_npz, out, tiny_vlm, limit=4))
    assert not list(out.glob(".mwm.lock*"))  # released after the run


def test_shards_lock_their_own_name_and_share_the_folder(phantoms_npz, tiny_vlm, tmp_path):
    out = tmp_path / "o"
    with lock_folder(out, name=".mwm.lock-shard-0-of-2", what="localize run"):  # shard 0 is running
        with pytest.raises(MWMError, match="in use by another localize run"):
            localize(_cfg(phantoms_npz, out, tiny_vlm, limit=6, shard="0/2"))  # the same shard twice
        with pytest.raises(MWMError, match="shard of a sharded run"):
            localize(_cfg(phantoms_npz, out, tiny_vlm, limit=6))
        with pytest.raises(MWMError, match="--overwrite would delete its work"):
            localize(_cfg(phantoms_npz, out, tiny_vlm, limit=6, shard="1/2"), overwrite=True)
        assert localize(_cfg(phantoms_npz, out, tiny_vlm, limit=6, shard="1/2"))["processed"] == 3
        # a shard started with another config is refused even while its siblings run
        with pytest.raises(MWMError, match="prompt: 'bright lesion' there, 'dark lesion' now"):
            localize(_cfg(phantoms_npz, out, tiny_vlm, limit=6, shard="1/2").model_copy(
                update={"prompt": "dark lesion"}))
    s = localize(_cfg(phantoms_npz, out, tiny_vlm, limit=6, shard="0/2"))
    assert s["manifest"].endswith("rois.jsonl") and len(read_manifest(out / "rois.jsonl")) == 6
    assert _prompts(out) == {"bright lesion"}


def test_settings_claim_is_atomic_first_come(tmp_path, phantoms_npz, tiny_vlm):
    """Two runs that both found no meta.json: the second to claim sees the first's settings and stops."""
    cfg = _cfg(phantoms_npz, tmp_path, tiny_vlm)
    a = {"settings": {"prompt": "a", "m2ib": {"steps": 2}}, "config": {}}
    claim_settings(tmp_path, a, cfg)
    with pytest.raises(MWMError, match=r"m2ib\.steps: 2 there, 3 now.*prompt: 'a' there, 'b' now"):
        claim_settings(tmp_path, {"settings": {"prompt": "b", "m2ib": {"steps": 3}}, "config": {}}, cfg)
    claim_settings(tmp_path, {**a, "n_images": 5}, cfg)  # the same settings: replaces meta.json
    assert json.loads((tmp_path / "meta.json").read_text())["n_images"] == 5
    # a setting a later mwm adds is not a difference for folders written before it existed
    claim_settings(tmp_path, {"settings": {**a["settings"], "added_later": 1}, "config": {}}, cfg)
    assert not list(tmp_path.glob(".meta.json*"))  # no temporary file left behind


# -- 3. file names ---------------------------------------------------------------------------------
COLLIDING = ["a/b.png", "a_b.png", "a b.png", "a?b.png"]


def test_safe_names_are_unique_and_stable():
    names = [_safe_name(i) for i in COLLIDING]
    assert len(set(names)) == 4
    assert names[1] == "a_b.png-" + hashlib.sha1(b"a_b.png").hexdigest()[:10]  # the same on every run / machine
    assert all(set(n) <= set("abcdefghijklmnopqrstuvwxyz0123456789-_.") for n in names)
    assert not _safe_name("../.hidden").startswith(".") and len(_safe_name("x" * 500)) <= 91


def test_colliding_ids_get_their_own_saliency_mask_and_gallery_files(tiny_vlm, tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "collide.npz"
    np.savez(data, images=rng.integers(0, 255, (4, 32, 32), dtype=np.uint8), labels=np.zeros(4, np.int64),
             label_names=np.array(["x"]), filenames=np.array(COLLIDING))
    out = tmp_path / "o"
    localize(_cfg(data, out, tiny_vlm, save_saliency=True, save_masks=True))
    recs = read_manifest(out / "rois.jsonl")
    assert [r["image"] for r in recs] == COLLIDING
    assert len({r["saliency"] for r in recs}) == len({r["mask"] for r in recs}) == 4
    assert all((out / r["saliency"]).is_file() and (out / r["mask"]).is_file() for r in recs)
    assert len(list((out / "saliency").iterdir())) == len(list((out / "masks").iterdir())) == 4
    panels = [json.loads(p.read_text())["image"] for p in (out / "gallery").glob("*.json")]
    assert sorted(panels) == sorted(COLLIDING) and len(list((out / "gallery").glob("*.png"))) == 4
    assert (out / "index.html").read_text().count("<figure>") == 4


# -- 5. constant images, prompts files that are not UTF-8 ---------------------------------------------
def test_constant_images_get_constant_saliency_and_no_box(phantoms_npz, tiny_vlm, tmp_path):
    from mwm.data import open_source

    ph = open_source(phantoms_npz)
    imgs = np.stack([np.zeros((32, 32), np.uint8), np.full((32, 32), 255, np.uint8),
                     (ph.read(0).image * 255).astype(np.uint8), np.full((32, 32), 100, np.uint8)])
    np.savez(tmp_path / "flat.npz", images=imgs, labels=np.zeros(4, np.int64), label_names=np.array(["x"]))
    localize(_cfg(tmp_path / "flat.npz", tmp_path / "o", tiny_vlm))
    recs = read_manifest(tmp_path / "o" / "rois.jsonl")
    assert [r["status"] for r in recs] == ["constant_saliency", "constant_saliency", "ok", "constant_saliency"]
    assert [len(r["boxes"]) for r in recs] == [0, 0, 1, 0]
    # a constant image that is not square (so padded to the VLM's square input) is constant too
    np.savez(tmp_path / "wide.npz", images=np.zeros((1, 32, 48), np.uint8), labels=np.zeros(1, np.int64))
    localize(_cfg(tmp_path / "wide.npz", tmp_path / "w", tiny_vlm))
    assert read_manifest(tmp_path / "w" / "rois.jsonl")[0]["status"] == "constant_saliency"


@pytest.mark.parametrize("content, match", [
    (b'{"default": "l\xe9sion"}', r"p\.json:1: the prompts file is not UTF-8 text \(byte 0xe9\)"),
    (b'{"default": "a",\n "x": "b",\n\x00\xff}', r"p\.json:3: the prompts file is not UTF-8"),
    (b'{"default": "a",\n "x": }', r"p\.json:2: the prompts file is not valid JSON"),
])
def test_prompts_file_that_is_not_utf8_json_names_file_and_line(phantoms_npz, tiny_vlm, tmp_path, content, match):
    pf = tmp_path / "p.json"
    pf.write_bytes(content)
    with pytest.raises(DataError, match=match):
        localize(_cfg(phantoms_npz, tmp_path / "o", tiny_vlm, limit=2).model_copy(
            update={"prompt": None, "prompts_file": pf}))


def test_prompts_file_with_bom_and_non_ascii_prompts(phantoms_npz, tiny_vlm, tmp_path):
    pf = tmp_path / "p.json"
    pf.write_bytes(b"\xef\xbb\xbf" + json.dumps({"default": "lésion"}, ensure_ascii=False).encode())
    localize(_cfg(phantoms_npz, tmp_path / "o", tiny_vlm, limit=2).model_copy(update={"prompt": None, "prompts_file": pf}))
    assert _prompts(tmp_path / "o") == {"lésion"}
