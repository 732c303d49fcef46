"""The evidence protocol's data-independent rules: pretraining length as a budget of images seen, and more seeds
for the random ratio that wins on val (chosen on the seeds every candidate has); every shipped bench file loads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from mwm.bench import BenchConfig, run_bench
from mwm.config import ConfigError
from mwm.bench.runner import budget_epochs, check_bench, pretrain_config, pretrain_count
from mwm.bench.tables import choose_baseline, choose_best

from .test_parts import _raw

REPO = Path(__file__).resolve().parents[2]


def test_budget_epochs():
    assert budget_epochs(25600, 2129) == 12  # Br35H train
    assert budget_epochs(25600, 2000) == 13 and budget_epochs(25600, 516) == 50
    assert budget_epochs(10, 1000) == 1


def test_pretrain_images_sets_every_arms_epochs(phantoms_npz, tmp_path):
    raw = _raw(phantoms_npz, tmp_path / "b")
    raw["pretrain"].pop("epochs")
    raw["pretrain"]["limit"] = 10
    raw["pretrain_images"] = 35
    cfg = BenchConfig.model_validate(raw)
    assert pretrain_count(phantoms_npz, {"limit": 10}) == 10
    assert pretrain_config(cfg, cfg.arms[1], 0, None).epochs == 4  # round(35 / 10)
    n_train = pretrain_count(phantoms_npz, {})
    assert 10 < n_train < 60  # the train split only
    raw["pretrain"].pop("limit")
    cfg = BenchConfig.model_validate(raw)
    assert pretrain_config(cfg, cfg.arms[1], 0, None).epochs == max(1, round(35 / n_train))
    raw["pretrain"]["epochs"] = 2
    with pytest.raises(ValidationError, match="pretrain_images sets every arm's epochs; remove epochs from pretrain"):
        BenchConfig.model_validate(raw)


def _phased(phantoms_npz, out) -> dict:
    """Two random ratios in phase 0 (the baseline is the best on val, then runs seed 1 too), one arm in phase 1."""
    raw = _raw(phantoms_npz, out)
    raw["arms"] = [{"name": "late", "phase": 1, "masking": {"strategy": "random", "ratio": 0.6}},
                   {"name": "r50", "masking": {"strategy": "random", "ratio": 0.5}},
                   {"name": "r75", "masking": {"strategy": "random", "ratio": 0.75}}]
    raw["tasks"] = raw["tasks"][:1]
    raw.update(baseline_from=["r50", "r75"], baseline_seeds=[1])
    return raw


def test_the_winning_ratio_gets_the_baseline_seeds(phantoms_npz, tmp_path, spy):
    raw = _phased(phantoms_npz, tmp_path / "b")
    cfg = BenchConfig.model_validate(raw)
    log: list[str] = []
    rows = run_bench(cfg, log=log.append)
    base = choose_baseline(cfg, [r for r in rows if r["seed"] == 0])
    other = "r75" if base == "r50" else "r50"
    assert {(r["arm"], r["seed"]) for r in rows} == {("r50", 0), ("r75", 0), (base, 1), ("late", 0)}
    assert spy.count(("pretrain", base)) == 2 and spy.count(("pretrain", other)) == 1
    # phase 0, then the baseline's extra seed (chosen as soon as it can be), then phase 1
    pre = [a for kind, a in spy if kind == "pretrain"]
    assert pre[2:] == [base, "late"] and set(pre[:2]) == {"r50", "r75"}
    assert any(f"baseline {base}" in m and "seeds [1] added" in m for m in log)
    assert choose_baseline(cfg, rows) == base  # the extra seed does not take part in the choice
    assert "(+ seeds [1] for the chosen baseline)" in (tmp_path / "b" / "results.md").read_text()
    with pytest.raises(ValidationError, match="give baseline_from too"):
        BenchConfig.model_validate({**raw, "baseline_from": None})


def test_phases_build_only_the_arms_asked_for(phantoms_npz, tmp_path, spy):
    raw = _phased(phantoms_npz, tmp_path / "b")
    cfg = BenchConfig.model_validate(raw)
    log: list[str] = []
    rows = run_bench(cfg, log=log.append, phases=[1])
    assert spy == [("pretrain", "late"), ("linear", "late")]
    took = r"\d+(\.\d)? (s|min|h)"  # the estimate from the finished run's time (seconds here)
    assert re.fullmatch(rf"1 of 3 results done; 2 arm x seed\(s\) to run, next r50 seed 0, r75 seed 0; ≈ {took} of "
                        rf"pretraining left \(2 runs × {took}, the mean so far; shards split it\); choices waiting "
                        r"for their candidates: \['baseline'\]", log[-1]), log[-1]
    assert {(r["arm"], r["seed"]) for r in rows} == {("late", 0)}
    spy.clear()
    rows = run_bench(cfg, log=log.append, phases=[0])  # the main arms and the baseline's extra seed
    base = choose_baseline(cfg, rows)
    assert log[-1] == "4 of 4 results done"
    assert sorted(a for kind, a in spy if kind == "pretrain") == sorted(["r50", "r75", base])
    assert {(r["arm"], r["seed"]) for r in rows} == {("r50", 0), ("r75", 0), (base, 1), ("late", 0)}
    with pytest.raises(ConfigError, match=r"--phases 2: no arm of bench 'p' has that phase; its arms' phases "
                                          r"are \[0, 1\]"):
        run_bench(cfg, phases=[0, 2])


def test_a_task_on_the_chosen_baseline_and_some_seeds(phantoms_npz, tmp_path, spy):
    raw = _raw(phantoms_npz, tmp_path / "b")
    raw["seeds"] = [0, 1]
    raw["arms"] = [{"name": "r50", "masking": {"strategy": "random", "ratio": 0.5}, "seeds": [0]},
                   {"name": "r75", "masking": {"strategy": "random", "ratio": 0.75}, "seeds": [0]}]
    raw["tasks"] = [raw["tasks"][0], {"kind": "linear", "name": "costly", "arms": ["baseline"], "seeds": [0],
                                      "options": {"epochs": 2}}]
    raw.update(baseline_from=["r50", "r75"], baseline_seeds=[1])
    cfg = BenchConfig.model_validate(raw)
    rows = run_bench(cfg, log=lambda m: None)
    base = choose_baseline(cfg, rows)
    assert {(r["arm"], r["seed"], r["task"]) for r in rows} == {
        ("r50", 0, "linear"), ("r75", 0, "linear"), (base, 1, "linear"), (base, 0, "costly")}
    # the costly task waited for the choice: pretraining ran once per arm × seed, the task once
    assert sorted(spy) == sorted([("pretrain", "r50"), ("pretrain", "r75"), ("pretrain", base), ("linear", "r50"),
                                  ("linear", "r75"), ("linear", base), ("costly", base)])
    spy.clear()
    assert {(r["arm"], r["seed"], r["task"]) for r in run_bench(cfg, log=lambda m: None)} == {
        (r["arm"], r["seed"], r["task"]) for r in rows} and spy == []
    for bad, match in [({"tasks": raw["tasks"][::-1]}, "the first task .'costly'. runs on every arm and seed"),
                       ({"tasks": [raw["tasks"][0], {**raw["tasks"][1], "seeds": [7]}]},
                        r"tasks name seeds no arm runs: \[7\]"),
                       ({"baseline_from": None, "baseline_seeds": [], "arms": raw["arms"][:1] + [
                           {"name": "mwm", "masking": {"strategy": "roi", "ratio_in": 1.0, "ratio_out": 0.25}}],
                         "baseline": None}, None)]:
        if match is None:  # a fixed baseline (the first random arm) serves as 'baseline' too
            assert BenchConfig.model_validate({**raw, **bad}).baseline_arm == "r50"
            continue
        with pytest.raises(ValidationError, match=match):
            BenchConfig.model_validate({**raw, **bad})
    with pytest.raises(ValidationError, match="a task runs on 'baseline' but the bench has no baseline"):
        BenchConfig.model_validate({**raw, "baseline_from": None, "baseline_seeds": [], "arms": [
            {"name": "mwm", "masking": {"strategy": "roi", "ratio_in": 1.0, "ratio_out": 0.25}}]})


def test_choose_a_setting_on_val_then_give_it_seeds_and_tasks(phantoms_npz, tmp_path, spy):
    """A `choose:` entry (e.g. a method's lr) works like baseline_from: the best candidate on val over its own
    seeds gets the extra seeds, and a task naming the choice runs on the chosen arm only."""
    raw = _raw(phantoms_npz, tmp_path / "b")
    raw["seeds"] = [0, 1]
    raw["arms"] = [{"name": f"a-{lr}", "masking": {"strategy": "random", "ratio": 0.5}, "options": {"lr": lr},
                    "seeds": [0]} for lr in (1e-3, 1e-2)] + [{"name": "scratch", "pretrain": False}]
    raw["tasks"] = [raw["tasks"][0], {"kind": "linear", "name": "costly", "arms": ["a"], "seeds": [1],
                                      "options": {"epochs": 2}}]
    raw["choose"] = [{"name": "a", "among": ["a-0.001", "a-0.01"], "seeds": [1]}]
    cfg = BenchConfig.model_validate(raw)
    log: list[str] = []
    rows = run_bench(cfg, log=log.append)
    best = choose_best(cfg, ["a-0.001", "a-0.01"], rows)
    assert {(r["arm"], r["seed"], r["task"]) for r in rows} == {
        ("a-0.001", 0, "linear"), ("a-0.01", 0, "linear"), ("scratch", 0, "linear"), ("scratch", 1, "linear"),
        (best, 1, "linear"), (best, 1, "costly")}
    assert [a for kind, a in spy if kind == "pretrain"][-1] == best and spy.count(("costly", best)) == 1
    assert any(m.startswith(f"a {best} (best of ['a-0.001', 'a-0.01'] on val): seeds [1] added") for m in log)
    md = (tmp_path / "b" / "results.md").read_text()
    assert "(+ seeds [1] for the chosen a)" in md and f"a: `{best}`, the best of ['a-0.001', 'a-0.01'] by mean" in md
    for choose, match in [([{"name": "scratch", "among": ["a-0.001", "a-0.01"]}], "differ from the arms'"),
                          ([{"name": "b", "among": ["a-0.001", "nope"]}],
                           r"among names arms that do not exist: \['nope'\]"),
                          ([{"name": "b", "among": ["a-0.001"]}], "at least 2 items")]:
        with pytest.raises(ValidationError, match=match):
            BenchConfig.model_validate({**raw, "choose": choose})


def _uncommented(text: str) -> str:
    """The bench file with its commented-out arms (later phases) switched on."""
    return re.sub(r"^  # (- |  )", r"  \1", text, flags=re.M)


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "bench").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_bench_files_load_with_every_phase(path, monkeypatch):
    monkeypatch.chdir(REPO)  # the files' paths are relative to the repository root
    for text in (path.read_text(), _uncommented(path.read_text())):
        cfg = BenchConfig.model_validate(yaml.safe_load(text))
        if Path(cfg.data).exists():  # ../shared/data is absent on a user's machine; the template names a placeholder
            check_bench(cfg)  # every arm's pretraining config and every task's config


def test_every_evidence_bench_runs_the_same_protocol(monkeypatch, phantoms_npz):
    """The three datasets' evidence benches and the template for a user's data share every protocol setting (only
    data, ROIs, the pretraining subset and warm-up may differ), so a result on held-out data comes from the same
    protocol; the template validates on a user's npz (here the repository's phantoms) given with --set."""
    from mwm.config import resolve

    monkeypatch.chdir(REPO)
    names = ["br35h_evidence", "kermany_evidence", "chest_ct_evidence", "evidence_template"]
    cfgs = {n: BenchConfig.model_validate(yaml.safe_load((REPO / "configs" / "bench" / f"{n}.yaml").read_text()))
            for n in names}

    def protocol(c: BenchConfig) -> dict:
        main = [a.model_dump(mode="json", exclude={"rois"}) for a in c.arms if a.phase == 0]
        pre = {k: v for k, v in c.pretrain.items() if k not in ("limit", "warmup_epochs", "min_roi_share")}
        return {"arch": c.arch, "size": c.size, "seeds": c.seeds, "pretrain_images": c.pretrain_images,
                "pretrain": pre, "main_arms": main, "baseline_from": c.baseline_from,
                "baseline_seeds": c.baseline_seeds, "tasks": [t.model_dump(mode="json") for t in c.tasks[:2]]}

    ref = protocol(cfgs["br35h_evidence"])
    for n in names[1:]:
        assert protocol(cfgs[n]) == ref, n
    user = resolve(BenchConfig, REPO / "configs" / "bench" / "evidence_template.yaml", [f"data={phantoms_npz}"], {})
    check_bench(user)  # every arm's and task's config on the user's data
