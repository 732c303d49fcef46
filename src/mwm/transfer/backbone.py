"""Where the encoder comes from: ``--weights RUN/encoder.pth`` (or ``RUN/``), ``none`` (random init) or
``timm`` (the arch's ImageNet weights from the hub, for users who are online).

:func:`resolve_weights` turns the option into a :class:`BackboneSpec` (arch, timm kwargs, state dict, input
normalization) *before* anything is built, so a wrong path fails in a second with a message saying what to
pass; :func:`create_backbone` builds the timm model and proves that only classifier keys were left out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import MWMError

__all__ = ["BackboneSpec", "resolve_weights", "create_backbone", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class BackboneSpec:
    """arch: timm name; kwargs: extra ``timm.create_model`` arguments (e.g. ViT ``img_size``); state_dict: the
    encoder weights or None; hub: load timm's own pretrained weights; mean/std: input normalization (3,);
    source: what ``--weights`` said, for reports; size: pretraining image size when known."""

    arch: str
    kwargs: dict = field(default_factory=dict)
    state_dict: dict | None = None
    hub: bool = False
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    source: str = "none"
    size: int | None = None

    def normalizer(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) as (1, 3, 1, 1) tensors."""
        return (torch.tensor(self.mean, device=device).view(1, 3, 1, 1),
                torch.tensor(self.std, device=device).view(1, 3, 1, 1))


def resolve_weights(weights: str | Path, arch: str | None = None) -> BackboneSpec:
    """``weights``: ``none`` | ``timm`` | a file (``encoder.pth``) | a run folder holding ``encoder.pth``.

    With a file, the arch, timm kwargs and normalization come from ``encoder.json`` beside it (written by
    ``mwm pretrain``); ``arch`` must then agree or be None. ``none``/``timm`` need ``arch``.
    """
    w = str(weights)
    if w.lower() in ("none", "random", "timm"):
        if not arch:
            raise MWMError(f"--weights {w} needs --arch (a timm model name such as resnet18)")
        return BackboneSpec(arch=arch, hub=w.lower() == "timm", source=w.lower())
    path = Path(w)
    if path.is_dir():
        path = path / "encoder.pth"
    if not path.is_file():
        raise MWMError(f"{weights}: no encoder weights there; pass the encoder.pth (or the run folder) that "
                       "`mwm pretrain --out RUN` wrote, `--weights none` for random init, or `--weights timm` "
                       "for the arch's ImageNet weights (needs internet)")
    meta_file = path.with_name("encoder.json")
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    saved_arch = meta.get("arch")
    if saved_arch and arch and saved_arch != arch:
        raise MWMError(f"{path} holds a '{saved_arch}' encoder (see {meta_file.name}) but --arch is '{arch}'; "
                       "drop --arch or pass the matching one")
    arch = arch or saved_arch
    if not arch:
        raise MWMError(f"{path}: no encoder.json beside it to say the architecture; pass --arch")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MWMError(f"{path}: cannot read the weights ({type(e).__name__}: {e}); re-export them with "
                       "`mwm pretrain --resume`") from e
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        raise MWMError(f"{path} is a Detectron2 checkpoint; pass encoder.pth (the timm state_dict) instead")
    if "normalize" in meta and meta["normalize"] is None:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # pretrained on raw [0, 1] inputs: feed them the same way
    else:
        norm = meta.get("normalize") or {}
        mean, std = tuple(norm.get("mean", IMAGENET_MEAN)), tuple(norm.get("std", IMAGENET_STD))
    return BackboneSpec(arch=arch, kwargs=dict(meta.get("timm_kwargs") or {}), state_dict=sd, mean=mean, std=std,
                        source=str(path), size=meta.get("size"))


def create_backbone(spec: BackboneSpec, **timm_overrides) -> nn.Module:
    """``timm.create_model(spec.arch, **spec.kwargs, **timm_overrides)`` with the spec's weights loaded.

    ``timm_overrides`` e.g. ``num_classes=3`` (a head) or ``features_only=True, out_indices=…`` (a feature
    pyramid); the state dict's keys are timm's, which ``features_only`` models keep for the trunk. Raises
    :class:`MWMError` when anything but classifier/head keys would be missing or unexpected.
    """
    import timm

    from ..mim import classifier_keys

    kwargs = {**spec.kwargs, **timm_overrides}
    try:
        model = timm.create_model(spec.arch, pretrained=spec.hub, **kwargs)
    except Exception as e:
        if spec.hub:
            raise MWMError(f"cannot fetch timm's '{spec.arch}' weights ({type(e).__name__}: {e}); offline, pass "
                           "--weights RUN/encoder.pth or --weights none") from e
        raise MWMError(f"timm cannot build '{spec.arch}' with {kwargs}: {e}") from e
    if spec.hub:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        spec.mean, spec.std = tuple(cfg.get("mean", spec.mean)), tuple(cfg.get("std", spec.std))
    if spec.state_dict is not None:
        try:
            missing, unexpected = model.load_state_dict(spec.state_dict, strict=False)
        except RuntimeError as e:  # tensor shape mismatches are raised even with strict=False
            raise MWMError(f"{spec.source} does not fit timm '{spec.arch}' ({kwargs}): "
                           f"{str(e).splitlines()[-1].strip()}; was it exported for a different --arch?") from e
        if kwargs.get("features_only"):
            # features_only models drop the pooling/classifier, so the saved head keys are the unexpected ones
            bad_missing, bad_unexpected = set(missing), {k for k in unexpected if not _is_head(k)}
        else:
            bad_missing, bad_unexpected = set(missing) - classifier_keys(model), set(unexpected)
        if bad_missing or bad_unexpected:
            raise MWMError(f"{spec.source} does not fit timm '{spec.arch}' ({kwargs}): missing "
                           f"{sorted(bad_missing)[:5]}, unexpected {sorted(bad_unexpected)[:5]}; was it exported "
                           "for a different --arch?")
    return model


def _is_head(key: str) -> bool:
    return key.split(".")[0] in ("fc", "head", "classifier", "norm", "fc_norm", "head_drop", "global_pool")
