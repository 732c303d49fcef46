"""M2IB: the paper's loss terms, batched == one image at a time, frozen-weight speed path."""

from __future__ import annotations

import open_clip
import pytest
import torch

from mwm.localize.m2ib import M2IBConfig, _kl_std_normal, image_seed, m2ib_saliency
from mwm.localize.vision import vision_stages


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 4, "head_width": 32},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    return open_clip.CLIP(**cfg).eval().requires_grad_(False)


def test_stages_reproduce_encode_image(tiny_clip):
    st = vision_stages(tiny_clip.visual)
    x = torch.randn(3, 3, 32, 32)
    assert torch.allclose(st.head(st.run_blocks(st.embed(x), 0)), tiny_clip.encode_image(x), atol=1e-5)
    assert st.grid == (4, 4) and st.num_prefix_tokens == 1


def test_kl_matches_reference_formula():
    alpha = torch.randn(2, 5, 7, dtype=torch.float64) * 3  # float64: the reference's log(1 - λ) loses digits in fp32
    x = torch.randn(2, 5, 7, dtype=torch.float64)
    lam = torch.sigmoid(alpha)
    mu, var = lam * x, (1 - lam) ** 2
    ref = -0.5 * (1 + torch.log(var) - mu**2 - var)  # M2IB's _calc_capacity
    assert torch.allclose(_kl_std_normal(mu, alpha), ref, atol=1e-5)


@pytest.mark.parametrize("feature_norm", ["standardize", "none"])
def test_batched_equals_one_at_a_time(tiny_clip, feature_norm):
    st = vision_stages(tiny_clip.visual)
    x = torch.randn(4, 3, 32, 32)
    text = torch.randn(4, 32)
    cfg = M2IBConfig(layer=1, steps=3, noise_copies=4, feature_norm=feature_norm)
    keys = ["a.png", "b.png", "c.png", "d.png"]
    batched = m2ib_saliency(st, x, text, cfg, keys=keys, out_size=(16, 16))
    for i, k in enumerate(keys):
        one = m2ib_saliency(st, x[i:i + 1], text[i:i + 1], cfg, keys=[k], out_size=(16, 16))
        assert torch.allclose(batched.token_kl[i], one.token_kl[0], rtol=1e-4, atol=1e-4)
        assert torch.allclose(batched.saliency[i], one.saliency[0], atol=1e-4)
    # the noise is keyed by image, not by batch position: reordering the batch reorders the result
    rev = m2ib_saliency(st, x.flip(0), text.flip(0), cfg, keys=keys[::-1], out_size=(16, 16))
    assert torch.allclose(rev.token_kl.flip(0), batched.token_kl, rtol=1e-4, atol=1e-4)
    assert batched.saliency.shape == (4, 16, 16)
    assert torch.allclose(batched.saliency.amin((1, 2)), torch.zeros(4)) and torch.allclose(batched.saliency.amax((1, 2)), torch.ones(4))


def test_optimisation_moves_alpha_and_fit(tiny_clip):
    st = vision_stages(tiny_clip.visual)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        text = tiny_clip.encode_image(x)  # a "prompt" that matches the image exactly
    r1 = m2ib_saliency(st, x, text, M2IBConfig(layer=1, steps=1, noise_copies=2))
    r10 = m2ib_saliency(st, x, text, M2IBConfig(layer=1, steps=10, noise_copies=2))
    # more steps compress more: the KL (information kept) falls from its α=5 start
    assert (r10.kl < r1.kl).all()
    assert not any(p.grad is not None for p in tiny_clip.parameters())  # weights frozen, no weight grads


