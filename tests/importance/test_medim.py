"""MedIM's KWM / SDM importance maps (mwm.importance.medim), their manifest (mwm.importance.maps), MedIM's diversity
masking (saliency_topk_diverse) and a 1-step `mwm pretrain` on the maps. Tiny open_clip models at 32 px."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mwm.cli import app
from mwm.errors import MWMError
from mwm.importance.maps import write_map_manifest
from mwm.importance.medim import (MedIMConfig, _report_features, attention_maps, load_mesh, medim_maps, parse_mesh,
                                  patch_features, report_words, sentence_index, split_sentences, text_token_features,
                                  word_weights)
from mwm.localize.vlm import build_biomedclip_like, export_vlm, load_vlm
from mwm.localize.vlm_train import TinyClipConfig
from mwm.masking import create_masker, MaskingBatch
from mwm.masking.policies import topk_diverse_keep

from ..conftest import one_thread

_single_thread = pytest.fixture(autouse=True, scope="module")(one_thread)
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> Path:
    """open_clip's native CLIP (causal text transformer, BPE tokenizer), 32 px, 4 × 4 patches."""
    torch.manual_seed(0)
    cfg = TinyClipConfig(width=32, layers=2, heads=2, text_width=32, text_layers=1, embed_dim=32).model_cfg(32)
    model = open_clip.CLIP(**cfg)
    pp = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "size": [32, 32]}
    return export_vlm(model, cfg, pp, tmp_path_factory.mktemp("vlm") / "tiny")


@pytest.fixture(scope="module")
def bert_vlm(tmp_path_factory) -> Path:
    """BiomedCLIP-shaped: timm ViT image tower, HF BERT text tower (WordPiece, bidirectional)."""
    return build_biomedclip_like(tmp_path_factory.mktemp("vlm") / "bert", text_layers=1, text_width=32,
                                 vision="vit_tiny_patch16_224")


