"""Pretraining methods: a :class:`PretrainMethod` per method, looked up by name in :data:`METHODS`.

Built in: ``spark`` (SparK, timm CNNs) and ``mae`` (MAE, timm ViTs), :mod:`.mim`. A new method is one file — a
config class (``method: Literal["name"]``, ``arch``, ``size``, ``in_chans``, ``pretrained``; :class:`MethodConfig`
has them) and a :class:`PretrainMethod` subclass — plus ``register_method("name", Config, Method)``; the contract
tests (tests/train/test_method_contract.py) then run it: a step, exact resume, an encoder timm loads.
"""

from .base import MethodContext, PretrainMethod, input_stats
from .registry import (METHODS, AnyMethodConfig, MethodConfig, MethodSpec, create_method, method_config, method_names,
                       method_spec, register_method)
from .mim import MAEMethod, MaskedImageModeling, MaskedViews, SparKMethod  # registers spark and mae
from .hpm import HPMMethod  # registers hpm (loss-guided, :mod:`.guided`)
from .anatomask import AnatoMaskMethod  # registers anatomask
from .hpm_mae import HPMMAEMethod  # registers hpm_mae (HPM on MAE)
from .attmask import AttMaskMethod  # registers attmask (MAE)
from .contrastive import BYOLMethod, MoCoV2Method, SimCLRMethod  # registers simclr, mocov2, byol (lightly)

__all__ = ["PretrainMethod", "MethodContext", "input_stats", "METHODS", "MethodSpec", "MethodConfig",
           "AnyMethodConfig", "register_method", "create_method", "method_config", "method_names", "method_spec",
           "MaskedImageModeling", "MaskedViews", "SparKMethod", "MAEMethod", "HPMMethod", "AnatoMaskMethod",
           "HPMMAEMethod", "AttMaskMethod", "SimCLRMethod", "MoCoV2Method", "BYOLMethod"]
