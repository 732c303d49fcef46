"""Contract tests over the pretraining-method registry (as timm's tests run over ``list_models()``): every registered
method trains a step, resumes exactly (2 steps == 1 step, stop, resume, 1 step: weights, EMA, metrics) and exports
an encoder that the transfer loader (``mwm.weights``) puts into a timm model with only the classifier missing.

The toy below — a denoising autoencoder with no mask (Gaussian noise on the input, reconstruct the clean image
with a tiny conv decoder) — is a whole new method in one class plus ``register_method``: it runs the same tests,
and ``mwm pretrain`` trains it with no other change (no keep-mask, no pictures).
"""

from __future__ import annotations

import ast
import math
from pathlib import Path
from typing import Literal

import pytest
import timm
import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError
from torch import nn

from mwm.train import PretrainConfig, pretrain
from mwm.train.checkpoint import checkpoint_path, load_checkpoint
from mwm.train.methods import MethodConfig, PretrainMethod, method_names, register_method
from mwm.train.metrics import TIMING, read_metrics
from mwm.train.summary import PretrainSummary, read_summary


# -- the toy method: one config class, one model, one PretrainMethod, one registration -------------------------------
class DenoiseConfig(MethodConfig):
    method: Literal["denoise"] = "denoise"
    noise: float = Field(default=0.2, gt=0, description="std of the Gaussian noise added to the [0, 1] input")


class DenoisingAutoencoder(nn.Module):
    """A timm encoder (exported as is) and a 1×1 conv + upsample + 3×3 conv decoder back to the image."""

    def __init__(self, cfg: DenoiseConfig):
        super().__init__()
        self.encoder = timm.create_model(cfg.arch, pretrained=cfg.pretrained, num_classes=0, in_chans=cfg.in_chans)
        self.decoder = nn.Sequential(nn.Conv2d(self.encoder.num_features, 16, 1), nn.GELU(),
                                     nn.Upsample(size=(cfg.size, cfg.size)), nn.Conv2d(16, cfg.in_chans, 3, padding=1))

    def forward(self, noisy: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.decoder(self.encoder.forward_features(noisy)), clean)


class DenoiseMethod(PretrainMethod):
    """Denoising autoencoder: no mask; the noise is drawn from this rank's generator (so resume is exact)."""

    def __init__(self, cfg: PretrainConfig):
        super().__init__(cfg, DenoisingAutoencoder(cfg.model))

    def views(self, batch):
        x = batch[0]
        noise = torch.randn(x.shape, generator=self.ctx.generator, device=x.device) * self.cfg.model.noise
        return self.normalize(x + noise), self.normalize(x)

    def training_step(self, views):
        noisy, clean = views
        loss = self.net(noisy, clean)
        return loss, {"input_error": (noisy - clean).pow(2).mean().detach()}

    def encoder(self) -> nn.Module:
        return super().encoder().encoder  # the timm model: its state_dict is in timm's names


register_method("denoise", DenoiseConfig, DenoiseMethod, help="toy denoising autoencoder (tests)")

# -- the contract, for every registered method ----------------------------------------------------------------------
# a tiny model per method; a method not listed runs timm's test_resnet (0.4 M parameters: small checkpoints) at 64 px
TINY = {"spark": {"arch": "test_resnet", "size": 64}, "mae": {"arch": "vit_tiny_patch16_224", "size": 32},
        # the guided MAE methods on 4 × 4 tokens (8-px patches): a ranking / attention map worth the name
        "hpm_mae": {"arch": "vit_tiny_patch16_224", "size": 32, "patch_size": 8, "decoder_dim": 64},
        "attmask": {"arch": "vit_tiny_patch16_224", "size": 32, "patch_size": 8, "decoder_dim": 64, "mode": "hint"}}
NAMES = method_names()
_RUNS: dict[str, tuple] = {}


def _config(npz, out, name: str, **kw) -> PretrainConfig:
    base = dict(data=npz, out=out, model={"method": name, **TINY.get(name, {"arch": "test_resnet", "size": 64})},
                accelerator="cpu", workers=0, batch_size=2, limit=2, epochs=2, warmup_epochs=1, ema=0.5, lr=1e-3,
                optimizer="adamw", log_every=1, recon_images=1, recon_every=1,
                masking={"strategy": "random", "ratio": 0.75})
    return PretrainConfig(**{**base, **kw})


def _runs(name: str, npz, tmp_path_factory) -> tuple:
    """(straight config, its summary, resumed config, summary after 1 epoch, summary after the resume), cached."""
    if name not in _RUNS:
        root = tmp_path_factory.mktemp(f"contract_{name}")
        a, b = _config(npz, root / "straight", name), _config(npz, root / "resumed", name)
        sa = pretrain(a)
        first = pretrain(b, stop_at_epoch=1)
        _RUNS[name] = (a, sa, b, first, pretrain(b.model_copy(update={"resume": True})))
    return _RUNS[name]


@pytest.fixture(scope="module", params=NAMES)
def runs(request, tiny_npz, tmp_path_factory):
    return request.param, *_runs(request.param, tiny_npz, tmp_path_factory)


def test_the_toy_is_registered():
    assert {"spark", "mae", "denoise"} <= set(NAMES)


def test_a_step_trains(runs):
    name, a, sa, b, first, sb = runs
    assert first["steps"] == 1 and first["epochs_done"] == 1 and math.isfinite(first["first_loss"])
    rows = read_metrics(sa["metrics"])
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["lr"] > 0  # (MAE's warmup starts at 0)
    assert list(sa) == list(PretrainSummary.model_fields)  # summary.json's keys, in order
    assert read_summary(a.out).steps == 2