def test_seed_changes_noise_and_layer_bounds(tiny_clip):
    st = vision_stages(tiny_clip.visual)
    x, text = torch.randn(1, 3, 32, 32), torch.randn(1, 32)
    a = m2ib_saliency(st, x, text, M2IBConfig(layer=2, steps=3, noise_copies=2, seed=0)).token_kl
    b = m2ib_saliency(st, x, text, M2IBConfig(layer=2, steps=3, noise_copies=2, seed=1)).token_kl
    assert not torch.allclose(a, b)
    assert image_seed(0, "x") == image_seed(0, "x") != image_seed(1, "x")
    with pytest.raises(ValueError, match="outside the vision tower's 4 blocks"):
        m2ib_saliency(st, x, text, M2IBConfig(layer=4))


def _kl_at_init(st, x, cfg):
    """Per-patch KL at the initial α on the raw features (the reference's bottleneck, feature_norm none)."""
    with torch.no_grad():
        feats = st.run_blocks(st.embed(x), 0, cfg.layer + 1)
        alpha = torch.full_like(feats, cfg.alpha_init)
        kl = _kl_std_normal(torch.sigmoid(alpha) * feats, alpha).sum(-1)
    return kl[:, st.num_prefix_tokens:].reshape(x.shape[0], *st.grid)


def test_saliency_is_the_last_forward_pass_kl(tiny_clip):
    # The reference reads the capacity buffered in the last forward pass, before the final Adam step:
    # with one step, the map is the KL at the initial α (5), whatever the prompt and the noise.
    st = vision_stages(tiny_clip.visual)
    x, text = torch.randn(2, 3, 32, 32), torch.randn(2, 32)
    cfg = M2IBConfig(layer=1, steps=1, noise_copies=2, feature_norm="none")
    res = m2ib_saliency(st, x, text, cfg)
    assert torch.equal(res.token_kl, _kl_at_init(st, x, cfg))
    # with two steps the map is the KL after one step: it has moved from the initial one
    two = m2ib_saliency(st, x, text, cfg.model_copy(update={"steps": 2}))
    assert not torch.allclose(two.token_kl, res.token_kl, rtol=1e-3)


def _agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(smallest per-map Pearson correlation, largest mean |a − b|) over a batch of maps."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a0, b0 = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    r = (a0 * b0).sum(1) / (a0.norm(dim=1) * b0.norm(dim=1))
    return float(r.min()), float((a - b).abs().mean(1).max())


def test_bf16_autocast_agrees_with_fp32(tiny_clip, monkeypatch):
    import mwm.localize.m2ib as m2ib

    st = vision_stages(tiny_clip.visual)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        text = tiny_clip.encode_image(x.flip(-1))  # a prompt the images relate to, so the fit term matters
    cfg = M2IBConfig(layer=1, steps=5, noise_copies=4)
    fp32 = m2ib_saliency(st, x, text, cfg.model_copy(update={"autocast": False}))
    assert torch.equal(m2ib_saliency(st, x, text, cfg).saliency, fp32.saliency)  # CPU: autocast is a no-op
    monkeypatch.setattr(m2ib, "AUTOCAST_DEVICES", ("cuda", "cpu"))
    bf16 = m2ib_saliency(st, x, text, cfg)
    assert not torch.equal(bf16.saliency, fp32.saliency)  # it did run in bf16
    r, mad = _agreement(bf16.saliency, fp32.saliency)
    assert r > 0.999 and mad < 0.01, (r, mad)  # measured: r 0.99999, mean |Δ| 0.001
    assert torch.allclose(bf16.fit, fp32.fit, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_autocast_agrees_with_fp32_on_cuda(tiny_clip):
    import copy

    st = vision_stages(copy.deepcopy(tiny_clip).cuda().visual)
    x = torch.randn(3, 3, 32, 32, device="cuda")
    text = torch.randn(3, 32, device="cuda")
    cfg = M2IBConfig(layer=1, steps=5, noise_copies=4)
    fp32 = m2ib_saliency(st, x, text, cfg.model_copy(update={"autocast": False}))
    bf16 = m2ib_saliency(st, x, text, cfg)
    r, mad = _agreement(bf16.saliency, fp32.saliency)
    assert r > 0.999 and mad < 0.01, (r, mad)
