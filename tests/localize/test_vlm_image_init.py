"""`mwm vlm train --image-init`: timm weights into a VLM's timm image tower (BiomedCLIP-shaped), checked strictly."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import save_file

from mwm.errors import MWMError
from mwm.localize.vlm import build_biomedclip_like, load_vlm
from mwm.localize.vlm_train import TinyClipConfig, VLMTrainConfig, apply_image_init, train_vlm

ARCH = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory):
    """A BiomedCLIP-shaped VLM folder with a small timm ViT tower and a 1-layer BERT."""
    return build_biomedclip_like(tmp_path_factory.mktemp("vlm") / "clip", text_layers=1, text_width=32, vision=ARCH)


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory):
    torch.manual_seed(123)
    sd = timm.create_model(ARCH, pretrained=False).state_dict()
    path = tmp_path_factory.mktemp("w") / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path, sd


def test_image_init_loads_the_tower_exactly(tower_dir, vit_file):
    path, sd = vit_file
    vlm = load_vlm(tower_dir)
    before = {k: v.clone() for k, v in vlm.model.visual.trunk.state_dict().items()}
    rec = apply_image_init(vlm.model, vlm.model_cfg, str(path))
    after = vlm.model.visual.trunk.state_dict()
    assert rec["tensors"] == len(after) and rec["sha256"] and rec["unused"] == []
    for k, v in after.items():
        assert torch.equal(v, sd[k]), k  # every tower tensor is the file's
    assert not torch.equal(before["blocks.0.attn.qkv.weight"], after["blocks.0.attn.qkv.weight"])
    assert apply_image_init(vlm.model, vlm.model_cfg, "none") is None


def test_image_init_errors(tower_dir, tmp_path):
    vlm = load_vlm(tower_dir)
    other = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), other)
    with pytest.raises(MWMError, match="does not fit"):
        apply_image_init(vlm.model, vlm.model_cfg, str(other))
    import open_clip

    tiny_cfg = TinyClipConfig(width=32, heads=1, layers=1, text_width=32, text_heads=1, text_layers=1,
                              embed_dim=16).model_cfg(32)
    with pytest.raises(MWMError, match="not a timm model"):
        apply_image_init(open_clip.CLIP(**tiny_cfg), tiny_cfg, str(other))


def test_vlm_train_with_image_init_records_it(tower_dir, vit_file, phantoms_npz, tmp_path):
    path, _ = vit_file
    cfg = VLMTrainConfig(data=phantoms_npz, out=tmp_path / "ft", init=str(tower_dir), image_init=str(path),
                         epochs=1, batch_size=16, eval_size=8)
    m = train_vlm(cfg, progress=False)
    assert m["image_init"]["source"] == str(path) and len(m["image_init"]["sha256"]) == 64
    assert json.loads((tmp_path / "ft" / "metrics.json").read_text())["image_init"] == m["image_init"]
    # resuming does not read the init again: the checkpoint holds the tower
    path.rename(path.with_suffix(".moved"))
    try:
        m2 = train_vlm(cfg.model_copy(update={"epochs": 1}), resume=True, progress=False)
        assert "image_init" not in m2
    finally:
        path.with_suffix(".moved").rename(path)
