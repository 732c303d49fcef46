"""Contrastive / self-distillation baselines with lightly's heads and losses: ``simclr``, ``mocov2``, ``byol``.

The Mask What Matters paper compares against these three (its Tables 2–4). Each trains the same timm backbone as
the MIM methods (``timm.create_model(arch, num_classes=0)``) and exports it as ``encoder.pth`` the same way; the
heads, the losses, the momentum update and its schedule are lightly's (``lightly.models.modules``,
``lightly.loss``, ``lightly.models.utils.update_momentum``, ``lightly.utils.scheduler.cosine_schedule``). The two
views of each image are drawn on the device from the run's generator (:mod:`.augment`: grayscale-aware, no colour
jitter), so a resumed run is exact.

* **SimCLR** (Chen et al., ICML 2020, arXiv:2002.05709): ``SimCLRProjectionHead`` (2 layers, hidden = the
  backbone's width, output 128, §B.1 / Fig. 8), NT-Xent over the 2B views of the batch (``NTXentLoss``, eq. 1) at
  temperature 0.5 (the paper's CIFAR-10 / small-batch setting, Table 5 and §B.9; lightly's default).
* **MoCo v2** (Chen et al., arXiv:2003.04297; official ``facebookresearch/moco`` ``moco/builder.py``): a query
  encoder + ``MoCoProjectionHead`` (2-layer MLP, hidden 2048, output 128), a key (momentum) encoder updated as
  ``k ← m·k + (1 − m)·q`` with m = 0.999, τ = 0.2, and a queue of keys as negatives: lightly's
  ``NTXentLoss(memory_bank_size=(K, 128))`` (enqueues each step's keys, drops the oldest). The paper's K = 65536
  is longer than most medical datasets (the queue would hold stale keys of the same scans); the default here is
  lightly's MoCo example's 4096. Keys are gathered over the GPUs before they are enqueued (as the official
  ``concat_all_gather``), so every rank holds the same queue; the official shuffle-BN is not done (sync BN is, on
  several GPUs).
* **BYOL** (Grill et al., NeurIPS 2020, arXiv:2006.07733): online encoder + ``BYOLProjectionHead`` (4096 → 256)
  + ``BYOLPredictionHead`` (4096 → 256); the target (encoder + projector) follows the online weights with
  ``τ_k = 1 − (1 − τ_base)(cos(πk/K) + 1)/2`` from τ_base = 0.996 to 1 over the run's K optimizer steps (§3.2;
  lightly's ``cosine_schedule(k, K, 0.996, 1)`` divides by K − 1: exactly 1 at the last step); loss the
  symmetrised negative cosine similarity of the online predictions and the other view's target projections
  (lightly's ``NegativeCosineSimilarity``): eq. 2's ``2 − 2·cos`` summed over both view orders, divided by 4,
  minus 1 — the same minimiser, gradients scaled by 1/4.

The momentum (target / key) networks sit in the model (checkpointed with it, never optimized: no gradients) and
are updated after each optimizer step (:meth:`PretrainMethod.on_after_optimizer_step`); MoCo's queue is a
checkpoint entry of its own (``queue``). No method here draws masks or reconstructions.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field
from torch import nn

from ...errors import MWMError
from .augment import ViewAugmentConfig, augment_views
from .base import PretrainMethod
from .registry import MethodConfig, register_method

if TYPE_CHECKING:
    from ...weights import InitWeights
    from ..config import PretrainConfig

__all__ = ["ContrastiveConfig", "SimCLRConfig", "MoCoV2Config", "BYOLConfig", "TwoViews", "ContrastiveNet",
           "ContrastiveMethod", "SimCLRMethod", "MoCoV2Method", "BYOLMethod", "total_optimizer_steps"]


# -- configs ---------------------------------------------------------------------------------------------------------
class ContrastiveConfig(MethodConfig):
    """Fields shared by the contrastive methods: the projection head's sizes and the view augmentation."""

    proj_dim: int = Field(default=128, ge=1, description="output width of the projection head")
    hidden_dim: int | None = Field(default=None, ge=1, description="hidden width of the heads; default: the "
                                   "method's reference")
    views: ViewAugmentConfig = ViewAugmentConfig()


