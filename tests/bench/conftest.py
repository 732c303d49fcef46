"""Fixtures of the bench tests."""

from __future__ import annotations

from pathlib import Path

import pytest

import mwm.bench.plots as plots
import mwm.train
import mwm.transfer.classify as classify


@pytest.fixture
def spy(monkeypatch) -> list:
    """Records every part that trains: ("pretrain", arm) or (task folder, arm)."""
    ran: list = []
    real_pretrain, real_finetune = mwm.train.pretrain, classify.finetune

    def pretrain(pc, *a, **k):
        ran.append(("pretrain", Path(pc.out).parts[-3]))
        return real_pretrain(pc, *a, **k)

    def finetune(tc, *a, **k):
        ran.append((Path(tc.out).name, Path(tc.out).parts[-3]))
        return real_finetune(tc, *a, **k)

    monkeypatch.setattr(mwm.train, "pretrain", pretrain)
    monkeypatch.setattr(classify, "finetune", finetune)
    monkeypatch.setattr(plots, "bench_plots", lambda *a, **k: None)  # time; plots are tested in test_tables.py
    return ran
