"""Saliency → mask → components → boxes: exact answers on known inputs, and agreement with sklearn / skimage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mwm.localize.postprocess import (binarize, boxes_to_mask, boxes_to_masks, expand_boxes, kmeans_1d,
                                      largest_components, mask_to_boxes, otsu_thresholds)


def _bimodal(b, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    n = h * w
    x = torch.cat([torch.randn(b, n - n // 4, generator=g) * 0.05 + 0.2, torch.randn(b, n // 4, generator=g) * 0.05 + 0.8], 1)
    return x[:, torch.randperm(n, generator=g)].reshape(b, h, w)


# -- binarize ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["uniform", "bimodal", "skewed"])
def test_kmeans_matches_sklearn(kind):
    from sklearn.cluster import KMeans

    g = torch.Generator().manual_seed(1)
    b, h, w = 4, 24, 24
    sal = {"uniform": torch.rand(b, h, w, generator=g), "bimodal": _bimodal(b, h, w, 2),
           "skewed": torch.rand(b, h, w, generator=g) ** 4}[kind]
    mask, status = binarize(sal, "kmeans")
    assert status == ["ok"] * b and mask.dtype == torch.bool and mask.shape == (b, h, w)
    _, cent = kmeans_1d(sal.reshape(b, -1))
    for j in range(b):
        x = sal[j].reshape(-1, 1).double().numpy()
        km = KMeans(n_clusters=2, n_init=10, random_state=0).fit(x)
        ref = km.labels_ == km.cluster_centers_[:, 0].argmax()  # foreground = higher centroid
        ours = mask[j].reshape(-1).numpy()
        diff = ref != ours
        if kind == "bimodal":
            assert not diff.any()
        else:
            # a flat objective (uniform noise) lets Lloyd and sklearn stop at neighbouring fixed points: they may
            # disagree only on values right at the midpoint between the two centroids
            mid = cent[j].mean().item()
            assert diff.sum() <= 0.01 * diff.size
            assert np.all(np.abs(x[diff, 0] - mid) < 0.01)
        # and the region is the high values: a wrong side (foreground = lower cluster) fails here
        assert x[ours, 0].min() > x[~ours, 0].max()


def test_kmeans_is_per_image_not_per_batch():
    """Each image gets its own clusters: batching images of different ranges changes nothing."""
    a = _bimodal(1, 16, 16, 0)
    b = _bimodal(1, 16, 16, 1) * 0.1 + 0.9  # a much narrower, higher range
    both = binarize(torch.cat([a, b]), "kmeans").mask
    assert torch.equal(both[0], binarize(a, "kmeans").mask[0])
    assert torch.equal(both[1], binarize(b, "kmeans").mask[0])
    assert 0.15 < both[1].float().mean() < 0.35  # a batch-global threshold would give all-True here


def test_otsu_matches_skimage_within_one_bin():
    from skimage.filters import threshold_otsu

    g = torch.Generator().manual_seed(3)
    sal = torch.cat([_bimodal(3, 32, 32, 4), torch.rand(2, 32, 32, generator=g) ** 2])
    thr = otsu_thresholds(sal.reshape(len(sal), -1))
    mask, status = binarize(sal, "otsu")
    assert status == ["ok"] * len(sal)
    for j in range(len(sal)):
        x = sal[j].numpy()
        ref = threshold_otsu(x, nbins=256)
        bin_w = (x.max() - x.min()) / 256
        assert abs(thr[j].item() - ref) <= bin_w
        near = np.abs(x - ref) <= bin_w
        assert np.array_equal(mask[j].numpy()[~near], (x > ref)[~near])


def test_threshold_method_and_statuses():
    sal = torch.rand(5, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.4  # all below 0.5
    sal[0, 2, 3] = 0.9
    sal[1, 4, 4] = float("nan")
    sal[2] = 0.7  # constant (and above the threshold: still no region)
    sal[3, 0, 0] = float("inf")
    mask, status = binarize(sal, "threshold", threshold=0.5)
    assert status == ["ok", "nan_saliency", "constant_saliency", "nan_saliency", "empty_mask"]
    assert mask[0].sum() == 1 and mask[0, 2, 3]
    assert not mask[1:].any()
    for method in ("kmeans", "otsu"):
        m, st = binarize(sal, method)
        assert st[1:4] == ["nan_saliency", "constant_saliency", "nan_saliency"]
        assert st[0] == st[4] == "ok" and not m[1:4].any()


def test_binarize_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown binarize method"):
        binarize(torch.rand(1, 4, 4), "median")
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        binarize(torch.rand(4, 4))


# -- components ----------------------------------------------------------------------------------
def _blobs():
    m = torch.zeros(1, 10, 12, dtype=torch.bool)
    m[0, 0, 8:10] = True  # A: 2 px, first pixel raster index 8
    m[0, 3, 0:2] = True  # B: 2 px, first pixel raster index 36 (more to the left, but later in raster order)
    m[0, 6:9, 4:7] = True  # C: 9 px, the largest
    return m


def test_largest_component_and_ties_in_raster_order():
    m = _blobs()
    k1 = largest_components(m, k=1)
    assert torch.equal(k1.mask[0], m[0] & (torch.arange(10)[:, None] >= 6))  # only C
    assert torch.equal(k1[0], k1.mask[0]) and len(k1) == 1
    k2 = largest_components(m, k=2)
    assert k2.mask[0, 0, 8] and not k2.mask[0, 3, 0]  # the 2-px tie goes to A (first in raster order)
    assert k2.sizes[0].tolist() == [9, 2]
    assert k2.components[0].shape == (2, 10, 12)
    np.testing.assert_allclose(k2.boxes[0].numpy(), [[4 / 12, 6 / 10, 7 / 12, 9 / 10], [8 / 12, 0, 10 / 12, 1 / 10]], rtol=1e-6)
    kall = largest_components(m, k=None)
    assert kall.sizes[0].tolist() == [9, 2, 2] and torch.equal(kall.mask, m)
    k5 = largest_components(m, k=5)  # asking for more than exist keeps all
    assert k5.components[0].shape[0] == 3


def test_connectivity_and_empty_images():
    m = torch.zeros(2, 5, 5, dtype=torch.bool)
    m[0, 0, 0] = m[0, 1, 1] = m[0, 2, 2] = True  # a diagonal: one component with 8-connectivity, three with 4
    m[0, 4, 4] = True
    c8 = largest_components(m, k=1, connectivity=8)
    assert c8.mask[0].sum() == 3
    c4 = largest_components(m, k=1, connectivity=4)
    assert c4.mask[0].sum() == 1 and c4.mask[0, 0, 0]  # all size 1: the first in raster order
    assert not c8.mask[1].any() and c8.components[1].shape == (0, 5, 5) and c8.boxes[1].shape == (0, 4)
    with pytest.raises(ValueError, match="connectivity"):
        largest_components(m, connectivity=6)


# -- boxes ---------------------------------------------------------------------------------------
def test_mask_to_boxes_exact():
    m = torch.zeros(8, 10, dtype=torch.bool)
    m[3, 4] = True
    assert mask_to_boxes(m) == [[4 / 10, 3 / 8, 5 / 10, 4 / 8]]  # one pixel: its edges
    m[6, 1] = True
    assert mask_to_boxes(m, "union") == [[1 / 10, 3 / 8, 5 / 10, 7 / 8]]
    full = torch.ones(8, 10, dtype=torch.bool)
    assert mask_to_boxes(full) == [[0.0, 0.0, 1.0, 1.0]]
    batch = torch.stack([m, torch.zeros_like(m), full])
    assert mask_to_boxes(batch) == [[[0.1, 3 / 8, 0.5, 7 / 8]], [], [[0.0, 0.0, 1.0, 1.0]]]


def test_mask_to_boxes_per_component_order_matches_components():
    m = _blobs()
    per = mask_to_boxes(m[0], "per_component")
    np.testing.assert_allclose(per, [[4 / 12, 0.6, 7 / 12, 0.9], [8 / 12, 0.0, 10 / 12, 0.1], [0.0, 0.3, 2 / 12, 0.4]])
    np.testing.assert_allclose(per, largest_components(m, k=None).boxes[0].numpy(), rtol=1e-6)
    assert mask_to_boxes(torch.zeros(1, 4, 4, dtype=torch.bool), "per_component") == [[]]


def test_expand_boxes_definition_and_clipping():
    assert expand_boxes([0.4, 0.4, 0.6, 0.8], 0.1) == pytest.approx([0.38, 0.36, 0.62, 0.84])  # ±10 % of w, h per side
    assert expand_boxes([0.0, 0.5, 0.5, 1.0], 0.5) == pytest.approx([0.0, 0.25, 0.75, 1.0])  # clipped at the borders
    assert expand_boxes([0.2, 0.2, 0.3, 0.3], 0.0) == pytest.approx([0.2, 0.2, 0.3, 0.3])
    nested = expand_boxes([[[0.4, 0.4, 0.6, 0.6]], [], [[0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5]]], 0.1)
    assert nested[1] == [] and nested[2] == [[0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5]]
    assert nested[0] == [pytest.approx([0.38, 0.38, 0.62, 0.62])]
    t = expand_boxes(torch.tensor([[[0.4, 0.4, 0.6, 0.6]]]), 0.25)
    assert t.shape == (1, 1, 4) and t.tolist()[0][0] == pytest.approx([0.35, 0.35, 0.65, 0.65])
    with pytest.raises(ValueError):
        expand_boxes([0.1, 0.1, 0.2, 0.2], -0.1)


def test_boxes_to_mask_pixel_centres_and_roundtrip():
    # x from 0.4 px to 1.6 px of a 10-px-wide image: centres 0.5 and 1.5 are inside, 2.5 is not
    m = boxes_to_mask([[0.04, 0.0, 0.16, 0.1]], 10, 10)
    assert m.dtype == torch.bool and m.shape == (10, 10)
    assert m.nonzero().tolist() == [[0, 0], [0, 1]]
    assert not boxes_to_mask([], 4, 6).any()
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # rectangle → box → rectangle is exact
        h, w = torch.randint(3, 30, (2,), generator=g).tolist()
        r0, c0 = torch.randint(0, h, (1,), generator=g).item(), torch.randint(0, w, (1,), generator=g).item()
        r1, c1 = torch.randint(r0 + 1, h + 1, (1,), generator=g).item(), torch.randint(c0 + 1, w + 1, (1,), generator=g).item()
        rect = torch.zeros(h, w, dtype=torch.bool)
        rect[r0:r1, c0:c1] = True
        assert torch.equal(boxes_to_mask(mask_to_boxes(rect), h, w), rect)


def test_boxes_to_masks_batched_equals_single():
    boxes = [[[0.1, 0.1, 0.5, 0.4], [0.6, 0.6, 0.9, 1.0]], [], [[0.0, 0.0, 1.0, 1.0]]]
    batch = boxes_to_masks(boxes, 12, 16)
    assert batch.shape == (3, 12, 16) and batch.dtype == torch.bool
    for j, bs in enumerate(boxes):
        assert torch.equal(batch[j], boxes_to_mask(bs, 12, 16))
    assert batch[2].all() and not batch[1].any()
    assert torch.equal(boxes_to_masks(torch.tensor([[[0.0, 0.0, 0.5, 0.5]]]), 4, 4)[0], boxes_to_mask([[0, 0, 0.5, 0.5]], 4, 4))


def test_pipeline_shapes_end_to_end():
    """binarize → components → per-component boxes → expand → rasterize, on a two-blob saliency."""
    sal = torch.zeros(2, 16, 16)
    sal[0, 2:6, 2:6] = 1.0
    sal[0, 10:12, 10:12] = 0.9
    sal[1] = torch.linspace(0, 1, 16)[None, :]  # a ramp: right half is the region
    mask, status = binarize(sal)
    kept = largest_components(mask, k=1)
    assert status == ["ok", "ok"]
    assert mask_to_boxes(kept.mask) == [[[2 / 16, 2 / 16, 6 / 16, 6 / 16]], [[0.5, 0.0, 1.0, 1.0]]]
    grown = expand_boxes(mask_to_boxes(kept.mask), 0.25)
    assert grown[0] == [pytest.approx([1 / 16, 1 / 16, 7 / 16, 7 / 16])]
    assert boxes_to_masks(grown, 16, 16)[0].sum() == 36


# -- dense CRF (MedCLIP-SAMv2's --postprocess crf) ------------------------------------------------
def _square_scene(h=32, w=32):
    """A bright 12×12 square on black, and a round saliency blob centred 1.5 px off the square's centre,
    wider than the square: a threshold cuts a disc that leaks out of the square; the CRF should not."""
    img = torch.zeros(1, 3, h, w)
    img[..., 8:20, 8:20] = 1.0
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    sal = torch.exp(-((yy - 15) ** 2 + (xx - 15) ** 2) / (2 * 6.0 ** 2))[None]
    return img, sal, img[0, 0] > 0


def test_crf_unary_is_the_reference_formula():
    from mwm.localize.postprocess import CRF_REFERENCE, crf_unary

    a = np.array([0.0, 0.25, 0.5, 1.0])
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    tau, eps = 1.05, 1e-8
    want_bg = -np.log(1 - a + eps) / (tau * sig(1 - a))
    want_fg = -np.log(a + eps) / (tau * sig(a))
    u = crf_unary(torch.tensor(a)[None, None], CRF_REFERENCE)  # (1, 2, 4)
    assert u.dtype == torch.float32 and u.shape == (1, 2, 4)
    np.testing.assert_allclose(u[0].numpy(), np.stack([want_bg, want_fg]), rtol=1e-6)
    assert (CRF_REFERENCE.gaussian_sxy, CRF_REFERENCE.gaussian_compat, CRF_REFERENCE.bilateral_sxy,
            CRF_REFERENCE.bilateral_srgb, CRF_REFERENCE.bilateral_compat, CRF_REFERENCE.iterations) == (5, 3, 5, 3, 5, 1)


def test_crf_follows_the_image_edge():
    pytest.importorskip("pydensecrf.densecrf", reason="the optional CRF package (pip install 'mwm[crf]') is not installed")
    img, sal, square = _square_scene()
    mask, status = binarize(sal, "crf", image=img)
    assert status == ["ok"] and mask.dtype == torch.bool and mask.shape == (1, 32, 32)
    m = mask[0]
    iou = lambda a: float((a & square).sum() / (a | square).sum())  # noqa: E731
    assert float((m & square).sum() / m.sum()) > 0.97  # stays inside the bright square …
    assert iou(m) > 0.85  # … and fills most of it
    thr = binarize(sal, "threshold", 0.5).mask[0]
    assert iou(m) > iou(thr) + 0.15  # the threshold's disc does not follow the edge
    # the bilateral term is what follows the edge: on a flat image the CRF keeps roughly the disc
    flat, _ = binarize(sal, "crf", image=torch.full_like(img, 0.5))
    assert iou(flat[0]) < iou(m) - 0.15
    # uint8 (B, H, W) images work the same
    m8, _ = binarize(sal, "crf", image=(img[:, 0] * 255).to(torch.uint8))
    assert torch.equal(m8, mask)


def test_crf_statuses_and_bad_inputs():
    pytest.importorskip("pydensecrf.densecrf", reason="the optional CRF package (pip install 'mwm[crf]') is not installed")
    img, sal, _ = _square_scene(16, 16)
    sal3 = torch.cat([sal, torch.full_like(sal, 0.4), sal.clone().fill_(float("nan"))])
    mask, status = binarize(sal3, "crf", image=img.expand(3, -1, -1, -1))
    assert status == ["ok", "constant_saliency", "nan_saliency"]
    assert mask.shape == (3, 16, 16) and mask[0].any() and not mask[1:].any()
    with pytest.raises(ValueError, match="needs the images"):
        binarize(sal, "crf")
    with pytest.raises(ValueError, match="matching the saliency"):
        binarize(sal, "crf", image=torch.zeros(1, 3, 8, 8))


def test_crf_missing_package_says_how_to_install(monkeypatch):
    import sys

    from mwm.errors import MWMError

    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    img, sal, _ = _square_scene(16, 16)
    with pytest.raises(MWMError, match=r"pip install 'mwm\[crf\]'"):
        binarize(sal, "crf", image=img)