class SimCLRConfig(ContrastiveConfig):
    method: Literal["simclr"] = "simclr"
    temperature: float = Field(default=0.5, gt=0, description="NT-Xent temperature (SimCLR Table 5, small batches)")


class MoCoV2Config(ContrastiveConfig):
    method: Literal["mocov2"] = "mocov2"
    temperature: float = Field(default=0.2, gt=0, description="InfoNCE temperature (MoCo v2: 0.2)")
    queue_size: int = Field(default=4096, ge=1, description="keys kept as negatives (MoCo v2: 65536; lightly's "
                            "example: 4096, better for datasets of a few thousand scans)")
    momentum: float = Field(default=0.999, ge=0, le=1, description="key-encoder momentum at the first step")
    momentum_end: float = Field(default=0.999, ge=0, le=1, description="momentum at the last step (cosine); "
                                "MoCo v2 keeps it constant")


class BYOLConfig(ContrastiveConfig):
    method: Literal["byol"] = "byol"
    proj_dim: int = Field(default=256, ge=1, description="output width of the projector and predictor (BYOL: 256)")
    momentum: float = Field(default=0.996, ge=0, le=1, description="τ_base: target momentum at the first step")
    momentum_end: float = Field(default=1.0, ge=0, le=1, description="target momentum at the last step (cosine)")
    views: ViewAugmentConfig = ViewAugmentConfig(blur_prob=(1.0, 0.1))  # BYOL's asymmetric blur (Table 6)


# -- the model -------------------------------------------------------------------------------------------------------
@dataclass
class TwoViews:
    """Two augmented, normalized views of one batch."""

    x0: torch.Tensor
    x1: torch.Tensor


