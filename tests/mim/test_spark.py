"""Decoder, masked loss, reconstruction and the SparK model / registry (resnet18 and convnext_atto at 64 px)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from mwm.masking import MaskingConfig, create_masker, random_keep
from mwm.mim import (LightDecoder, SparK, SparKConfig, create_mim_model, masked_mse, patchify, reconstruct,
                     unpatchify, upsample_keep)

SIZE = 64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_patchify_roundtrip_and_order():
    x = torch.randn(2, 3, 64, 32, generator=gen())
    t = patchify(x, 32)
    assert t.shape == (2, 2, 32 * 32 * 3)
    assert torch.equal(unpatchify(t, 32, (2, 1), 3), x)
    assert torch.equal(t[0, 1, :3], x[0, :, 32, 0])  # patch (1, 0), pixel (0, 0), channels last


def test_masked_mse_only_masked_patches_and_norm_pix():
    x = torch.randn(2, 3, SIZE, SIZE, generator=gen(1))
    pred = torch.randn_like(x)
    keep = random_keep(2, (2, 2), 0.5, gen(2))
    loss = masked_mse(x, pred, keep)
    assert loss.ndim == 0 and loss.dtype == torch.float32
    vis = upsample_keep(keep, (SIZE, SIZE))
    assert torch.equal(masked_mse(x, torch.where(vis, pred + 5, pred), keep), loss)  # visible: ignored
    assert masked_mse(x, torch.where(vis, pred, pred + 1), keep) != loss  # masked: counted
    # by hand: mean over masked patches of the per-patch MSE against the normalized patch
    t, p = patchify(x, 32), patchify(pred, 32)
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    per = ((p - t) ** 2).mean(-1)
    m = ~keep.flatten(1)
    assert torch.allclose(loss, per[m].mean(), rtol=1e-6)
    raw = ((p - patchify(x, 32)) ** 2).mean(-1)[m].mean()
    assert torch.allclose(masked_mse(x, pred, keep, norm_pix=False), raw, rtol=1e-6)
    assert masked_mse(x, pred, torch.ones_like(keep)) == 0  # nothing masked → 0, not NaN


def test_reconstruct_visible_from_input_masked_from_prediction():
    x = torch.rand(2, 1, SIZE, SIZE, generator=gen(3))
    keep = random_keep(2, (2, 2), 0.5, gen(4))
    t = patchify(x, 32)
    perfect = unpatchify((t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt(), 32, (2, 2), 1)
    assert torch.allclose(reconstruct(x, perfect, keep), x, atol=1e-5)
    junk = torch.randn_like(x)
    rec = reconstruct(x, junk, keep)
    vis = upsample_keep(keep, (SIZE, SIZE))
    assert torch.equal(rec[vis.expand_as(x)], x[vis.expand_as(x)])
    assert not torch.allclose(rec[~vis.expand_as(x)], x[~vis.expand_as(x)])


def test_decoder_shapes_and_mask_tokens_replace_holes():
    torch.manual_seed(0)
    dec = LightDecoder([16, 32, 64, 128], [4, 8, 16, 32], width=64, out_chans=3).eval()
    keep = random_keep(2, (2, 2), 0.5, gen(5))
    feats = [torch.randn(2, c, SIZE // r, SIZE // r) * upsample_keep(keep, (SIZE // r,) * 2)
             for c, r in zip([16, 32, 64, 128], [4, 8, 16, 32])]
    with torch.no_grad():
        out = dec(feats, keep)
        # whatever sits in the holes, the decoder sees its mask tokens there
        noisy = [f + torch.randn_like(f) * ~upsample_keep(keep, f.shape[-2:]) for f in feats]
        out2 = dec(noisy, keep)
    assert out.shape == (2, 3, SIZE, SIZE)
    assert torch.allclose(out, out2, atol=1e-6)
    assert [tuple(t.shape) for t in dec.mask_tokens] == [(1, 128, 1, 1), (1, 64, 1, 1), (1, 32, 1, 1), (1, 16, 1, 1)]
    assert dec.densify_projs[0].kernel_size == (1, 1) and dec.densify_projs[1].kernel_size == (3, 3)
    assert len(dec.blocks) == 5  # stride 32 → 1
    with pytest.raises(ValueError, match="doubling"):
        LightDecoder([16, 64], [4, 16], width=64)


@pytest.mark.parametrize("arch,norm", [("resnet18", "bn"), ("convnext_atto", "ln")])
def test_spark_forward_backward(arch, norm):
    torch.manual_seed(0)
    model = create_mim_model(SparKConfig(arch=arch, size=SIZE, decoder_width=64))
    assert isinstance(model, SparK) and model.stride == 32 and model.grid(SIZE) == (2, 2)
    names = {"bn": "MaskedBatchNorm2d", "ln": "_MaskedLayerNorm2d"}
    assert type(model.decoder.densify_norms[0]).__name__ == names[norm]
    x = torch.randn(2, 3, SIZE, SIZE)
    keep, _ = create_masker(MaskingConfig(strategy="random", ratio=0.5))(batch=2, grid=model.grid(SIZE),
                                                                          generator=gen(6))
    out = model(x, keep)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"]) and out["pred"].shape == x.shape
    out["loss"].backward()
    assert model.decoder.mask_tokens[0].grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.encoder.parameters() if p.requires_grad)
    rec = model.reconstruct(x, out["pred"].detach(), keep)
    assert rec.shape == x.shape


def test_config_registry_and_validation():
    m = create_mim_model({"arch": "resnet18", "size": 64, "decoder_width": 64, "in_chans": 1})
    assert isinstance(m, SparK)
    out = m(torch.randn(2, 1, 64, 64), random_keep(2, (2, 2), 0.5, gen(7)))
    assert out["pred"].shape == (2, 1, 64, 64)
    with pytest.raises(ValidationError, match="multiple of 32"):
        SparKConfig(size=100)
    with pytest.raises(ValidationError):
        SparKConfig(decoder_widht=3)
    with pytest.raises(ValueError, match="unknown MIM method"):
        create_mim_model({"method": "beit"})


def test_bf16_autocast_keeps_holes_zero_and_trains():
    torch.manual_seed(0)
    model = create_mim_model(SparKConfig(arch="resnet18", size=SIZE, decoder_width=64))
    x, keep = torch.randn(2, 3, SIZE, SIZE), random_keep(2, (2, 2), 0.5, gen(8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = model.encoder(x, keep)
        out = model(x, keep)
    assert all(f.dtype == torch.bfloat16 and (f * ~upsample_keep(keep, f.shape[-2:])).abs().max() == 0 for f in feats)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()


def test_convert_sync_batchnorm_keeps_sparse_layers_sparse():
    from mwm.mim.sparse import MaskedBatchNorm2d, SparseBatchNorm2d

    model = create_mim_model(SparKConfig(arch="resnet18", size=SIZE, decoder_width=64))
    model.convert_sync_batchnorm(process_group="pg")  # no forward: no process group is needed to convert
    assert all(m._mwm_sync_group == "pg" for m in model.encoder.modules() if isinstance(m, SparseBatchNorm2d))
    assert all(type(m) is MaskedBatchNorm2d and m._mwm_sync_group == "pg" for m in model.decoder.densify_norms)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.decoder.blocks.modules())


def test_init_and_drop_path_follow_spark():
    """SparK's init: decoder blocks and head truncated-normal(0.02) convs with zero bias, transposed convs Kaiming;
    the densify projections live outside SparK's decoder and keep PyTorch's default init (uniform ±1/√fan_in,
    non-zero bias). Drop path: SparK's per-model rate (resnet50 0.05), not exported with the weights."""
    from mwm.mim.spark import spark_drop_path

    torch.manual_seed(0)
    model = create_mim_model(SparKConfig(arch="resnet18", size=SIZE, decoder_width=64))
    dec = model.decoder
    for proj in dec.densify_projs:
        bound = 1 / (proj.weight[0].numel()) ** 0.5
        assert proj.bias.abs().max() > 0 and proj.weight.abs().max() <= bound
        assert float(proj.weight.detach().std()) == pytest.approx(bound / 3 ** 0.5, rel=0.1)  # uniform, not N(0, 0.02)
    conv = dec.blocks[0][1]
    assert float(conv.weight.detach().std()) == pytest.approx(0.02, rel=0.1) and not dec.head.bias.any()
    assert all(t.abs().max() <= 0.02 for t in dec.mask_tokens)
    assert spark_drop_path("resnet50") == 0.05 and spark_drop_path("resnet18") == 0.0
    assert spark_drop_path("resnet50", 0.0) == 0.0
    r50 = create_mim_model(SparKConfig(arch="resnet50", size=SIZE))
    rates = [m.drop_prob for m in r50.encoder.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.05)
    assert "drop_path_rate" not in r50.encoder.model_kwargs  # encoder.json: fine-tuning picks its own
