"""`PretrainConfig`: everything `mwm pretrain` does, typed and validated (pydantic, ``extra="forbid"``).

The method is a nested config of the class its ``model.method`` names in the method registry
(:mod:`mwm.train.methods`): :class:`~mwm.mim.SparKConfig` (``spark``, timm CNNs), :class:`~mwm.mim.MAEConfig`
(``mae``, timm ViTs) or any registered method's; when a YAML/``--set`` config leaves ``method`` out it is inferred
from the arch name (``vit*``/``deit*`` → ``mae``, else ``spark``). ``model.size`` is the decode size too, so the
two can never disagree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..data.types import ReadOptions
from ..data.paired import AugmentConfig
from ..masking import AnyMaskingConfig, MaskingConfig, strategy_requires
from ..mim import SparKConfig
from .methods.registry import AnyMethodConfig, method_spec

__all__ = ["PretrainConfig", "AugmentConfig", "RESUME_MAY_CHANGE", "SPAWN_STRATEGIES"]

Precision = Literal["32-true", "bf16-mixed", "16-mixed"]
Strategy = Literal["auto", "ddp", "ddp_spawn", "ddp_fork", "ddp_find_unused_parameters_true"]
SPAWN_STRATEGIES = ("ddp_spawn",)  # launch() pickles its arguments: callbacks that are closures cannot go along

# Options a resumed run may change without breaking "continue exactly" (they steer logging/outputs only), plus
# ``epochs`` (extends or shortens the cosine schedule: allowed, with a warning) and the launch options (the
# world size itself is checked separately, because the effective batch and the learning rate depend on it).
RESUME_MAY_CHANGE = frozenset({"resume", "epochs", "log_every", "checkpoint_every", "recon_every", "recon_images",
                               "workers", "accelerator", "devices", "strategy", "num_nodes", "data", "rois", "out",
                               "min_roi_share", "init_sha256"})


def _check_pretrain_options(cfg: "PretrainConfig") -> None:
    """The arch exists in timm, the masking masks something, ``init`` and ``model.pretrained`` are not both set."""
    from ..mim.registry import check_arch

    check_arch(cfg.model.arch)
    m = cfg.masking
    if m.strategy == "roi" and m.ratio_in == 0 and m.ratio_out == 0:
        raise ValueError("ratio_in and ratio_out are both 0: nothing is masked, so nothing is learned; MWM uses "
                         "e.g. --ratio-in 0.8 --ratio-out 0.2")
    if m.strategy != "roi" and m.ratio == 0:
        raise ValueError("--ratio 0 masks nothing, so the reconstruction loss is 0 and nothing is learned; use "
                         "e.g. --ratio 0.6 (SparK) or 0.75 (MAE)")
    if cfg.init.lower() != "none" and cfg.model.pretrained:
        raise ValueError("give the encoder's initial weights once: --init (recorded with a hash) or "
                         "model.pretrained, not both")


def _infer_method(arch: str) -> str:
    a = arch.lower()
    return "mae" if a.startswith(("vit", "deit", "eva", "beit")) else "spark"


class PretrainConfig(BaseModel):
    """Stage 2: masked image modeling with a (guided) masker, on Lightning Fabric.

    Learning rate: ``lr = base_lr × effective_batch / 256`` with ``effective_batch = batch_size × accumulate ×
    world_size`` (the linear scaling rule of MAE/SparK), unless ``lr`` is given: then that absolute value is used
    as is. Schedule per optimizer step: linear warmup over ``warmup_epochs``, then cosine to
    ``final_lr_ratio × lr``, the weight decay annealed by a cosine from ``weight_decay`` to ``weight_decay_end``
    (SparK's ``lr_wd_annealing``, see :mod:`mwm.train.optim`). Defaults follow SparK (LAMB, base_lr 2e-4, betas
    (0.9, 0.95), weight decay 0.04 → 0.2, warmup from 0.005 × lr, cosine to 0.001 × lr, gradient clipping at 5),
    scaled down in epochs for small medical datasets; the three schedule ends left unset follow the method's
    reference (MAE: warmup from 0, cosine to 0, constant weight decay).
    """

    model_config = ConfigDict(extra="forbid")

    # -- data --------------------------------------------------------------------------------------------------
    data: Path = Field(description="scans: folder, .npz, .csv or a single file (anything `open_source` reads)")
    out: Path = Field(description="run folder: config.yaml, checkpoints/, metrics.csv, tb/, recon/, encoder.pth")
    split: str | None = Field(default=None, description="default: 'train' when the data has splits, else all")
    limit: int | None = Field(default=None, ge=1, description="only the first N images of the split (quick runs)")
    rois: Path | None = Field(default=None, description="rois.jsonl from `mwm localize`, joined by image id")
    allow_missing_rois: bool = Field(default=False, description="images without a manifest record get no ROI")
    min_roi_share: float = Field(default=0.5, ge=0, le=1, description="ROI-guided masking warns (with read.strict / "
                                 "--strict: fails) when fewer of the images have an ROI box")
    resize: Literal["pad", "stretch", "crop"] = "pad"
    read: ReadOptions = ReadOptions()
    augment: AugmentConfig = AugmentConfig()
    normalize: bool = Field(default=True, description="normalize inputs with the timm arch's mean/std (as "
                                                      "fine-tuning with timm's data config will)")
    # -- model and masking -------------------------------------------------------------------------------------
    model: AnyMethodConfig = SparKConfig()  # the class of its `method` (mwm.train.methods registry)
    init: str = Field(default="none", description="encoder init: none, imagenet (timm's weights for the arch, "
                      "online) or a file: a timm checkpoint (.pth/.safetensors) or a run's encoder.pth")
    init_sha256: str | None = Field(default=None, description="sha256 of the init weights, filled in by the run "
                                    "(config.yaml); when set, other weights are refused")
    masking: AnyMaskingConfig = MaskingConfig()  # the class of its `strategy` (mwm.masking registry)
    sync_bn: bool = Field(default=True, description="synchronise (masked) BatchNorm statistics across GPUs "
                                                    "(CUDA only: DDP rejects SyncBatchNorm on CPU)")
    # -- optimisation ------------------------------------------------------------------------------------------
    epochs: int = Field(default=100, ge=1)
    batch_size: int = Field(default=32, ge=1, description="images per device and micro-step")
    accumulate: int = Field(default=1, ge=1, description="micro-steps per optimizer step")
    lr: float | None = Field(default=None, gt=0, description="absolute peak learning rate; overrides base_lr")
    base_lr: float = Field(default=2e-4, gt=0, description="peak lr per 256 images of effective batch")
    final_lr_ratio: float | None = Field(default=None, ge=0, le=1, description="cosine ends at this fraction of "
                                         "lr; default: the method's reference (SparK 0.001, MAE 0)")
    warmup_start_ratio: float | None = Field(default=None, ge=0, le=1, description="warmup starts at this fraction "
                                             "of lr; default: SparK 0.005, MAE 0")
    optimizer: Literal["adamw", "lamb"] = "lamb"
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(default=0.04, ge=0, description="not applied to biases, norms, tokens")
    weight_decay_end: float | None = Field(default=None, ge=0, description="weight decay at the last step (cosine "
                                           "from weight_decay); default: SparK 0.2, MAE constant (= weight_decay)")
    warmup_epochs: float = Field(default=5.0, ge=0)
    clip_grad: float | None = Field(default=5.0, gt=0, description="max global gradient norm; None = off")
    ema: float | None = Field(default=None, gt=0, lt=1, description="EMA decay of the weights (e.g. 0.999); "
                                                                   "encoder.pth is then exported from the EMA")
    # -- hardware ----------------------------------------------------------------------------------------------
    precision: Precision = "32-true"
    accelerator: str = Field(default="auto", description="auto, cpu, cuda, gpu, mps")
    devices: int | str = Field(default=1, description="devices per node: a count, -1/'auto' for all, or '0,2'")
    num_nodes: int = Field(default=1, ge=1)
    strategy: Strategy = "auto"
    workers: int | None = Field(default=None, ge=0, description="DataLoader workers per rank; default: from the "
                                                               "CPU count")
    # -- run bookkeeping ---------------------------------------------------------------------------------------
    seed: int = Field(default=0, ge=0)
    resume: bool = Field(default=False, description="continue OUT/checkpoints/last.pt exactly")
    log_every: int = Field(default=10, ge=1, description="optimizer steps between metrics rows (host syncs)")
    checkpoint_every: int = Field(default=1, ge=1, description="epochs between checkpoints (and at the end)")
    recon_every: int = Field(default=5, ge=0, description="epochs between reconstruction PNGs (0: only at the end)")
    recon_images: int = Field(default=8, ge=0, description="images in each reconstruction PNG (0: none)")

    @model_validator(mode="before")
    @classmethod
    def _model_method(cls, data: Any) -> Any:
        # ``method`` picks the config class (the registry); a user who only sets arch/size should not have to know it.
        if isinstance(data, dict) and isinstance(data.get("model"), dict) and "method" not in data["model"]:
            m = dict(data["model"])
            m["method"] = _infer_method(str(m.get("arch", "resnet50")))
            data = {**data, "model": m}
        return data

    @field_validator("devices")
    @classmethod
    def _devices(cls, v: int | str) -> int | str:
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            return int(v)  # "2" from the command line means two devices, as Fabric's int does
        return v

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"betas must lie in [0, 1), got {v}")
        return v

    @model_validator(mode="after")
    def _check(self) -> "PretrainConfig":
        strategy = self.masking.strategy
        requires = strategy_requires(strategy)
        if "saliency" in requires and self.rois is None:
            raise ValueError(f"masking strategy '{strategy}' masks by per-image saliency maps and needs --rois "
                             "rois.jsonl written by `mwm localize --save-saliency` (its records name the maps); "
                             "use --masking random for uniform masking")
        if "boxes" in requires and self.rois is None:
            raise ValueError(f"masking strategy '{strategy}' masks by ROI and needs --rois rois.jsonl (written by "
                             "`mwm localize`); use --masking random for uniform masking")
        if "text" in requires:
            raise ValueError(f"masking strategy '{strategy}' needs per-image text, which `mwm pretrain` does not "
                             "load yet")
        check = getattr(method_spec(self.model.method).factory, "check_config", None)
        if check is not None:
            check(self)  # the method's own rules, e.g. MAE needs a fixed visible count
        _check_pretrain_options(self)
        if self.model.in_chans != 3:
            raise ValueError(f"model.in_chans must be 3: pretraining decodes 3-channel images so the exported "
                             f"encoder matches timm's default in_chans=3 (got {self.model.in_chans})")
        return self

    @property
    def size(self) -> int:
        return self.model.size

    @property
    def arch(self) -> str:
        return self.model.arch