def _npz(path: Path, captions: list[str], size: int = 32, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    img = (rng.random((1, size, size)) * 255).astype(np.uint8)
    n = len(captions)
    np.savez(path, images=np.repeat(img, n, 0), labels=np.zeros(n, np.int64), label_names=np.array(["lesion"]),
             filenames=np.array([f"im{k}.png" for k in range(n)]), captions=np.array(captions))
    return path


def _cfg(data, out, vlm, **kw) -> MedIMConfig:
    return MedIMConfig(data=data, out=out, vlm=str(vlm), device="cpu", batch_size=4, split="all", **kw)


def _map(out: Path, rec: dict) -> np.ndarray:
    return np.asarray(Image.open(out / rec["saliency"]))


# -- words, sentences, MeSH ------------------------------------------------------------------------------------


def test_mesh_list_is_parsed_as_medim_matches_it(tmp_path):
    """MedIM lower-cases each line, splits it at commas and trims: single words only, case-insensitive; --mesh adds
    terms."""
    assert parse_mesh(["Mammary Glands, Human", "  Brain ", "Intestine,Large"]) == {"mammary glands", "human", "brain",
                                                                                 "intestine", "large"}
    mesh = load_mesh()
    assert {"head", "brain", "neoplasms", "lung"} <= mesh and "lesion" not in mesh
    extra = tmp_path / "more.txt"
    extra.write_text("Lesion\nRing Enhancement\n")
    assert {"lesion", "ring enhancement"} <= load_mesh(extra) and "head" in load_mesh(extra)
    with pytest.raises(MWMError, match="no such file"):
        load_mesh(tmp_path / "none.txt")


def test_sentences_follow_medims_report_preparation():
    """Sentences end at '.' and at numbered items; words are lower-cased letter/digit runs; one-word sentences go."""
    rep = "1. No acute findings.  2. Heart size NORMAL, lungs clear.\nOk. Mild cardiomegaly"
    assert split_sentences(rep) == [["no", "acute", "findings"], ["heart", "size", "normal", "lungs", "clear"],
                                    ["mild", "cardiomegaly"]]


def test_sdm_picks_one_sentence_reproducibly_per_image_id():
    """Seeded by (seed, image id): the same id always gets the same sentence, ids spread over the eligible
    sentences (those with ≥ 4 words, MedIM's > 3), and a short sentence is never drawn while a long one exists."""
    counts = [5, 2, 6, 4]
    picks = [sentence_index(f"img{k}", counts) for k in range(200)]
    assert picks == [sentence_index(f"img{k}", counts) for k in range(200)]
    assert set(picks) == {0, 2, 3}  # sentence 1 has 2 words
    assert [sentence_index(f"img{k}", counts, seed=1) for k in range(200)] != picks
    assert sentence_index("x", [2, 3]) in (0, 1)  # none eligible: any


def test_sdm_weights_mark_the_words_of_exactly_one_sentence(tiny_vlm):
    vlm = load_vlm(tiny_vlm)
    rw = report_words(vlm.tokenizer, "a bright ring lesion here. the head scan is normal otherwise. ok then",
                      vlm.context_length)
    assert rw.sentence == [0] * 5 + [1] * 6 + [2] * 2
    for k in range(20):
        wt = word_weights(rw, "sdm", set(), image_id=f"id{k}")
        chosen = {s for s, x in zip(rw.sentence, wt.tolist()) if x}
        assert len(chosen) == 1 and chosen <= {0, 1}
        assert wt.sum() == rw.sentence.count(chosen.pop())
        assert torch.equal(wt, word_weights(rw, "sdm", set(), image_id=f"id{k}"))


@pytest.mark.parametrize("which", ["tiny", "bert"])
def test_subword_tokens_of_a_word_are_summed_before_the_projection(which, tiny_vlm, bert_vlm):
    """A word split into several tokens gets one feature: the sum of its tokens' final hidden states, projected
    (MedIM's aggregate_tokens, 'sum'). Checked by hand for both tokenizers (BPE and WordPiece)."""
    vlm = load_vlm(tiny_vlm if which == "tiny" else bert_vlm)
    rw = report_words(vlm.tokenizer, "splenomegalyx in the lungs", vlm.context_length)
    a, b = rw.spans[0]
    assert rw.words == ["splenomegalyx", "in", "the", "lungs"] and b - a > 1  # several subword tokens
    emb, valid = _report_features(vlm, [rw])
    with torch.no_grad():
        hidden, project = text_token_features(vlm.model, rw.tokens[None])
        want = project(hidden[0, a:b].sum(0))
    torch.testing.assert_close(emb[0, 0], want.float(), rtol=1e-4, atol=1e-5)
    assert valid[0].tolist()[:4] == [True] * 4


# -- attention -----------------------------------------------------------------------------------------------------


def test_attention_is_a_softmax_over_patches_at_temperature_01():
    """By hand: each chosen word's cosine similarity to every patch, /0.1, softmax over the patches; summed over
    the chosen words only."""
    g = torch.Generator().manual_seed(0)
    words, patches = torch.randn(1, 3, 5, generator=g), torch.randn(1, 4, 5, generator=g)
    weights = torch.tensor([[1.0, 0.0, 1.0]])
    got = attention_maps(words, weights, patches, 0.1)[0]
    want = [0.0] * 4
    for wi in (0, 2):
        cos = [float(torch.dot(words[0, wi], patches[0, n]) / (words[0, wi].norm() * patches[0, n].norm()))
               for n in range(4)]
        z = sum(math.exp(c / 0.1) for c in cos)
        for n in range(4):
            want[n] += math.exp(cos[n] / 0.1) / z
    assert got.tolist() == pytest.approx(want, rel=1e-5)
    assert float(got.sum()) == pytest.approx(2.0)  # one distribution per chosen word
    assert not torch.allclose(attention_maps(words, weights, patches, 1.0)[0], got)  # the temperature matters


@pytest.mark.parametrize("which", ["tiny", "bert"])
def test_kwm_map_is_the_attention_of_the_mesh_words_only(which, tiny_vlm, bert_vlm):
    """KWM on a report with one MeSH word among non-MeSH words: the map equals that word's own softmax over the
    image's patches, computed by hand from the towers' features (both tower kinds)."""
    vlm = load_vlm(tiny_vlm if which == "tiny" else bert_vlm)
    rw = report_words(vlm.tokenizer, "a bright ring in the head with a dark spot", vlm.context_length)
    wt = word_weights(rw, "kwm", load_mesh())
    assert [w for w, x in zip(rw.words, wt.tolist()) if x] == ["head"]
    img = torch.rand(1, 3, *vlm.image_size, generator=torch.Generator().manual_seed(1))
    emb, _ = _report_features(vlm, [rw])
    with torch.no_grad():
        patches = patch_features(vlm, vlm.preprocess(img))
    got = attention_maps(emb, wt[None], patches, 0.1)[0]
    k = rw.words.index("head")
    sim = torch.nn.functional.cosine_similarity(emb[0, k][None], patches[0], dim=-1)
    torch.testing.assert_close(got, torch.softmax(sim / 0.1, 0), rtol=1e-5, atol=1e-6)
    assert patches.shape[1] == vlm.stages.grid[0] * vlm.stages.grid[1]


# -- the run: manifest, statuses, cache --------------------------------------------------------------------------


def test_kwm_run_ignores_non_mesh_words_and_flags_reports_without_one(tiny_vlm, tmp_path):
    """End to end on identical images: the causal text tower gives "head" the same feature in both first reports,
    so their KWM maps are identical although the second adds non-MeSH words (a map over all words would differ);
    a report without a MeSH word gets status no_mesh_word and no map; an empty report no_report."""
    caps = ["a scan of the head", "a scan of the head with a bright ring", "a bright ring", ""]
    data = _npz(tmp_path / "d.npz", caps)
    out = tmp_path / "kwm"
    s = medim_maps(_cfg(data, out, tiny_vlm))
    recs = [json.loads(line) for line in (out / "rois.jsonl").read_text().splitlines()]
    assert [r["status"] for r in recs] == ["ok", "ok", "no_mesh_word", "no_report"]
    assert s["statuses"] == {"ok": 2, "no_mesh_word": 1, "no_report": 1}
    assert recs[0]["prompt"] == recs[1]["prompt"] == "head"
    assert "saliency" not in recs[2] and "saliency" not in recs[3]
    m0, m1 = _map(out, recs[0]), _map(out, recs[1])
    assert m0.shape == (32, 32) and m0.max() == 255 and m0.min() == 0  # min–max, on the VLM's square
    np.testing.assert_array_equal(m0, m1)
    assert all(r["boxes"] == [] and r["width"] == 32 and r["height"] == 32 for r in recs)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["config"]["resize"] == "pad" and meta["settings"]["mode"] == "kwm"
    assert meta["settings"]["temperature"] == 0.1
    sdm = medim_maps(_cfg(data, tmp_path / "sdm", tiny_vlm, mode="sdm"))
    assert sdm["statuses"] == {"ok": 3, "no_report": 1}  # every report with words has a sentence


def test_rerun_is_cached_other_settings_refused_unless_overwrite(tiny_vlm, tmp_path):
    data = _npz(tmp_path / "d.npz", ["the head", "the lung field"])
    out = tmp_path / "m"
    assert medim_maps(_cfg(data, out, tiny_vlm))["cached"] is False
    stamp = (out / "rois.jsonl").stat().st_mtime_ns
    assert medim_maps(_cfg(data, out, tiny_vlm))["cached"] is True
    assert (out / "rois.jsonl").stat().st_mtime_ns == stamp
    with pytest.raises(MWMError, match="temperature"):
        medim_maps(_cfg(data, out, tiny_vlm, temperature=0.5))
    s = medim_maps(_cfg(data, out, tiny_vlm, temperature=0.5), overwrite=True)
    assert s["cached"] is False and json.loads((out / "meta.json").read_text())["settings"]["temperature"] == 0.5


def test_write_map_manifest_contract(tmp_path):
    """The generic writer: one record per id, maps named as `mwm localize` names them, a NaN map is nan_saliency,
    an iterator is not consumed when the run is cached, wrong counts are errors."""
    from mwm.localize.manifest import read_manifest
    from mwm.rois.manifest import safe_file_name as _safe_name

    maps = np.stack([np.linspace(0, 1, 64).reshape(8, 8), np.full((8, 8), np.nan), np.zeros((8, 8))])
    out = tmp_path / "maps"
    p = write_map_manifest(out, ["a/1.png", "b", "c"], [(10, 20), (8, 8), (8, 8)], maps, {"m": 1}, "pad",
                           statuses=["ok", "ok", "nope"])
    recs = read_manifest(p)
    assert [r["status"] for r in recs] == ["ok", "nan_saliency", "nope"]
    assert recs[0]["saliency"] == f"saliency/{_safe_name('a/1.png')}.png"
    assert (recs[0]["width"], recs[0]["height"]) == (20, 10)

    def never():
        raise AssertionError("consumed")
        yield

    assert write_map_manifest(out, ["a/1.png", "b", "c"], [(10, 20)] * 3, never(), {"m": 1}, "pad") == p
    with pytest.raises(MWMError, match="other settings"):
        write_map_manifest(out, ["a"], [(8, 8)], maps[:1], {"m": 2}, "pad")
    with pytest.raises(MWMError, match="2 importance maps for 3 ids"):
        write_map_manifest(tmp_path / "x", ["a", "b", "c"], [(8, 8)] * 3, maps[:2], {}, "pad")


def test_cli_template_reports(tiny_vlm, tmp_path):
    """`mwm importance medim` with class templates: the template names a MeSH word, every image gets a map."""
    data = _npz(tmp_path / "d.npz", ["x", "y", "z"])
    out = tmp_path / "cli"
    r = runner.invoke(app, ["importance", "medim", str(data), "--vlm", str(tiny_vlm), "--out", str(out),
                            "--template", "a head scan showing {class}", "--split", "all", "--device", "cpu",
                            "--quiet"])
    assert r.exit_code == 0, r.output
    recs = [json.loads(line) for line in (out / "rois.jsonl").read_text().splitlines()]
    assert [x["prompt"] for x in recs] == ["head"] * 3 and all(x["status"] == "ok" for x in recs)
    r = runner.invoke(app, ["importance", "medim", str(data), "--vlm", str(tiny_vlm), "--out", str(out),
                            "--mode", "sdm", "--split", "all", "--device", "cpu", "--quiet"])
    assert r.exit_code == 2 and "other settings" in r.output


# -- MedIM's diversity masking -------------------------------------------------------------------------------------


def test_diverse_policy_masks_90_percent_from_the_top_and_10_from_the_rest():
    """pruning_sort_attDiversity at γ = 0.5 on 14 × 14 tokens: 98 masked, 88 (round(0.9 · 98)) drawn among the 98
    most important and 10 among the rest (MedIM: 88 + 9 by flooring), different cells per draw."""
    imp = torch.arange(196.0).view(1, 14, 14).repeat(4, 1, 1)  # cells 98..195 are the top half
    union_top, union_rest = torch.zeros(98, dtype=torch.bool), torch.zeros(98, dtype=torch.bool)
    for seed in range(8):
        keep = topk_diverse_keep(imp, 0.5, 0.9, torch.Generator().manual_seed(seed))
        masked = ~keep.flatten(1)
        assert (masked.sum(1) == 98).all()
        assert (masked[:, 98:].sum(1) == 88).all() and (masked[:, :98].sum(1) == 10).all()
        union_top |= masked[:, 98:].any(0)
        union_rest |= masked[:, :98].any(0)
    assert union_top.all() and union_rest.sum() > 50  # random inside each group, not the same cells every time
    # top_share 1 is plain top-k; near ratio 1 the rest cannot take its share and the top takes it
    assert (~topk_diverse_keep(imp, 0.5, 1.0).flatten(1))[:, 98:].all()
    m = ~topk_diverse_keep(torch.arange(100.0).view(1, 10, 10), 0.95, 0.9).flatten(1)
    assert m.sum() == 95 and m[0, :5].all()


def test_diverse_strategy_is_registered_with_medims_defaults():
    masker = create_masker({"strategy": "saliency_topk_diverse"})
    assert masker.cfg.ratio == 0.5 and masker.cfg.top_share == 0.9
    sal = torch.zeros(2, 32, 32)
    sal[:, :16] = 1.0  # top half salient
    keep, stats = masker(MaskingBatch(2, (8, 8), generator=torch.Generator().manual_seed(0), importance=sal))
    assert ((~keep).flatten(1).sum(1) == 32).all()
    # 29 = round(0.9 · 32) of the masked cells in the salient half, 3 in the rest
    assert float(stats["mask_ratio_in"]) == pytest.approx(29 / 32)
    assert float(stats["mask_ratio_out"]) == pytest.approx(3 / 32)


# -- pretraining reads the maps ------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["saliency_topk", "saliency_topk_diverse"])
def test_pretrain_masks_by_medim_maps(strategy, tiny_vlm, phantoms_npz, tmp_path_factory, tmp_path):
    """The manifest is what `mwm pretrain --rois … --masking saliency_topk[_diverse]` reads: one step on phantoms
    (their npz captions), every training image's map loaded, exact counts."""
    from mwm.train import PretrainConfig, pretrain

    out = tmp_path_factory.getbasetemp() / "medim_sdm"
    medim_maps(MedIMConfig(data=phantoms_npz, out=out, vlm=str(tiny_vlm), mode="sdm", device="cpu"))
    keeps = []
    cfg = PretrainConfig(data=phantoms_npz, out=tmp_path / "run", rois=out / "rois.jsonl",
                         model={"arch": "resnet18", "size": 64, "mask_stride": 16}, accelerator="cpu", workers=0,
                         batch_size=4, limit=4, epochs=1, warmup_epochs=0, recon_images=0, log_every=1,
                         masking={"strategy": strategy, "ratio": 0.5})
    s = pretrain(cfg, hook=lambda ev, info: keeps.append(info["keep"]) if ev == "step" else None)
    assert s["steps"] == 1 and np.isfinite(s["final_loss"])
    assert s["saliency_stats"]["with_saliency"] == 4 and s["saliency_stats"]["resize"] == "pad"
    assert keeps[0].shape == (4, 1, 4, 4) and (keeps[0].flatten(1).sum(1) == 8).all()
