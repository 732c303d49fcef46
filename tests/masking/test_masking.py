"""Maskers: exact counts, ratios, ROI edge cases, determinism, area-based ROI grid (property tests)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mwm.masking import (NEEDS_SALIENCY, STRATEGIES, MaskingConfig, boxes_tensor, create_masker, n_keep, random_keep,
                         ratios_for_overall, roi_coverage, soft_keep, topk_keep, two_region_keep)

grids = st.sampled_from([(2, 2), (4, 4), (7, 7), (3, 5), (8, 8), (14, 14), (16, 16)])  # 8 × 8: --mask-stride 8
ratios = st.floats(0.0, 0.95)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@settings(max_examples=40, deadline=None)
@given(grid=grids, ratio=ratios, b=st.integers(1, 6), seed=st.integers(0, 10**6))
def test_random_exact_count(grid, ratio, b, seed):
    keep = random_keep(b, grid, ratio, gen(seed))
    n = grid[0] * grid[1]
    assert keep.shape == (b, 1, *grid) and keep.dtype == torch.bool
    assert (keep.flatten(1).sum(1) == round(n * (1 - ratio))).all() or \
           (keep.flatten(1).sum(1) == int(n_keep(n, ratio))).all()


@st.composite
def roi_batches(draw):
    h, w = draw(grids)
    b = draw(st.integers(1, 6))
    masks = []
    for _ in range(b):
        kind = draw(st.sampled_from(["empty", "full", "random"]))
        if kind == "empty":
            masks.append(torch.zeros(h, w, dtype=torch.bool))
        elif kind == "full":
            masks.append(torch.ones(h, w, dtype=torch.bool))
        else:
            bits = draw(st.lists(st.booleans(), min_size=h * w, max_size=h * w))
            masks.append(torch.tensor(bits).view(h, w))
    return torch.stack(masks)


@settings(max_examples=60, deadline=None)
@given(roi=roi_batches(), r_in=st.floats(0, 1), r_out=st.floats(0, 0.95), seed=st.integers(0, 10**6))
def test_two_region_exact_per_region(roi, r_in, r_out, seed):
    keep = two_region_keep(roi, r_in, r_out, gen(seed))[:, 0]
    for i in range(roi.shape[0]):  # checking per sample is the point of this test
        n_in = int(roi[i].sum())
        n_out = roi[i].numel() - n_in
        assert int((keep[i] & roi[i]).sum()) == int(n_keep(n_in, r_in))
        assert int((keep[i] & ~roi[i]).sum()) == int(n_keep(n_out, r_out))
        # ratio within one patch of target in each region
        if n_in:
            assert abs((1 - (keep[i] & roi[i]).sum() / n_in) - r_in) <= 1 / n_in + 1e-9
    again = two_region_keep(roi, r_in, r_out, gen(seed))[:, 0]
    assert torch.equal(keep, again)  # deterministic under a seed


@settings(max_examples=60, deadline=None)
@given(roi=roi_batches(), overall=st.floats(0.05, 0.9), r_in=st.floats(0.3, 1.0))
def test_overall_ratio_held(roi, overall, r_in):
    a, b = ratios_for_overall(roi, overall, r_in)
    keep = two_region_keep(roi, a, b, gen(1))
    N = roi[0].numel()
    masked = (~keep).flatten(1).sum(1)
    assert (masked == round(N * overall)).all() or (masked - N * overall).abs().max() <= 0.5 + 1e-9
    # skew: the ROI is masked at least as much as the background wherever both exist
    both = roi.flatten(1).any(1) & (~roi).flatten(1).any(1)
    assert (a[both] >= b[both] - 1e-9).all()


@settings(max_examples=30, deadline=None)
@given(grid=grids, ratio=ratios, seed=st.integers(0, 1000))
def test_soft_and_topk_exact_count(grid, ratio, seed):
    imp = torch.rand(3, *grid, generator=gen(seed))
    k = int(n_keep(grid[0] * grid[1], ratio))
    for keep in (soft_keep(imp, ratio, 0.25, gen(seed)), topk_keep(imp, ratio, gen(seed))):
        assert (keep.flatten(1).sum(1) == k).all()
    keep = topk_keep(imp, ratio, gen(seed))[:, 0]
    # top-k masks exactly the most important patches
    masked_min = torch.where(~keep, imp, torch.full_like(imp, 2.0)).flatten(1).amin(1)
    kept_max = torch.where(keep, imp, torch.full_like(imp, -1.0)).flatten(1).amax(1)
    assert (masked_min >= kept_max).all()


def test_soft_prefers_important_patches():
    imp = torch.zeros(2000, 4, 4)
    imp[:, :2] = 1.0  # the top half is important
    keep = soft_keep(imp, 0.5, 0.25, gen(0))[:, 0]
    masked_top = (~keep[:, :2]).float().mean()
    masked_bottom = (~keep[:, 2:]).float().mean()
    assert masked_top > 0.9 and masked_bottom < 0.1


def test_roi_coverage_by_area_keeps_small_boxes():
    # a box of 1/4 patch that misses every patch centre: nearest-neighbour sampling would drop it
    boxes, valid = boxes_tensor([[[0.01, 0.01, 0.05, 0.05]], [], [[0.0, 0.0, 1.0, 1.0]], [[0.25, 0.0, 0.75, 0.5]]])
    cov = roi_coverage(boxes, valid, (4, 4))
    assert cov[0, 0, 0] > 0 and cov[0].sum() > 0 and (cov[0] > 0).sum() == 1
    assert cov[0, 0, 0].item() == pytest_approx((0.04 * 4) ** 2)
    assert cov[1].sum() == 0 and torch.allclose(cov[2], torch.ones(4, 4))
    assert torch.allclose(cov[3], torch.tensor([[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float32))
    # total covered area equals the box area
    assert abs(cov[3].sum().item() / 16 - 0.25) < 1e-6


def pytest_approx(v):
    import pytest

    return pytest.approx(v, rel=1e-5)


def test_registry_and_stats():
    boxes, valid = boxes_tensor([[[0.0, 0.0, 0.5, 0.5]], []])
    masker = create_masker(MaskingConfig(strategy="roi", ratio_in=1.0, ratio_out=0.0, ratio=0.5))
    keep, stats = masker(2, (4, 4), boxes, valid, gen(0))
    assert not keep[0, 0, :2, :2].any() and keep[0, 0, 2:].all()  # ROI fully masked, background fully visible
    assert int((~keep[1]).sum()) == 8  # no ROI → uniform at `ratio`
    assert set(stats) == {"mask_ratio", "mask_ratio_in", "mask_ratio_out", "roi_fraction"}
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in stats.values())
    import pytest

    with pytest.raises(ValueError, match="unknown masking strategy"):
        MaskingConfig(strategy="nope")
    with pytest.raises(ValueError, match="needs ROI boxes"):
        create_masker(MaskingConfig(strategy="roi"))(2, (4, 4))


def test_no_roi_policy_ratio_or_background_exact_counts():
    """A batch mixing ROI and no-ROI images (no box, and a failed localization's empty list): ``no_roi: ratio``
    (ours) masks the no-ROI images at ``ratio``; ``background`` (the MWM reference's low_mask_ratio) at
    ``ratio_out``. ROI images are masked the same under both."""
    import pytest

    boxes, valid = boxes_tensor([[[0.0, 0.0, 0.5, 0.5]], [], [[0.5, 0.5, 1.0, 1.0]], []])
    grid = (4, 4)  # 16 patches: ROI images have 4 ROI patches, 12 background
    counts = {}
    for policy in ("ratio", "background"):
        m = create_masker(MaskingConfig(strategy="roi", ratio_in=0.75, ratio_out=0.25, ratio=0.5, no_roi=policy))
        keep, _ = m(4, grid, boxes, valid, gen(3))
        masked = (~keep).flatten(1).sum(1).tolist()
        roi = roi_coverage(boxes, valid, grid).flatten(1) > 0
        in_roi = ((~keep).flatten(1) & roi).sum(1).tolist()
        assert in_roi[0] == in_roi[2] == 3 and masked[0] == masked[2] == 3 + 3  # 0.75 · 4 + 0.25 · 12
        counts[policy] = (masked[1], masked[3])
    assert counts == {"ratio": (8, 8), "background": (4, 4)}  # 0.5 · 16 and 0.25 · 16
    assert MaskingConfig(no_roi="random").no_roi == "random"  # the former name still loads old config.yaml files
    with pytest.raises(ValueError):
        MaskingConfig(no_roi="error")


@st.composite
def box_batches(draw):
    """1–5 images, each with 0–2 boxes of any size (down to a sliver) anywhere in the image."""
    out = []
    for _ in range(draw(st.integers(1, 5))):
        bl = []
        for _ in range(draw(st.integers(0, 2))):
            x0, y0 = draw(st.floats(0, 0.95)), draw(st.floats(0, 0.95))
            bl.append([x0, y0, draw(st.floats(x0 + 0.01, 1.0)), draw(st.floats(y0 + 0.01, 1.0))])
        out.append(bl)
    return out


BUILTIN = ("random", "roi", "roi_overall", "soft", "topk", "saliency_soft", "saliency_topk")


def test_builtin_strategies_registered():
    assert set(BUILTIN) <= set(STRATEGIES)


@settings(max_examples=40, deadline=None)
@given(boxes=box_batches(), grid=st.sampled_from([(8, 8), (16, 16)]), strategy=st.sampled_from(BUILTIN),
       ratio=st.floats(0.1, 0.9), seed=st.integers(0, 10**6))
def test_every_strategy_at_fine_grids(boxes, grid, strategy, ratio, seed):
    """Every registered strategy at the fine grids of ``--mask-stride`` (8 × 8 at 64 px, 16 × 16 at 128 px): the
    keep-mask has the grid's shape, ROI coverage is by area (covered area = box area), the exact-count strategies
    keep round(N·(1 − ratio)) patches in every image, and MWM's two-level masker is exact per region."""
    bt, valid = boxes_tensor(boxes)
    cfg = MaskingConfig(strategy=strategy, ratio=ratio, ratio_in=0.8, ratio_out=0.2)
    extra = {"importance": torch.rand(len(boxes), *grid, generator=gen(seed))} if strategy in NEEDS_SALIENCY else {}
    keep, stats = create_masker(cfg)(len(boxes), grid, boxes=bt, valid=valid, generator=gen(seed), **extra)
    assert keep.shape == (len(boxes), 1, *grid) and keep.dtype == torch.bool
    N = grid[0] * grid[1]
    cov = roi_coverage(bt, valid, grid)
    for i, bl in enumerate(boxes):
        if len(bl) == 1:  # one box: exact area
            x0, y0, x1, y1 = bl[0]
            assert abs(float(cov[i].sum()) / N - (x1 - x0) * (y1 - y0)) < 1e-4
    visible = keep.flatten(1).sum(1)
    if strategy == "roi":
        roi = (cov > 0).flatten(1)
        for i, bl in enumerate(boxes):
            n_in = int(roi[i].sum())
            if bl:
                assert int((keep[i].flatten() & roi[i]).sum()) == int(n_keep(n_in, 0.8))
                assert int((keep[i].flatten() & ~roi[i]).sum()) == int(n_keep(N - n_in, 0.2))
            else:
                assert int(visible[i]) == int(n_keep(N, ratio))
    elif strategy == "roi_overall":  # the overall count is held in every image, with or without an ROI
        assert (N - visible == int(torch.round(torch.tensor(N * ratio, dtype=torch.float64)))).all()
    else:
        assert (visible == int(n_keep(N, ratio))).all()
    assert abs(float(stats["mask_ratio"]) - float((~keep).float().mean())) < 1e-6
