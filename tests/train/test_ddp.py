"""Two CPU processes under Fabric DDP (gloo on localhost, a free port): the ranks end with identical parameters,
draw different masks, and the lr rule counts both ranks.

``ddp_fork`` rather than ``ddp_spawn``: spawned workers re-import torch, Lightning and timm (≈ 25 s on a busy
2-core machine before the first step, against ≈ 6 s forked). Forking is safe here because nothing in the parent
holds an OpenMP pool: the parent runs single-threaded and OMP_NUM_THREADS=1 keeps the children so (GNU OpenMP
cannot use a pool inherited through fork)."""

from __future__ import annotations

import functools
import hashlib
import socket
from pathlib import Path

import torch

from mwm.train import PretrainConfig, pretrain


def record(folder: str, event: str, info: dict) -> None:
    """The per-rank hook (module level and picklable, so it would also reach spawned workers)."""
    d = Path(folder)
    if event == "step":
        (d / f"mask{info['rank']}.txt").write_text(hashlib.sha256(info["keep"].numpy().tobytes()).hexdigest())
    elif event == "end":
        torch.save({k: v.detach().cpu() for k, v in info["model"].named_parameters()}, d / f"params{info['rank']}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_on_cpu(tiny_npz, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))  # set, so Fabric's choice does not outlive the test
    spy = tmp_path / "spy"
    spy.mkdir()
    cfg = PretrainConfig(data=tiny_npz, out=tmp_path / "run", model={"arch": "resnet18", "size": 64},
                         accelerator="cpu", devices=2, strategy="ddp_fork", workers=0, batch_size=2, limit=8,
                         epochs=1, base_lr=1e-2, warmup_epochs=0, optimizer="adamw", log_every=1, recon_images=2,
                         masking={"strategy": "random", "ratio": 0.5})
    s = pretrain(cfg, hook=functools.partial(record, str(spy)))
    # 8 images / (2 per rank × 2 ranks) = 2 steps; lr = base_lr × (2 × 1 × 2) / 256
    assert s["world_size"] == 2 and s["effective_batch"] == 4 and s["steps"] == 2
    assert s["lr"] == 1e-2 * 4 / 256
    masks = [(spy / f"mask{r}.txt").read_text() for r in (0, 1)]
    assert masks[0] != masks[1], "both ranks drew the same masks: the mask generator is not seeded per rank"
    p0, p1 = (torch.load(spy / f"params{r}.pt", weights_only=True) for r in (0, 1))
    assert p0.keys() == p1.keys() and all(torch.equal(p0[k], p1[k]) for k in p0)
    start = torch.load(Path(s["checkpoint"]), weights_only=True)
    assert len(start["rng"]) == 2 and not torch.equal(start["rng"][0]["mask"], start["rng"][1]["mask"])
    assert Path(s["encoder"]).is_file()
