"""Helpers shared by the method tests."""

from __future__ import annotations

import json
import types
from pathlib import Path

import torch

from mwm.train.methods import MethodContext, create_method


def prepared_method(cfg):
    """The method of ``cfg`` built under torch seed 0 and prepared on the CPU with generator seed 0 (no ROIs)."""
    torch.manual_seed(0)
    method = create_method(cfg)
    method.prepare(MethodContext(torch.device("cpu"), torch.Generator().manual_seed(0),
                                 types.SimpleNamespace(has_rois=False)))
    return method


def assert_pretrained_once(bench_out: Path, arms: tuple[str, ...]) -> None:
    """Each arm's bench pretraining ran one step with its own method and exported an encoder."""
    for arm in arms:
        run = bench_out / "runs" / arm / "seed0" / "pretrain"
        summary = json.loads((run / "summary.json").read_text())
        assert summary["steps"] == 1 and summary["masking"].startswith(arm)
        assert (run / "encoder.pth").is_file() and json.loads((run / "encoder.json").read_text())["method"] == arm
