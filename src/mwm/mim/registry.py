"""MIM models by name: ``"spark"`` (timm CNNs, :mod:`mwm.mim.spark`) and ``"mae"`` (timm ViTs, :mod:`mwm.mim.mae`).

>>> model = create_mim_model(SparKConfig(arch="resnet18", size=64))
>>> model = create_mim_model({"method": "mae", "arch": "vit_tiny_patch16_224", "size": 64})

A new method is one config class with a ``method: Literal["name"]`` field, one ``create_*`` function and
:func:`register_mim_model`. Every model has ``forward(x, keep) -> {"loss", "pred"}``, ``stride``, ``grid(size)``,
``reconstruct(x, pred, keep)`` and ``encoder_state_dict()``.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel
from torch import nn

from .mae import MAEConfig, create_mae
from .spark import SparKConfig, create_spark

__all__ = ["MIM_MODELS", "register_mim_model", "create_mim_model", "mim_config"]

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
    """Build the model a config describes (timm-style ``create_*``)."""
    cfg = mim_config(cfg)
    method = getattr(cfg, "method", None)
    if method not in MIM_MODELS:
        raise ValueError(f"unknown MIM method '{method}'; choose one of {sorted(MIM_MODELS)}")
    return MIM_MODELS[method][1](cfg)
