"""SparK sparse CNN encoder over a timm backbone, and weight export (timm, Detectron2).

>>> enc = SparseEncoder("resnet50")
>>> feats = enc(x, keep)   # x (B, 3, H, W), keep bool (B, 1, H/32, W/32)
>>> fine = SparseEncoder("resnet50", mask_stride=8)
>>> feats = fine(x, keep8)  # keep8 bool (B, 1, H/8, W/8): a finer mask grid, same features and weights
>>> [f.shape for f in feats]  # (B, 256, H/4, W/4), (B, 512, H/8, W/8), (B, 1024, H/16, W/16), (B, 2048, H/32, W/32)
>>> sd = encoder_state_dict_for_timm(enc)
>>> timm.create_model("resnet50").load_state_dict(sd, strict=False)   # missing: fc.weight, fc.bias only

The backbone is the full timm model (not ``features_only``) pruned by timm's own
``prune_intermediate_layers`` and run through ``forward_intermediates``, so parameter names are exactly the
timm model's (``features_only`` renames ConvNeXt's ``stages.0`` → ``stages_0``) and export is a plain
state_dict. Its layers are made sparse in place (:mod:`mwm.mim.sparse`) and read the keep-mask from this
encoder's own :class:`MaskContext`.
"""

from __future__ import annotations

import timm
import torch
from torch import nn

from ..weights import classifier_keys
from .sparse import MaskContext, SparseBatchNorm2d, sparsify

__all__ = ["SparseEncoder", "check_mask_stride", "encoder_state_dict_for_timm", "to_detectron2", "classifier_keys",
           "architecture_kwargs"]

# timm kwargs that regularize training but do not change the architecture or its weights: they steer the
# pretraining only and are not exported (fine-tuning chooses its own)
TRAINING_ONLY_KWARGS = frozenset({"drop_path_rate", "drop_rate", "drop_block_rate", "attn_drop_rate",
                                  "proj_drop_rate", "pos_drop_rate", "patch_drop_rate"})


def architecture_kwargs(kwargs: dict) -> dict:
    """``kwargs`` without :data:`TRAINING_ONLY_KWARGS`: what a timm model needs to load the exported weights."""
    return {k: v for k, v in kwargs.items() if k not in TRAINING_ONLY_KWARGS}


