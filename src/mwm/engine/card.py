"""``encoder.json``: the card that travels with an exported encoder (``RUN/encoder.pth``), written by pretraining
(:func:`mwm.train.export.export_encoder`) and read by every consumer of the weights (``--weights`` of the transfer
tasks and ``--init`` of pretraining, through :func:`mwm.weights.resolve_weights`).

The file is one JSON object, ``json.dumps(card, indent=2)`` plus a newline, keys in this order: ``arch``,
``timm_kwargs``, ``format``, ``load``, ``detectron2`` (how to load the files), then what the run adds: ``size``,
``method``, ``ema``, ``normalize`` (``{"mean": [3], "std": [3]}``, or null for raw [0, 1] inputs). Keys this class
does not name are kept as they are (``extra="allow"``), so a card written by a newer mwm loads and saves unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN  # = mwm.weights' (engine sits below weights)
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD

from ..errors import MWMError

__all__ = ["EncoderCard", "CARD_NAME"]

CARD_NAME = "encoder.json"


class EncoderCard(BaseModel):
    """What ``encoder.json`` says. Every field may be absent in a card written by hand or by an older mwm;
    :attr:`model_fields_set` tells absent from null (``normalize`` absent: ImageNet's statistics; null: raw
    inputs)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    arch: str | None = Field(default=None, description="timm model name")
    timm_kwargs: dict | None = Field(default_factory=dict, description="extra timm.create_model arguments (ViT "
                                                                       "img_size…)")
    format: str | None = None
    load_hint: str | None = Field(default=None, alias="load", description="one line of Python that loads "
                                                                         "encoder.pth (the file's 'load' key)")
    detectron2: str | None = Field(default=None, description="how to use encoder_d2.pth (ResNets), else null")
    size: int | None = Field(default=None, description="pretraining image side in pixels")
    method: str | None = None
    ema: bool | None = None
    normalize: dict | None = Field(default=None, description="input mean/std the encoder was trained with; null: "
                                                             "raw [0, 1] inputs")

    @classmethod
    def for_export(cls, arch: str, timm_kwargs: dict, detectron2: bool, **extra) -> "EncoderCard":
        """The card :func:`mwm.train.export.export_encoder` writes: loading instructions for ``arch`` (and the
        Detectron2 file when ``detectron2``), then ``extra`` in its order."""
        d2 = ("encoder_d2.pth: MODEL.WEIGHTS; RESNETS.STRIDE_IN_1X1 False"
              + (", RES2_OUT_CHANNELS 64" if arch in ("resnet18", "resnet34") else "")) if detectron2 else None
        return cls.model_validate({
            "arch": arch, "timm_kwargs": timm_kwargs, "format": "timm state_dict",
            "load": f"timm.create_model({arch!r}, pretrained=False, **timm_kwargs).load_state_dict("
                    "torch.load('encoder.pth'), strict=False)  # missing: classifier keys only",
            "detectron2": d2, **extra})

    # -- the file ------------------------------------------------------------------------------------------------

    def to_json(self) -> str:
        """The file's text: the keys that were given (absent stays absent), indented by 2, newline-terminated."""
        return json.dumps(self.model_dump(by_alias=True, exclude_unset=True), indent=2) + "\n"

    def save(self, path: str | Path) -> Path:
        """Write atomically to ``path`` (a file, or a run folder → ``folder/encoder.json``); returns the file."""
        from ..io import atomic_write_text

        path = Path(path)
        if path.is_dir():
            path = path / CARD_NAME
        atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "EncoderCard":
        """Read ``path`` (the card, a run folder, or the ``encoder.pth`` it sits beside)."""
        path = Path(path)
        if path.is_dir():
            path = path / CARD_NAME
        elif path.name != CARD_NAME and path.suffix != ".json":
            path = path.with_name(CARD_NAME)
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except (OSError, ValueError) as e:  # JSON and pydantic errors are ValueErrors
            raise MWMError(f"{path}: not a readable encoder card ({e}); it is written by `mwm pretrain` next to "
                           "encoder.pth") from e

    @classmethod
    def beside(cls, weights: str | Path) -> "EncoderCard":
        """The card next to a weights file, or an empty card (nothing known) when there is none."""
        path = Path(weights).with_name(CARD_NAME)
        return cls.load(path) if path.is_file() else cls()

    # -- what consumers need -------------------------------------------------------------------------------------

    def input_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) to normalize [0, 1] inputs with: the card's, zeros/ones for ``normalize: null`` (trained on
        raw inputs: feed them the same way), ImageNet's when the card does not say."""
        if "normalize" in self.model_fields_set and self.normalize is None:
            return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        norm = self.normalize or {}
        return tuple(norm.get("mean", IMAGENET_MEAN)), tuple(norm.get("std", IMAGENET_STD))
