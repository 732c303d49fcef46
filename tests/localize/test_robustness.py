"""`mwm localize-robustness` and the noisy prompts it generates: rows, changed share, reproducibility, agreement with
`mwm localize`, errors."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from typer.testing import CliRunner

from mwm.cli import app
from mwm.errors import DataError, MWMError
from mwm.io import lock_folder
from mwm.localize.metrics import evaluate_manifest
from mwm.localize.pipeline import LocalizeConfig, localize
from mwm.localize.prompt_noise import n_dropped, n_typos, noisy_variants, parse_noise, typos, word_dropout
from mwm.localize.robustness import RobustnessConfig, build_rows, load_variants, pairwise_iou, run_study

from ..conftest import one_thread
from .test_pipeline import tiny_vlm  # noqa: F401  (a module-scoped fixture)

runner = CliRunner()
_single_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

VARIANTS = """\
target: lesion
reference: a lesion
families:
  short: [lesion, a bright lesion]
  wrong_target: [the skull]
  negation: [no lesion]
ensembles:
  on_target: [reference, short, typos]
"""
# 4 M2IB steps: after 1–2 Adam steps (sign-like updates) a random tiny CLIP's maps barely depend on the prompt
SETTINGS = ["--layer", "1", "--steps", "4", "--noise-copies", "2", "--device", "cpu", "--binarize", "threshold",
            "--threshold", "0.5", "--expand", "0", "--split", "test", "--limit", "6", "--batch-size", "4",
            "--set", "changed_iou=0.96"]  # a random tiny CLIP's ROIs are large and overlap: a strict "changed"
NOISE = ["--noise", "typos=0.2,dropout=0.5", "--seed", "3"]
# reference + short 2 + wrong 1 + negation 1 + (typos, dropout) × (reference + 2 short) = 11 prompts; ensembles of
# the 3 families with two or more (short, typos, dropout), and the pooled on_target (reference + short + typos)
N_ROWS = 15


@pytest.fixture(scope="module")
def variants_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("variants") / "v.yaml"
    p.write_text(VARIANTS)
    return p


@pytest.fixture(scope="module")
def study(phantoms_npz, tiny_vlm, variants_file, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("rob") / "r"
    r = runner.invoke(app, ["localize-robustness", str(phantoms_npz), "--vlm", str(tiny_vlm), "--prompts",
                            str(variants_file), "--gt", str(phantoms_npz), "--out", str(out), *SETTINGS, *NOISE])
    assert r.exit_code == 0, r.output
    return out


def _rows(out):
    with open(out / "robustness.csv") as f:
        return list(csv.DictReader(f))


# -- noisy prompts ---------------------------------------------------------------------------------
def _levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def test_typos_are_reproducible_and_follow_the_rate():
    text = "an irregular bright lesion in the left hemisphere of the brain"
    assert typos(text, 0.1, seed=5) == typos(text, 0.1, seed=5)
    assert len({typos(text, 0.1, seed=s) for s in range(8)}) > 4  # the seed moves the edits
    assert typos(text, 0.0) == text and typos("a b", 0.1) != "a b"  # rate 0: none; a short prompt: at least one
    letters = sum(c.isalpha() for c in text)
    for rate in (0.05, 0.1, 0.3):
        k = n_typos(text, rate)
        assert k == max(1, round(rate * letters))
        dists = [_levenshtein(text, typos(text, rate, seed=s)) for s in range(10)]
        assert all(1 <= d <= 2 * k for d in dists)  # each edit is 1 (insert/delete/substitute) or 2 (swap) steps
        assert sum(dists) / len(dists) >= 0.8 * k
    with pytest.raises(ValueError):
        typos(text, 1.5)


def test_word_dropout_drops_exactly_the_rate_and_keeps_order():
    text = "a large dark irregular ring lesion in a head scan"
    words = text.split()
    for rate, seed in [(0.1, 0), (0.3, 1), (0.5, 2), (1.0, 3)]:
        got = word_dropout(text, rate, seed)
        assert got == word_dropout(text, rate, seed)
        kept = got.split()
        assert len(words) - len(kept) == n_dropped(text, rate) == min(len(words) - 1, max(1, round(rate * len(words))))
        it = iter(words)
        assert all(w in it for w in kept)  # a subsequence: order kept
    assert word_dropout("lesion", 0.5) == "lesion"


def test_parse_noise_and_noisy_variants():
    assert parse_noise("typos=0.1, dropout=0.2") == {"typos": 0.1, "dropout": 0.2}
    assert parse_noise("none") == {} and parse_noise({"typos": 0.3}) == {"typos": 0.3}
    for bad, msg in [("typo=0.1", "unknown noise kind"), ("typos=2", r"in \[0, 1\]"), ("typos", "KIND=RATE"),
                     ("typos=x", "number")]:
        with pytest.raises(ValueError, match=msg):
            parse_noise(bad)
    v = noisy_variants(["a lesion", "lesion"], {"typos": 0.2, "dropout": 0.5}, seed=0, samples=2)
    assert [len(x) for x in v.values()] == [4, 4] and v == noisy_variants(["a lesion", "lesion"],
                                                                         {"typos": 0.2, "dropout": 0.5}, 0, 2)


# -- the variants file ---------------------------------------------------------------------------
@pytest.mark.parametrize("text,key", [
    ("families: {short: [lesion]}\n", "reference"),
    ("reference: a lesion\nfamilies: {short: [lesion, 3]}\n", "families.short.1"),
    ("reference: a lesion\nfamilies: {short: []}\n", "families"),
    ("reference: a lesion\nfamilies: {typos: [lesoin]}\n", "families"),
    ("reference: a lesion\nfamilies: {short: ['a;b']}\n", "families"),
    ("reference: a lesion\nfamilies: {short: [lesion]}\nprompt: x\n", "prompt"),
    ("reference: a lesion\nfamilies: {short: [lesion]}\nensembles: {pooled: [short, lay]}\n", "(top level)"),
])
def test_bad_variants_file_names_file_and_key(tmp_path, text, key):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(DataError) as e:
        load_variants(p)
    assert str(p) in str(e.value) and f"key '{key}'" in str(e.value)


def test_unparsable_variants_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("reference: [unclosed\n")
    with pytest.raises(DataError, match="not a valid YAML"):
        load_variants(p)


def test_rows_and_pairwise_iou(variants_file):
    distinct, rows = build_rows(load_variants(variants_file), {"typos": 0.2, "dropout": 0.5}, seed=3, samples=1)
    assert len(rows) == N_ROWS and [r.family for r in rows][:5] == ["reference", "short", "short", "wrong_target",
                                                                      "negation"]
    assert [r.family for r in rows if r.kind == "ensemble"] == ["short", "typos", "dropout", "on_target"]
    assert len(rows[-1].members) == 1 + 2 + 3 and rows[-1].over == ["reference", "short", "typos"]
    assert all(distinct[r.members[0]] == r.label for r in rows if r.kind == "single")
    m = torch.zeros(2, 3, 4, 4, dtype=torch.bool)  # 2 rows × 3 images
    m[0, 0, :2] = True
    m[1, 0, 2:] = True  # image 0: disjoint ROIs
    m[0, 1, :2] = m[1, 1, :1] = True  # image 1: IoU 1/2; image 2: both empty → agree
    iou = pairwise_iou(m)
    assert iou[0, 1].tolist() == [0.0, 0.5, 1.0] and iou[0, 0].tolist() == [1.0, 1.0, 1.0]


# -- the study ---------------------------------------------------------------------------------------
def test_study_outputs(study):
    rows = _rows(study)
    assert len(rows) == N_ROWS and sum(r["kind"] == "ensemble" for r in rows) == 4
    ref = rows[0]
    assert ref["family"] == "reference" and float(ref["changed_share"]) == 0 and float(ref["mean_iou_to_reference"]) == 1
    assert all(r["n"] == ref["n"] and int(r["n"]) > 0 for r in rows)
    assert len({r["changed_share"] for r in rows}) > 1  # the prompts do move some ROIs
    assert all(float(r["mean_iou_to_reference"]) < 1 for r in rows[1:] if r["variant"] != ref["variant"])
    s = json.loads((study / "summary.json").read_text())
    assert s["n_images"] == 6 and len(s["agreement"]["mean_roi_iou"]) == N_ROWS
    assert all(s["agreement"]["mean_roi_iou"][i][i] == 1 for i in range(N_ROWS))
    assert set(s["spread"]) == {"reference", "short", "wrong_target", "negation", "typos", "dropout", "all"}
    assert s["spread"]["short"]["dice"]["n"] == 2 and set(s["ensemble_effect"]) == {"short", "typos", "dropout", "on_target"}
    assert s["ensemble_effect"]["on_target"]["n_prompts"] == 6
    md = (study / "robustness.md").read_text()
    assert md.count("\n| ") >= N_ROWS and "| family | variant | precision | recall | Dice | changed share |" in md
    assert (study / "robustness.png").stat().st_size > 0 and (study / "gallery.png").stat().st_size > 0


def _cfg(phantoms_npz, tiny_vlm, variants_file, out, **kw):  # noqa: F811
    d = dict(data=phantoms_npz, out=out, vlm=str(tiny_vlm), prompts=variants_file, gt=phantoms_npz, split="test",
             limit=6, noise={"typos": 0.2, "dropout": 0.5}, seed=3, m2ib={"layer": 1, "steps": 4, "noise_copies": 2},
             binarize="threshold", expand=0.0, batch_size=4, device="cpu", gallery=0, changed_iou=0.96)
    return RobustnessConfig(**{**d, **kw})


def test_same_seed_reproduces_the_table(study, phantoms_npz, tiny_vlm, variants_file, tmp_path):  # noqa: F811
    # other batching (images per batch, prompts per pass) gives the same table
    run_study(_cfg(phantoms_npz, tiny_vlm, variants_file, tmp_path / "again", batch_size=6, pairs_per_pass=8))
    assert (tmp_path / "again" / "robustness.csv").read_text() == (study / "robustness.csv").read_text()
    other = run_study(_cfg(phantoms_npz, tiny_vlm, variants_file, tmp_path / "seed4", seed=4))
    assert other["prompts"]["typos"] != json.loads((study / "summary.json").read_text())["prompts"]["typos"]


def test_a_variant_scores_what_localize_gives(study, phantoms_npz, tiny_vlm, tmp_path):  # noqa: F811
    cfg = LocalizeConfig(data=phantoms_npz, out=tmp_path / "loc", vlm=str(tiny_vlm), prompt="the skull", split="test",
                         limit=6, m2ib={"layer": 1, "steps": 4, "noise_copies": 2}, binarize="threshold", expand=0.0,
                         device="cpu", gallery=0)
    localize(cfg)
    with pytest.warns(UserWarning):  # the other annotated phantoms are not in this manifest
        s = evaluate_manifest(tmp_path / "loc" / "rois.jsonl", phantoms_npz).summary
    row = next(r for r in _rows(study) if r["variant"] == "the skull")
    for k in ("precision", "recall", "dice"):
        assert float(row[k]) == pytest.approx(s[k], abs=1e-6)


def test_errors(phantoms_npz, tiny_vlm, variants_file, tmp_path):  # noqa: F811
    bad = tmp_path / "bad.yaml"
    bad.write_text("reference: a lesion\n")
    r = runner.invoke(app, ["localize-robustness", str(phantoms_npz), "--vlm", str(tiny_vlm), "--prompts", str(bad),
                            "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "bad.yaml" in r.output and "families" in r.output
    out = tmp_path / "locked"
    with lock_folder(out, what="other run"):
        with pytest.raises(MWMError, match="other run"):
            run_study(_cfg(phantoms_npz, tiny_vlm, variants_file, out))


@pytest.mark.parametrize("name", ["phantoms_variants.yaml", "br35h_variants.yaml"])
def test_shipped_variants_files_load(name):
    from ..conftest import REPO

    v = load_variants(REPO / "configs" / "prompts" / name)
    distinct, rows = build_rows(v, {"typos": 0.1, "dropout": 0.1}, seed=0, samples=1)
    assert {"short", "wrong_target", "negation", "context"} <= set(v.families) and len(distinct) >= 20