class SparseEncoder(nn.Module):
    """SparK encoder (Tian et al., ICLR 2023, Fig. 2): a timm CNN whose layers only "see" visible patches.

    Args:
        arch: timm model name (resnet18/34/50/101, resnext*, convnext_* v1).
        pretrained: timm pretrained weights (needs the hub or a local cache; the test suite never does).
        min_reduction: keep the feature levels whose stride is ≥ this (4 → strides 4, 8, 16, 32 as SparK).
        mask_stride: pixels per keep-mask cell; ``None`` = the output stride (SparK). A finer stride (8 on a
            stride-32 ResNet) must divide the output stride: each level then keeps a cell active when any of its
            sub-cells is visible (:func:`mwm.mim.sparse.keep_at`), masked pixels stay zero at every level.
        **model_kwargs: passed to ``timm.create_model`` (``in_chans=1`` for grayscale, ``drop_path_rate`` …).

    ``forward(x, keep)``: x (B, C, H, W); keep bool (B, 1, H/mask_stride, W/mask_stride), True = visible, or
    ``None`` (dense: identical to the timm model). Returns the feature maps, finest first, each exactly zero at
    inactive positions. Attributes: ``stride`` (the output stride, 32 for ResNet/ConvNeXt), ``mask_stride``
    (the mask grid's patch size), ``channels`` and ``reductions`` of the returned levels. A dilated model
    (timm ``output_stride=16``) repeats a stride; only the deepest level of each stride is returned.
    """

    def __init__(self, arch: str, pretrained: bool = False, min_reduction: int = 4, mask_stride: int | None = None,
                 coarse_active: str = "any", **model_kwargs):
        super().__init__()
        model = timm.create_model(arch, pretrained=pretrained, **model_kwargs)
        if not hasattr(model, "forward_intermediates") or not hasattr(model, "prune_intermediate_layers"):
            raise ValueError(f"timm model '{arch}' has no forward_intermediates API; use a resnet* or convnext*")
        info = model.feature_info
        deepest = {f["reduction"]: i for i, f in enumerate(info)}  # dilated stages repeat a stride: keep the last
        self.indices = [i for i, f in enumerate(info)
                        if f["reduction"] >= min_reduction and deepest[f["reduction"]] == i]
        model.prune_intermediate_layers(self.indices, prune_head=True)
        self.arch = arch
        self.model_kwargs = architecture_kwargs(model_kwargs)  # exported with the weights (encoder.json)
        self.channels = [info[i]["num_chs"] for i in self.indices]
        self.reductions = [info[i]["reduction"] for i in self.indices]
        self.stride = self.reductions[-1]
        self.mask_stride = check_mask_stride(mask_stride, self.stride, arch)
        self.coarse_active = coarse_active  # levels coarser than the mask grid: a cell active when any/all visible
        self.in_chans = model_kwargs.get("in_chans", 3)
        self._ctx = MaskContext()
        self.model = sparsify(model, self._ctx)

    def grid(self, size: int | tuple[int, int]) -> tuple[int, int]:
        """Mask grid (h, w) for an input of ``size`` (int or (H, W)): ``size // mask_stride``; the size must be a
        multiple of ``stride`` (the output stride)."""
        grid_for(size, self.stride)
        return grid_for(size, self.mask_stride)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> list[torch.Tensor]:
        if keep is not None:
            grid_for(x.shape[-2:], self.stride)
            _check_keep(keep, x, self.mask_stride)
        with self._ctx.active(keep, self.coarse_active) as frame:
            if keep is not None:
                x = x * frame.mask(x.shape[-2:], x.dtype)  # SparK: the encoder sees only visible pixels
            return self.model.forward_intermediates(x, indices=self.indices, intermediates_only=True)

    def convert_sync_batchnorm(self, process_group=None) -> "SparseEncoder":
        """Synchronise the sparse BatchNorm statistics across ``process_group`` (default: the world). Use this,
        never ``nn.SyncBatchNorm.convert_sync_batchnorm``, which would replace the sparse layers with dense ones."""
        import torch.distributed as dist

        group = process_group if process_group is not None else dist.group.WORLD
        for m in self.modules():
            if isinstance(m, SparseBatchNorm2d):
                m._mwm_sync_group = group
        return self

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights for ``timm.create_model(arch, pretrained=False)`` (see :func:`encoder_state_dict_for_timm`)."""
        return encoder_state_dict_for_timm(self)

    def dense_model(self, **kwargs) -> nn.Module:
        """A fresh dense timm model of the same arch holding the encoder's weights (classifier freshly initialised).
        ``kwargs`` override the creation kwargs (e.g. ``num_classes=2``)."""
        dense = timm.create_model(self.arch, pretrained=False, **{**self.model_kwargs, **kwargs})
        sd = encoder_state_dict_for_timm(self)
        missing, unexpected = dense.load_state_dict(sd, strict=False)
        assert not unexpected and set(missing) <= classifier_keys(dense), (missing, unexpected)
        return dense


def check_mask_stride(mask_stride: int | None, stride: int, arch: str = "the encoder") -> int:
    """The mask stride to use: ``stride`` when None; else it must divide the encoder's ``stride``."""
    if mask_stride is None:
        return stride
    if mask_stride < 1 or stride % mask_stride:
        divisors = [d for d in range(2, stride + 1) if stride % d == 0]
        raise ValueError(f"mask stride {mask_stride} must divide {arch}'s output stride {stride} (each level's "
                         f"cells are then whole groups of mask cells); choose one of {divisors}")
    return mask_stride


def grid_for(size: int | tuple[int, int] | torch.Size, stride: int) -> tuple[int, int]:
    H, W = (size, size) if isinstance(size, int) else tuple(size)[-2:]
    if H % stride or W % stride:
        raise ValueError(f"input size {H}×{W} is not a multiple of the encoder stride {stride}; "
                         f"resize to e.g. {max(stride, round(H / stride) * stride)}")
    return H // stride, W // stride


def _check_keep(keep: torch.Tensor, x: torch.Tensor, stride: int) -> None:
    grid = grid_for(x.shape[-2:], stride)
    if keep.dtype != torch.bool or keep.shape != (x.shape[0], 1, *grid):
        raise ValueError(f"keep must be bool of shape (B, 1, h, w) = {(x.shape[0], 1, *grid)} for input "
                         f"{tuple(x.shape)} at mask stride {stride}; got {keep.dtype} {tuple(keep.shape)}")


