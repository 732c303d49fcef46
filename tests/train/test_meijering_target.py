"""``model.target: meijering`` — M&M reading (b): the masked patches are reconstructed as the image's Meijering
ridge map (1 channel, per-patch normalised like pixels) instead of its pixels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from mwm.mim import MAEConfig, SparKConfig, create_mim_model
from mwm.mim.loss import masked_mse, patchify
from mwm.train import PretrainConfig


def _keep(b: int, h: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(b, 1, h, h, generator=g) < 0.5
    keep[:, :, 0, 0], keep[:, :, -1, -1] = True, False  # both kinds in every image
    return keep


def _map(b: int, size: int) -> torch.Tensor:
    """A hand-made ridge map: bright lines on a dark background, (B, 1, S, S) in [0, 1]."""
    m = torch.zeros(b, 1, size, size)
    m[:, :, size // 3, :] = 1.0
    m[:, :, :, size // 2] = 0.6
    return m + 0.05 * torch.rand(b, 1, size, size, generator=torch.Generator().manual_seed(1))


class _Fixed(torch.nn.Module):
    """A decoder stand-in that returns a fixed prediction."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out

    def forward(self, *a, **k) -> torch.Tensor:
        return self.out


def _normalized(t: torch.Tensor, p: int) -> torch.Tensor:
    """What a perfect model predicts with norm_pix: each patch of t normalised by its own mean / std."""
    from mwm.mim.loss import _target_stats, unpatchify

    patches = patchify(t, p)
    mean, std = _target_stats(patches, 1e-6)
    return unpatchify((patches - mean) / std, p, (t.shape[-2] // p, t.shape[-1] // p), t.shape[1])


@pytest.mark.parametrize("norm_pix", [True, False])
def test_spark_loss_is_zero_when_the_prediction_is_the_map(norm_pix):
    torch.manual_seed(0)
    model = create_mim_model(SparKConfig(arch="resnet18", size=64, mask_stride=16, target="meijering",
                                         norm_pix=norm_pix)).eval()
    x, smap, keep = torch.rand(2, 3, 64, 64), _map(2, 64), _keep(2, 4)
    perfect = _normalized(smap, 16) if norm_pix else smap
    # garbage on the visible patches: only the masked ones count
    pred = torch.where(keep.repeat_interleave(16, 2).repeat_interleave(16, 3), torch.randn(2, 1, 64, 64), perfect)
    model.decoder = _Fixed(pred)
    assert model(x, keep, target=smap)["loss"].item() == pytest.approx(0.0, abs=1e-6)
    # the same prediction scored against the image (what target pixels would do) is far from 0
    assert masked_mse(x[:, :1], pred, keep, norm_pix).item() > 0.1
    with pytest.raises(ValueError, match="target="):  # a map-target model needs its map
        model(x, keep)


def test_the_decoder_predicts_one_channel_and_learns_the_map():
    torch.manual_seed(0)
    model = create_mim_model(SparKConfig(arch="resnet18", size=64, mask_stride=16, target="meijering"))
    x, smap, keep = torch.rand(2, 3, 64, 64), _map(2, 64), _keep(2, 4)
    out = model(x, keep, target=smap)
    assert out["pred"].shape == (2, 1, 64, 64)
    out["loss"].backward()  # the loss reaches the decoder through the map target
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.parameters())


def test_mae_loss_is_zero_when_the_prediction_is_the_map():
    torch.manual_seed(0)
    model = create_mim_model(MAEConfig(arch="vit_tiny_patch16_224", size=32, target="meijering")).eval()
    x, smap = torch.rand(2, 3, 32, 32), _map(2, 32)
    keep = torch.tensor([[True, False], [False, True]]).expand(2, 1, 2, 2).clone()
    model.decoder = _Fixed(patchify(_normalized(smap, 16), 16))
    out = model(x, keep, n_visible=2, target=smap)
    assert out["pred"].shape == (2, 1, 32, 32) and out["loss"].item() == pytest.approx(0.0, abs=1e-6)


def test_config_dump_names_the_target_only_when_set():
    """The default is left out (the pinned SparK/MAE dumps: tests/train/test_pinned_config.py); a set target is in
    the dump (so the bench tells the arms apart) and round-trips."""
    assert "target" not in SparKConfig().model_dump() and "target" not in MAEConfig().model_dump()
    cfg = PretrainConfig(data="x.npz", out="run", rois="maps/rois.jsonl",
                         model={"arch": "resnet18", "size": 64, "target": "meijering"})
    model = cfg.model_dump(mode="json")["model"]
    assert list(model)[-1] == "target" and model["target"] == "meijering"
    assert PretrainConfig.model_validate(cfg.model_dump(mode="json")).model.target == "meijering"
    with pytest.raises(ValidationError, match="mwm importance meijering"):  # no maps to reconstruct
        PretrainConfig(data="x.npz", out="run", model={"arch": "resnet18", "size": 64, "target": "meijering"})
    with pytest.raises(ValidationError, match="target"):
        PretrainConfig(data="x.npz", out="run", model={"arch": "resnet18", "target": "frangi"})


def test_pretraining_reconstructs_the_manifest_maps(tmp_path, monkeypatch):
    """One step with random masking on a `mwm importance meijering` manifest: the model is handed the (cropped)
    map of each image as its target, not the image; no reconstruction pictures are drawn."""
    from mwm.data.synthetic import PhantomConfig, generate
    from mwm.importance.meijering import write_meijering_manifest
    from mwm.mim.spark import SparK
    from mwm.train import pretrain

    data = tmp_path / "ph.npz"
    generate(PhantomConfig(n=4, size=64, seed=3)).save_npz(data)
    manifest = Path(write_meijering_manifest(data, tmp_path / "maps", sigmas=(1, 2), size=64, split="all")["manifest"])
    seen = []
    real = SparK.forward

    def spy(self, x, keep, target=None):
        seen.append((x.detach().clone(), target))
        return real(self, x, keep, target)

    monkeypatch.setattr(SparK, "forward", spy)
    s = pretrain(PretrainConfig(data=data, out=tmp_path / "run", rois=manifest, split="all", accelerator="cpu",
                                workers=0, batch_size=4, limit=4, epochs=1, warmup_epochs=0, recon_images=2,
                                recon_every=1, model={"arch": "resnet18", "size": 64, "mask_stride": 16,
                                                      "target": "meijering"},
                                masking={"strategy": "random", "ratio": 0.5}))
    x, target = seen[0]
    assert target is not None and target.shape == (4, 1, 64, 64)
    assert 0 <= target.min() and target.max() <= 1 and target.max() > 0.5  # the maps, min-max normalised
    assert not torch.allclose(target[:, 0], x[:, 0])  # not the (normalised) image
    assert s["recon"] == [] and s["saliency_stats"]["with_saliency"] == 4
    assert json.loads((tmp_path / "run" / "encoder.json").read_text())["arch"] == "resnet18"