class ContrastiveNet(nn.Module):
    """A timm backbone (``encoder``, exported), its projection head, optionally a predictor (BYOL) and momentum
    copies of backbone + projector (MoCo, BYOL). ``forward(x0, x1)`` returns the embeddings the loss needs, so
    every trained parameter is used inside one forward (DDP)."""

    def __init__(self, cfg: ContrastiveConfig, heads: Callable[[int], tuple[nn.Module, nn.Module | None]],
                 momentum: bool = False):
        """``heads(width)`` → (projection head, predictor or None) for the backbone's feature width; ``momentum``:
        keep momentum copies of backbone and projection head (frozen: updated by :meth:`update_momentum`)."""
        import timm

        super().__init__()
        self.encoder = timm.create_model(cfg.arch, pretrained=cfg.pretrained, num_classes=0, in_chans=cfg.in_chans)
        self.projection, self.prediction = heads(self.encoder.num_features)
        self.encoder_momentum = self.projection_momentum = None
        if momentum:
            self.encoder_momentum = copy.deepcopy(self.encoder)
            self.projection_momentum = copy.deepcopy(self.projection)
            self._freeze_momentum()

    def _freeze_momentum(self) -> None:
        from lightly.models.utils import deactivate_requires_grad

        deactivate_requires_grad(self.encoder_momentum)
        deactivate_requires_grad(self.projection_momentum)

    def reset_momentum(self) -> None:
        """Momentum copies = the online weights (after ``--init`` loaded new ones into the encoder)."""
        if self.encoder_momentum is not None:
            self.encoder_momentum.load_state_dict(self.encoder.state_dict())
            self.projection_momentum.load_state_dict(self.projection.state_dict())

    def convert_sync_batchnorm(self) -> None:
        """BatchNorm (backbone and heads) synchronised over the GPUs (the trainer's ``sync_bn``), in place."""
        nn.SyncBatchNorm.convert_sync_batchnorm(self)

    @torch.no_grad()
    def update_momentum(self, m: float) -> None:
        """``target ← m·target + (1 − m)·online`` for backbone and projector (lightly's ``update_momentum``)."""
        from lightly.models.utils import update_momentum

        update_momentum(self.encoder, self.encoder_momentum, m)
        update_momentum(self.projection, self.projection_momentum, m)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.encoder(x))

    @torch.no_grad()
    def project_momentum(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_momentum(self.encoder_momentum(x)).detach()

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.encoder_momentum is None:  # SimCLR
            return {"z0": self.project(x0), "z1": self.project(x1)}
        if self.prediction is None:  # MoCo: a query of view 0, a key of view 1
            return {"q": self.project(x0), "k": self.project_momentum(x1)}
        # BYOL: both views through both branches (symmetrised loss)
        return {"p0": self.prediction(self.project(x0)), "p1": self.prediction(self.project(x1)),
                "t0": self.project_momentum(x0), "t1": self.project_momentum(x1)}


def total_optimizer_steps(cfg: "PretrainConfig", n_images: int) -> int:
    """Optimizer steps of the whole run (the momentum schedule's length), as the trainer counts them."""
    import torch.distributed as dist

    from ..data import micro_batches_per_epoch

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return micro_batches_per_epoch(n_images, cfg.batch_size, cfg.accumulate, world) // cfg.accumulate * cfg.epochs


# -- the methods -----------------------------------------------------------------------------------------------------
class ContrastiveMethod(PretrainMethod):
    """Two views → the model's embeddings → a lightly loss; momentum targets updated after each optimizer step.
    Schedule as in the papers: warmup from 0, cosine to 0, constant weight decay."""

    schedule_defaults = {"warmup_start_ratio": 0.0, "final_lr_ratio": 0.0, "weight_decay_end": None}
    draws_masks = False

    def __init__(self, cfg: "PretrainConfig", model: ContrastiveNet):
        super().__init__(cfg, model)
        self.total_steps = 1

    @classmethod
    def check_config(cls, cfg: "PretrainConfig") -> None:
        if cfg.model.arch.lower().startswith(("vit", "deit", "eva", "beit")):
            raise ValueError(f"{cfg.model.method} trains timm CNNs here (resnet18/50, convnext_*): a ViT would need "
                             f"its img_size in the export; got '{cfg.model.arch}' (MAE pretrains ViTs: --method mae)")
        if cfg.batch_size < 2:
            raise ValueError(f"{cfg.model.method} needs --batch-size 2 or more (negatives / BatchNorm in the heads "
                             f"see the batch); got {cfg.batch_size}")

    def prepare(self, ctx) -> None:
        super().prepare(ctx)
        self.total_steps = max(1, total_optimizer_steps(self.cfg, len(ctx.data)))

    def apply_init(self, init: "InitWeights") -> dict:
        """``--init`` weights into the backbone (timm names; the classifier is not part of it), then the momentum
        copies start from them too."""
        enc = self.model.encoder
        own = enc.state_dict()
        load = {k: v for k, v in init.state_dict.items() if k in own}
        bad = [k for k in own if k not in load or load[k].shape != own[k].shape]
        if bad:
            raise MWMError(f"{init.source}: no tensor of the right shape for {bad[:5]} of the '{self.cfg.arch}' "
                           "backbone")
        enc.load_state_dict(load)
        self.model.reset_momentum()
        return {"source": init.source, "sha256": init.sha256, "tensors": len(load), "skipped": [],
                "unused": sorted(set(init.state_dict) - set(own))}

    def views(self, batch: tuple[torch.Tensor, ...]) -> TwoViews:
        x0, x1 = augment_views(batch[0], self.cfg.model.views, self.ctx.generator)
        return TwoViews(self.normalize(x0), self.normalize(x1))

    def training_step(self, views: TwoViews) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = {k: v.float() for k, v in self.net(views.x0, views.x1).items()}  # losses in fp32 under mixed precision
        return self.loss(out), {}

    def loss(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def momentum_at(self, step: int) -> float:
        """The momentum used after optimizer step ``step`` (1-based): lightly's ``cosine_schedule`` at k = step − 1
        of K = the run's optimizer steps (k = 0 gives ``momentum``, the last step ``momentum_end``)."""
        from lightly.utils.scheduler import cosine_schedule

        m = self.cfg.model
        return cosine_schedule(step - 1, self.total_steps, m.momentum, m.momentum_end)

    def on_after_optimizer_step(self, step: int) -> None:
        if self.model.encoder_momentum is not None:
            self.model.update_momentum(self.momentum_at(step))
        super().on_after_optimizer_step(step)  # the run's --ema, after the target moved

    def encoder(self) -> nn.Module:
        return super().encoder().encoder  # the online timm backbone: its state_dict is in timm's names


class SimCLRMethod(ContrastiveMethod):
    """SimCLR: NT-Xent between the two views' projections, the other 2B − 2 views as negatives."""

    def __init__(self, cfg: "PretrainConfig"):
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        m = cfg.model
        super().__init__(cfg, ContrastiveNet(m, lambda w: (SimCLRProjectionHead(w, m.hidden_dim or w, m.proj_dim),
                                                           None)))
        self.criterion = NTXentLoss(temperature=m.temperature, gather_distributed=True)

    def loss(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.criterion(out["z0"], out["z1"])


class MoCoV2Method(ContrastiveMethod):
    """MoCo v2: InfoNCE of each query against its key and the queue (lightly's NT-Xent with a memory bank)."""

    def __init__(self, cfg: "PretrainConfig"):
        from lightly.loss import NTXentLoss
        from lightly.models.modules import MoCoProjectionHead

        m = cfg.model
        super().__init__(cfg, ContrastiveNet(m, lambda w: (MoCoProjectionHead(w, m.hidden_dim or 2048, m.proj_dim),
                                                           None), momentum=True))
        # the bank starts as random unit vectors (as the official queue), drawn here from the seeded global RNG
        self.criterion = NTXentLoss(temperature=m.temperature, memory_bank_size=(m.queue_size, m.proj_dim),
                                    gather_distributed=True)

    def prepare(self, ctx) -> None:
        super().prepare(ctx)
        self.criterion.to(ctx.device)
        # lightly reads the queue pointer with int() every step: on the host that is no device sync (the bank itself
        # stays on the device; the criterion is not part of the DDP-wrapped model, so no buffer broadcast sees it)
        self.criterion.memory_bank.bank_ptr = self.criterion.memory_bank.bank_ptr.cpu()

    def loss(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.criterion(out["q"], out["k"])  # enqueues the keys (the query carries a gradient)

    def state_dict(self) -> dict[str, Any]:
        bank = self.criterion.memory_bank
        return {**super().state_dict(), "queue": {"bank": bank.bank.clone(), "ptr": bank.bank_ptr.clone()}}

    def load_state_dict(self, state: dict[str, Any], source: str = "the checkpoint") -> None:
        super().load_state_dict(state, source)
        queue = state.get("queue")
        if queue is None:
            raise MWMError(f"{source} has no MoCo queue; it was not written by a mocov2 run")
        bank = self.criterion.memory_bank
        bank.bank.copy_(queue["bank"])
        bank.bank_ptr.copy_(queue["ptr"])


class BYOLMethod(ContrastiveMethod):
    """BYOL: the online predictions regress the other view's target projections (negative cosine similarity)."""

    def __init__(self, cfg: "PretrainConfig"):
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead

        m = cfg.model
        hidden = m.hidden_dim or 4096

        def heads(width: int) -> tuple[nn.Module, nn.Module]:
            return (BYOLProjectionHead(width, hidden, m.proj_dim), BYOLPredictionHead(m.proj_dim, hidden, m.proj_dim))

        super().__init__(cfg, ContrastiveNet(m, heads, momentum=True))
        self.criterion = NegativeCosineSimilarity()

    def loss(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        return 0.5 * (self.criterion(out["p0"], out["t1"]) + self.criterion(out["p1"], out["t0"]))


register_method("simclr", SimCLRConfig, SimCLRMethod, help="SimCLR (NT-Xent), timm CNNs, lightly heads/loss")
register_method("mocov2", MoCoV2Config, MoCoV2Method, help="MoCo v2 (momentum encoder + queue), lightly")
register_method("byol", BYOLConfig, BYOLMethod, help="BYOL (predictor + cosine momentum target), lightly")
