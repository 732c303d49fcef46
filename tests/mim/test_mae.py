"""MAE path on vit_tiny_patch16_224 created at 64 px (4×4 grid of 16-px patches)."""

from __future__ import annotations

import pytest
import timm
import torch

from mwm.masking import n_keep, random_keep, two_region_keep
from mwm.mim import MAE, MAEConfig, create_mim_model, masked_mse, upsample_keep, visible_index
from mwm.mim.mae import sincos_pos_embed_2d

SIZE = 64
ARCH = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def mae():
    torch.manual_seed(0)
    return create_mim_model(MAEConfig(arch=ARCH, size=SIZE, decoder_dim=64, decoder_depth=1))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_only_visible_tokens_enter_the_encoder(mae):
    assert isinstance(mae, MAE) and mae.stride == 16 and mae.grid(SIZE) == (4, 4)
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1])) for b in mae.encoder.model.blocks]
    keep = random_keep(3, (4, 4), 0.75, gen(1))
    out = mae(torch.randn(3, 3, SIZE, SIZE), keep)
    for h in hooks:
        h.remove()
    n_vis = int(n_keep(16, 0.75))
    assert seen == [1 + n_vis] * len(mae.encoder.model.blocks)  # class token + visible patches only
    assert out["pred"].shape == (3, 3, SIZE, SIZE) and out["loss"].ndim == 0
    out["loss"].backward()
    assert mae.decoder.mask_token.grad.abs().sum() > 0


def test_visible_tokens_are_the_right_ones(mae):
    keep = random_keep(2, (4, 4), 0.5, gen(2))
    ids_keep, ids_restore = visible_index(keep)
    flat = keep.flatten(1)
    for b in range(2):  # test-side loop over a 2-sample batch, checking the vectorized gather
        assert torch.equal(ids_keep[b], flat[b].nonzero().flatten())
    order = torch.cat([ids_keep, (~flat).nonzero()[:, 1].view(2, -1)], 1)
    assert torch.equal(torch.gather(order, 1, ids_restore), torch.arange(16).expand(2, -1))
    ids2, _ = visible_index(keep, n_visible=8)
    assert torch.equal(ids2, ids_keep)


def test_unequal_counts_name_the_masker_to_use(mae):
    roi = torch.zeros(2, 4, 4, dtype=torch.bool)
    roi[0, :2, :2] = True
    keep = two_region_keep(roi, 0.9, 0.1, gen(3))  # MWM two-level: counts follow ROI size
    assert keep.flatten(1).sum(1).unique().numel() == 2
    with pytest.raises(ValueError, match="roi_overall"):
        mae(torch.randn(2, 3, SIZE, SIZE), keep)


def test_loss_only_on_masked_patches(mae):
    x = torch.randn(2, 3, SIZE, SIZE)
    keep = random_keep(2, (4, 4), 0.75, gen(4))
    with torch.no_grad():
        out = mae(x, keep)
    vis = upsample_keep(keep, (SIZE, SIZE))
    changed = torch.where(vis, out["pred"] * 3 + 1, out["pred"])
    assert torch.equal(masked_mse(x, changed, keep), out["loss"])
    assert masked_mse(x, torch.where(vis, out["pred"], out["pred"] + 1), keep) != out["loss"]


def test_export_loads_into_timm(mae):
    sd = mae.encoder_state_dict()
    dense = timm.create_model(ARCH, pretrained=False, img_size=SIZE)
    res = dense.load_state_dict(sd, strict=False)
    assert res.unexpected_keys == [] and set(res.missing_keys) == {"head.weight", "head.bias"}
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        tokens, _ = mae.encoder.eval()(x, None)  # keep=None: every token, the fine-tuning view
        assert torch.allclose(tokens, dense.eval().forward_features(x), atol=1e-5)


def test_sincos_pos_embed():
    pe = sincos_pos_embed_2d(8, (2, 3))
    assert pe.shape == (6, 8)
    assert torch.allclose(pe[0], torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]))
    assert torch.equal(pe[1, :4], pe[0, :4]) and not torch.equal(pe[1, 4:], pe[0, 4:])  # same row, next column
