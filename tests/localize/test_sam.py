"""SAM refinement with random-weight models of the real architectures (transformers SamModel, segment-anything Sam)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch

from mwm.localize.sam import (Refined, SamError, SamRefiner, SegmentAnythingRefiner, TransformersSamRefiner,
                              load_sam)

H = W = 64
BOXES = torch.tensor([[4.0, 6.0, 20.0, 30.0], [30.0, 10.0, 60.0, 44.0], [8.0, 40.0, 24.0, 60.0]])


@pytest.fixture(scope="module")
def tiny_hf_sam(tmp_path_factory) -> Path:
    """A transformers SAM (ViT 32-d, 2 layers, 64-px input) with random weights, saved with its processor."""
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    cfg = SamConfig(
        vision_config=dict(hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=16, window_size=2, global_attn_indexes=[1], num_pos_feats=16,
                           mlp_dim=64),
        prompt_encoder_config=dict(hidden_size=32, image_size=64, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32))
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny-sam-hf")
    SamModel(cfg).save_pretrained(d)
    SamProcessor(SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64},
                                   mask_size={"longest_edge": 16}, mask_pad_size={"height": 16, "width": 16})
                 ).save_pretrained(d)
    return d


def _image():
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, H, W, generator=g)


def _count_calls(module: torch.nn.Module, post=None) -> list:
    """Wrap module.forward; ``post(out)`` may edit the output. Returns the list that records each call."""
    calls = []
    orig = module.forward

    def forward(*a, **k):
        calls.append(k.get("input_boxes", a[1] if len(a) > 1 else None))
        out = orig(*a, **k)
        return post(out) if post else out

    module.forward = forward
    return calls


def test_transformers_sam_one_call_for_all_boxes(tiny_hf_sam):
    sam = load_sam(str(tiny_hf_sam))
    assert isinstance(sam, TransformersSamRefiner) and isinstance(sam, SamRefiner)
    calls = _count_calls(sam.model)
    res = sam.refine(_image(), BOXES)
    assert isinstance(res, Refined)
    mask, note = res  # unpacks as (mask, note)
    assert len(calls) == 1 and calls[0].shape == (1, 3, 4)  # one forward pass with all K = 3 box prompts
    assert mask.shape == (H, W) and mask.dtype == torch.bool
    assert res.per_box.shape == (3, H, W)
    assert torch.equal(mask, res.per_box.any(0))
    assert set(res.box_status) <= {"sam", "component", "box"}
    # gray inputs are accepted and give the same answer as their RGB expansion
    gray = _image()[:1]
    assert torch.equal(sam.refine(gray, BOXES).mask, sam.refine(gray.expand(3, -1, -1), BOXES).mask)
    assert sam.refine(gray[0], BOXES[:1]).mask.shape == (H, W)


def test_transformers_sam_empty_mask_keeps_component(tiny_hf_sam):
    sam = load_sam(tiny_hf_sam)

    def kill_box_1(out):
        out.pred_masks[:, 1] = -100.0  # SAM "finds nothing" for the second box
        out.pred_masks[:, [0, 2]] = 100.0  # and everything for the others
        return out

    _count_calls(sam.model, post=kill_box_1)
    comps = torch.zeros(3, H, W, dtype=torch.bool)
    comps[1, 20:30, 40:50] = True
    res = sam.refine(_image(), BOXES, fallback=comps)
    assert res.box_status == ["sam", "component", "sam"]
    assert torch.equal(res.per_box[1], comps[1])
    assert res.per_box[0].all() and res.mask.all()
    assert "box 1 of 3" in res.note and "component" in res.note
    # without components, the box itself stands in
    res = sam.refine(_image(), BOXES)
    assert res.box_status[1] == "box"
    exp = torch.zeros(H, W, dtype=torch.bool)
    exp[10:44, 30:60] = True
    assert torch.equal(res.per_box[1], exp)


def test_no_boxes_no_call(tiny_hf_sam):
    sam = load_sam(tiny_hf_sam)
    calls = _count_calls(sam.model)
    res = sam.refine(_image(), torch.zeros(0, 4))
    assert not calls and res.mask.shape == (H, W) and not res.mask.any() and res.note == "no_boxes"


# -- segment-anything ------------------------------------------------------------------------------
def _tiny_segment_anything(checkpoint=None, embed=32):
    """segment-anything's own Sam classes at 64 px with a 32-d ViT: the vit_b code path in a fraction of the time."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    sam = Sam(
        image_encoder=ImageEncoderViT(img_size=64, patch_size=16, embed_dim=embed, depth=2, num_heads=2, mlp_ratio=2,
                                      out_chans=32, qkv_bias=True, use_rel_pos=True, window_size=2,
                                      global_attn_indexes=(1,), norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)),
        prompt_encoder=PromptEncoder(embed_dim=32, image_embedding_size=(4, 4), input_image_size=(64, 64),
                                     mask_in_chans=4),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=32, iou_head_depth=2, iou_head_hidden_dim=32,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=64, num_heads=2)),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    if checkpoint is not None:
        sam.load_state_dict(torch.load(checkpoint))
    return sam.eval()


@pytest.fixture
def tiny_sa_checkpoint(tmp_path, monkeypatch) -> Path:
    from segment_anything import sam_model_registry

    monkeypatch.setitem(sam_model_registry, "tiny", _tiny_segment_anything)
    monkeypatch.setitem(sam_model_registry, "tiny_wide", partial(_tiny_segment_anything, embed=48))
    torch.manual_seed(0)
    path = tmp_path / "sam_tiny.pth"
    torch.save(_tiny_segment_anything().state_dict(), path)
    return path


def test_segment_anything_one_call_for_all_boxes(tiny_sa_checkpoint):
    sam = load_sam(tiny_sa_checkpoint, sam_type="tiny")
    assert isinstance(sam, SegmentAnythingRefiner)
    enc, dec = _count_calls(sam.model.image_encoder), _count_calls(sam.model.mask_decoder)
    res = sam.refine(_image(), BOXES)
    assert len(enc) == 1 and len(dec) == 1  # the image encoded once, the K boxes decoded as one batch
    assert res.mask.shape == (H, W) and res.mask.dtype == torch.bool and res.per_box.shape == (3, H, W)


def test_segment_anything_errors(tiny_sa_checkpoint, tmp_path):
    with pytest.raises(SamError, match="unknown SAM type 'vit_x'.*vit_b"):
        load_sam(tiny_sa_checkpoint, sam_type="vit_x")
    with pytest.raises(SamError, match="does not fit SAM type tiny_wide"):
        load_sam(tiny_sa_checkpoint, sam_type="tiny_wide")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(SamError, match="cannot read the SAM checkpoint"):
        load_sam(junk, sam_type="tiny")


def test_missing_checkpoint_and_offline_hub(tmp_path):
    assert load_sam(None) is None and load_sam("") is None
    missing = tmp_path / "weights" / "sam_vit_b_01ec64.pth"
    with pytest.raises(SamError) as e:
        load_sam(str(missing))
    msg = str(e.value)
    assert str(missing) in msg and "--sam-checkpoint PATH --sam-type vit_b|vit_l|vit_h" in msg
    with pytest.raises(SamError, match="offline|not found"):
        load_sam("mwm-tests/no-such-sam-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SamError, match="without config.json"):
        load_sam(tmp_path / "empty")
