"""Fixtures for the training tests: tiny phantom data (64 px, so ResNet's 32-px mask grid is 2 × 2 and masks
mean something) and a matching ROI manifest. Tests run single-threaded: on a shared 2-core machine OpenMP's
barrier waits cost more than these tiny tensors' work (see tests/mim/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import one_thread


_single_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory) -> Path:
    """16 phantoms at 64 px with lesion masks (ids = npz filenames)."""
    from mwm.data.synthetic import PhantomConfig, generate

    path = tmp_path_factory.mktemp("train_data") / "ph64.npz"
    generate(PhantomConfig(n=16, size=64, seed=1)).save_npz(path)
    return path


def write_manifest(npz: Path, path: Path, drop: int = 0) -> list[str]:
    """rois.jsonl with one box per image around its lesion mask (status empty_roi where it has none), leaving out
    the first ``drop`` train images. Returns the ids left out."""
    z = np.load(npz)
    ids = [str(s) for s in z["filenames"]]
    train = [i for i, s in enumerate(z["split"]) if s == "train"]
    left_out = [ids[i] for i in train[:drop]]
    lines = []
    for i, sid in enumerate(ids):
        if sid in left_out:
            continue
        m = z["masks"][i]
        h, w = m.shape
        ys, xs = np.nonzero(m)
        if len(xs):
            box = [xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h]
            rec = {"image": sid, "width": w, "height": h, "boxes": [[float(v) for v in box]], "prompt": "lesion",
                   "status": "ok"}
        else:
            rec = {"image": sid, "width": w, "height": h, "boxes": [], "prompt": "lesion", "status": "empty_roi"}
        lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + "\n")
    return left_out


def small_pretrain(data, out, **kw):
    """A one-epoch resnet18 @ 64 px pretraining config on 4 images (random masking 0.5), overridable by ``kw``."""
    from mwm.train import PretrainConfig

    base = dict(data=data, out=out, model={"arch": "resnet18", "size": 64}, accelerator="cpu", workers=0,
                batch_size=4, limit=4, epochs=1, warmup_epochs=0, recon_images=0, log_every=1,
                masking={"strategy": "random", "ratio": 0.5})
    return PretrainConfig(**{**base, **kw})
