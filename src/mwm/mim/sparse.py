"""Sparse (masked) versions of dense CNN layers, SparK-style (Tian et al., ICLR 2023, Fig. 2).

SparK treats the visible patches of a masked image as a *sparse* point cloud and emulates submanifold
sparse convolution with dense kernels: every layer that mixes positions (conv, pooling) runs densely and
its output is **re-masked** to the visible set at its resolution, and normalization statistics are taken
over **visible positions only** (the masked "holes" would otherwise pull BatchNorm's mean towards zero and
shift the distribution the encoder sees at fine-tuning, when nothing is masked).

Invariant (what makes the layers below correct and cheap): every tensor flowing through a sparsified
encoder is exactly zero at masked positions. It holds by induction: the input image is multiplied by
the mask; conv / pool / norm / channels-last linear outputs are re-masked; the remaining ops in the
supported families (ReLU, GELU, SiLU, residual sums, per-channel scales such as ConvNeXt's layer
scale, DropPath) map zero to zero. So BatchNorm can take its visible-position statistics as plain sums
divided by the visible count — no gather/scatter (SparK's ``x[ii]`` indexing) and no second masking pass.

Mask stride: the keep-mask may be drawn on a grid finer than the encoder's output stride (e.g. 8-px cells on a
stride-32 ResNet: an 8 × 8 grid at 64 px). Each resolution then sees the mask through :func:`keep_at` — upsampled
where the map is finer than the grid, any-pooled where it is coarser (a coarse cell is active when any of its
sub-cells is visible). The induction above still holds at every resolution, and since masked pixels are zeroed
at the input and every map below the grid's resolution is masked at the grid's cells, no masked pixel's value
reaches any feature (tests/mim/test_mask_stride.py perturbs them and compares).

State: the keep-mask is never module-global (SparK's ``encoder._cur_active`` is, so two encoders in one
process — e.g. a teacher and a student, or two ranks' replicas under DataParallel — read each other's
mask). Here every sparse layer holds a reference to a :class:`MaskContext` owned by its encoder; the
encoder pushes the mask at the start of its forward and pops it in a ``finally``. The context stack is
thread-local, so replicas sharing a context in threads never see each other's frame. A frame caches
the upsampled mask once per resolution and dtype, so each resolution is expanded once per forward
instead of once per layer.

Layer swap: :func:`sparsify` changes a module's class *in place* to a subclass (``SparseConv2d`` is a
``nn.Conv2d``), so parameter names, buffers, hooks and ``state_dict`` keys are untouched and the weights
load straight back into the dense timm model.

Distributed: :class:`SparseBatchNorm2d` can all-reduce its three sums (Σx, Σx², n) across a process
group (set by :meth:`SparseEncoder.convert_sync_batchnorm` / ``SparK.convert_sync_batchnorm``), which is
exactly synchronised BatchNorm over the visible positions of the global batch. Do **not** use
``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` on a sparse encoder: it replaces the sparse layers
with dense ones and silently normalizes over the masked holes again.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MaskContext", "MaskFrame", "upsample_keep", "keep_at", "masked_batch_norm", "MaskedBatchNorm2d",
           "SparseConv2d", "SparseMaxPool2d", "SparseAvgPool2d", "SparseBatchNorm2d", "SparseLayerNorm2d",
           "SparseLayerNorm", "SparseLinear", "sparsify", "UnsupportedLayerError"]


class UnsupportedLayerError(NotImplementedError):
    """A layer that mixes positions in a way the sparse encoder cannot emulate (GroupNorm, GRN, SE pooling…)."""


def upsample_keep(keep: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest upsampling of a keep-mask by an integer factor per axis.

    keep: (B, 1, h, w) bool → (B, 1, H, W) bool, H = h·fh, W = w·fw. One ``expand`` + one copy (equivalent to
    ``repeat_interleave`` on both axes, which makes two copies).
    """
    B, _, h, w = keep.shape
    H, W = size
    if H % h or W % w:
        raise ValueError(f"feature size {H}×{W} is not an integer multiple of the mask grid {h}×{w}; "
                         f"use an input size divisible by the encoder stride")
    fh, fw = H // h, W // w
    if fh == 1 and fw == 1:
        return keep
    return keep[:, :, :, None, :, None].expand(B, 1, h, fh, w, fw).reshape(B, 1, H, W)


