"""Pretraining methods by name: ``name → (config class, factory)``, as timm's model registry.

>>> from mwm.train.methods import register_method, method_names
>>> register_method("denoise", DenoiseConfig, DenoiseMethod)     # DenoiseMethod(cfg: PretrainConfig)
>>> method_names()
['denoise', 'mae', 'spark']

``PretrainConfig.model`` holds the method's config: its ``method`` field names the registry entry, and the entry's
config class validates the rest at validation time (so a method registered after ``mwm.train`` was imported is
accepted too), dumping only its own fields (``SerializeAsAny``): the dump of SparK and MAE configs is the one the
benchmark identifies finished runs by (tests/train/test_pinned_config.py).

A method config has at least ``method: Literal["name"]``, ``arch`` (the timm encoder), ``size``, ``in_chans`` and
``pretrained``; :class:`MethodConfig` is a base with those fields for new methods.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SerializeAsAny

if TYPE_CHECKING:
    from ..config import PretrainConfig
    from .base import PretrainMethod

__all__ = ["MethodSpec", "METHODS", "MethodConfig", "register_method", "method_names", "method_spec",
           "method_config", "create_method", "AnyMethodConfig"]


class MethodConfig(BaseModel):
    """A base for a new method's config: the fields every method config has (the loop, export and validation read
    them). SparK's and MAE's configs declare the same fields themselves (their field order is their dump's)."""

    model_config = ConfigDict(extra="forbid")

    method: str
    arch: str = Field(default="resnet18", description="timm encoder the method pretrains (and exports)")
    size: int = Field(default=224, gt=0, description="input side in pixels")
    in_chans: int = Field(default=3, ge=1)
    pretrained: bool = False


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its config class (``PretrainConfig.model``) and the factory building it from the whole
    :class:`~mwm.train.PretrainConfig` (a :class:`~mwm.train.methods.PretrainMethod` subclass is one)."""

    name: str
    config: type[BaseModel]
    factory: Callable[["PretrainConfig"], "PretrainMethod"]
    help: str = ""


METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, config: type[BaseModel], factory: Callable[["PretrainConfig"], "PretrainMethod"],
                    help: str = "") -> MethodSpec:
    """Register (or replace) method ``name``; ``help`` is a few words for listings (``mwm pretrain --method``)."""
    field = config.model_fields.get("method")
    if field is None:
        raise ValueError(f"method '{name}': its config class {config.__name__} has no `method` field")
    METHODS[name] = spec = MethodSpec(name, config, factory, help)
    return spec


def method_names() -> list[str]:
    return sorted(METHODS)


def method_spec(name: str) -> MethodSpec:
    spec = METHODS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"unknown pretraining method '{name}'; choose one of {method_names()}")
    return spec


def method_config(data: Mapping[str, Any] | BaseModel) -> BaseModel:
    """The config of ``data["method"]`` built by its registered class; a config instance passes through."""
    if isinstance(data, BaseModel):
        return data
    return method_spec(data.get("method", "spark")).config.model_validate(dict(data))


def create_method(cfg: "PretrainConfig") -> "PretrainMethod":
    """The method ``cfg.model`` names, built for the run (its model is created here: seed first)."""
    return method_spec(cfg.model.method).factory(cfg)


def _as_method_config(v: Any) -> Any:
    """``PretrainConfig.model``: a mapping is validated by its method's config class (looked up in the registry at
    validation time); its ValidationError keeps the field locations under ``model``."""
    if isinstance(v, BaseModel):
        method_spec(getattr(v, "method", None))  # a config object of a method nobody registered is refused too
    return method_config(v) if isinstance(v, Mapping) else v


# the type of the config field holding any method's config: dumped with the fields of its own class
AnyMethodConfig = Annotated[SerializeAsAny[BaseModel], BeforeValidator(_as_method_config)]
