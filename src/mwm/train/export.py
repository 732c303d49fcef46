"""Encoder export: RUN/encoder.pth (timm state_dict), RUN/encoder_d2.pth (Detectron2 names, ResNets) and
RUN/encoder.json (how to load them: :class:`mwm.engine.card.EncoderCard` owns that file's format).

``encoder.pth`` is a plain ``state_dict``: ``timm.create_model(arch, pretrained=False, **timm_kwargs)
.load_state_dict(sd, strict=False)`` reports only the classifier keys missing (the contract in docs/DESIGN.md);
:func:`check_encoder` proves it before the run reports success.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..engine.card import EncoderCard
from .checkpoint import save_or_explain

__all__ = ["export_encoder", "check_encoder", "timm_kwargs", "EncoderCard"]


def timm_kwargs(mim_model: nn.Module) -> dict:
    """The ``timm.create_model`` kwargs the exported weights need (ViT: ``img_size``; CNN: ``in_chans``…)."""
    enc = getattr(mim_model, "encoder", mim_model)
    if hasattr(enc, "export_model_kwargs"):
        return dict(enc.export_model_kwargs())
    return dict(getattr(enc, "model_kwargs", {}))


def _torchvision_resnet(sd: dict) -> bool:
    # Detectron2's converter renames torchvision-style ResNets (conv1/bn1/layerN); deep-stem variants
    # (resnet50d: conv1.0 …) and other families have no Detectron2 counterpart
    return "conv1.weight" in sd and "bn1.weight" in sd and any(k.startswith("layer1.") for k in sd)


def export_encoder(mim_model: nn.Module, out: str | Path, arch: str, extra: dict | None = None) -> dict[str, Path]:
    """Write encoder.pth (+ encoder_d2.pth for torchvision-style ResNets) and encoder.json into ``out``.
    ``mim_model``: what a method's ``encoder()`` gives: a SparK/MAE model (``encoder_state_dict()``) or a module
    whose ``state_dict()`` is in timm's names. Returns the paths written."""
    out = Path(out)
    sd = mim_model.encoder_state_dict() if hasattr(mim_model, "encoder_state_dict") else mim_model.state_dict()
    paths = {"encoder": out / "encoder.pth"}
    save_or_explain(sd, paths["encoder"], out)
    if _torchvision_resnet(sd):
        from ..mim import to_detectron2

        paths["encoder_d2"] = out / "encoder_d2.pth"
        # Detectron2's checkpointer reads {"model": …}; matching_heuristics lets it map res2…res5 by name
        save_or_explain({"model": to_detectron2(sd), "__author__": "mwm", "matching_heuristics": True},
                        paths["encoder_d2"], out)
    card = EncoderCard.for_export(arch, timm_kwargs(mim_model), "encoder_d2" in paths, **(extra or {}))
    paths["meta"] = card.save(out / "encoder.json")
    return paths


def check_encoder(path: str | Path, arch: str, kwargs: dict | None = None) -> list[str]:
    """Load ``path`` into a fresh ``timm.create_model(arch, pretrained=False)``; return the missing keys (the
    classifier) or raise ``RuntimeError`` when anything else is missing or unexpected."""
    import timm

    from ..mim import classifier_keys

    model = timm.create_model(arch, pretrained=False, **(kwargs or {}))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    bad = set(missing) - classifier_keys(model)
    if bad or unexpected:
        raise RuntimeError(f"{path} does not load into timm '{arch}': missing {sorted(bad)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
    return list(missing)
