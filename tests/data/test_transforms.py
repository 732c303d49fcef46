"""Resize policies for images, masks and ROI boxes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mwm.data.transforms import Fit, mask_to_tensor, to_tensor


def test_pad_keeps_aspect_and_centres():
    img = np.ones((10, 20), np.float32)  # wide
    t = to_tensor(img, 40, 1, "pad")
    assert t.shape == (1, 40, 40)
    rows = t[0].sum(1) > 0
    assert rows.sum() == 20 and rows[10:30].all()  # 20 rows of image centred, black above and below
    assert torch.allclose(t[0, 10:30], torch.ones(20, 40))


def test_stretch_and_crop():
    img = np.zeros((10, 20), np.float32)
    img[:, :10] = 1.0
    st = to_tensor(img, 8, 1, "stretch")[0]  # columns 0..9 of 20 → 0..3.99 of 8; antialiasing blurs column 3
    assert st[:, :3].min() > 0.999 and st[:, 5:].max() == 0.0 and st[:, 4].max() < 0.5
    c = to_tensor(img, 10, 1, "crop")  # central 10×10 of the 10×20 image: columns 5..14
    assert torch.allclose(c[0, :, :5], torch.ones(10, 5)) and c[0, :, 5:].max() == 0


def test_channels():
    rgb = np.zeros((4, 4, 3), np.float32)
    rgb[..., 1] = 1.0
    assert torch.allclose(to_tensor(rgb, 4, 1), torch.full((1, 4, 4), 0.587))
    g = np.random.default_rng(0).random((4, 4)).astype(np.float32)
    t3 = to_tensor(g, 4, 3)
    assert t3.shape == (3, 4, 4) and torch.equal(t3[0], t3[2])
    with pytest.raises(ValueError):
        to_tensor(g, 4, 2)


@pytest.mark.parametrize("policy", ["pad", "stretch", "crop"])
def test_mask_and_box_follow_the_image(policy):
    h, w, size = 30, 50, 20
    mask = np.zeros((h, w), np.uint8)
    mask[9:21, 20:36] = 1  # box x 20..36, y 9..21
    m = mask_to_tensor(mask, size, policy).numpy()
    box = Fit.of(h, w, size, policy).box([20 / w, 9 / h, 36 / w, 21 / h], h, w, size)
    ys, xs = np.nonzero(m)
    # the resized mask lies inside the mapped box (to within one output pixel of rounding)
    assert xs.min() >= box[0] * size - 1 and xs.max() + 1 <= box[2] * size + 1
    assert ys.min() >= box[1] * size - 1 and ys.max() + 1 <= box[3] * size + 1
    assert abs(m.sum() - (box[2] - box[0]) * (box[3] - box[1]) * size * size) <= 2 * size


@pytest.mark.parametrize("policy", ["pad", "stretch", "crop"])
def test_unbox_inverts_box(policy):
    fit = Fit.of(30, 50, 20, policy)
    b = [0.3, 0.35, 0.6, 0.7]
    back = fit.unbox(fit.box(b, 30, 50, 20), 30, 50, 20)
    assert back == pytest.approx(b, abs=1e-9)
