"""The masking-strategy protocol: what a strategy receives (:class:`MaskingBatch`), what it declares
(:attr:`MaskingStrategy.requires`, its config class), what it returns (a keep-mask with exact counts and its
realised-ratio statistics), and the registry that maps a name to it.

A new strategy is one class plus registration (the test suite's "mask the brightest patches" toy)::

    class BrightestConfig(StrategyConfig):
        strategy: Literal["brightest"] = "brightest"

    @register_strategy("brightest")
    class Brightest(MaskingStrategy):
        '''Mask the brightest cells first (exact count at ``ratio``).'''
        requires = frozenset({"images"})
        config_class = BrightestConfig

        def mask(self, b: MaskingBatch):
            score = pool_importance(b.images.mean(1), b.grid)
            keep = topk_keep(score, self.cfg.ratio, b.generator)
            return keep, realised_ratios(keep)

A strategy that is an importance source × a policy is one line (:func:`mwm.masking.strategies.register_composite`).
Every registered strategy gets the contract tests of ``tests/masking/test_contract.py`` for free.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SerializeAsAny, model_validator

from .policies import n_keep

__all__ = ["REQUIREMENTS", "MaskingBatch", "MaskingStrategy", "StrategyConfig", "StrategySpec", "STRATEGIES",
           "NEEDS_ROI", "NEEDS_SALIENCY", "register_strategy", "create_masker", "masking_config", "strategy_requires",
           "visible_count", "AnyMaskingConfig"]

# what a strategy may ask for, and the MaskingBatch field that carries it
REQUIREMENTS: dict[str, str] = {"boxes": "boxes", "saliency": "importance", "images": "images", "text": "text",
                                "model_outputs": "outputs"}
_MISSING = {  # why a required input is absent, and what to pass
    "boxes": "needs ROI boxes (pass --rois rois.jsonl)",
    "saliency": "needs per-image saliency maps (importance=(B, H, W)); pass --rois with a manifest from "
                "`mwm localize --save-saliency`",
    "images": "needs the images (MaskingBatch.images)",
    "text": "needs per-image text tokens (MaskingBatch.text)",
}


@dataclass(frozen=True)
class MaskingBatch:
    """Everything a strategy may look at for one batch. Only ``batch_size`` and ``grid`` are always set; the rest
    is given when the caller has it (the pretraining loop: images, boxes + valid with an ROI manifest, saliency
    maps for the saliency strategies, the previous step's outputs for strategies that require them).

    batch_size: B. grid: (h, w) mask cells. generator: the draws' ``torch.Generator`` (its device is the draws').
    device: where to draw when no input tensor says so. images: float (B, C, H, W) in [0, 1] as augmented, before
    input normalization. boxes: float (B, M, 4) normalized ``[x0, y0, x1, y1]``; valid: bool (B, M).
    importance: a per-pixel map (B, H, W) (the ``--save-saliency`` maps, moved with the image by the paired
    augmentation). ids: the images' ids. text: per-image token ids (B, L). outputs: the model's outputs of the
    previous micro-step (detached; None on the first step of a run, and of a resumed one: a strategy that needs
    them across a resume keeps what it needs in :meth:`MaskingStrategy.update` and its ``state_dict``).
    """

    batch_size: int
    grid: tuple[int, int]
    generator: torch.Generator | None = None
    device: torch.device | str | None = None
    images: torch.Tensor | None = None
    boxes: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    importance: torch.Tensor | None = None
    ids: Sequence[str] | None = None
    text: torch.Tensor | None = None
    outputs: Mapping[str, torch.Tensor] | None = None


class StrategyConfig(BaseModel):
    """The base of every strategy's config: the discriminator ``strategy`` (a registered name) and the overall
    mask ratio. A strategy with settings of its own subclasses it (extra fields are refused)."""

    model_config = ConfigDict(extra="forbid")

    strategy: str = "random"
    ratio: float = Field(default=0.6, ge=0, lt=1)

    @model_validator(mode="after")
    def _registered(self) -> "StrategyConfig":
        spec = STRATEGIES.get(self.strategy)
        if spec is None:
            raise ValueError(f"unknown masking strategy '{self.strategy}'; choose one of {sorted(STRATEGIES)}")
        if type(self) is not spec.config:
            raise ValueError(f"masking strategy '{self.strategy}' is configured by {spec.config.__name__}, not "
                             f"{type(self).__name__}: build it with mwm.masking.masking_config({{'strategy': "
                             f"'{self.strategy}', ...}})")
        return self


class MaskingStrategy:
    """A masking strategy: ``strategy(batch) -> (keep, stats)``.

    keep: bool (B, 1, h, w), True = visible; stats: realised ratios as 0-d tensors (``mask_ratio``, and with a
    region ``mask_ratio_in``, ``mask_ratio_out``, ``roi_fraction``; :func:`mwm.masking.realised_ratios`), read back
    by the loop once per logging interval (no host sync here).

    Subclasses set ``requires`` (a subset of :data:`REQUIREMENTS`: checked before :meth:`mask`, except
    ``model_outputs``, which is None on the first step), ``config_class`` and implement :meth:`mask`; stateful
    ones (EMA teachers, schedules) override :meth:`update`, :meth:`state_dict`, :meth:`load_state_dict`.
    """

    name: ClassVar[str] = ""  # set by register_strategy
    requires: ClassVar[frozenset[str]] = frozenset()
    config_class: ClassVar[type[StrategyConfig]] = StrategyConfig

    def __init__(self, cfg: StrategyConfig):
        self.cfg = cfg

    def __call__(self, batch: MaskingBatch | int, grid: tuple[int, int] | None = None, boxes=None, valid=None,
                 generator=None, device=None, importance=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``strategy(MaskingBatch(...))``; the keyword form of the former maskers still works:
        ``masker(batch=B, grid=(h, w), boxes=…, valid=…, generator=…, device=…, importance=…)``."""
        if not isinstance(batch, MaskingBatch):
            batch = MaskingBatch(batch_size=int(batch), grid=tuple(grid), generator=generator, device=device,
                                 boxes=boxes, valid=valid, importance=importance)
        for req in self.requires:
            if req in _MISSING and getattr(batch, REQUIREMENTS[req]) is None:
                raise ValueError(f"masking strategy '{self.cfg.strategy}' {_MISSING[req]}")
        return self.mask(batch)

    def mask(self, batch: MaskingBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    @classmethod
    def visible_count(cls, cfg: StrategyConfig, n: int) -> int | None:
        """Visible cells per image when every image keeps the same number (MAE's token gather needs it), else
        None. Default: ``round(n · (1 − ratio))``."""
        return int(n_keep(n, cfg.ratio))

    def update(self, outputs: Mapping[str, torch.Tensor] | None) -> None:
        """After each micro-step, for strategies that require ``model_outputs``: the step's detached outputs."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


@dataclass(frozen=True)
class StrategySpec:
    """A registered strategy: its class (built with its config), config class and requirements."""

    name: str
    cls: type[MaskingStrategy]
    config: type[StrategyConfig]
    requires: frozenset[str]


STRATEGIES: dict[str, StrategySpec] = {}
# derived views of ``requires`` (kept for the code that imports them): strategies that need an ROI manifest (its
# boxes, or the saliency maps its records name), and those that need the maps
NEEDS_ROI: set[str] = set()
NEEDS_SALIENCY: set[str] = set()


def register_strategy(name: str):
    """Class decorator: register a :class:`MaskingStrategy` subclass under ``name`` (its ``requires`` and
    ``config_class`` are read from the class)."""

    def deco(cls: type[MaskingStrategy]) -> type[MaskingStrategy]:
        unknown = set(cls.requires) - set(REQUIREMENTS)
        if unknown:
            raise ValueError(f"strategy '{name}' requires {sorted(unknown)}; known: {sorted(REQUIREMENTS)}")
        cls.name = name
        STRATEGIES[name] = StrategySpec(name, cls, cls.config_class, frozenset(cls.requires))
        NEEDS_ROI.discard(name)
        NEEDS_SALIENCY.discard(name)
        if cls.requires & {"boxes", "saliency"}:  # the maps come from the manifest's records
            NEEDS_ROI.add(name)
        if "saliency" in cls.requires:
            NEEDS_SALIENCY.add(name)
        return cls

    return deco


def strategy_requires(name: str) -> frozenset[str]:
    """What strategy ``name`` requires (empty for an unknown name: its config fails validation anyway)."""
    spec = STRATEGIES.get(name)
    return spec.requires if spec is not None else frozenset()


def masking_config(data: Mapping[str, Any] | StrategyConfig | None = None, **fields) -> StrategyConfig:
    """The config of ``data["strategy"]`` (default ``random``) built by its registered class, e.g.
    ``masking_config({"strategy": "roi", "ratio_in": 0.8})``; a config instance passes through."""
    if isinstance(data, StrategyConfig) and not fields:
        return data
    d = {**(data.model_dump() if isinstance(data, StrategyConfig) else dict(data or {})), **fields}
    name = d.get("strategy", "random")
    spec = STRATEGIES.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"unknown masking strategy '{name}'; choose one of {sorted(STRATEGIES)}")
    return spec.config.model_validate(d)


def _as_masking_config(v: Any) -> Any:
    """PretrainConfig's ``masking`` field: a dict is validated by its strategy's config class (the discriminator
    is looked up in the registry at validation time, so strategies registered later are accepted too). Its
    ValidationError keeps the field locations under ``masking`` (pydantic nests them)."""
    return masking_config(v) if isinstance(v, Mapping) else v


# the type of a config field holding any strategy's config: dumped with the fields of its own class
AnyMaskingConfig = Annotated[SerializeAsAny[StrategyConfig], BeforeValidator(_as_masking_config)]


def create_masker(cfg: StrategyConfig | Mapping[str, Any]) -> MaskingStrategy:
    """The strategy for ``cfg`` (a config or its fields): ``create_masker(cfg)(MaskingBatch(...))``."""
    cfg = masking_config(cfg)
    return STRATEGIES[cfg.strategy].cls(cfg)


def visible_count(cfg: StrategyConfig, n: int) -> int | None:
    """Visible cells per image under ``cfg`` on a grid of ``n`` cells when fixed, else None (see
    :meth:`MaskingStrategy.visible_count`)."""
    return STRATEGIES[cfg.strategy].cls.visible_count(cfg, n)
