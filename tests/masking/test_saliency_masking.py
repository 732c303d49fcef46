"""Saliency-weighted masking without boxes (``saliency_soft``, ``saliency_topk``): the per-pixel saliency map is
area-pooled to the mask grid, min–max normalised per image, and masked by the soft / top-k policy with exact
counts. Property tests give them the invariants every masker has (exact counts, shape, dtype, determinism)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mwm.masking import (NEEDS_ROI, NEEDS_SALIENCY, STRATEGIES, MaskingConfig, boxes_tensor, create_masker,
                         masking_config, n_keep, pool_importance, top_half)

SALIENCY = sorted(NEEDS_SALIENCY)
grids = st.sampled_from([(2, 2), (4, 4), (7, 7), (3, 5), (8, 8), (14, 14)])


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def masker(strategy, ratio=0.5, **kw):
    return create_masker(masking_config({"strategy": strategy, "ratio": ratio, **kw}))


def test_registered_as_manifest_strategies():
    # needs_saliency implies needs_roi: PretrainConfig and the bench then ask for a manifest (--rois / rois.source)
    assert set(SALIENCY) == {"saliency_soft", "saliency_topk", "saliency_topk_diverse"} and set(SALIENCY) <= NEEDS_ROI <= set(STRATEGIES)


@settings(max_examples=40, deadline=None)
@given(grid=grids, stride=st.sampled_from([1, 4, 8]), ratio=st.floats(0.05, 0.95), b=st.integers(1, 5),
       strategy=st.sampled_from(SALIENCY), no_map=st.lists(st.booleans(), min_size=5, max_size=5),
       seed=st.integers(0, 10**6))
def test_exact_counts_shape_dtype_determinism(grid, stride, ratio, b, strategy, no_map, seed):
    """Every image keeps exactly round(N·(1 − ratio)) patches — with a map or without one (all zeros) — the keep-mask
    is bool (B, 1, h, w), and the same generator seed gives the same mask."""
    h, w = grid
    imp = torch.rand(b, h * stride, w * stride, generator=gen(seed + 1))
    imp[torch.tensor(no_map[:b])] = 0  # images without a saliency map
    m = masker(strategy, ratio)
    keep, stats = m(b, grid, generator=gen(seed), importance=imp)
    assert keep.shape == (b, 1, h, w) and keep.dtype == torch.bool
    assert (keep.flatten(1).sum(1) == int(n_keep(h * w, ratio))).all()
    again, _ = m(b, grid, generator=gen(seed), importance=imp)
    assert torch.equal(keep, again)
    assert abs(float(stats["mask_ratio"]) - float((~keep).float().mean())) < 1e-6
    assert set(stats) == {"mask_ratio", "mask_ratio_in", "mask_ratio_out", "roi_fraction"}
    assert all(v.ndim == 0 for v in stats.values())


def _patch_means(pix: torch.Tensor, grid) -> torch.Tensor:
    """Reference pooling, written independently of the code under test: reshape into patches and average."""
    b, H, W = pix.shape
    h, w = grid
    return pix.view(b, h, H // h, w, W // w).mean((2, 4))


@settings(max_examples=30, deadline=None)
@given(grid=st.sampled_from([(4, 4), (8, 8), (3, 5)]), ratio=st.floats(0.1, 0.9), seed=st.integers(0, 10**6))
def test_topk_masks_exactly_the_most_salient_patches(grid, ratio, seed):
    pix = torch.rand(4, grid[0] * 8, grid[1] * 8, generator=gen(seed))
    keep, _ = masker("saliency_topk", ratio)(4, grid, generator=gen(seed), importance=pix)
    means = _patch_means(pix, grid).flatten(1)
    k = int(n_keep(grid[0] * grid[1], ratio))
    masked = ~keep.flatten(1)
    expected = torch.zeros_like(masked)
    expected.scatter_(1, means.argsort(1, descending=True)[:, : grid[0] * grid[1] - k], True)
    assert torch.equal(masked, expected)


def test_pooling_is_by_area_so_a_small_spot_off_the_patch_centre_counts():
    """A bright 2 × 2 spot in a corner of one 8 × 8 patch: nearest-neighbour sampling at the patch centres would
    miss it; the patch mean does not, so top-k masks exactly that patch."""
    pix = torch.zeros(1, 32, 32)
    pix[0, 9:11, 17:19] = 1.0  # patch (1, 2) of the 4 × 4 grid, away from its centre (12, 20)
    imp = pool_importance(pix, (4, 4))
    assert imp[0, 1, 2] == 1 and imp.sum() == 1
    keep, _ = masker("saliency_topk", 1 / 16)(1, (4, 4), generator=gen(0), importance=pix)
    assert not keep[0, 0, 1, 2] and int((~keep).sum()) == 1


def test_pool_importance_normalises_per_image_and_zeroes_constant_maps():
    pix = torch.stack([torch.full((16, 16), 0.3), torch.linspace(0.2, 0.6, 16).repeat(16, 1)])
    imp = pool_importance(pix, (4, 4))
    assert imp.shape == (2, 4, 4) and torch.all(imp[0] == 0)  # a constant map: no preference
    assert imp[1].min() == 0 and imp[1].max() == 1  # min–max per image
    assert torch.allclose(pool_importance(imp, (4, 4)), imp)  # a map on the grid is only normalised


def test_soft_masks_salient_patches_more_often_but_not_always():
    """Saliency rising left to right: the masked frequency rises with it, and (unlike top-k) the least salient
    column is still masked sometimes."""
    ramp = torch.linspace(0, 1, 32).repeat(32, 1)
    pix = ramp.expand(2000, 32, 32)
    keep, stats = masker("saliency_soft", 0.5, temperature=0.25)(2000, (4, 4), generator=gen(0), importance=pix)
    freq = (~keep[:, 0]).float().mean((0, 1))  # per column
    assert (freq[1:] > freq[:-1]).all(), freq
    assert freq[-1] > 0.9 and 0.0 < freq[0] < 0.1
    assert float(stats["mask_ratio_in"]) > float(stats["mask_ratio_out"]) + 0.5


def test_images_without_a_map_are_masked_uniformly():
    """An all-zero map (no saliency for that image) is masked uniformly at ``ratio``: every patch equally often."""
    pix = torch.zeros(4000, 16, 16)
    for strategy in SALIENCY:
        keep, _ = masker(strategy, 0.5)(4000, (4, 4), generator=gen(1), importance=pix)
        freq = (~keep[:, 0]).float().mean(0)
        assert (freq - 0.5).abs().max() < 0.05, (strategy, freq)


def test_stats_split_patches_into_the_salient_half_and_the_rest():
    pix = torch.linspace(0, 1, 64).view(8, 8).repeat_interleave(4, 0).repeat_interleave(4, 1)[None].repeat(3, 1, 1)
    half = top_half(pool_importance(pix, (8, 8)))
    assert (half.flatten(1).sum(1) == 32).all() and half[:, 4:].all() and not half[:, :4].any()
    _, stats = masker("saliency_topk", 0.5)(3, (8, 8), generator=gen(0), importance=pix)
    assert float(stats["mask_ratio_in"]) == 1.0 and float(stats["mask_ratio_out"]) == 0.0
    assert float(stats["roi_fraction"]) == 0.5


def test_missing_importance_is_an_error_and_other_strategies_ignore_it():
    for strategy in SALIENCY:
        with pytest.raises(ValueError, match="save-saliency"):
            masker(strategy)(2, (4, 4), generator=gen(0))
    boxes, valid = boxes_tensor([[[0.0, 0.0, 0.5, 0.5]], []])
    imp = torch.rand(2, 16, 16)
    for strategy in ("random", "roi", "roi_overall", "soft", "topk"):
        m = masker(strategy)
        a, _ = m(2, (4, 4), boxes=boxes, valid=valid, generator=gen(3))
        b, _ = m(2, (4, 4), boxes=boxes, valid=valid, generator=gen(3), importance=imp)
        assert torch.equal(a, b), strategy


def test_yaml_config_round_trip():
    cfg = MaskingConfig.model_validate({"strategy": "saliency_soft", "ratio": 0.6, "temperature": 0.1})
    assert cfg.strategy == "saliency_soft" and cfg.temperature == 0.1


def test_pretrain_help_names_every_registered_strategy():
    """The CLI's --masking help is static text (importing the registry would load torch on every command); it must
    name every strategy the package registers, so a new one cannot be left out of it."""
    import re

    from typer.testing import CliRunner

    from mwm.cli import app

    text = " ".join(CliRunner().invoke(app, ["pretrain", "--help"], env={"COLUMNS": "200"}).output.split())
    text = re.sub(r"[│╭╮╰╯─]", " ", text)
    builtin = [name for name, spec in STRATEGIES.items() if spec.cls.__module__.startswith("mwm.")]  # not test toys
    assert {"random", "roi", "saliency_topk_diverse"} <= set(builtin)
    missing = [s for s in builtin if s not in text]
    assert not missing, f"mwm pretrain --help does not name {missing}"
