"""MIM models by name: ``"spark"`` (timm CNNs, :mod:`mwm.mim.spark`) and ``"mae"`` (timm ViTs, :mod:`mwm.mim.mae`).

>>> model = create_mim_model(SparKConfig(arch="resnet18", size=64))
>>> model = create_mim_model({"method": "mae", "arch": "vit_tiny_patch16_224", "size": 64})

These are the MIM *models*; what ``mwm pretrain`` runs is a pretraining *method* (``mwm.train.methods``: a
model plus its masking and step hooks), whose registry maps ``spark``/``mae`` to these configs. A new MIM model is
one config class with a ``method: Literal["name"]`` field, one ``create_*`` function and :func:`register_mim_model`
(and a method registered for it). Every model has ``forward(x, keep) -> {"loss", "pred"}``, ``stride``,
``grid(size)``, ``reconstruct(x, pred, keep)`` and ``encoder_state_dict()``.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel
from torch import nn

from .mae import MAEConfig, create_mae
from .spark import SparKConfig, create_spark

__all__ = ["MIM_MODELS", "register_mim_model", "create_mim_model", "mim_config", "check_arch"]

MIM_MODELS: dict[str, tuple[type[BaseModel], Callable[[BaseModel], nn.Module]]] = {}


def register_mim_model(name: str, config_cls: type[BaseModel], factory: Callable[[BaseModel], nn.Module]) -> None:
    MIM_MODELS[name] = (config_cls, factory)


register_mim_model("spark", SparKConfig, create_spark)
register_mim_model("mae", MAEConfig, create_mae)


def mim_config(data: BaseModel | dict) -> BaseModel:
    """A validated config from a config object or a mapping (``method`` picks the class; default ``"spark"``)."""
    if isinstance(data, BaseModel):
        return data
    method = data.get("method", "spark")
    if method not in MIM_MODELS:
        raise ValueError(f"unknown MIM method '{method}'; choose one of {sorted(MIM_MODELS)}")
    return MIM_MODELS[method][0].model_validate(data)


def create_mim_model(cfg: BaseModel | dict) -> nn.Module:
    """Build the model a config describes (timm-style ``create_*``). An arch of the wrong family for the method
    (``mae`` with a CNN, ``spark`` with a ViT) is a ``ValueError`` saying which method fits."""
    cfg = mim_config(cfg)
    method = getattr(cfg, "method", None)
    if method not in MIM_MODELS:
        raise ValueError(f"unknown MIM method '{method}'; choose one of {sorted(MIM_MODELS)}")
    check_arch(cfg.arch)
    family = _family(cfg.arch)  # before building: a wrong family fails in many ways inside the builders
    fits = {"vit": "mae", "cnn": "spark"}.get(family)
    if fits is not None and fits != method:
        kind = "a ViT" if family == "vit" else "a CNN"
        raise ValueError(f"--method {method} cannot pretrain '{cfg.arch}', which is {kind}: use --method {fits} "
                         "(or leave --method out: it follows --arch); spark takes timm CNNs (resnet*, "
                         "convnext*), mae takes timm ViTs (vit_*, deit_*)")
    try:
        return MIM_MODELS[method][1](cfg)
    except (ValueError, TypeError, RuntimeError, AttributeError) as e:
        raise ValueError(f"cannot build the {method} model for '{cfg.arch}': {e}") from e


def check_arch(arch: str) -> None:
    """Raise ``ValueError`` when timm has no model ``arch``, naming the closest names timm knows."""
    import difflib

    import timm

    if ":" in arch or timm.is_model(arch):  # hf-hub:/local-dir: names are timm's to resolve
        return
    close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
    raise ValueError(f"timm has no model '{arch}'" + (f"; did you mean {', '.join(close)}?" if close else ".")
                     + " timm.list_models('pattern*') lists the names it knows")


def _family(arch: str) -> str | None:
    """'vit' (a timm VisionTransformer-like model: patch_embed + blocks), 'cnn' (feature_info with strides) or
    None when timm cannot build it; built on the meta device, so it costs no memory."""
    import timm
    import torch

    try:
        with torch.device("meta"):
            m = timm.create_model(arch, pretrained=False)
    except Exception:
        return None
    if hasattr(m, "patch_embed") and hasattr(m, "blocks"):
        return "vit"
    return "cnn" if hasattr(m, "feature_info") else None
