"""`mwm pretrain` through typer's runner: a one-step run, resuming from the run's own config.yaml, and errors."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from mwm.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_cli_pretrain_smoke_and_resume_from_config(tiny_npz, tmp_path):
    out = tmp_path / "run"
    r = run("pretrain", tiny_npz, "--out", out, "--arch", "resnet18", "--size", 64, "--epochs", 1, "--batch-size", 4,
            "--limit", 4, "--accelerator", "cpu", "--workers", 0, "--optimizer", "adamw", "--lr", 1e-3,
            "--warmup-epochs", 0, "--masking", "random", "--ratio", 0.5, "--recon-every", 1, "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["steps"] == 1 and s["lr"] == 1e-3 and s["encoder"] == str(out / "encoder.pth")
    assert "encoder.pth" in r.stderr and "loss" in r.stderr
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["arch"] == "resnet18" and saved["masking"]["ratio"] == 0.5 and saved["lr"] == 1e-3
    assert (out / "recon" / "epoch_001.png").is_file() and (out / "encoder_d2.pth").is_file()
    # the run's own config.yaml resumes it (a finished run: nothing to train, outputs re-exported)
    r = run("pretrain", tiny_npz, "--config", out / "config.yaml", "--resume", "--quiet")
    assert r.exit_code == 0, r.output
    # a new run never overwrites a checkpoint
    r = run("pretrain", tiny_npz, "--config", out / "config.yaml", "--quiet")
    assert r.exit_code == 2 and "already holds a run" in r.output and "--resume" in r.output


def test_cli_pretrain_errors(tiny_npz, tmp_path):
    r = run("pretrain", tiny_npz, "--out", tmp_path / "x", "--masking", "roi")
    assert r.exit_code == 2 and "needs --rois" in r.output
    r = run("pretrain", tiny_npz, "--out", tmp_path / "x", "--masking", "roi", "--rois", tmp_path / "nope.jsonl")
    assert r.exit_code == 2 and "nope.jsonl" in r.output
    r = run("pretrain", tiny_npz, "--out", tmp_path / "x", "--resume", "--accelerator", "cpu")
    assert r.exit_code == 2 and "no checkpoint to resume" in r.output
    r = run("pretrain", tiny_npz)
    assert r.exit_code == 2 and "--out" in r.output