def test_resume_equals_uninterrupted(runs):
    name, a, sa, b, first, sb = runs
    assert sb["resumed_from_epoch"] == 1 and sb["steps"] == sa["steps"] == 2
    ca, cb = load_checkpoint(checkpoint_path(a.out)), load_checkpoint(checkpoint_path(b.out))
    for part in ("model", "ema"):
        assert ca[part].keys() == cb[part].keys()
        bad = [k for k in ca[part] if not torch.equal(ca[part][k], cb[part][k])]
        assert not bad, f"{name}: {part} differs after resume: {bad[:5]}"
    assert torch.equal(ca["rng"][0]["mask"], cb["rng"][0]["mask"])
    strip = [[{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(s["metrics"])] for s in (sa, sb)]
    assert strip[0] == strip[1]
    ea, eb = (torch.load(s["encoder"], weights_only=True) for s in (sa, sb))
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)


def test_encoder_loads_into_timm(runs):
    """The transfer tasks' loader (``--weights RUN/encoder.pth``) builds the timm model with only the head new."""
    from mwm.weights import create_backbone, resolve_weights

    name, a, sa, *_ = runs
    spec = resolve_weights(sa["encoder"])
    model = create_backbone(spec, num_classes=3)
    sd = torch.load(sa["encoder"], weights_only=True)
    own = model.state_dict()
    assert spec.arch == a.arch and sd and all(torch.equal(own[k], v) for k, v in sd.items() if k in own)
    assert set(own) - set(sd) == set(sa["encoder_missing_keys"]) and sa["encoder_missing_keys"]


def test_the_toy_needs_no_mask_and_draws_no_pictures(tiny_npz, tmp_path_factory, tmp_path):
    """The loop assumes neither a keep-mask nor reconstructions: the toy logs no mask ratios, writes no PNG even
    with recon_images set, and its hook sees no keep."""
    _, sa, *_ = _runs("denoise", tiny_npz, tmp_path_factory)
    assert sa["recon"] == [] and sa["masking"] is None and sa["mask_grid"] is None
    row = read_metrics(sa["metrics"])[0]
    assert row["mask_ratio"] is None and row["mask_ratio_in"] is None
    seen = []
    pretrain(_config(tiny_npz, tmp_path / "hook", "denoise", epochs=1, ema=None, warmup_epochs=0),
             hook=lambda ev, info: seen.append((ev, sorted(info))))
    assert seen[0] == ("step", ["rank", "step"]) and seen[-1] == ("end", ["model", "rank"])


def test_the_toy_config_is_its_own_class():
    cfg = PretrainConfig(data="x.npz", out="run", model={"method": "denoise", "size": 64, "noise": 0.1})
    assert type(cfg.model) is DenoiseConfig
    assert cfg.model_dump(mode="json")["model"] == {"method": "denoise", "arch": "resnet18", "size": 64,
                                                    "in_chans": 3, "pretrained": False, "noise": 0.1}
    assert PretrainConfig.model_validate(cfg.model_dump(mode="json")).model == cfg.model
    with pytest.raises(ValidationError, match="decoder_width"):  # a SparK field is not the toy's
        PretrainConfig(data="x.npz", out="run", model={"method": "denoise", "decoder_width": 64})
    with pytest.raises(ValidationError, match=r"unknown pretraining method 'nope'; choose one of \[.*'denoise'"):
        PretrainConfig(data="x.npz", out="run", model={"method": "nope", "arch": "resnet18"})


def test_cli_method_help_names_the_builtin_methods():
    """``mwm pretrain --method``'s help (static: the CLI imports no torch to show it) names every method mwm
    registers itself; the value is checked by the registry (an unknown name lists the registered ones)."""
    import typing

    from mwm.cli.pretrain import pretrain as command
    from mwm.train.methods import METHODS

    info = typing.get_type_hints(command, include_extras=True)["method"].__metadata__[0]
    builtin = [n for n, spec in METHODS.items() if spec.factory.__module__.startswith("mwm.")]
    assert builtin and all(n in info.help for n in builtin)


# -- the trainer --------------------------------------------------------------------------------------------------
def test_scheduler_state_is_its_position():
    """The schedule comes from the config; the checkpoint holds the position only, and an older checkpoint's saved
    lambda numbers (a 10-step plan) do not replace this run's (a 20-step plan)."""
    from mwm.train.optim import LrWdScheduler, SparKSchedule

    def make(total):
        opt = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(2))], "wd_scale": 1.0}], lr=1.0)
        return LrWdScheduler(opt, SparKSchedule(total, 2, 0.0, 0.0, 0.04, 0.2))

    old = make(10)
    for _ in range(5):
        old.optimizer.step()
        old.step()
    state = old.state_dict()
    assert "lr_lambdas" not in state and state["last_epoch"] == 5
    state["lr_lambdas"] = [dict(old.schedule.__dict__)]  # as checkpoints before issue 13 held it
    new = make(20)
    new.load_state_dict(state)
    assert new.last_epoch == 5 and new.schedule.total == 20
    assert new.optimizer.param_groups[0]["lr"] == pytest.approx(new.schedule(5))
    assert new.optimizer.param_groups[0]["lr"] != pytest.approx(old.schedule(5))


def test_train_functions_are_short():
    """The issue's bar: no function in mwm.train longer than 60 lines (the trainer is small methods)."""
    import mwm.train

    root = Path(mwm.train.__file__).parent
    long = []
    for f in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{f.relative_to(root)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long, long
