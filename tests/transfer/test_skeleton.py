"""The shared transfer skeleton: one config base, one runtime for all three tasks, one paired augmentation
(image + mask + boxes drawn once), typed metrics."""

from __future__ import annotations

import json

import pytest
import torch

from mwm.data.paired import crop_flip_theta, hflip_instances, paired_crop_flip, warp_boxes
from mwm.errors import MWMError
from mwm.transfer.classify import FinetuneConfig
from mwm.transfer.config import TransferConfig
from mwm.transfer.detect import DetectConfig
from mwm.transfer.results import TaskMetrics
from mwm.transfer.segment import SegmentConfig

CONFIGS = (FinetuneConfig, SegmentConfig, DetectConfig)
SHARED = ("data", "out", "weights", "arch", "size", "resize", "read", "train_limit", "batch_size", "epochs", "lr",
          "weight_decay", "patience", "seed", "device")


@pytest.mark.parametrize("cls", CONFIGS)
def test_every_task_config_is_a_transfer_config(cls):
    assert issubclass(cls, TransferConfig)
    assert set(SHARED) <= set(cls.model_fields)
    # declared once: the data-reading, seed and device fields come from the base only
    assert not {"resize", "read", "seed", "device"} & set(cls.__annotations__)
    with pytest.raises(ValueError, match="cuda:N"):
        cls(data="d.npz", out="o", weights="none", arch="resnet18", device="cuda:one")
    with pytest.raises(ValueError, match="none or timm"):
        cls(data="d.npz", out="o", weights=" ", arch="resnet18")


def test_detection_runs_on_the_shared_fabric_factory(tmp_path):
    """detect used to build its own torch.device ("--device cuda: CUDA is not available here"); the shared factory
    says which device and precision cannot run."""
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    from mwm.transfer.detect import detect

    with pytest.raises(MWMError, match="cannot run on device=cuda precision=32-true"):
        detect(DetectConfig(data=tmp_path / "d.npz", out=tmp_path / "o", device="cuda"))


# -- paired augmentation ---------------------------------------------------------------------------------------

def _extent(m: torch.Tensor) -> torch.Tensor:
    """Normalized [x0, y0, x1, y1] pixel extent of a binary (H, W) mask."""
    ys, xs = torch.nonzero(m, as_tuple=True)
    h, w = m.shape
    return torch.tensor([xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h], dtype=torch.float32)


@pytest.mark.parametrize("hflip", [0.0, 1.0])
def test_image_mask_and_boxes_get_the_same_crop_and_flip(hflip):
    """One draw moves the image, its mask and its box together: the warped box is the warped mask's extent (to a
    pixel), and the image's bright square lands where the mask does."""
    n, s = 8, 64
    x = torch.zeros(n, 1, s, s)
    m = torch.zeros(n, 1, s, s)
    x[:, :, 20:40, 10:30] = 1.0
    m[:, :, 20:40, 10:30] = 1.0
    box = torch.tensor([10 / s, 20 / s, 30 / s, 40 / s]).expand(n, 1, 4)
    xo, mo, bo, valid = paired_crop_flip(x, m, box, torch.Generator().manual_seed(0), scale=(0.5, 0.9), hflip=hflip)
    assert mo.unique().tolist() in ([0.0, 1.0], [0.0], [1.0])  # nearest: the mask stays binary
    checked = 0
    for i in range(n):
        if mo[i, 0].sum() < 4 or not valid[i, 0]:
            continue
        assert torch.allclose(bo[i, 0], _extent(mo[i, 0] > 0.5), atol=1.5 / s)
        assert ((xo[i, 0] > 0.5) == (mo[i, 0] > 0.5)).float().mean() > 0.97
        checked += 1
    assert checked >= 4
    if hflip == 1.0:  # flipped: the square (left half of the input) ends up on the right of the crop's centre
        theta = crop_flip_theta(n, (0.5, 0.9), hflip=1.0, generator=torch.Generator().manual_seed(0))
        assert (theta[:, 0, 0] < 0).all()


def test_boxes_outside_the_crop_are_invalid():
    theta = torch.tensor([[[0.5, 0.0, -0.5], [0.0, 0.5, -0.5]]])  # the top-left quarter of the image
    b, v = warp_boxes(torch.tensor([[[0.0, 0.0, 0.25, 0.25], [0.6, 0.6, 0.9, 0.9]]]), theta)
    assert v.tolist() == [[True, False]]
    assert torch.allclose(b[0, 0], torch.tensor([0.0, 0.0, 0.5, 0.5]))


def test_hflip_instances_mirrors_exclusive_pixel_boxes():
    img = torch.arange(12.0).view(1, 3, 4)
    masks = torch.zeros(1, 3, 4, dtype=torch.uint8)
    masks[0, :, 0] = 1
    f, t = hflip_instances(img, {"boxes": torch.tensor([[0.0, 0.0, 1.0, 3.0]]), "labels": torch.ones(1),
                                 "masks": masks})
    assert t["boxes"].tolist() == [[3.0, 0.0, 4.0, 3.0]] and t["masks"][0, :, 3].all()
    assert torch.equal(f, img.flip(-1))


# -- typed metrics ---------------------------------------------------------------------------------------------

def test_task_metrics_keep_the_tasks_order_and_check_the_shared_keys(tmp_path):
    d = {"dice": 0.5, "n_test": 3, "n_train": 10, "n_val": 2, "best_epoch": 4, "arch": "resnet18",
         "weights": "none", "size": 32, "history": [{"epoch": 1}], "seconds": 1.5}
    m = TaskMetrics.model_validate(d)
    assert m.n_test == 3 and m.model_extra["dice"] == 0.5
    path = m.save(tmp_path / "metrics.json")
    assert path.read_text() == json.dumps(d, indent=2) + "\n"
    assert TaskMetrics.load(path).as_dict() == d and list(TaskMetrics.load(path).as_dict()) == list(d)
    with pytest.raises(ValueError, match="n_test"):
        TaskMetrics.model_validate({k: v for k, v in d.items() if k != "n_test"})
