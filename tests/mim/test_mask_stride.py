"""A mask grid finer than the encoder's output stride (``mask_stride``, issue 11): an 8 × 8 keep-mask on a
stride-32 ResNet at 64 px. What must hold: the masker draws at ``size // mask_stride``; each level keeps a cell
active when any of its sub-cells is visible; no masked pixel's value reaches any feature, the decoder's input or
its prediction; the loss scores exactly the masked 8 × 8 patches. MAE reaches the same grid with 8-px patches."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from mwm.masking import MaskingConfig, create_masker, n_keep, random_keep
from mwm.mim import SparKConfig, SparseEncoder, create_mim_model, keep_at, masked_mse
from mwm.train.export import timm_kwargs

SIZE, S = 64, 8
GRID = (SIZE // S, SIZE // S)


def keep8(batch: int, ratio: float = 0.6, seed: int = 0) -> torch.Tensor:
    return random_keep(batch, GRID, ratio, torch.Generator().manual_seed(seed))


def perturb_masked(x: torch.Tensor, keep: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """x with every masked pixel replaced by large arbitrary values (visible pixels untouched)."""
    vis = keep_at(keep, x.shape[-2:])
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)) * 50 + 7
    return torch.where(vis, x, noise)


def reference_active(keep: torch.Tensor, side: int) -> torch.Tensor:
    """The active set of a side × side level, computed independently: max-pool (any visible 8-px sub-cell) for
    coarser levels, repeat for finer ones."""
    h = keep.shape[-1]
    if side <= h:
        return F.max_pool2d(keep.float(), h // side) > 0
    return keep.repeat_interleave(side // h, 2).repeat_interleave(side // h, 3)


def test_keep_at_any_pools_coarser_levels_and_upsamples_finer():
    keep = keep8(4, ratio=0.8)
    for side in (1, 2, 4, 8, 16, 32):  # the stride-64/32/16/8/4/2 levels of a 64-px input
        assert torch.equal(keep_at(keep, (side, side)), reference_active(keep, side))
    with pytest.raises(ValueError, match="do not tile"):
        keep_at(keep, (3, 3))


@pytest.fixture(scope="module", params=["resnet18", "convnext_atto"])
def enc8(request):
    torch.manual_seed(0)
    return SparseEncoder(request.param, mask_stride=S)


def _features_and_layer_outputs(enc, x, keep):
    outs = []
    hooks = [m.register_forward_hook(lambda mod, i, o: outs.append(o)) for m in enc.modules() if hasattr(m, "_mwm_ctx")]
    try:
        feats = enc(x, keep)
    finally:
        for h in hooks:
            h.remove()
    return feats, outs


def test_masked_pixels_never_reach_any_layer(enc8):
    """The invariant: with the keep-mask at stride 8, changing masked pixels arbitrarily changes nothing in any
    sparse layer's output (training mode: BatchNorm statistics come from the batch, so they are checked too)."""
    enc8.train()
    x = torch.randn(3, 3, SIZE, SIZE)
    keep = keep8(3)
    assert enc8.grid(SIZE) == GRID
    feats, outs = _features_and_layer_outputs(enc8, x, keep)
    feats2, outs2 = _features_and_layer_outputs(enc8, perturb_masked(x, keep), keep)
    assert len(outs) == len(outs2) > 10
    for a, b in zip(feats + outs, feats2 + outs2):
        assert torch.equal(a, b)
    # not vacuous: the features do depend on the visible pixels
    x3 = torch.where(keep_at(keep, x.shape[-2:]), x + 1, x)
    assert not torch.equal(enc8(x3, keep)[-1], feats[-1])


