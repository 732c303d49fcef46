"""The vision tower of a CLIP model as three stages, so an information bottleneck can sit after block L.

``embed(x)`` → tokens, ``blocks`` (each maps tokens → tokens), ``head(tokens)`` → image embedding.
Two open_clip tower kinds are covered: its native ``VisionTransformer`` (OpenAI-style CLIP, our tiny
CLIPs) and ``TimmModel`` with a timm ``VisionTransformer`` trunk (BiomedCLIP). Both use the towers'
own public pieces (open_clip's ``_embeds``/``_pool``, timm's ``forward_head``), no monkeypatching.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class VisionStages(Protocol):
    blocks: nn.ModuleList
    num_prefix_tokens: int  # CLS (+ registers) before the patch tokens
    grid: tuple[int, int]  # patch grid (h, w)
    image_size: tuple[int, int]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) normalized → tokens (B, T, D), T = num_prefix_tokens + h*w."""

    def run_blocks(self, tokens: torch.Tensor, start: int, stop: int | None = None) -> torch.Tensor:
        """Apply blocks[start:stop] to (B, T, D)."""

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens after the last block (B, T, D) → image embedding (B, E), not normalized."""


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class OpenClipViTStages:
    """open_clip ``VisionTransformer`` (attributes conv1, transformer.resblocks, ln_post, proj)."""

    def __init__(self, visual: nn.Module):
        self.visual = visual
        self.blocks = visual.transformer.resblocks
        self.batch_first = getattr(visual.transformer, "batch_first", True)
        self.num_prefix_tokens = 1
        self.grid = _pair(visual.grid_size)
        self.image_size = _pair(visual.image_size)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual._embeds(x)

    def run_blocks(self, tokens: torch.Tensor, start: int, stop: int | None = None) -> torch.Tensor:
        x = tokens if self.batch_first else tokens.transpose(0, 1)
        for blk in self.blocks[start:stop]:
            x = blk(x)
        return x if self.batch_first else x.transpose(0, 1)

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.visual._pool(tokens)
        return pooled @ self.visual.proj if self.visual.proj is not None else pooled


class TimmViTStages:
    """open_clip ``TimmModel`` whose trunk is a timm ``VisionTransformer`` (e.g. BiomedCLIP's ViT-B/16)."""

    def __init__(self, visual: nn.Module):
        self.visual = visual
        self.trunk = visual.trunk
        if not hasattr(self.trunk, "blocks") or not hasattr(self.trunk, "patch_embed"):
            raise TypeError(f"timm trunk {type(self.trunk).__name__} is not a VisionTransformer; M2IB needs token blocks")
        self.blocks = self.trunk.blocks
        self.num_prefix_tokens = int(getattr(self.trunk, "num_prefix_tokens", 1))
        self.grid = _pair(self.trunk.patch_embed.grid_size)
        self.image_size = _pair(self.trunk.patch_embed.img_size)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        t = self.trunk
        x = t.patch_embed(x)
        x = t._pos_embed(x)
        x = t.patch_drop(x)
        return t.norm_pre(x)

    def run_blocks(self, tokens: torch.Tensor, start: int, stop: int | None = None) -> torch.Tensor:
        for blk in self.blocks[start:stop]:
            tokens = blk(tokens)
        return tokens

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.visual.head(self.trunk.forward_head(self.trunk.norm(tokens)))


def vision_stages(visual: nn.Module) -> VisionStages:
    """The stage view of an open_clip vision tower; a clear error for towers without token blocks."""
    if hasattr(visual, "transformer") and hasattr(visual, "conv1"):
        return OpenClipViTStages(visual)
    if hasattr(visual, "trunk"):
        return TimmViTStages(visual)
    raise TypeError(f"vision tower {type(visual).__name__} has no transformer blocks; M2IB needs a ViT image encoder "
                    "(open_clip ViT or a timm ViT trunk), not a CNN such as RN50")
