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


def mae_2d_sincos(embed_dim, grid_size, cls_token=False):
    """MAE's util/pos_embed.py get_2d_sincos_pos_embed, written out in numpy (square grids, as MAE)."""
    import numpy as np

    def one_d(d, pos):
        omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.stack(np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32)), 0)
    grid = grid.reshape([2, 1, grid_size, grid_size])
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return torch.from_numpy(emb).float()


def test_sincos_pos_embed_is_maes():
    assert torch.equal(sincos_pos_embed_2d(8, (3, 3)), mae_2d_sincos(8, 3))
    pe = sincos_pos_embed_2d(8, (2, 3))  # non-square: row-major patches, first half = column (MAE's order)
    assert pe.shape == (6, 8) and torch.allclose(pe[0], torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]))
    assert torch.equal(pe[3, :4], pe[0, :4]) and torch.equal(pe[1, 4:], pe[0, 4:])  # same column / same row


def test_encoder_pos_embed_is_fixed_sincos_and_exported(mae):
    """The encoder's position embedding is MAE's sin-cos table with the class position at zero, is not trained by
    an optimizer step, and is in the exported state_dict (timm loads it)."""
    from mwm.train import PretrainConfig
    from mwm.train.optim import build_optimizer

    pe = mae.encoder.model.pos_embed
    assert pe.shape == (1, 17, 192) and not pe.requires_grad
    assert torch.equal(pe[0], mae_2d_sincos(192, 4, cls_token=True))
    model = create_mim_model(MAEConfig(arch=ARCH, size=SIZE, decoder_dim=64, decoder_depth=1))
    before = model.encoder.model.pos_embed.detach().clone()
    # MAE's initialisation, not timm's trunc-normal(0.02): xavier-uniform linears (bound √(6/(fan_in+fan_out)))
    w = model.encoder.model.blocks[0].mlp.fc1.weight
    assert 0.07 < w.abs().max() <= (6 / sum(w.shape)) ** 0.5 and not model.encoder.model.blocks[0].mlp.fc1.bias.any()
    cfg = PretrainConfig(data="x.npz", out="run", model=model_cfg_dict(), lr=0.1, optimizer="adamw")
    opt, _, _ = build_optimizer(model, cfg, world_size=1)
    assert all(p is not model.encoder.model.pos_embed for g in opt.param_groups for p in g["params"])
    keep = random_keep(2, (4, 4), 0.75, gen(5))
    model(torch.randn(2, 3, SIZE, SIZE), keep)["loss"].backward()
    opt.step()
    assert torch.equal(model.encoder.model.pos_embed, before)
    assert torch.equal(model.encoder_state_dict()["pos_embed"], before)
    # the decoder's table is MAE's too (no class row: prefix tokens get no position there)
    assert torch.equal(model.decoder.pos_embed[0], mae_2d_sincos(64, 4))
    learned = create_mim_model(MAEConfig(arch=ARCH, size=SIZE, decoder_dim=64, pos_embed="learned"))
    assert learned.encoder.model.pos_embed.requires_grad


def model_cfg_dict():
    return {"method": "mae", "arch": ARCH, "size": SIZE, "decoder_dim": 64, "decoder_depth": 1}
