"""AttMask on MAE: the most (least) attended tokens are masked, AttMask-Hint reveals exactly the stated number of the
top tokens, the [CLS] attention equals timm's own attention matrix (fused attention on), the EMA teacher's attention
picks the student's mask with equal visible counts, and the schedules / config checks. (The bench arm runs in
tests/train/test_hpm_mae.py; the registry contract in tests/train/test_method_contract.py.)"""

from __future__ import annotations

import pytest
import torch

from mwm.train import PretrainConfig
from mwm.train.methods.attmask import (
    AttMaskMethod,
    attmask_keep,
    cls_attention,
    hint_counts,
    teacher_cls_attention,
)

from .helpers import prepared_method

TINY_VIT = {"arch": "vit_tiny_patch16_224", "size": 32, "patch_size": 8}  # 4 × 4 tokens


def _hand_map(B: int = 8) -> torch.Tensor:
    """(B, 8, 8) attention with distinct values: a random permutation of 0..63 per image."""
    g = torch.Generator().manual_seed(0)
    return torch.stack([torch.randperm(64, generator=g) for _ in range(B)]).float().div(64).view(B, 8, 8)


def test_high_masks_the_most_attended_and_low_the_least():
    att = _hand_map()
    order = att.flatten(1).argsort(1, descending=True)
    for mode, idx in (("high", order[:, :48]), ("low", order[:, 16:])):
        masked = ~attmask_keep(att, 0.75, mode, generator=torch.Generator().manual_seed(1)).flatten(1)
        assert (masked.sum(1) == 48).all()
        expect = torch.zeros_like(masked).scatter_(1, idx, True)
        assert torch.equal(masked, expect), mode


def test_hint_reveals_exactly_the_stated_number_of_top_tokens():
    """Official counts (attmask.py show_hints; main_attmask.py passes show_max·r): of 64 tokens at r = 0.75, 48 are
    masked as High; int(64·0.25) = 16 are the top, int(0.25·0.75·64) = 12 of them drawn uniformly are revealed; the
    other masked tokens stay masked."""
    att = _hand_map(32)
    assert hint_counts(64, 0.75, 0.25) == (16, 12)
    assert hint_counts(196, 0.5, 0.1) == (19, 9)  # ViT-B/16 at 224, the paper's setting
    masked = ~attmask_keep(att, 0.75, "hint", show_max=0.25, generator=torch.Generator().manual_seed(2)).flatten(1)
    order = att.flatten(1).argsort(1, descending=True)
    top, rest_masked, unmasked = order[:, :16], order[:, 16:48], order[:, 48:]
    assert (masked.sum(1) == 48 - 12).all()
    assert (~masked.gather(1, top)).sum(1).eq(12).all()  # exactly 12 revealed, all from the top 16
    assert masked.gather(1, rest_masked).all() and not masked.gather(1, unmasked).any()
    # the revealed ones are drawn at random: they differ between images / draws (a fixed rule would not)
    revealed = ~masked.gather(1, top)
    assert len({tuple(r.tolist()) for r in revealed}) > 1
    # show_ratio sets the revealed share of the masked tokens separately: int(0.1·0.75·64) = 4
    m2 = ~attmask_keep(att, 0.75, "hint", show_max=0.25, show_ratio=0.1,
                       generator=torch.Generator().manual_seed(3)).flatten(1)
    assert (m2.sum(1) == 44).all() and (~m2.gather(1, top)).sum(1).eq(4).all()
    with pytest.raises(ValueError, match="must all be masked"):
        attmask_keep(att, 0.2, "hint", show_max=0.5)


def test_ties_are_broken_at_random_with_exact_counts():
    """A constant map (every token tied) still masks exactly M per image, in varying places."""
    masked = ~attmask_keep(torch.full((16, 4, 4), 0.5), 0.75, generator=torch.Generator().manual_seed(4)).flatten(1)
    assert (masked.sum(1) == 12).all() and len({tuple(r.tolist()) for r in masked}) > 1


@pytest.fixture(scope="module")
def attm(tmp_path_factory):
    cfg = PretrainConfig(data="unused.npz", out=tmp_path_factory.mktemp("attmask") / "r", epochs=5,
                         model={"method": "attmask", **TINY_VIT, "decoder_dim": 64, "decoder_depth": 1,
                                "mode": "hint", "show_max": 0.25},
                         masking={"strategy": "random", "ratio": 0.75})
    return prepared_method(cfg)


