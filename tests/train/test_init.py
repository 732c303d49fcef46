"""`mwm pretrain --init` (issue 10 B): the encoder starts from a timm checkpoint (.pth / .safetensors), an earlier
run's encoder.pth (continued pretraining) or timm's ImageNet weights; keys are checked strictly, the source and a
hash are recorded, a resume never re-reads the init. Plus the shared weight reader of mwm.weights
(wrapped state dicts, Detectron2 checkpoints)."""

from __future__ import annotations

import hashlib
import json

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from mwm.cli import app
from mwm.errors import MWMError
from mwm.mim import create_mim_model, to_detectron2
from mwm.train import PretrainConfig, pretrain
from mwm.train.export import timm_kwargs
from mwm.train.init import apply_init
from mwm.weights import create_backbone, read_state_dict, resolve_init, resolve_weights

from .conftest import small_pretrain

runner = CliRunner()


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def timm_files(tmp_path_factory):
    """A resnet18 with seeded random weights saved as timm would (classifier included): .pth and .safetensors."""
    d = tmp_path_factory.mktemp("timm_ckpt")
    torch.manual_seed(3)
    sd = timm.create_model("resnet18", pretrained=False).state_dict()
    torch.save(sd, d / "resnet18.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "resnet18.safetensors"))
    return {"sd": sd, "pth": d / "resnet18.pth", "safetensors": d / "resnet18.safetensors"}


@pytest.mark.parametrize("kind", ["pth", "safetensors"])
def test_init_sets_the_encoder_to_the_file_exactly(timm_files, kind, tiny_npz, tmp_path):
    cfg = small_pretrain(tiny_npz, tmp_path, init=str(timm_files[kind]))
    model = create_mim_model(cfg.model)
    rec = apply_init(model, resolve_init(cfg.init, cfg.arch, timm_kwargs(model)))
    enc, want = model.encoder_state_dict(), timm_files["sd"]
    assert set(enc) == set(want) - {"fc.weight", "fc.bias"}
    assert all(torch.equal(enc[k], want[k]) for k in enc)
    assert rec["sha256"] == sha256(timm_files[kind]) and rec["source"] == str(timm_files[kind])
    assert rec["skipped"] == [] and rec["tensors"] == len(model.encoder.model.state_dict())


def test_init_of_another_arch_is_a_clear_error(timm_files, tiny_npz, tmp_path):
    cfg = small_pretrain(tiny_npz, tmp_path / "r34", model={"arch": "resnet34", "size": 64}, init=str(timm_files["pth"]))
    with pytest.raises(MWMError, match=r"does not fit timm 'resnet34'.*different --arch"):
        pretrain(cfg)
    assert not (tmp_path / "r34" / "checkpoints").exists()
    with pytest.raises(MWMError, match="--init .*nope.pth: no weights there"):
        resolve_init(str(tmp_path / "nope.pth"), "resnet18", {})
    with pytest.raises(MWMError, match="sha256"):  # a config.yaml pins its init
        resolve_init(str(timm_files["pth"]), "resnet18", {}, expect_sha256="0" * 64)


def test_cli_init_records_source_and_hash_and_resume_does_not_reload(timm_files, tiny_npz, tmp_path):
    init = tmp_path / "w.safetensors"
    init.write_bytes(timm_files["safetensors"].read_bytes())
    out = tmp_path / "run"
    args = ["pretrain", str(tiny_npz), "--out", str(out), "--arch", "resnet18", "--size", "64", "--epochs", "2",
            "--batch-size", "4", "--limit", "4", "--accelerator", "cpu", "--workers", "0", "--optimizer", "adamw",
            "--lr", "1e-9", "--weight-decay", "0", "--warmup-epochs", "0", "--recon-every", "0", "--init", str(init)]
    cfg = PretrainConfig(data=tiny_npz, out=out, model={"arch": "resnet18", "size": 64}, epochs=2, batch_size=4,
                         limit=4, accelerator="cpu", workers=0, optimizer="adamw", lr=1e-9, weight_decay=0,
                         warmup_epochs=0, recon_every=0, init=str(init))
    first = pretrain(cfg, stop_at_epoch=1)  # as if the job were killed after epoch 1
    assert first["init"]["sha256"] == sha256(init) and first["init"]["source"] == str(init)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["init"] == str(init) and saved["init_sha256"] == sha256(init)
    enc = torch.load(out / "encoder.pth", weights_only=True)
    assert torch.allclose(enc["layer3.0.conv1.weight"], timm_files["sd"]["layer3.0.conv1.weight"], atol=1e-6)
    init.unlink()  # resuming must not read the init again: the checkpoint's weights win
    r = runner.invoke(app, [*args, "--resume", "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["resumed_from_epoch"] == 1 and s["init"]["sha256"] == first["init"]["sha256"]
    assert yaml.safe_load((out / "config.yaml").read_text())["init_sha256"] == first["init"]["sha256"]


def test_continued_pretraining_from_a_run_encoder(tiny_npz, tmp_path):
    a = pretrain(small_pretrain(tiny_npz, tmp_path / "a", lr=1e-2, optimizer="adamw"))
    before = torch.load(a["encoder"], weights_only=True)
    b = pretrain(small_pretrain(tiny_npz, tmp_path / "b", init=str(tmp_path / "a"), lr=1e-9, optimizer="adamw",
                       weight_decay=0, seed=7))
    assert b["init"]["source"] == str(tmp_path / "a" / "encoder.pth")
    after = torch.load(b["encoder"], weights_only=True)
    assert torch.allclose(after["layer4.1.conv2.weight"], before["layer4.1.conv2.weight"], atol=1e-6)
    # the run's encoder.json names its arch: another --arch is refused before anything is built
    with pytest.raises(MWMError, match="holds a 'resnet18' encoder .* --arch is 'resnet34'"):
        resolve_init(str(tmp_path / "a"), "resnet34", {})


def test_init_imagenet_offline_names_what_to_download(tiny_npz, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))  # nothing cached either
    with pytest.raises(MWMError) as e:
        pretrain(small_pretrain(tiny_npz, tmp_path / "run", init="imagenet"))
    msg = str(e.value)
    assert "--init imagenet" in msg and "timm/resnet18" in msg and "model.safetensors" in msg
    assert "--init /path/to/model.safetensors" in msg


def test_init_of_the_mae_vit_encoder(tmp_path):
    """A timm ViT checkpoint at 224 px initialises the MAE encoder at 32 px: every tensor but the position
    embedding equal; pos_embed resampled by timm's filter (learned) or skipped with a note (fixed sin-cos)."""
    torch.manual_seed(4)
    sd = timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict()
    torch.save({"model": sd, "epoch": 3}, tmp_path / "deit_style.pth")  # a DeiT/MAE-style wrapped checkpoint
    model = create_mim_model({"method": "mae", "arch": "vit_tiny_patch16_224", "size": 32})
    rec = apply_init(model, resolve_init(str(tmp_path / "deit_style.pth"), "vit_tiny_patch16_224",
                                         timm_kwargs(model)))
    enc = model.encoder_state_dict()
    assert all(torch.equal(enc[k], sd[k]) for k in enc if k != "pos_embed")
    pe = model.encoder.model.pos_embed
    assert pe.shape[1] == 1 + 4
    assert rec["skipped"] == [] or rec["skipped"][0].startswith("pos_embed")


# -- the shared weight reader (mwm.weights) ------------------------------------------------------------

def test_wrapped_timm_state_dict_is_unwrapped_not_called_detectron2(timm_files, tmp_path):
    sd = timm_files["sd"]
    torch.save({"model": sd}, tmp_path / "wrapped.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 1}, tmp_path / "ddp.pth")
    for name in ("wrapped.pth", "ddp.pth"):
        spec = resolve_weights(tmp_path / name, "resnet18")
        model = create_backbone(spec)
        assert torch.equal(model.state_dict()["layer1.0.conv1.weight"], sd["layer1.0.conv1.weight"])
    torch.save({"model": to_detectron2(sd), "__author__": "mwm", "matching_heuristics": True}, tmp_path / "d2.pth")
    torch.save({"model": to_detectron2(sd)}, tmp_path / "d2_bare.pth")
    for name in ("d2.pth", "d2_bare.pth"):
        with pytest.raises(MWMError, match="is a Detectron2 checkpoint"):
            read_state_dict(tmp_path / name)
    torch.save({"model": {"blocks.0.weight": torch.zeros(2)}}, tmp_path / "other.pth")
    with pytest.raises(MWMError, match="does not fit timm 'resnet18'"):
        create_backbone(resolve_weights(tmp_path / "other.pth", "resnet18"))
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "nothing.pth")
    with pytest.raises(MWMError, match="no state dict inside"):
        read_state_dict(tmp_path / "nothing.pth")
