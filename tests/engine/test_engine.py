"""mwm.engine: the device/precision/Fabric factory, the transfer lr schedule (bit-equal to what each task computed
before issue 13), seeding, and the encoder card (byte-compatible with the encoder.json pretraining wrote)."""

from __future__ import annotations

import io
import json
import math
import random

import numpy as np
import pytest
import torch

from mwm.engine import LrSchedule, build_scheduler, check_device, device_fabric, lr_factor, seed_all, split_device
from mwm.engine.card import EncoderCard
from mwm.errors import MWMError

# -- runtime ---------------------------------------------------------------------------------------------------


def test_device_names_are_checked_and_split():
    assert check_device(" CUDA:1 ") == "cuda:1" and check_device("auto") == "auto"
    with pytest.raises(ValueError, match="cuda:N"):
        check_device("cuda:x")
    assert split_device("cuda:1") == ("cuda", [1]) and split_device("cpu") == ("cpu", 1)


def test_device_fabric_runs_on_cpu_and_names_what_cannot_run():
    fabric = device_fabric("cpu", "32-true")
    assert fabric.device.type == "cpu" and fabric.world_size == 1
    if not torch.cuda.is_available():
        with pytest.raises(MWMError, match=r"device=cuda precision=32-true"):
            device_fabric("cuda")
        # detection's auto: cuda when there is one, else the CPU (never MPS)
        assert device_fabric("auto", auto="cuda_or_cpu").device.type == "cpu"


def test_pretraining_make_fabric_keeps_its_error_message():
    from types import SimpleNamespace

    from mwm.train.pretrain import make_fabric

    cfg = SimpleNamespace(accelerator="cpu", devices=1, num_nodes=1, strategy="auto", precision="64-wrong")
    with pytest.raises(MWMError, match="cannot run on accelerator=cpu devices=1 num_nodes=1 strategy=auto "
                                       "precision=64-wrong"):
        make_fabric(cfg)


# -- schedules: the formulas each task used before issue 13, copied verbatim -----------------------------------

def _old_transfer(step, total, warmup, final_ratio=0.0):  # mwm.train.optim.lr_factor (classify, segment)
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def _old_detect(warmup_iters, schedule, lr_steps, step, total):  # mwm.transfer.detect._lr_factor
    warm = min(warmup_iters, total // 3)
    if step < warm:
        a = step / warm
        return 0.001 * (1 - a) + a
    if schedule == "cosine":
        t = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * t))
    return 0.1 ** sum(step >= int(f * total) for f in lr_steps)


@pytest.mark.parametrize("total,warmup,final", [(100, 10, 0.0), (7, 0, 0.0), (30, 29, 0.1), (1, 1, 0.0)])
def test_transfer_schedule_equals_the_old_one_bit_for_bit(total, warmup, final):
    for s in range(total + 1):
        assert lr_factor(s, total, warmup, final) == _old_transfer(s, total, warmup, final)


@pytest.mark.parametrize("total,warmup_iters,schedule", [(90, 100, "step"), (90, 5, "step"), (100, 10, "cosine"),
                                                         (12, 0, "cosine"), (3, 100, "step")])
def test_detection_schedule_equals_the_old_one_bit_for_bit(total, warmup_iters, schedule):
    from mwm.transfer.detect import DetectConfig, _lr_factor

    steps = (2 / 3, 8 / 9)
    cfg = DetectConfig(data="d.npz", out="o", warmup_iters=warmup_iters, schedule=schedule, lr_steps=steps)
    for s in range(total + 1):
        assert _lr_factor(cfg, s, total) == _old_detect(warmup_iters, schedule, steps, s, total)


def test_scheduler_state_is_plain_numbers():
    """LambdaLR saves the lambda's __dict__: it must load with weights_only=True (exact resume of a checkpoint)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, 20, 4, warmup_start=0.001, decay="step", milestones=(0.5,))
    for _ in range(12):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 1, 0)
    fresh.load_state_dict(state)
    assert isinstance(fresh.lr_lambdas[0], LrSchedule) and fresh.lr_lambdas[0](12) == pytest.approx(0.1)


def test_seed_all_seeds_python_numpy_and_torch():
    seed_all(5)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_all(5)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


# -- the encoder card ------------------------------------------------------------------------------------------

def _old_card_text(arch: str, kwargs: dict, d2: bool, extra: dict) -> str:  # export_encoder before issue 13
    meta = {"arch": arch, "timm_kwargs": kwargs, "format": "timm state_dict",
            "load": f"timm.create_model({arch!r}, pretrained=False, **timm_kwargs).load_state_dict("
                    "torch.load('encoder.pth'), strict=False)  # missing: classifier keys only",
            "detectron2": "encoder_d2.pth: MODEL.WEIGHTS; RESNETS.STRIDE_IN_1X1 False"
                          + (", RES2_OUT_CHANNELS 64" if arch in ("resnet18", "resnet34") else "")
            if d2 else None,
            **extra}
    return json.dumps(meta, indent=2) + "\n"


@pytest.mark.parametrize("arch,kwargs,d2,extra", [
    ("resnet18", {}, True, {"size": 64, "method": "spark", "ema": False,
                            "normalize": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}),
    ("resnet50", {}, True, {"size": 128, "method": "spark", "ema": True, "normalize": None}),
    ("vit_small_patch16_224", {"img_size": 64, "patch_size": 8}, False,
     {"size": 64, "method": "mae", "ema": False, "normalize": None, "future_key": [1, 2]}),
])
def test_card_writes_the_old_bytes_and_reads_them_back(tmp_path, arch, kwargs, d2, extra):
    old = _old_card_text(arch, kwargs, d2, extra)
    card = EncoderCard.for_export(arch, kwargs, d2, **extra)
    assert card.save(tmp_path) == tmp_path / "encoder.json"
    assert (tmp_path / "encoder.json").read_text() == old
    (tmp_path / "encoder.pth").write_bytes(b"")
    for where in (tmp_path, tmp_path / "encoder.json", tmp_path / "encoder.pth"):
        again = EncoderCard.load(where)
        assert again.to_json() == old and again.arch == arch and again.timm_kwargs == kwargs
    assert EncoderCard.load(tmp_path).model_extra.get("future_key") == extra.get("future_key")


def test_card_normalization_absent_null_or_given(tmp_path):
    cases = [({"arch": "resnet18"}, ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))),
             ({"arch": "resnet18", "normalize": None}, ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))),
             ({"arch": "resnet18", "normalize": {"mean": [0.4, 0.45, 0.5], "std": [0.2, 0.25, 0.3]}},
              ((0.4, 0.45, 0.5), (0.2, 0.25, 0.3)))]
    for meta, stats in cases:
        (tmp_path / "encoder.json").write_text(json.dumps(meta))
        card = EncoderCard.load(tmp_path)
        assert card.input_stats() == stats
        assert json.loads(card.to_json()) == meta  # nothing absent is written back


def test_a_broken_card_is_an_error_naming_the_file(tmp_path):
    (tmp_path / "encoder.json").write_text("{not json")
    with pytest.raises(MWMError, match="encoder.json: not a readable encoder card"):
        EncoderCard.load(tmp_path)
    assert EncoderCard.beside(tmp_path / "sub" / "encoder.pth").arch is None  # no card: nothing known