def test_each_level_is_active_where_any_sub_cell_is_visible(enc8):
    """Exact active sets per level: zero exactly where every 8-px sub-cell is masked (finer levels: the upsampled
    mask); the top level is not all-visible (the pooling is not a no-op at this ratio)."""
    enc8.eval()
    x = torch.randn(2, 3, SIZE, SIZE) + 3  # no feature is zero by chance at an active position
    keep = keep8(2, ratio=0.75, seed=5)
    assert int(keep.flatten(1).sum(1)[0]) == int(n_keep(64, 0.75)) == 16
    for f in enc8(x, keep):
        active = reference_active(keep, f.shape[-1])
        assert (f * ~active).abs().amax() == 0  # masked positions exactly zero
        assert (f.abs().amax(1, keepdim=True) > 0)[active].all()  # active positions carry features
    mid = keep_at(keep, (SIZE // 16, SIZE // 16))  # 2 × 2 sub-cells per cell: some active, some not
    assert 0 < int(mid.sum()) < mid.numel()


def test_visible_count_per_level_matches_the_pooled_mask():
    """The masked BatchNorm divides by the active count of its level: for a coarser level that is the number of
    pooled cells with any visible sub-cell, not (visible mask cells) × (area ratio)."""
    from mwm.mim.sparse import MaskFrame

    keep = keep8(4, ratio=0.6, seed=2)
    f = MaskFrame(keep)
    for side in (2, 4, 8, 16, 32):
        ref = keep_at(keep, (side, side)).sum().float()
        assert torch.equal(f.count((side, side)), ref)
        assert torch.equal(f.mask((side, side), torch.float32).sum(), ref)


def test_spark_prediction_ignores_masked_pixels_and_decoder_fills_inactive_cells():
    torch.manual_seed(0)
    model = create_mim_model(SparKConfig(arch="resnet18", size=SIZE, mask_stride=S))
    assert model.grid(SIZE) == GRID and model.stride == S and model.encoder.stride == 32
    model.train()
    x = torch.randn(4, 3, SIZE, SIZE)
    keep = keep8(4)
    keep[0, :, :4, :4] = False  # a whole stride-32 cell masked: inactive at the top level too
    out = model(x, keep)
    out2 = model(perturb_masked(x, keep), keep)
    assert torch.equal(out["pred"], out2["pred"])  # the visible-only path ends at the prediction
    # densify: every level's inactive positions hold its mask token (a 1×1 projection at the top level)
    feats = model.encoder(x, keep)
    dense = model.decoder.densify(feats, keep)
    top = keep_at(keep, feats[-1].shape[-2:])
    tok = model.decoder.densify_projs[0](model.decoder.mask_tokens[0])[0, :, 0, 0]
    d0 = dense[0].permute(0, 2, 3, 1)  # (B, h, w, C)
    assert (~top).any()
    assert torch.allclose(d0[~top[:, 0]], tok.expand(int((~top).sum()), -1))


def test_loss_covers_exactly_the_masked_8px_patches():
    torch.manual_seed(0)
    x = torch.randn(2, 3, SIZE, SIZE)
    pred = torch.randn(2, 3, SIZE, SIZE)
    keep = keep8(2, ratio=0.5)
    vis = keep_at(keep, (SIZE, SIZE))
    base = masked_mse(x, pred, keep)
    # changing the prediction on visible 8 × 8 patches does not change the loss
    assert torch.equal(masked_mse(x, torch.where(vis, pred + 100, pred), keep), base)
    # changing it inside one masked 8 × 8 patch does
    i, j = (~keep[0, 0]).nonzero()[0].tolist()
    p2 = pred.clone()
    p2[0, :, i * S:(i + 1) * S, j * S:(j + 1) * S] += 1
    assert not torch.equal(masked_mse(x, p2, keep), base)
    # per-patch normalization over 8 × 8 patches: a target-exact prediction gives zero loss
    t = x.reshape(2, 3, 8, S, 8, S)
    mean = t.mean((1, 3, 5), keepdim=True)
    std = (t.var((1, 3, 5), keepdim=True) + 1e-6).sqrt()
    exact = ((t - mean) / std).reshape(2, 3, SIZE, SIZE)
    assert masked_mse(x, exact, keep) < 1e-8


def test_masker_and_model_agree_on_the_fine_grid():
    model = create_mim_model(SparKConfig(arch="resnet18", size=SIZE, mask_stride=S))
    m = create_masker(MaskingConfig(strategy="random", ratio=0.6))
    keep, stats = m(5, model.grid(SIZE), generator=torch.Generator().manual_seed(0))
    assert keep.shape == (5, 1, 8, 8)
    assert (keep.flatten(1).sum(1) == int(n_keep(64, 0.6))).all()  # 26 visible of 64
    assert abs(float(stats["mask_ratio"]) - 38 / 64) < 1e-6
    with pytest.raises(ValueError, match="keep must be bool of shape"):
        model(torch.randn(5, 3, SIZE, SIZE), keep[:, :, :4, :4])  # the encoder-stride grid is refused


def test_config_validation_and_defaults():
    assert create_mim_model(SparKConfig(arch="resnet18", size=SIZE)).grid(SIZE) == (2, 2)
    for bad in (12, 64, 3):
        with pytest.raises(ValueError, match="must divide"):
            SparKConfig(arch="resnet18", size=SIZE, mask_stride=bad)
    with pytest.raises(ValueError):
        SparKConfig(arch="resnet18", size=SIZE, mask_stride=1)


def test_export_is_the_plain_timm_model():
    model = create_mim_model(SparKConfig(arch="resnet18", size=SIZE, mask_stride=S))
    assert "mask_stride" not in timm_kwargs(model)
    dense = timm.create_model("resnet18", pretrained=False, **timm_kwargs(model))
    missing, unexpected = dense.load_state_dict(model.encoder_state_dict(), strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected


def test_mae_fine_grid_is_8px_patches():
    cfg = {"method": "mae", "arch": "vit_tiny_patch16_224", "size": SIZE, "patch_size": S, "decoder_dim": 64,
           "decoder_depth": 1}
    model = create_mim_model(cfg)
    assert model.grid(SIZE) == GRID and model.stride == S
    keep = keep8(2, ratio=0.75)
    out = model(torch.randn(2, 3, SIZE, SIZE), keep)
    assert out["pred"].shape == (2, 3, SIZE, SIZE) and torch.isfinite(out["loss"])
    kw = timm_kwargs(model)
    assert kw["patch_size"] == S and kw["img_size"] == SIZE
    dense = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw)
    missing, unexpected = dense.load_state_dict(model.encoder_state_dict(), strict=False)
    assert set(missing) <= {"head.weight", "head.bias"} and not unexpected
    assert create_mim_model({**cfg, "mask_stride": S}).grid(SIZE) == GRID  # the same stride, said twice, is fine
    with pytest.raises(ValueError, match="patch_size 8"):
        create_mim_model({"method": "mae", "arch": "vit_tiny_patch16_224", "size": SIZE, "mask_stride": S})


def test_dilated_encoder_keeps_one_level_per_stride():
    """timm's output_stride=16 repeats stride 16 (layer3, dilated layer4); the encoder returns the deepest."""
    enc = SparseEncoder("resnet18", output_stride=16, mask_stride=S)
    assert enc.reductions == [4, 8, 16] and enc.stride == 16 and enc.channels[-1] == 512
    keep = random_keep(2, enc.grid(64), 0.6, torch.Generator().manual_seed(0))
    feats = enc(torch.randn(2, 3, 64, 64), keep)
    assert [f.shape[-1] for f in feats] == [16, 8, 4]


def test_coarse_all_keeps_deep_levels_sparse_and_masked_pixels_out():
    """coarse_active='all': a coarser level's cell is active only when every 8-px sub-cell is visible (min-pool),
    so the deep levels are as sparse as the mask; masked pixels still reach no layer, and the decoder densifies
    with the same active sets."""
    keep = keep8(4, ratio=0.6)
    for side in (1, 2, 4):
        want = -F.max_pool2d(-keep.float(), 8 // side) > 0  # min-pool: all sub-cells visible
        assert torch.equal(keep_at(keep, (side, side), "all"), want)
        assert int(keep_at(keep, (side, side), "all").sum()) < int(keep_at(keep, (side, side)).sum())
    torch.manual_seed(0)
    enc = SparseEncoder("resnet18", mask_stride=S, coarse_active="all").train()
    x = torch.randn(4, 3, SIZE, SIZE)
    feats, outs = _features_and_layer_outputs(enc, x, keep)
    feats2, outs2 = _features_and_layer_outputs(enc, perturb_masked(x, keep), keep)
    for a, b in zip(feats + outs, feats2 + outs2):
        assert torch.equal(a, b)
    top = feats[-1]  # stride 32: 2 × 2, active only where all 16 sub-cells are visible
    assert (top * ~keep_at(keep, top.shape[-2:], "all")).abs().amax() == 0
    from mwm.mim import SparKConfig, create_mim_model

    model = create_mim_model(SparKConfig(arch="resnet18", size=SIZE, mask_stride=S, coarse_active="all",
                                         decoder_width=32))
    assert model.encoder.coarse_active == "all"
    out = model(x, keep)
    out2 = model(perturb_masked(x, keep), keep)
    assert torch.allclose(out["pred"], out2["pred"]) and torch.isfinite(out["loss"])
