"""SparK's light UNet decoder with hierarchical densification (Tian et al., ICLR 2023, Fig. 2: "densifying").

Densify (per encoder level j, top = stride 32 first): normalize the sparse features over visible positions
(``densify_norm``: sparse BN for BN backbones, LN for ConvNeXt, as SparK), fill the holes with a learned mask
token of that level ``[M_j] ∈ R^{1×C_j×1×1}``, project to the decoder width of that level (1×1 conv at the top
level, 3×3 below — SparK's ``densify_proj``; identity when the widths already match at the top).

Decode: ``x ← block_j(x + S_j)`` from stride 32 to stride 1, each block ×2 upsampling with the width halving
(``width, width/2, …``); a final 1×1 conv maps to image channels. The decoder predicts the whole image;
the loss keeps only masked patches.

Blocks (``block``):
  * ``"spark"`` — SparK's ``UNetBlock``: ConvTranspose2d(c, c, 4, s2, p1) → [3×3 conv c→c, BN, ReLU6] →
    [3×3 conv c→c/2, BN]. About 17.5·c²·r² MACs per block at output side r.
  * ``"light"`` (default) — ConvTranspose2d(c, c/2, 2, s2) → 2 × [3×3 conv c/2→c/2, BN, ReLU]: the upsampling
    and the convolutions run at the halved width, ≈ 5·c²·r² MACs, 3.5× cheaper at the same width. With SparK's
    halving rule every block costs the same, so the decoder is 5 equal blocks; see
    ``benchmarks/bench_pretrain_step.py`` for the step-time consequence.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from timm.layers import LayerNorm2d, trunc_normal_
from torch import nn

from .sparse import MaskedBatchNorm2d, keep_at

__all__ = ["LightDecoder"]


class _SparKBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.ConvTranspose2d(cin, cin, kernel_size=4, stride=2, padding=1, bias=True),
            nn.Conv2d(cin, cin, 3, padding=1, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(inplace=True),
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
        )


class _LightBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.ConvTranspose2d(cin, cout, kernel_size=2, stride=2, bias=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        )


class _MaskedLayerNorm2d(LayerNorm2d):
    """Channels-first LN for the densify step; per-position, so masking the output equals SparK's gather."""

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        y = super().forward(x)
        return y if keep is None else y * keep.to(y.dtype)


class _Identity(nn.Module):
    def forward(self, x, keep=None):
        return x


def _densify_norm(kind: str, channels: int) -> nn.Module:
    if kind == "bn":
        return MaskedBatchNorm2d(channels)
    if kind == "ln":
        return _MaskedLayerNorm2d(channels)
    if kind == "none":
        return _Identity()
    raise ValueError(f"densify_norm must be 'bn', 'ln' or 'none', got {kind!r}")


