"""Prompt ensembles: the reduction, batched == looped single prompts, P = 1 bit-identical, and `mwm localize` with
"a;b;c", --ensemble and --prompt-family."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from typer.testing import CliRunner

from mwm.cli import app
from mwm.errors import DataError, MWMError
from mwm.localize.ensemble import ensemble_saliency, family_prompts, parse_family, reduce_maps, split_prompt
from mwm.localize.m2ib import M2IBConfig, _normalize_maps, m2ib_saliency
from mwm.rois.manifest import read_manifest
from mwm.localize.pipeline import batch_saliency, localize, prompt_embeddings
from mwm.localize.vision import vision_stages
from mwm.localize.vlm import load_vlm

from ..conftest import one_thread
from .test_pipeline import _cfg, tiny_vlm  # noqa: F401  (tiny_vlm: a module-scoped fixture)

runner = CliRunner()
_single_thread = pytest.fixture(autouse=True, scope="module")(one_thread)
FAST = M2IBConfig(layer=1, steps=2, noise_copies=2)


@pytest.fixture(scope="module")
def stages():
    torch.manual_seed(0)
    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 4, "head_width": 32},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    return vision_stages(open_clip.CLIP(**cfg).eval().requires_grad_(False).visual)


def test_split_prompt():
    assert split_prompt("a lesion") == ["a lesion"] and split_prompt(" a lesion ") == [" a lesion "]
    assert split_prompt(" a ; b;c ") == ["a", "b", "c"]
    for bad in ("a;;b", "a;", ";a"):
        with pytest.raises(DataError, match="empty part"):
            split_prompt(bad)


def test_batched_equals_looped_single_prompts(stages):
    torch.manual_seed(1)
    pixels, text = torch.randn(3, 3, 32, 32), torch.randn(3, 4, 32)  # 3 images × 4 prompts
    keys = ["img0", "img1", "img2"]
    res = ensemble_saliency(stages, pixels, text, FAST, keys=keys, out_size=(32, 32))
    singles = torch.stack([m2ib_saliency(stages, pixels, text[:, p], FAST, keys=keys, out_size=(32, 32)).saliency
                           for p in range(4)], 1)  # (3, 4, 32, 32): one prompt at a time, each image keyed by its id
    assert torch.allclose(res.maps, singles, atol=1e-6)
    assert torch.allclose(res.saliency, _normalize_maps(singles.mean(1)), atol=1e-6)
    assert res.saliency.shape == (3, 32, 32) and res.fit.shape == (3,)
    # ragged: image 1 has only its first two prompts; its map is the ensemble of those two alone
    valid = torch.tensor([[True] * 4, [True, True, False, False], [True] * 4])
    rag = ensemble_saliency(stages, pixels, text, FAST, keys=keys, valid=valid, out_size=(32, 32))
    assert torch.allclose(rag.saliency[1], _normalize_maps(singles[1:2, :2].mean(1))[0], atol=1e-6)
    assert torch.isnan(rag.maps[1, 2:]).all() and torch.allclose(rag.saliency[0], res.saliency[0], atol=1e-6)


def test_one_prompt_is_bit_identical(stages, tiny_vlm):  # noqa: F811
    torch.manual_seed(2)
    pixels, text = torch.randn(3, 3, 32, 32), torch.randn(3, 1, 32)
    single = m2ib_saliency(stages, pixels, text[:, 0], FAST, keys=["a", "b", "c"], out_size=(32, 32))
    ens = ensemble_saliency(stages, pixels, text, FAST, keys=["a", "b", "c"], out_size=(32, 32))
    assert torch.equal(ens.saliency, single.saliency) and torch.equal(ens.fit, single.fit)
    # the pipeline's batch path with plain prompts is exactly the call `mwm localize` made before ensembles
    vlm = load_vlm(str(tiny_vlm), device="cpu")
    prompts = ["bright lesion", "dark lesion", "bright lesion"]
    emb = prompt_embeddings(vlm, prompts)
    px = vlm.preprocess(torch.rand(3, 3, 32, 32))
    got = batch_saliency(vlm, px, prompts, ["a", "b", "c"], emb, FAST, out_size=(32, 32))
    old = m2ib_saliency(vlm.stages, px, torch.stack([emb[p] for p in prompts]), FAST, keys=["a", "b", "c"],
                        out_size=(32, 32))
    assert torch.equal(got.saliency, old.saliency) and torch.equal(got.fit, old.fit)


def test_median_differs_from_mean_and_ignores_an_outlier():
    a = torch.zeros(8, 8)
    a[1:3, 1:3] = 1.0  # the region two prompts agree on
    b = torch.zeros(8, 8)
    b[5:8, 5:8] = 1.0  # one outlier prompt's region
    maps = torch.stack([a, a, b])[None]  # (1, 3, 8, 8)
    mean, med = reduce_maps(maps, "mean")[0], reduce_maps(maps, "median")[0]
    assert mean[6, 6] == pytest.approx(0.5) and mean[1, 1] == 1  # (1/3) / (2/3) after min–max
    assert med[6, 6] == 0 and med[1, 1] == 1 and not torch.equal(mean, med)
    # an even count: the mean of the two middle values (numpy's median), not torch's lower median
    vals = torch.tensor([[0.0, 0.2, 0.6, 1.0], [0.0, 0.0, 1.0, 1.0], [0.0] * 4, [1.0] * 4])  # 4 pixels × 4 prompts
    four = vals.T.reshape(1, 4, 2, 2)
    assert torch.allclose(reduce_maps(four, "median")[0].flatten(), torch.tensor([0.4, 0.5, 0.0, 1.0]))
    # ragged: the padding (any value) never counts
    valid = torch.tensor([[True, True, False]])
    padded = torch.stack([a, b, torch.full((8, 8), 7.0)])[None]
    assert torch.equal(reduce_maps(padded, "median", valid), reduce_maps(padded[:, :2], "median"))
    # a NaN member makes the map NaN (reported as nan_saliency), for either reduction
    nan = torch.stack([a, torch.full((8, 8), float("nan"))])[None]
    assert torch.isnan(reduce_maps(nan, "mean")).all() and torch.isnan(reduce_maps(nan, "median")).all()


def test_localize_ensemble_manifest_and_settings(phantoms_npz, tiny_vlm, tmp_path):  # noqa: F811
    out = tmp_path / "ens"
    localize(_cfg(phantoms_npz, out, tiny_vlm, limit=8).model_copy(update={"prompt": "bright lesion;a dark lesion"}))
    recs = read_manifest(out / "rois.jsonl")
    assert len(recs) == 8 and {r["prompt"] for r in recs} == {"bright lesion;a dark lesion"}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["settings"]["ensemble"] == "mean" and meta["settings"]["prompt"] == "bright lesion;a dark lesion"
    single = tmp_path / "single"
    localize(_cfg(phantoms_npz, single, tiny_vlm, limit=8))
    assert [r["fit"] for r in read_manifest(single / "rois.jsonl")] != [r["fit"] for r in recs]
    # the reduction is a setting: resuming the folder with the median is refused, naming it
    with pytest.raises(MWMError, match="ensemble: 'mean' there, 'median' now"):
        localize(_cfg(phantoms_npz, out, tiny_vlm, limit=8).model_copy(
            update={"prompt": "bright lesion;a dark lesion", "ensemble": "median"}))


class _Entry:
    def family(self, kind):
        return {"short": ["lesion"], "all": ["lesion", "a bright lesion", "a dark spot"]}[kind]


def test_prompt_family(phantoms_npz, tiny_vlm, tmp_path, monkeypatch):  # noqa: F811
    from mwm.localize import prompt_library

    asked = []
    monkeypatch.setattr(prompt_library, "get_entry", lambda m, t: asked.append((m, t)) or _Entry())
    assert parse_family("phantom/lesion") == ("phantom", "lesion", "all")
    assert family_prompts("phantom/lesion:short") == ["lesion"] and asked[-1] == ("phantom", "lesion")
    for bad in ("phantom", "phantom/lesion:everything", "/lesion"):
        with pytest.raises(DataError, match="--prompt-family"):
            parse_family(bad)
    out = tmp_path / "fam"
    r = runner.invoke(app, ["localize", str(phantoms_npz), "--vlm", str(tiny_vlm), "--prompt-family", "phantom/lesion",
                            "--ensemble", "median", "--out", str(out), "--limit", "4", "--layer", "1", "--steps", "1",
                            "--noise-copies", "2", "--device", "cpu", "--gallery", "0"])
    assert r.exit_code == 0, r.output
    assert {x["prompt"] for x in read_manifest(out / "rois.jsonl")} == {"lesion;a bright lesion;a dark spot"}
    settings = json.loads((out / "meta.json").read_text())["settings"]
    assert settings["family_prompts"] == "lesion;a bright lesion;a dark spot" and settings["ensemble"] == "median"
    r = runner.invoke(app, ["localize", str(phantoms_npz), "--vlm", str(tiny_vlm), "--prompt-family", "phantom/lesion",
                            "--prompt", "lesion", "--out", str(tmp_path / "both")])
    assert r.exit_code != 0 and "not both" in r.output