def keep_at(keep: torch.Tensor, size: tuple[int, int], coarse: str = "any") -> torch.Tensor:
    """The keep-mask at a feature resolution ``size`` = (H, W), from the mask grid (h, w).

    Finer maps (H ≥ h): nearest upsampling, every position of a visible cell is visible (:func:`upsample_keep`).
    Coarser maps (H < h, a mask stride finer than the layer's stride): a coarse cell is **active when any of its
    sub-cells is visible** (any-pooling over the h/H × w/W sub-cells), so each level sees every visible pixel
    below it; the masked sub-cells of an active cell are still zero at the input and at every finer level, so
    their pixels never reach the features (SparK only upsamples: its mask grid is always the top level's).
    ``coarse="all"``: a coarse cell is active only when **all** its sub-cells are visible, so the deep levels stay
    as sparse as the mask (their visible share = the share of fully visible coarse cells); the visible pixels of
    a partly masked cell then reach only the finer levels. Either way no masked pixel reaches a feature.
    keep: (B, 1, h, w) bool → (B, 1, H, W) bool.
    """
    B, _, h, w = keep.shape
    H, W = size
    if H >= h and W >= w:
        return upsample_keep(keep, size)
    if H <= h and W <= w and h % H == 0 and w % W == 0:
        cells = keep.reshape(B, 1, H, h // H, W, w // W)
        return cells.all(dim=(3, 5)) if coarse == "all" else cells.any(dim=(3, 5))
    raise ValueError(f"feature size {H}×{W} and the mask grid {h}×{w} do not tile each other; use an input size "
                     f"divisible by the encoder stride and a mask stride that divides it")


class MaskFrame:
    """The mask of one encoder call. ``keep`` (B, 1, h, w) bool or ``None`` (dense: every position visible).

    :meth:`mask` returns the float mask at a feature resolution (:func:`keep_at`: upsampled to finer maps,
    any-pooled to coarser ones when the mask stride is finer than the layer's stride), cached per (H, W, dtype,
    device) so each resolution is built once per forward however many layers use it.
    """

    __slots__ = ("keep", "coarse", "_cache")

    def __init__(self, keep: torch.Tensor | None, coarse: str = "any"):
        self.keep = keep
        self.coarse = coarse  # how a level coarser than the mask grid pools it (keep_at)
        self._cache: dict = {}

    @property
    def dense(self) -> bool:
        return self.keep is None

    def mask(self, size: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """(B, 1, H, W) mask in ``dtype`` (1 = visible)."""
        key = (size[0], size[1], dtype)
        m = self._cache.get(key)
        if m is None:
            m = keep_at(self.keep, size, self.coarse).to(dtype)
            self._cache[key] = m
        return m

    def count(self, size: tuple[int, int]) -> torch.Tensor:
        """Number of visible positions at this resolution over the batch, a 0-d float32 tensor (no host sync)."""
        key = ("n", size[0], size[1])
        n = self._cache.get(key)
        if n is None:
            h, w = self.keep.shape[2:]
            if size[0] >= h and size[1] >= w:  # upsampled: each visible cell is (H/h)·(W/w) positions
                n = self.keep.sum(dtype=torch.float32) * ((size[0] // h) * (size[1] // w))
            else:  # pooled to a coarser level
                n = keep_at(self.keep, size, self.coarse).sum(dtype=torch.float32)
            self._cache[key] = n
        return n

    def remask(self, y: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """Zero the masked positions of an NCHW tensor (no-op when dense). ``inplace`` only for fresh outputs of ops
        whose backward does not read their output (conv, pooling): saves an allocation and a copy."""
        if self.keep is None:
            return y
        m = self.mask(y.shape[-2:], y.dtype)
        return y.mul_(m) if inplace else y * m

    def remask_nhwc(self, y: torch.Tensor) -> torch.Tensor:
        """Same for a channels-last (B, H, W, C) tensor."""
        if self.keep is None:
            return y
        return y * self.mask(y.shape[1:3], y.dtype).permute(0, 2, 3, 1)


class MaskContext:
    """Per-encoder holder of the current :class:`MaskFrame`; a thread-local stack so nested or concurrent
    calls each see their own mask. Pickles/deep-copies as an empty context (frames never outlive a call)."""

    def __init__(self):
        self._local = threading.local()

    def _stack(self) -> list[MaskFrame]:
        s = getattr(self._local, "stack", None)
        if s is None:
            s = self._local.stack = []
        return s

    @contextmanager
    def active(self, keep: torch.Tensor | None, coarse: str = "any"):
        frame = MaskFrame(keep, coarse)
        stack = self._stack()
        stack.append(frame)
        try:
            yield frame
        finally:
            stack.pop()

    def current(self) -> MaskFrame:
        s = self._stack()
        if not s:
            raise RuntimeError("a sparse layer ran outside its SparseEncoder.forward (no keep-mask is active); "
                               "call the encoder as encoder(x, keep), not its inner model. Gradient "
                               "checkpointing that re-runs layers during backward is not supported.")
        return s[-1]

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


# ---------------------------------------------------------------------------------------------- BatchNorm


def masked_batch_norm(x: torch.Tensor, mask: torch.Tensor, count: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm,
                      assume_zero: bool = True, process_group=None) -> torch.Tensor:
    """BatchNorm over the visible positions only, computed with masked sums (no gather/scatter).

    x: (B, C, H, W); mask: (B, 1, H, W) float, 1 = visible; count: 0-d tensor n = Σ mask.
    With μ = Σ(x·m)/n and σ² = Σ(x²·m)/n − μ² (biased, as BatchNorm normalizes), the output is
    ``((x − μ)/√(σ² + ε)·γ + β)·m`` — identical to ``F.batch_norm`` on the (n, C) gathered visible features
    scattered back into zeros (SparK's ``SparseBatchNorm2d``), but without the gather/scatter copies. Running
    statistics (training, ``track_running_stats``) are updated with the unbiased σ²·n/(n−1) as
    ``nn.BatchNorm2d`` does; eval mode normalizes with them. ``assume_zero``: x is already zero at masked
    positions (the encoder invariant), so Σ(x·m) = Σx and no extra masking pass is needed. Statistics are
    accumulated in float32 whatever the input dtype (bf16 autocast).
    """
    training = bn.training or (bn.running_mean is None and bn.running_var is None)
    if not assume_zero:
        x = x * mask
    weight = bn.weight if bn.weight is not None else x.new_ones(x.shape[1], dtype=_acc(x.dtype))
    bias = bn.bias if bn.bias is not None else x.new_zeros(x.shape[1], dtype=_acc(x.dtype))
    if training:
        mean, var, n = _visible_stats(x, count, process_group)
        if bn.training and bn.track_running_stats and bn.running_mean is not None:
            factor = _momentum(bn)
            with torch.no_grad():
                unbiased = var * (n / (n - 1).clamp_min(1))
                bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), factor)
                bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), factor)
        if process_group is None:
            return _MaskedBN.apply(x, mask, n, mean, var, weight, bias, bn.eps)
        # synchronised: let autograd differentiate through the all-reduced sums
        return _affine(x, mask, mean, var, weight, bias, bn.eps)
    # eval: a per-channel affine map with the running statistics; the native kernel differentiates it
    return F.batch_norm(x, bn.running_mean, bn.running_var, weight, bias, False, 0.0, bn.eps) * mask


def _visible_stats(x: torch.Tensor, count: torch.Tensor, process_group=None):
    """Visible-position mean and biased variance per channel; x is zero at masked positions.

    Σx by ``sum`` and Σx² as a squared ``vector_norm`` per (sample, channel): two streaming reductions with no
    temporary (``var_mean`` over (0, 2, 3) is 10× slower on CPU, ``(x*x).sum`` allocates a full copy).
    Accumulated in float32 at least. Returns (mean, var, n), n ≥ 1. Detached unless synchronised: the custom
    backward of :class:`_MaskedBN` differentiates the statistics itself; the synchronised path lets autograd do
    it through a differentiable all-reduce.
    """
    C = x.shape[1]
    acc = _acc(x.dtype)
    sync = process_group is not None
    with torch.set_grad_enabled(sync and torch.is_grad_enabled()):
        xs = x if sync else x.detach()
        s1 = xs.sum((0, 2, 3), dtype=acc)
        if sync:
            s2 = (xs.to(acc) ** 2).sum((0, 2, 3))  # differentiable everywhere (a norm is not at 0)
        else:
            s2 = torch.linalg.vector_norm(xs.flatten(2), dim=-1, dtype=acc).square().sum(0)
        n = count.to(acc).reshape(1)
        if sync:
            from torch.distributed.nn.functional import all_reduce  # differentiable: exact SyncBN over visible

            s1, s2, n = all_reduce(torch.cat([s1, s2, n]), group=process_group).split([C, C, 1])
        n = n.clamp_min(1)
        mean = s1 / n
        var = (s2 / n - mean * mean).clamp_min(0)
    return mean, var, n


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for half types, else the dtype itself (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def _affine(x, mask, mean, var, weight, bias, eps):
    """``((x − μ)·γ/√(σ²+ε) + β)·m`` by autograd (synchronised statistics, which carry their own gradient)."""
    C = x.shape[1]
    acc = _acc(x.dtype)
    scale = torch.rsqrt(var.to(acc) + eps) * weight.to(acc)
    shift = bias.to(acc) - mean.to(acc) * scale
    return torch.addcmul(shift.to(x.dtype).view(1, C, 1, 1), x, scale.to(x.dtype).view(1, C, 1, 1)) * mask


class _MaskedBN(torch.autograd.Function):
    """Training-mode masked BatchNorm with a hand-written backward built on the native BatchNorm kernels.

    Forward: the native eval-mode kernel normalizes with the visible statistics (one fused pass), then the
    output is re-masked in place. Backward, with g the output gradient masked to visible positions,
    x̂ = (x − μ)·r, r = 1/√(σ²+ε) and sums over visible positions (BatchNorm's gradient over the n visible
    samples, Ioffe & Szegedy 2015, Alg. 1 differentiated):

        ∂γ = Σ g·x̂,   ∂β = Σ g,   ∂x = γr·(g − Σg/n − x̂·Σ(g·x̂)/n)

    The native eval-mode backward gives ∂γ, ∂β and γr·g in one call; the remaining terms are affine in x,
    ``k1·x + k0``, added with two in-place passes (k0 only at visible positions, so ∂x stays exactly zero at
    masked ones). On CPU this is as fast as dense BatchNorm; the same formula differentiated op by op is ~3×
    slower (memory-bound passes dominate small feature maps).
    """

    @staticmethod
    def forward(ctx, x, mask, n, mean, var, weight, bias, eps):
        y = F.batch_norm(x, mean.to(weight.dtype), var.to(weight.dtype), weight, bias, False, 0.0, eps)
        y.mul_(mask)
        ctx.save_for_backward(x, mask, n, mean, var, weight)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, g):
        x, mask, n, mean, var, weight = ctx.saved_tensors
        C = x.shape[1]
        gm = g * mask
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            gm, x, weight, mean.to(weight.dtype), var.to(weight.dtype), None, None, False, ctx.eps,
            [True, True, True])
        invstd = torch.rsqrt(var + ctx.eps)
        a = weight.detach().to(invstd.dtype) * invstd
        k1 = -a * invstd * gw.to(invstd.dtype) / n
        k0 = -a * gb.to(invstd.dtype) / n - k1 * mean
        gx.addcmul_(x, k1.to(gx.dtype).view(1, C, 1, 1)).addcmul_(mask.to(gx.dtype), k0.to(gx.dtype).view(1, C, 1, 1))
        return gx, None, None, None, None, gw, gb, None


