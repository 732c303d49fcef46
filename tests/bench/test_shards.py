"""Arms with their own seeds, and `mwm bench --shard i/n`: n processes share one bench folder, each running
every n-th arm x seed; the last to finish writes the complete tables."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mwm.bench import BenchConfig, run_bench
from mwm.bench.runner import run_order
from mwm.cli import app
from mwm.errors import MWMError
from mwm.io import lock_folder

from .test_parts import _csv, _raw, _run


def _seeded(phantoms_npz, out) -> dict:
    raw = _raw(phantoms_npz, out)
    raw["seeds"] = [0, 1]
    raw["arms"][2]["seeds"] = [1]  # the mwm arm runs seed 1 only
    raw["tasks"] = raw["tasks"][:1]
    return raw


def test_arm_seeds_and_run_order(phantoms_npz, tmp_path):
    cfg = BenchConfig.model_validate(_seeded(phantoms_npz, tmp_path))
    assert [(s, a.name) for s, a in run_order(cfg)] == [(0, "scratch"), (0, "random"), (1, "scratch"),
                                                         (1, "random"), (1, "mwm")]
    raw = _seeded(phantoms_npz, tmp_path)
    raw["arms"][2]["seeds"] = [3, 3]
    with pytest.raises(ValueError, match="unique"):
        BenchConfig.model_validate(raw)


def test_two_shards_split_the_parts_and_the_last_writes_every_row(phantoms_npz, tmp_path, spy):
    raw = _seeded(phantoms_npz, tmp_path / "b")
    _, ran0 = _run(raw, spy, shard=(0, 2))
    rows1, ran1 = _run(raw, spy, shard=(1, 2))
    # order: (0 scratch) (0 random) (1 scratch) (1 random) (1 mwm) -> shard 0 takes items 0, 2, 4
    assert ran0 == {("linear", "scratch"), ("pretrain", "mwm"), ("linear", "mwm")}
    assert ran1 == {("pretrain", "random"), ("linear", "random")}
    assert sorted((r["arm"], r["seed"]) for r in rows1) == [("mwm", 1), ("random", 0), ("random", 1),
                                                            ("scratch", 0), ("scratch", 1)]
    assert len(_csv(tmp_path / "b")) == 5
    _, again = _run(raw, spy)  # unsharded afterwards: everything is done
    assert again == set()


def test_shards_and_whole_runs_do_not_mix(phantoms_npz, tmp_path):
    raw = _seeded(phantoms_npz, tmp_path / "b")
    cfg = BenchConfig.model_validate(raw)
    out = tmp_path / "b"
    with lock_folder(out, name=".mwm.lock-shard-0-of-2", what="bench run"):
        with pytest.raises(MWMError, match="sharded bench run"):
            run_bench(cfg, log=lambda s: None, only_tables=True)
    with lock_folder(out, what="bench run"):
        with pytest.raises(MWMError, match="whole bench run"):
            run_bench(cfg, log=lambda s: None, only_tables=True, shard=(1, 2))
    run_bench(cfg, log=lambda s: None, only_tables=True, shard=(0, 2))  # writes config.yaml
    other = BenchConfig.model_validate({**raw, "seeds": [0, 1, 2]})
    with lock_folder(out, name=".mwm.lock-shard-0-of-2", what="bench run"):
        with pytest.raises(MWMError, match="another config"):
            run_bench(other, log=lambda s: None, only_tables=True, shard=(1, 2))


def test_cli_shard_option(phantoms_npz, tmp_path):
    y = tmp_path / "bench.yaml"
    y.write_text(yaml.safe_dump(_raw(phantoms_npz, tmp_path / "b")))
    r = CliRunner().invoke(app, ["bench", str(y), "--shard", "2/2"])
    assert r.exit_code == 2 and "0 <= i < n" in r.output
    r = CliRunner().invoke(app, ["bench", str(y), "--shard", "x"])
    assert r.exit_code == 2 and "0/4" in r.output


def test_the_last_shard_tabulates_parts_other_shards_finished_while_it_ran(phantoms_npz, tmp_path, monkeypatch):
    """Shard 0 passes shard 1's parts before they exist; shard 1 finishes them while shard 0 trains its last
    part (run inline here). Shard 0, finishing last, must still report every row."""
    import mwm.train

    raw = _seeded(phantoms_npz, tmp_path / "b")
    real = mwm.train.pretrain
    other_done: list = []

    def pretrain(pc, *a, **k):
        out = real(pc, *a, **k)
        if Path(pc.out).parts[-3] == "mwm" and not other_done:  # shard 0's last part: shard 1 runs meanwhile
            other_done.append(run_bench(BenchConfig.model_validate(raw), log=lambda s: None, shard=(1, 2)))
        return out

    monkeypatch.setattr(mwm.train, "pretrain", pretrain)
    rows = run_bench(BenchConfig.model_validate(raw), log=lambda s: None, shard=(0, 2))
    assert other_done and sorted((r["arm"], r["seed"]) for r in rows) == [
        ("mwm", 1), ("random", 0), ("random", 1), ("scratch", 0), ("scratch", 1)]
    assert len(_csv(tmp_path / "b")) == 5


def test_a_shard_started_by_an_older_mwm_is_not_another_config(phantoms_npz, tmp_path):
    """A shard started before mwm gained an option wrote a config.yaml without it; a shard started now, with the
    option at its default, runs beside it (the parts' identities agree, bench_part.json); a changed setting does not."""
    raw = _seeded(phantoms_npz, tmp_path / "b")
    cfg = BenchConfig.model_validate(raw)
    out = tmp_path / "b"
    run_bench(cfg, log=lambda s: None, only_tables=True, shard=(0, 2))
    saved = yaml.safe_load((out / "config.yaml").read_text())
    del saved["rois"]["quantile"]  # an option the older shard's mwm did not have
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    with lock_folder(out, name=".mwm.lock-shard-0-of-2", what="bench run"):
        run_bench(cfg, log=lambda s: None, only_tables=True, shard=(1, 2))
        saved["rois"]["expand"] = 0.3  # a setting both know, with another value
        (out / "config.yaml").write_text(yaml.safe_dump(saved))
        with pytest.raises(MWMError, match="another config"):
            run_bench(cfg, log=lambda s: None, only_tables=True, shard=(1, 2))


def test_shards_started_together_wait_for_each_others_config(phantoms_npz, tmp_path):
    """Shard 0 holds its lock and is about to save its config.yaml (an earlier bench's is still there) when shard 1
    starts: shard 1 must wait for the save, not refuse its own config as another one."""
    import threading
    import time

    from mwm.config import save_config

    raw = _seeded(phantoms_npz, tmp_path / "b")
    cfg, out = BenchConfig.model_validate(raw), tmp_path / "b"
    run_bench(BenchConfig.model_validate({**raw, "seeds": [0, 1, 2]}), log=lambda s: None, only_tables=True)
    saving = threading.Event()

    def shard0_saves():
        with lock_folder(out, name=".mwm.lock-config", what="bench config check"):
            saving.set()
            time.sleep(1.0)
            save_config(cfg, out / "config.yaml")

    with lock_folder(out, name=".mwm.lock-shard-0-of-2", what="bench run"):
        t = threading.Thread(target=shard0_saves)
        t.start()
        saving.wait()
        run_bench(cfg, log=lambda s: None, only_tables=True, shard=(1, 2))  # waited, then found its own config
        t.join()