class LightDecoder(nn.Module):
    """SparK decoder. ``forward(features, keep) → pred (B, out_chans, H, W)``.

    Args:
        channels: encoder channels per level, finest first (``SparseEncoder.channels``).
        reductions: their strides, finest first; consecutive levels must differ by ×2 (4, 8, 16, 32).
        width: decoder width at the top (stride-32) level; halves at every ×2 upsampling.
        out_chans: image channels to predict.
        densify_norm: ``"bn"`` (sparse BatchNorm over visible positions), ``"ln"`` or ``"none"``.
        block: ``"light"`` or ``"spark"`` (see module doc).
        densify_kernel: kernel of the densify projections below the top level (SparK: 3; 1 is ~9× cheaper).
        channels_last: run the upsampling path in channels-last memory format. The late stages have few channels
            (width/16, width/32) at high resolution, where oneDNN's NCHW convolutions are 3–10× slower than NHWC
            on CPU; cuDNN is also at least as fast in NHWC.
    """

    def __init__(self, channels: list[int], reductions: list[int], width: int = 256, out_chans: int = 3,
                 densify_norm: Literal["bn", "ln", "none"] = "bn", block: Literal["light", "spark"] = "light",
                 densify_kernel: int = 3, channels_last: bool = True):
        super().__init__()
        top = reductions[-1]
        n_up = round(math.log2(top))
        if 2 ** n_up != top or any(r2 != 2 * r1 for r1, r2 in zip(reductions[:-1], reductions[1:])):
            raise ValueError(f"decoder needs power-of-two strides doubling per level, got {reductions}")
        if width // 2 ** n_up < 1:
            raise ValueError(f"decoder width {width} is too small to halve {n_up} times")
        self.width, self.stride, self.block_kind, self.channels_last = width, top, block, channels_last
        widths = [width // 2 ** i for i in range(n_up + 1)]  # at strides top, top/2, …, 1
        enc_top_down = channels[::-1]
        self.mask_tokens = nn.ParameterList()
        self.densify_norms = nn.ModuleList()
        self.densify_projs = nn.ModuleList()
        for j, c in enumerate(enc_top_down):
            tok = nn.Parameter(torch.zeros(1, c, 1, 1))
            trunc_normal_(tok, mean=0, std=0.02, a=-0.02, b=0.02)
            self.mask_tokens.append(tok)
            self.densify_norms.append(_densify_norm(densify_norm, c))
            if j == 0 and c == widths[0]:
                proj = nn.Identity()
            else:
                k = 1 if j == 0 else densify_kernel
                proj = nn.Conv2d(c, widths[j], kernel_size=k, padding=k // 2, bias=True)
            self.densify_projs.append(proj)
        blk = {"light": _LightBlock, "spark": _SparKBlock}[block]
        self.blocks = nn.ModuleList([blk(widths[i], widths[i + 1]) for i in range(n_up)])
        self.head = nn.Conv2d(widths[-1], out_chans, kernel_size=1, bias=True)
        self._init()

    def _init(self):
        # SparK's LightDecoder.initialize, applied to what SparK's decoder holds (the upsampling blocks and the
        # head): truncated-normal(0.02) convs, Kaiming (fan_out) for transposed convs, unit norms. SparK builds the
        # densify projections and norms in the SparK module, outside the decoder, so they keep PyTorch's default
        # init (Kaiming-uniform, a=√5, non-zero bias); the mask tokens are truncated-normal(0.02) at ±0.02 (above).
        spark_decoder_init([*self.blocks.modules(), self.head])

    def densify(self, features: list[torch.Tensor], keep: torch.Tensor, coarse: str = "any") -> list[torch.Tensor]:
        """Sparse features (finest first) → dense decoder inputs, top level first. keep: (B, 1, h, w) bool at the
        mask grid; each level's active set is the encoder's (:func:`~mwm.mim.sparse.keep_at`: any-pooled where the
        mask grid is finer than the level), its inactive positions get the level's mask token."""
        out = []
        for j, f in enumerate(features[::-1]):
            k = keep_at(keep, f.shape[-2:], coarse)
            f = self.densify_norms[j](f, k)
            f = torch.where(k, f, self.mask_tokens[j].to(f.dtype))
            out.append(self.densify_projs[j](f))
        return out

    def forward(self, features: list[torch.Tensor], keep: torch.Tensor, coarse: str = "any") -> torch.Tensor:
        dense = self.densify(features, keep, coarse)
        x = dense[0].contiguous(memory_format=torch.channels_last) if self.channels_last else dense[0]
        for i, blk in enumerate(self.blocks):
            if 0 < i < len(dense):
                x = x + dense[i]
            x = blk(x)
        return self.head(x)


def spark_decoder_init(modules) -> None:
    """SparK's ``LightDecoder.initialize`` on ``modules``: truncated-normal(0.02) convs, Kaiming (fan_out) transposed
    convs, zero biases, unit norms (shared by the decoder and heads built like it, e.g. HPM's loss predictor)."""
    for m in modules:
        if isinstance(m, nn.Conv2d):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.ConvTranspose2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
