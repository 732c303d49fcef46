"""The options every transfer task shares: :class:`TransferConfig`, the base of ``FinetuneConfig``
(``mwm finetune``), ``SegmentConfig`` (``mwm segment``) and ``DetectConfig`` (``mwm detect``).

A task redeclares a field only where its default or range differs (batch size, epochs, lr, …; see each
config). The resolved ``model_dump(mode="json")`` of every task config is what the bench identifies finished task
runs by (:func:`mwm.bench.parts.task_identity`): a new field here is a new key in every task's identity, so it
must come with a default that reproduces what the tasks did before (tests/transfer/test_config_dumps.py pins the
dumps).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..data.types import ReadOptions
from ..engine.runtime import check_device

__all__ = ["TransferConfig", "Resize"]

Resize = Literal["pad", "stretch", "crop"]


class TransferConfig(BaseModel):
    """Data, weights, the optimisation budget, seed and device of a transfer task (``extra="forbid"``)."""

    model_config = ConfigDict(extra="forbid")

    # -- data --------------------------------------------------------------------------------------------------
    data: Path = Field(description="labelled images: npz (labels / masks, split), an image folder, a CSV")
    out: Path = Field(description="output folder: metrics.json, config.yaml, the model")
    size: int | None = Field(default=None, ge=8, description="input side in pixels; default: the encoder's "
                                                            "pretraining size (encoder.json), else 64")
    resize: Resize = "pad"
    read: ReadOptions = Field(default_factory=ReadOptions)
    train_limit: int | None = Field(default=None, ge=1, description="train on N training images only "
                                                                   "(label-efficiency runs); val/test stay whole")
    # -- model -------------------------------------------------------------------------------------------------
    weights: str = Field(description="RUN/encoder.pth, RUN/, 'none' (random init) or 'timm' (hub, online)")
    arch: str | None = Field(default=None, description="timm name; default: from encoder.json beside the weights")
    # -- optimisation ------------------------------------------------------------------------------------------
    batch_size: int = Field(default=64, ge=1, description="images per step")
    epochs: int | None = Field(default=None, ge=1, description="passes over the training images")
    lr: float | None = Field(default=None, gt=0, description="peak learning rate")
    weight_decay: float | None = Field(default=None, ge=0, description="not applied to biases and norms")
    patience: int | None = Field(default=None, ge=0, description="stop after this many val evaluations without "
                                                                 "improvement (0 or None: never stop early)")
    seed: int = Field(default=0, ge=0, description="data order, augmentation and head initialisation")
    # -- hardware ----------------------------------------------------------------------------------------------
    device: str = Field(default="auto", description="auto, cpu, cuda, cuda:1, gpu, mps (one device)")

    @field_validator("device")
    @classmethod
    def _device_name(cls, v: str) -> str:
        return check_device(v)

    @field_validator("weights")
    @classmethod
    def _weights_given(cls, v: str) -> str:
        if not str(v).strip():
            raise ValueError("give RUN/encoder.pth, RUN/, none or timm")
        return str(v)