def _momentum(bn: nn.modules.batchnorm._BatchNorm) -> float:
    """nn.BatchNorm's exponential-average factor, incrementing ``num_batches_tracked`` as it does."""
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    if bn.momentum is None:  # cumulative moving average (reads the counter, as torch does)
        return 1.0 / float(bn.num_batches_tracked)
    return bn.momentum


class MaskedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with an explicit mask argument: ``forward(x, keep_up)``, keep_up (B, 1, H, W) bool.
    Used by the decoder's densify step (SparK Fig. 2), where features are sparse but no encoder context exists.
    ``_mwm_sync_group``: a process group to synchronise the statistics over (see ``SparK.convert_sync_batchnorm``)."""

    _mwm_sync_group = None

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if keep is None:
            return super().forward(x)
        m = keep.to(x.dtype)
        return masked_batch_norm(x, m, keep.sum(dtype=torch.float32), self, assume_zero=False,
                                 process_group=self._mwm_sync_group)


# ---------------------------------------------------------------------------------------- sparse layers


class _Sparse:
    """Mixin: the layer's mask context lives in ``self._mwm_ctx`` (set by :func:`sparsify`)."""

    _mwm_ctx: MaskContext

    def _frame(self) -> MaskFrame:
        return self._mwm_ctx.current()


