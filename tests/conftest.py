"""Shared fixtures. The suite runs offline on data it makes itself; tests on the real
datasets in ../shared/data skip with a reason where that folder is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MWM_SHARED_DATA", REPO.parent / "shared" / "data"))


def tiny_pretrain_run(data, out, mask_stride: int = 8):
    """A one-step resnet18 @ 64 px pretraining run on 4 images (random masking at 0.6) into ``out``: a real run
    folder (checkpoint with decoder, encoder.json) for tests of what reads runs."""
    from mwm.train import PretrainConfig, pretrain

    pretrain(PretrainConfig(data=data, out=out, model={"arch": "resnet18", "size": 64, "mask_stride": mask_stride},
                            accelerator="cpu", workers=0, batch_size=4, limit=4, epochs=1, warmup_epochs=0,
                            recon_images=0, masking={"strategy": "random", "ratio": 0.6}))
    return out


def one_thread():
    """Fixture body: torch on 1 thread, restored after. Tiny tensors on a shared 2-core machine: OpenMP barrier
    waits cost more than the work. Each test package wraps it with the scope it needs, e.g.
    ``_single_thread = pytest.fixture(autouse=True, scope="module")(one_thread)``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def shared_file(name: str) -> Path:
    """A file of ../shared/data, or skip the test saying why."""
    p = SHARED_DATA / name
    if not p.is_file():
        pytest.skip(f"{p} not present (the real datasets live in ../shared/data beside the checkout; "
                    "set MWM_SHARED_DATA to point elsewhere)")
    return p


@pytest.fixture(scope="session")
def phantoms_npz(tmp_path_factory) -> Path:
    """60 phantoms at 32 px with masks, labels and captions."""
    from mwm.data.synthetic import PhantomConfig, generate

    path = tmp_path_factory.mktemp("phantoms") / "phantoms.npz"
    generate(PhantomConfig(n=60, size=32, seed=0)).save_npz(path)
    return path
