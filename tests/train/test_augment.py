"""Paired augmentation: the transformed box is where the transformed image shows the drawn box."""

from __future__ import annotations

import torch

from mwm.train.augment import crop_params, paired_random_resized_crop, transform_boxes


def _image_with_box(box_px, size=64):
    x0, y0, x1, y1 = box_px
    img = torch.zeros(3, size, size)
    img[:, y0:y1, x0:x1] = 1.0
    return img, torch.tensor([[x0 / size, y0 / size, x1 / size, y1 / size]])


def _bbox(mask: torch.Tensor) -> list[int]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def test_box_drawn_into_image_stays_aligned():
    """Over many draws (crops, flips, boxes cut by the crop edge, boxes cropped away) the foreground of the
    augmented image and the augmented box agree to within a pixel, and a dropped box means no foreground."""
    img, box = _image_with_box((10, 6, 30, 24))  # off-centre, so a missing flip of the box is caught
    kept = dropped = 0
    for seed in range(60):
        g = torch.Generator().manual_seed(seed)
        out, ob = paired_random_resized_crop(img, box, g, scale=(0.2, 1.0), hflip=0.5)
        assert out.shape == img.shape
        fg = out[0] > 0.5
        if len(ob) == 0:
            assert out.max() < 0.5, f"seed {seed}: box dropped but still visible"
            dropped += 1
            continue
        kept += 1
        want = (ob[0] * 64).tolist()
        got = _bbox(fg)
        assert all(abs(a - b) <= 1.0 for a, b in zip(got, want)), (seed, got, want)
    assert kept > 30 and dropped >= 1


def test_flip_mirrors_box_with_image():
    """Whole-image crops: each draw is the identity or a mirror, both happen, and the box follows the image."""
    img, box = _image_with_box((4, 8, 20, 40))
    mirrored = torch.tensor([[1 - 20 / 64, 8 / 64, 1 - 4 / 64, 40 / 64]])
    seen = set()
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        out, ob = paired_random_resized_crop(img, box, g, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.5)
        flipped = torch.equal(out, img.flip(-1))
        assert flipped or torch.equal(out, img)
        assert torch.allclose(ob, mirrored if flipped else box)
        seen.add(flipped)
    assert seen == {True, False}


def test_boxes_clipped_and_empty_dropped():
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.9, 0.9, 1.0, 1.0], [0.25, 0.25, 0.75, 0.75]])
    out = transform_boxes(boxes, 64, 64, (0, 0, 32, 32), flip=False)  # the top-left quarter
    assert torch.allclose(out, torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 1.0, 1.0]]))
    assert transform_boxes(torch.zeros(0, 4), 64, 64, (0, 0, 32, 32), flip=True).shape == (0, 4)


def test_crop_params_in_bounds_and_seeded():
    for seed in range(20):
        top, left, h, w = crop_params(64, 48, (0.5, 1.0), (0.75, 4 / 3), torch.Generator().manual_seed(seed))
        assert 0 <= top and top + h <= 64 and 0 <= left and left + w <= 48 and h > 0 and w > 0
        assert 0.5 * 64 * 48 * 0.85 <= h * w <= 64 * 48
    a = crop_params(64, 64, (0.5, 1.0), (0.75, 4 / 3), torch.Generator().manual_seed(3))
    assert a == crop_params(64, 64, (0.5, 1.0), (0.75, 4 / 3), torch.Generator().manual_seed(3))