class SparseConv2d(_Sparse, nn.Conv2d):
    """Dense convolution, output re-masked to the visible set at the output resolution (SparK's dense
    emulation of submanifold sparse convolution)."""

    def forward(self, x):
        return self._frame().remask(super().forward(x), inplace=True)


class SparseMaxPool2d(_Sparse, nn.MaxPool2d):
    def forward(self, x):
        return self._frame().remask(super().forward(x), inplace=True)


class SparseAvgPool2d(_Sparse, nn.AvgPool2d):
    def forward(self, x):
        return self._frame().remask(super().forward(x), inplace=True)


class SparseBatchNorm2d(_Sparse, nn.BatchNorm2d):
    """BatchNorm2d over visible positions (:func:`masked_batch_norm`); plain BatchNorm when the call is dense."""

    _mwm_sync_group = None  # set by SparseEncoder.convert_sync_batchnorm

    def forward(self, x):
        f = self._frame()
        if f.dense:
            return super().forward(x)
        size = x.shape[-2:]
        return masked_batch_norm(x, f.mask(size, x.dtype), f.count(size), self, assume_zero=True,
                                 process_group=self._mwm_sync_group)


class SparseLayerNorm2d(_Sparse):
    """Mixin over a channels-first LayerNorm class (timm ``LayerNorm2d``), applied by :func:`sparsify`.

    LayerNorm normalizes each position over its own channels,
    so normalizing the visible positions alone (SparK's gather) equals normalizing everything and re-masking:
    the masked positions would only hold β."""

    def forward(self, x):
        return self._frame().remask(super().forward(x))