def encoder_state_dict_for_timm(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """Export an encoder (a :class:`SparseEncoder`, a ViT MAE encoder, or a model holding one as ``.encoder``) as
    a plain state_dict that ``timm.create_model(arch, pretrained=False, **kwargs).load_state_dict(sd, strict=False)``
    loads with ``missing_keys`` = the classifier keys only and no unexpected keys.

    Layers the pretraining pruned because nothing trains them (ConvNeXt's ``head.norm``) are filled with a fresh
    model's initial values, which is what fine-tuning would start from anyway. Tensors are detached CPU clones.
    """
    enc = getattr(encoder, "encoder", encoder)
    if hasattr(enc, "export_model_kwargs"):  # the ViT path carries img_size etc.
        kwargs = enc.export_model_kwargs()
    else:
        kwargs = dict(enc.model_kwargs)
    sd = {k: v.detach().cpu().clone() for k, v in enc.model.state_dict().items()}
    ref = _reference_model(enc.arch, kwargs)
    drop = classifier_keys(ref)
    ref_sd = ref.state_dict()
    unknown = set(sd) - set(ref_sd)
    if unknown:
        raise RuntimeError(f"encoder keys not in timm '{enc.arch}': {sorted(unknown)[:5]}")
    fill = [k for k in ref_sd if k not in sd and k not in drop]
    if fill:
        fresh = timm.create_model(enc.arch, pretrained=False, **kwargs).state_dict()
        sd.update({k: fresh[k].clone() for k in fill})
    return {k: sd[k] for k in ref_sd if k in sd and k not in drop}


def _reference_model(arch: str, kwargs: dict) -> nn.Module:
    """The timm model's names and shapes, built on the meta device (no allocation, no init cost) where its
    constructor allows; some constructors read tensor values (e.g. ``drop_path_rate`` schedules), then on CPU."""
    try:
        with torch.device("meta"):
            return timm.create_model(arch, pretrained=False, **kwargs)
    except (RuntimeError, NotImplementedError):
        return timm.create_model(arch, pretrained=False, **kwargs)


def to_detectron2(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a torchvision/timm ResNet state_dict to Detectron2's ResNet names, as detectron2's
    ``tools/convert-torchvision-to-d2.py`` does: ``conv1`` → ``stem.conv1``, ``bn1`` → ``stem.conv1.norm``,
    ``layerN`` → ``res{N+1}``, ``bnK`` → ``convK.norm``, ``downsample.0/1`` → ``shortcut`` / ``shortcut.norm``.
    Classifier (``fc.*``) and ``num_batches_tracked`` keys are dropped (Detectron2's FrozenBN has no counter).
    Save as ``{"model": sd, "__author__": "mwm", "matching_heuristics": True}`` (pickle) for
    ``MODEL.WEIGHTS``; set ``RESNETS.STRIDE_IN_1X1: False`` (torchvision-style stride in the 3×3 conv) and,
    for ResNet-18/34, ``RESNETS.RES2_OUT_CHANNELS: 64``.
    """
    out = {}
    for k, v in sd.items():
        if k.startswith("fc.") or k.endswith("num_batches_tracked"):
            continue
        n = k if "layer" in k else "stem." + k
        for t in (1, 2, 3, 4):
            n = n.replace(f"layer{t}", f"res{t + 1}")
        for t in (1, 2, 3):
            n = n.replace(f"bn{t}", f"conv{t}.norm")
        n = n.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        out[n] = v
    return out


class MaskedModel(nn.Module):
    """What SparK and MAE share: an encoder, a decoder, the loss settings, and the keep-mask grid.

    ``stride``: pixels per keep-mask cell (the mask stride: the encoder's ``mask_stride`` where it has one, else
    its stride); ``grid(size)`` → (h, w) for an input size (maskers use it). The loss patches are the mask cells.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, norm_pix: bool = True, eps: float = 1e-6):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.norm_pix, self.eps = norm_pix, eps

    @property
    def stride(self) -> int:
        return getattr(self.encoder, "mask_stride", self.encoder.stride)

    def grid(self, size: int | tuple[int, int]) -> tuple[int, int]:
        return self.encoder.grid(size)