def test_cls_attention_equals_timms_attention_matrix(attm):
    """With fused attention on (no weights to read), the extracted map equals the [CLS] row of the last block's
    softmax(q kᵀ·scale) as timm's own unfused path computes it (captured at its attn_drop), averaged over heads, over
    the patch columns; and a manual einsum from the block's input."""
    enc = attm.teacher.module.encoder
    attn = enc.model.blocks[-1].attn
    assert attn.fused_attn  # the path that returns no attention weights
    x = attm.normalize(torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(5)))
    with torch.no_grad():
        ours = teacher_cls_attention(enc, x)
        captured = {}
        h1 = attn.attn_drop.register_forward_hook(lambda m, a, out: captured.__setitem__("attn", out))
        h2 = attn.register_forward_pre_hook(lambda m, a: captured.__setitem__("x", a[0]))
        attn.fused_attn = False
        try:
            enc(x)
        finally:
            attn.fused_attn = True
            h1.remove()
            h2.remove()
    P = enc.num_prefix_tokens
    timm_map = captured["attn"][:, :, 0, P:].mean(1).view(3, 4, 4)
    assert ours.shape == (3, 4, 4) and torch.allclose(ours, timm_map, atol=1e-6)
    # by hand: q_cls·kᵀ/√d, softmax over every token (class included), patch columns, mean over heads
    xin = captured["x"]
    H, d = attn.num_heads, attn.head_dim
    q, k, _ = attn.qkv(xin).view(3, -1, 3, H, d).unbind(2)
    logits = torch.einsum("bhd,blhd->bhl", q[:, 0], k) / d ** 0.5
    hand = logits.softmax(-1)[:, :, P:].mean(1)
    assert torch.allclose(cls_attention(attn, xin, P), hand, atol=1e-6)
    assert torch.allclose(ours.flatten(1), hand, atol=1e-6)
    assert (ours.flatten(1).sum(1) < 1).all()  # the class column is left out, not renormalised


def test_student_masks_the_teachers_most_attended(attm):
    """views(): the teacher's [CLS] attention on the whole image → High masking (12 of 16) minus 3 hints from the top
    4; every image keeps 4 + 3 = 7 tokens, the count MAE's gather is given."""
    assert isinstance(attm, AttMaskMethod) and attm.grid == (4, 4) and attm.n_mask == 12 and attm.n_reveal == 3
    assert attm.forward_kwargs() == {"n_visible": 7}
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        att = attm.teacher_attention(attm.normalize(x))
    views = attm.views((x, None, None))
    masked = ~views.keep.flatten(1)
    order = att.flatten(1).argsort(1, descending=True)
    assert (masked.sum(1) == 9).all()
    assert (~masked.gather(1, order[:, :4])).sum(1).eq(3).all()
    assert masked.gather(1, order[:, 4:12]).all() and not masked.gather(1, order[:, 12:]).any()
    loss, logs = attm.training_step(views)
    assert torch.isfinite(loss) and logs["mask_ratio"].item() == pytest.approx(9 / 16)


def test_teacher_decay_ramps_over_the_run_and_is_checkpointed(attm):
    """0.996 → 0.9999 linearly over the 5 epochs (iBOT's momentum start; the ramp is per epoch)."""
    decays = []
    for t in range(5):
        attm.on_epoch_start(t)
        decays.append(attm.teacher.decay)
    assert decays == pytest.approx([0.996 + t / 5 * (0.9999 - 0.996) for t in range(5)])
    state = {k: ({n: t.clone() for n, t in v.items()} if isinstance(v, dict) else v)
             for k, v in attm.state_dict().items()}  # (the live tensors, copied)
    assert set(state) >= {"model", "ema", "teacher"}
    w = attm.teacher.module.encoder.model.blocks[-1].attn.qkv.weight
    before = w.detach().clone()
    with torch.no_grad():
        w.add_(1.0)
    attm.load_state_dict(state)
    assert torch.equal(attm.teacher.module.encoder.model.blocks[-1].attn.qkv.weight, before)


def test_config_checks():
    base = dict(data="x.npz", out="r", masking={"strategy": "random", "ratio": 0.3})
    with pytest.raises(ValueError, match="show_max"):
        PretrainConfig(**base, model={"method": "attmask", **TINY_VIT, "mode": "hint", "show_max": 0.5})
    PretrainConfig(**base, model={"method": "attmask", **TINY_VIT, "mode": "high", "show_max": 0.5})  # unused
    with pytest.raises(ValueError, match="draws its own masks"):
        PretrainConfig(data="x.npz", out="r", model={"method": "attmask", **TINY_VIT},
                       masking={"strategy": "topk", "ratio": 0.5}, rois="x.jsonl")