class SparseLayerNorm(_Sparse):
    """Mixin over a channels-last LayerNorm class (timm ``LayerNorm`` / ``nn.LayerNorm`` inside ConvNeXt blocks on
    (B, H, W, C)), applied by :func:`sparsify`;
    any other input rank (e.g. a pooled (B, C) head) passes through dense."""

    def forward(self, x):
        y = super().forward(x)
        return self._frame().remask_nhwc(y) if y.ndim == 4 else y


class SparseLinear(_Sparse, nn.Linear):
    """Linear on channels-last (B, H, W, C) maps (ConvNeXt's point-wise MLP); its bias would fill the holes."""

    def forward(self, x):
        y = super().forward(x)
        return self._frame().remask_nhwc(y) if y.ndim == 4 else y


_CLASS_CACHE: dict[tuple[type, type], type] = {}


def _subclass(mixin: type, base: type) -> type:
    """``mixin`` over ``base`` (e.g. SparseLayerNorm2d over timm's LayerNorm2d), created once per pair."""
    if issubclass(base, mixin):
        return base
    key = (mixin, base)
    cls = _CLASS_CACHE.get(key)
    if cls is None:
        if mixin in (SparseConv2d, SparseMaxPool2d, SparseAvgPool2d, SparseBatchNorm2d, SparseLinear) and \
                base in mixin.__mro__:
            cls = mixin  # exact torch class: use the named class (nicer repr, picklable by name)
        else:
            # a named module-level class so whole-model pickling (torch.save(model)) can find it
            name = f"Sparse{base.__name__}"
            while name in globals():
                name += "_"
            cls = type(name, (mixin, base), {"__module__": __name__, "__qualname__": name})
            globals()[name] = cls
        _CLASS_CACHE[key] = cls
    return cls


