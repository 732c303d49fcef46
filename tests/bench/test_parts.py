"""`mwm bench` reuses a part only when it was made with the config now asked for: a changed setting reruns that
part and what depends on it (moving the old one to OUT/stale/), settings that cannot change results do not;
the whole bench file is validated before anything runs; one bench at a time per output folder."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mwm.bench import BenchConfig, run_bench
from mwm.cli import app
from mwm.config import ConfigError
from mwm.errors import MWMError
from mwm.io import lock_folder


def _raw(phantoms_npz, out) -> dict:
    return {"name": "p", "data": str(phantoms_npz), "out": str(out), "arch": "resnet18", "size": 64,
            "seeds": [0], "device": "cpu", "rois": {"source": "gt-boxes", "expand": 0.1},
            "pretrain": {"epochs": 1, "batch_size": 8, "limit": 16, "lr": 1e-3, "warmup_epochs": 0,
                         "recon_images": 0, "workers": 0, "model": {"decoder_width": 32}},
            "arms": [{"name": "scratch", "pretrain": False},
                     {"name": "random", "masking": {"strategy": "random", "ratio": 0.5}},
                     {"name": "mwm", "masking": {"strategy": "roi", "ratio_in": 1.0, "ratio_out": 0.25}}],
            "tasks": [{"kind": "linear", "options": {"epochs": 3}},
                      {"kind": "linear", "name": "probe2", "arms": ["random"], "options": {"epochs": 3}}]}


def _run(raw: dict, ran: list, log: list | None = None, **kw) -> tuple[list[dict], set]:
    ran.clear()
    rows = run_bench(BenchConfig.model_validate(raw), log=(log.append if log is not None else lambda s: None), **kw)
    return rows, set(ran)


def _csv(out: Path) -> list[dict]:
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def test_changed_config_reruns_exactly_the_parts_it_affects(phantoms_npz, tmp_path, spy):
    out = tmp_path / "b"
    raw = _raw(phantoms_npz, out)
    rows, ran = _run(raw, spy)
    assert ran == {("pretrain", "random"), ("pretrain", "mwm"), ("linear", "scratch"), ("linear", "random"),
                   ("linear", "mwm"), ("probe2", "random")}
    assert len(rows) == 4

    # unchanged, up to settings that cannot change results: nothing trains
    raw["pretrain"].update(log_every=3, checkpoint_every=2, recon_images=2)
    again, ran = _run(raw, spy)
    assert ran == set()
    assert [r["accuracy"] for r in again] == [r["accuracy"] for r in rows]

    # one arm's masking ratio: that arm's pretraining and its tasks, nothing else; never relabelled
    old_loss = json.loads((out / "runs/random/seed0/pretrain/summary.json").read_text())["final_loss"]
    raw["arms"][1]["masking"]["ratio"] = 0.25
    log: list[str] = []
    _, ran = _run(raw, spy, log)
    assert ran == {("pretrain", "random"), ("linear", "random"), ("probe2", "random")}
    moved = [s for s in log if "moved it to" in s]
    assert len(moved) == 3 and any("masking.ratio 0.5 → 0.25" in s for s in moved)
    stale = list((out / "stale").glob("runs-random-seed0-pretrain-*"))
    assert len(stale) == 1 and json.loads((stale[0] / "summary.json").read_text())["final_loss"] == old_loss
    new_loss = json.loads((out / "runs/random/seed0/pretrain/summary.json").read_text())["final_loss"]
    random_rows = [r for r in _csv(out) if r["arm"] == "random"]
    assert {r["ratio"] for r in random_rows} == {"0.25"}
    assert all(float(r["pretrain_final_loss"]) == pytest.approx(new_loss) for r in random_rows)
    assert new_loss != old_loss

    # ROI expansion: the manifest is rebuilt (the old one kept), the guided arm reruns, the random arm does not
    old_rois = (out / "rois.jsonl").read_text()
    raw["rois"]["expand"] = 0.5
    _, ran = _run(raw, spy)
    assert ran == {("pretrain", "mwm"), ("linear", "mwm")}
    assert (out / "rois.jsonl").read_text() != old_rois
    assert [p.read_text() for p in (out / "stale").glob("rois-*/rois.jsonl")] == [old_rois]

    # one task's option: only that task; a part without a stored hash (older mwm) is redone, not adopted
    raw["tasks"][1]["options"]["epochs"] = 4
    (out / "runs/scratch/seed0/linear/bench_part.json").unlink()
    _, ran = _run(raw, spy)
    assert ran == {("probe2", "random"), ("linear", "scratch")}
    assert (out / "stale" / "runs-scratch-seed0-linear-nohash" / "metrics.json").is_file()

    # tables only: parts made with another config are left out, nothing runs and nothing moves
    raw["arms"][1]["masking"]["ratio"] = 0.5
    log = []
    rows, ran = _run(raw, spy, log, only_tables=True)
    assert ran == set() and {r["arm"] for r in rows} == {"scratch", "mwm"}
    assert any("pretrain random seed 0" in s and "left out" in s for s in log)
    assert (out / "runs/random/seed0/pretrain/summary.json").is_file()


@pytest.mark.parametrize("edit, key", [
    (lambda r: r["pretrain"].update(epochz=2), "\n  pretrain.epochz: Extra inputs"),
    (lambda r: r["arms"][1]["masking"].update(ratio=1.5), "arm 'random': arms[random].masking.ratio"),
    (lambda r: r["arms"][2].update(options={"lr": -1}), "arm 'mwm': arms[mwm].options.lr"),
    (lambda r: r["tasks"][1]["options"].update(epochs=0), "task 'probe2': options.epochs"),
])
def test_invalid_part_configs_fail_at_load(phantoms_npz, tmp_path, spy, edit, key):
    raw = _raw(phantoms_npz, tmp_path / "b")
    edit(raw)
    with pytest.raises(ConfigError, match="invalid bench config") as e:
        run_bench(BenchConfig.model_validate(raw), log=lambda s: None)
    assert key in str(e.value)
    assert spy == [] and not (tmp_path / "b").exists()


def test_every_invalid_part_is_reported_at_once(phantoms_npz, tmp_path):
    from mwm.bench.runner import check_bench

    raw = _raw(phantoms_npz, tmp_path / "b")
    raw["arms"][1]["masking"]["ratio"] = 1.5
    raw["tasks"][0]["options"]["epochz"] = 2
    with pytest.raises(ConfigError) as e:
        check_bench(BenchConfig.model_validate(raw))
    msg = str(e.value)
    assert "arms[random].masking.ratio" in msg and "task 'linear': options.epochz" in msg
    assert msg.count("epochz") == 1  # once, not once per arm the task runs on


def test_second_bench_into_the_same_folder_fails(phantoms_npz, tmp_path):
    cfg = BenchConfig.model_validate(_raw(phantoms_npz, tmp_path / "b"))
    with lock_folder(tmp_path / "b", what="bench run"):
        with pytest.raises(MWMError, match="in use by another bench run"):
            run_bench(cfg, log=lambda s: None, only_tables=True)
    assert not (tmp_path / "b" / "results.csv").exists()


def test_cli_rejects_a_bad_seed_list(phantoms_npz, tmp_path):
    y = tmp_path / "bench.yaml"
    y.write_text(yaml.safe_dump(_raw(phantoms_npz, tmp_path / "b")))
    r = CliRunner().invoke(app, ["bench", str(y), "--seeds", "a,b"])
    assert r.exit_code == 2 and "--seeds" in r.output and "0,1,2" in r.output
    r = CliRunner().invoke(app, ["bench", str(y), "--seeds", "1,1"])
    assert r.exit_code == 2 and "unique" in r.output
    assert not (tmp_path / "b").exists()


def test_options_added_since_at_their_default_keep_a_part(tmp_path):
    """A part recorded before an option existed is reused while that option holds its default, and rerun
    when it does not (or when the record names an option that no longer exists)."""
    from mwm.bench.parts import Part, PartStore, pretrain_identity
    from mwm.train import PretrainConfig

    def part(**masking):
        pc = PretrainConfig(data=tmp_path / "d.npz", out=tmp_path / "run", model={"arch": "resnet18", "size": 64},
                            masking={"strategy": "roi", **masking}, rois=tmp_path / "rois.jsonl")
        return Part("pretrain", pc.out, pc.out / "summary.json", pretrain_identity(pc, "abc"), config=pc)

    logs: list[str] = []
    store = PartStore(tmp_path, logs.append)
    now = part()
    store.write_record(now)
    (now.path / "summary.json").write_text("{}")
    rec = json.loads(now.record.read_text())
    del rec["identity"]["masking"]["no_roi"]  # as written by an mwm without the option
    rec["hash"] = "0" * 64
    now.record.write_text(json.dumps(rec))
    assert store.state(part(no_roi="background")) == "stale"  # not the default: a different run
    assert store.state(now) == "done"
    assert json.loads(now.record.read_text())["hash"] == now.hash  # adopted under the current identity
    rec = json.loads(now.record.read_text())
    rec["identity"]["masking"]["gone_option"] = 1
    rec["hash"] = "1" * 64
    now.record.write_text(json.dumps(rec))
    assert store.state(now) == "stale"


def test_a_revision_bump_reruns_parts_recorded_before_it(tmp_path, monkeypatch):
    """A task recorded before mwm changed what it computes (revision) is stale even though every option the
    record lacks holds its default now."""
    from mwm.bench import parts as P
    from mwm.transfer.classify import FinetuneConfig

    tc = FinetuneConfig(data=tmp_path / "d.npz", out=tmp_path / "t", weights="none", arch="resnet18")
    store = P.PartStore(tmp_path, lambda s: None)
    monkeypatch.setitem(P.REVISION, "task", 1)
    old = P.Part("task", tc.out, tc.out / "metrics.json", P.task_identity("linear", tc, None), config=tc)
    store.write_record(old)
    (tc.out / "metrics.json").write_text("{}")
    monkeypatch.setitem(P.REVISION, "task", 2)
    now = P.Part("task", tc.out, tc.out / "metrics.json", P.task_identity("linear", tc, None), config=tc)
    assert "revision" not in old.identity and now.identity["revision"] == 2
    assert store.state(now) == "stale"
