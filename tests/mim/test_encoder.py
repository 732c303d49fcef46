"""Sparse encoder: masked positions stay zero, dense equivalence, visible-only BatchNorm, per-instance mask state,
export to timm and Detectron2 names. resnet18 and convnext_atto at 64 px (mask grid 2×2), batch 2–4."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

from mwm.masking import random_keep
from mwm.mim import (SparseEncoder, UnsupportedLayerError, classifier_keys, encoder_state_dict_for_timm,
                     masked_batch_norm, to_detectron2, upsample_keep)
from mwm.mim.sparse import SparseLayerNorm, SparseLinear

ARCHS = ["resnet18", "convnext_atto"]
SIZE = 64


def keep_for(batch, seed=0, ratio=0.5):
    return random_keep(batch, (SIZE // 32, SIZE // 32), ratio, torch.Generator().manual_seed(seed))


def randomize_bn_stats(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


@pytest.fixture(scope="module", params=ARCHS)
def enc(request):
    torch.manual_seed(0)
    e = SparseEncoder(request.param)
    randomize_bn_stats(e)
    return e


def dense_twin(enc):
    d = timm.create_model(enc.arch, pretrained=False)
    d.load_state_dict(encoder_state_dict_for_timm(enc), strict=False)
    return d


def test_masked_positions_exactly_zero_at_every_layer(enc):
    x = torch.randn(3, 3, SIZE, SIZE)
    keep = keep_for(3)
    outs = []
    hooks = [m.register_forward_hook(lambda mod, i, o: outs.append((mod, o)))
             for m in enc.modules() if hasattr(m, "_mwm_ctx")]
    try:
        feats = enc(x, keep)
    finally:
        for h in hooks:
            h.remove()
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2] and enc.reductions == [4, 8, 16, 32]
    for f in feats:
        hole = ~upsample_keep(keep, f.shape[-2:])
        assert (f * hole).abs().max() == 0
        assert (f * ~hole).abs().sum() > 0
    assert len(outs) > 20
    for mod, o in outs:  # every sparse layer's output, NCHW or channels-last (ConvNeXt's LN / MLP)
        if isinstance(mod, (SparseLayerNorm, SparseLinear)):
            hole = ~upsample_keep(keep, o.shape[1:3]).permute(0, 2, 3, 1)
        else:
            hole = ~upsample_keep(keep, o.shape[-2:])
        assert (o * hole).abs().max() == 0, type(mod).__name__


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_all_visible_equals_dense_timm(enc, mode):
    dense = dense_twin(enc)
    e = copy.deepcopy(enc)
    x = torch.randn(2, 3, SIZE, SIZE)
    for m in (dense, e):
        m.train(mode == "train")
    with torch.no_grad():
        ref = dense.forward_intermediates(x, indices=e.indices, intermediates_only=True)
        got_all = e(x, torch.ones(2, 1, 2, 2, dtype=torch.bool))  # the sparse code path, nothing masked
        got_none = copy.deepcopy(enc).train(mode == "train")(x, None)  # the dense path
    # train: batch statistics from Σx, Σx² against timm's Welford, compounded over 4 stages (measured ≤ 5e-6)
    tol = 1e-5 if mode == "eval" else 3e-5
    for r, a, n in zip(ref, got_all, got_none):
        assert torch.allclose(a, r, atol=tol, rtol=tol), (a - r).abs().max()
        assert torch.allclose(n, r, atol=1e-6, rtol=1e-6)
    if mode == "train":  # running statistics follow the same update
        for (name, b), (_, bd) in zip(e.model.named_buffers(), dense.named_buffers()):
            assert torch.allclose(b.float(), bd.float(), atol=1e-4, rtol=1e-4), name


def test_input_gradient_zero_at_masked_pixels(enc):
    x = torch.randn(2, 3, SIZE, SIZE, requires_grad=True)
    keep = keep_for(2, seed=1)
    feats = enc(x, keep)
    sum((f * torch.randn_like(f)).sum() for f in feats).backward()
    hole = ~upsample_keep(keep, (SIZE, SIZE))
    assert (x.grad * hole).abs().max() == 0
    assert (x.grad * ~hole).abs().sum() > 0


def test_sparse_bn_equals_batch_norm_on_visible_subset():
    e = SparseEncoder("resnet18").train()
    randomize_bn_stats(e)
    bn = e.model.bn1
    before = (bn.running_mean.clone(), bn.running_var.clone())
    seen = {}
    h = bn.register_forward_hook(lambda m, i, o: seen.update(inp=i[0].detach().clone(), out=o.detach().clone()))
    keep = keep_for(4, seed=2, ratio=0.6)
    e(torch.randn(4, 3, SIZE, SIZE), keep)
    h.remove()
    vis = upsample_keep(keep, seen["inp"].shape[-2:])[:, 0]
    sub = seen["inp"].permute(0, 2, 3, 1)[vis]  # (N_vis, C)
    rm, rv = before[0].clone(), before[1].clone()
    ref = F.batch_norm(sub, rm, rv, bn.weight, bn.bias, True, bn.momentum, bn.eps)
    got = seen["out"].permute(0, 2, 3, 1)
    assert torch.allclose(got[vis], ref, atol=1e-5, rtol=1e-5)
    assert got[~vis].abs().max() == 0
    assert torch.allclose(bn.running_mean, rm, atol=1e-6) and torch.allclose(bn.running_var, rv, atol=1e-5)


def test_masked_batch_norm_forward_backward_float64():
    g = torch.Generator().manual_seed(3)
    B, C, H, W = 3, 5, 6, 6
    keep = torch.rand(B, 1, H, W, generator=g) > 0.4
    m = keep.double()
    x = ((torch.randn(B, C, H, W, generator=g, dtype=torch.double) * 2 + 1) * m).requires_grad_()
    bn = torch.nn.BatchNorm2d(C).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    y = masked_batch_norm(x, m, m.sum(), bn)
    sub = x.permute(0, 2, 3, 1)[keep[:, 0]]
    ref = torch.zeros(B, H, W, C, dtype=torch.double)
    ref[keep[:, 0]] = F.batch_norm(sub, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    ref = ref.permute(0, 3, 1, 2)
    assert torch.allclose(y, ref, atol=1e-12)
    gy = torch.randn(y.shape, generator=g, dtype=torch.double)
    got = torch.autograd.grad((y * gy).sum(), [x, bn.weight, bn.bias])
    want = torch.autograd.grad((ref * gy).sum(), [x, bn.weight, bn.bias])
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-10)
    assert (got[0] * (1 - m)).abs().max() == 0


def test_two_encoders_do_not_interfere():
    torch.manual_seed(0)
    a, b = SparseEncoder("resnet18").eval(), SparseEncoder("resnet18").eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    ka, kb = keep_for(2, seed=4), ~keep_for(2, seed=4)  # complementary masks
    with torch.no_grad():
        ref_a, ref_b, ref_a_kb = a(x, ka), b(x, kb), a(x, kb)
        inner = {}
        # run b *inside* a's forward (between two of a's layers): each must keep its own mask
        h = a.model.layer2.register_forward_hook(lambda *_: inner.update(b=b(x, kb)))
        got_a = a(x, ka)
        h.remove()
        c = copy.deepcopy(a)  # a deep copy owns a fresh context
        got_c = c(x, kb)
    assert c._ctx is not a._ctx
    for r, g in zip(ref_a, got_a):
        assert torch.equal(r, g)
    for r, g in zip(ref_b, inner["b"]):
        assert torch.equal(r, g)
    for r, g in zip(ref_a_kb, got_c):
        assert torch.equal(r, g)


def test_sparse_layer_outside_encoder_forward_raises():
    e = SparseEncoder("resnet18")
    with pytest.raises(RuntimeError, match="outside its SparseEncoder.forward"):
        e.model(torch.randn(1, 3, SIZE, SIZE))


@pytest.mark.parametrize("arch", ARCHS)
def test_export_loads_into_timm_with_only_classifier_missing(arch):
    e = SparseEncoder(arch)
    sd = encoder_state_dict_for_timm(e)
    dense = timm.create_model(arch, pretrained=False)
    res = dense.load_state_dict(sd, strict=False)
    assert res.unexpected_keys == []
    assert set(res.missing_keys) == classifier_keys(dense)
    want = {"fc.weight", "fc.bias"} if arch == "resnet18" else {"head.fc.weight", "head.fc.bias"}
    assert set(res.missing_keys) == want
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        a = e.eval()(x, None)
        b = dense.eval().forward_intermediates(x, indices=e.indices, intermediates_only=True)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert isinstance(e.dense_model(num_classes=2), torch.nn.Module)


def test_to_detectron2_names():
    sd = encoder_state_dict_for_timm(SparseEncoder("resnet18"))
    d2 = to_detectron2(sd)
    for k in ["stem.conv1.weight", "stem.conv1.norm.weight", "stem.conv1.norm.running_var", "res2.0.conv1.weight",
              "res2.0.conv1.norm.bias", "res2.1.conv2.norm.weight", "res3.0.shortcut.weight",
              "res3.0.shortcut.norm.running_mean", "res5.1.conv2.weight"]:
        assert k in d2, k
    assert not any(k.startswith("fc") or "num_batches_tracked" in k or "layer" in k or "bn" in k for k in d2)
    assert len(d2) == len([k for k in sd if not k.endswith("num_batches_tracked")])
    assert torch.equal(d2["res3.0.shortcut.norm.running_mean"], sd["layer2.0.downsample.1.running_mean"])


def test_keep_and_size_validation():
    e = SparseEncoder("resnet18")
    assert e.grid(64) == (2, 2) and e.grid((96, 64)) == (3, 2) and e.stride == 32
    with pytest.raises(ValueError, match="multiple of the encoder stride"):
        e.grid(70)
    with pytest.raises(ValueError, match="keep must be bool"):
        e(torch.randn(2, 3, SIZE, SIZE), torch.ones(2, 1, 4, 4, dtype=torch.bool))
    with pytest.raises(UnsupportedLayerError, match="global pooling"):
        SparseEncoder("seresnet18")