def _unsupported(m: nn.Module) -> str | None:
    """Why a module cannot be emulated sparsely, or None."""
    name = type(m).__name__
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and type(m) not in (nn.BatchNorm2d, nn.SyncBatchNorm):
        return "a BatchNorm variant with fused extras (e.g. timm BatchNormAct2d)"
    if isinstance(m, (nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)):
        return "GroupNorm/InstanceNorm statistics span masked positions"
    if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) or "GlobalResponseNorm" in name or \
            name in ("SEModule", "EffectiveSEModule", "SqueezeExcite", "EcaModule"):
        return "global pooling over the feature map would count masked positions"
    return None


def sparsify(model: nn.Module, ctx: MaskContext) -> nn.Module:
    """Swap, in place, every supported layer of ``model`` for its sparse subclass bound to ``ctx``.

    Conv2d (and subclasses) → SparseConv2d; MaxPool2d / AvgPool2d → re-masked; BatchNorm2d / SyncBatchNorm →
    SparseBatchNorm2d (local statistics; see module doc for synchronised stats); timm LayerNorm2d →
    channels-first sparse LN; LayerNorm / Linear on channels-last maps → re-masked. Raises
    :class:`UnsupportedLayerError` naming the first layer that mixes positions some other way.
    """
    from timm.layers import LayerNorm2d

    for name, m in model.named_modules():
        why = _unsupported(m)
        if why:
            raise UnsupportedLayerError(f"cannot sparsify layer '{name}' ({type(m).__name__}): {why}. "
                                        "Supported backbones: timm resnet*/resnext*, convnext* (v1).")
        cls = type(m)
        if isinstance(m, nn.Conv2d):
            new = _subclass(SparseConv2d, cls)
        elif isinstance(m, nn.MaxPool2d):
            new = _subclass(SparseMaxPool2d, cls)
        elif isinstance(m, nn.AvgPool2d):
            new = _subclass(SparseAvgPool2d, cls)
        elif cls in (nn.BatchNorm2d, nn.SyncBatchNorm):
            new = SparseBatchNorm2d  # SyncBatchNorm → local sparse BN (sync via the encoder's option)
        elif isinstance(m, LayerNorm2d):
            new = _subclass(SparseLayerNorm2d, cls)
        elif isinstance(m, nn.LayerNorm):
            new = _subclass(SparseLayerNorm, cls)
        elif isinstance(m, nn.Linear):
            new = _subclass(SparseLinear, cls)
        else:
            continue
        if new is not cls:
            m.__class__ = new
        m._mwm_ctx = ctx
    return model
