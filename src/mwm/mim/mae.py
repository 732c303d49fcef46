"""MAE for timm ViTs (He et al., CVPR 2022): drop the masked tokens, encode the visible ones, decode with a light
transformer, predict the pixels of every patch, score the masked ones.

>>> model = create_mim_model(MAEConfig(arch="vit_small_patch16_224", size=224))
>>> keep, _ = masker(batch=B, grid=model.grid(224), device=x.device)      # bool (B, 1, 14, 14), True = visible
>>> out = model(x, keep); out["loss"].backward()

Position embeddings (MAE ``models_mae.py``): encoder and decoder both use the fixed 2-D sin-cos table of MAE's
``util/pos_embed.py`` (class/prefix positions zero). The encoder's is timm's ``pos_embed`` parameter filled with
it and frozen (``requires_grad=False``), so it is still in ``encoder.pth`` and timm loads it; the optimizer never
sees it. ``pos_embed: learned`` keeps timm's trainable one (the default with ``pretrained``, whose checkpoint has
its own). Without ``pretrained`` the encoder is initialised as MAE's ``initialize_weights`` (xavier-uniform
linears and patch projection, N(0, 0.02) class token, unit LayerNorms) instead of timm's truncated normal.

Token dropping (MAE §3 "MAE encoder"): the encoder runs on the ``n_vis`` visible patch tokens (+ the class
token) only — the ×(1/(1−ratio)) saving that makes MAE fast. A batch is one dense tensor, so every sample needs
the same ``n_vis``: the ``random`` and ``roi_overall`` maskers guarantee it (so do ``soft`` and ``topk``);
MWM's two-level ``roi`` masker does not (its count follows ROI size) and is rejected with an error saying so.

Decoder (MAE §3 "MAE decoder"): visible tokens → linear to the decoder width, a shared learned mask token in
every masked slot, tokens put back in patch order, fixed 2-D sin-cos position embeddings, ``depth`` timm
transformer blocks, LayerNorm, a linear head to the p²·C pixels of each patch. The loss and the
reconstruction are shared with SparK (:mod:`mwm.mim.loss`).
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import timm
import torch
from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator
from timm.models.vision_transformer import Block
from torch import nn

from .encoder import MaskedModel, encoder_state_dict_for_timm, grid_for
from .loss import dump_without_default_target, target_field, masked_mse, reconstruct, target_channels, target_for, unpatchify

__all__ = ["MAE", "MAEConfig", "ViTEncoder", "MAEDecoder", "create_mae", "visible_index", "sincos_pos_embed_2d"]

_COUNT_HINT = ("MAE drops masked tokens, so every image of a batch needs the same number of visible patches; "
               "use masking strategy 'random' or 'roi_overall' (exact equal counts; 'soft' and 'topk' also work). "
               "The two-level 'roi' strategy varies the count with ROI size and cannot be batched without padding.")


class MAEConfig(BaseModel):
    """An MAE model on a timm ViT (MAE's defaults are decoder width 512, depth 8; a light 192 × 2 decoder is
    enough for fine-tuning transfer per MAE Table 1a/1b and costs a fraction of the encoder)."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["mae"] = "mae"
    arch: str = Field(default="vit_small_patch16_224", description="timm ViT (vit_tiny/small/base_patch16_224 …)")
    size: int = Field(default=224, gt=0, description="input side in pixels; a multiple of the patch size")
    in_chans: int = Field(default=3, ge=1)
    decoder_dim: int = Field(default=192, ge=32)
    decoder_depth: int = Field(default=2, ge=1)
    decoder_heads: int | None = Field(default=None, ge=1, description="default: decoder_dim // 64")
    norm_pix: bool = True
    eps: float = Field(default=1e-6, gt=0)
    drop_path_rate: float = Field(default=0.0, ge=0, lt=1)
    pretrained: bool = False
    pos_embed: Literal["sincos", "learned"] | None = Field(
        default=None, description="encoder position embedding: MAE's fixed 2-D sin-cos (frozen) or timm's learned "
                                  "one; default sincos, learned with pretrained weights")
    patch_size: int | None = Field(default=None, ge=2, description="the ViT's patch size (a timm kwarg, exported "
                                   "in encoder.json); default: the arch's (16 for *_patch16_*). 8 at 64 px: 8 × 8 "
                                   "tokens")
    mask_stride: int | None = Field(default=None, ge=2, description="pixels per mask cell; MAE masks whole tokens, "
                                    "so it can only be the patch size (set patch_size for a finer grid)")
    target: Literal["pixels", "meijering"] = target_field()

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        return dump_without_default_target(handler(self))  # the pinned dump of configs without a target

    @model_validator(mode="after")
    def _dims(self) -> "MAEConfig":
        if self.decoder_dim % 4:
            raise ValueError("decoder_dim must be a multiple of 4 (2-D sin-cos position embedding)")
        if self.decoder_dim % self.heads:
            raise ValueError(f"decoder_dim {self.decoder_dim} is not divisible by {self.heads} heads")
        if self.mask_stride is not None and self.patch_size is not None and self.mask_stride != self.patch_size:
            raise ValueError(_mask_stride_hint(self.mask_stride, self.patch_size, self.arch))
        return self

    @property
    def heads(self) -> int:
        return self.decoder_heads or max(1, self.decoder_dim // 64)


def _mask_stride_hint(mask_stride: int, patch: int, arch: str) -> str:
    return (f"mask stride {mask_stride} differs from {arch}'s patch size {patch}: MAE drops whole tokens, so its mask "
            f"cell is the patch. For a finer grid use smaller patches: model.patch_size {mask_stride} "
            f"(--set model.patch_size={mask_stride}); the encoder then has (size / {mask_stride})² tokens")


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding, MAE's ``get_2d_sincos_pos_embed`` (without the class row) for
    an (h, w) grid: (h·w, dim) in patch order (row-major). As MAE's (its ``meshgrid(grid_w, grid_h)`` puts w
    first), the first half of the channels encodes the **column**, the second half the row, each as
    [sin(pos·ω_k), cos(pos·ω_k)] with ω_k = 10000^(−k/(dim/4)), k < dim/4; computed in float64."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos embedding needs a dimension divisible by 4, got {dim}")
    h, w = grid
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")

    def axis(pos):
        a = pos.reshape(-1, 1) * omega
        return torch.cat([a.sin(), a.cos()], 1)

    return torch.cat([axis(xs), axis(ys)], 1).float()


def _mae_init_vit(model: nn.Module) -> None:
    """MAE's ``initialize_weights`` on a timm ViT: patch projection xavier-uniform as a linear, class token
    N(0, 0.02), every Linear xavier-uniform with zero bias, LayerNorms at 1/0."""
    w = model.patch_embed.proj.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    if getattr(model, "cls_token", None) is not None:
        nn.init.normal_(model.cls_token, std=0.02)
    _init_linears_and_norms(model)


def _init_linears_and_norms(module: nn.Module) -> None:
    """MAE's ``_init_weights``: every Linear xavier-uniform with zero bias, LayerNorms at 1/0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _fixed_sincos(model: nn.Module, grid: tuple[int, int]) -> None:
    """Fill timm's ``pos_embed`` (1, prefix + N or N, D) with MAE's sin-cos table (prefix rows 0) and freeze it."""
    pe = model.pos_embed
    n = grid[0] * grid[1]
    table = torch.zeros(pe.shape[1], pe.shape[2])
    table[-n:] = sincos_pos_embed_2d(pe.shape[2], grid)
    with torch.no_grad():
        pe.copy_(table[None])
    pe.requires_grad_(False)


def visible_index(keep: torch.Tensor, n_visible: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """keep (B, 1, h, w) bool → (ids_keep (B, n_vis), ids_restore (B, N)).

    ``ids_keep``: the visible patch indices of each sample in patch order (a stable sort puts visible first);
    ``ids_restore``: the inverse permutation, so ``cat([visible, masked])`` gathered with it is in patch order.
    With ``n_visible=None`` the count is read from ``keep`` (one host sync, unavoidable for a data-dependent
    shape) and checked equal across the batch; pass it (e.g. ``n_keep(h*w, ratio)``) to avoid the sync — the
    check then runs asynchronously on the device.
    """
    B = keep.shape[0]
    flat = keep.reshape(B, -1)
    counts = flat.sum(1)
    if n_visible is None:
        lo, hi = (int(v) for v in torch.aminmax(counts))
        if lo != hi:
            raise ValueError(f"visible patches per image range from {lo} to {hi}. {_COUNT_HINT}")
        n_visible = hi
    else:
        torch._assert_async((counts == n_visible).all(), f"visible-patch count differs from {n_visible}. {_COUNT_HINT}")
    order = torch.argsort((~flat).to(torch.uint8), dim=1, stable=True)
    return order[:, :n_visible], torch.argsort(order, dim=1)


class ViTEncoder(nn.Module):
    """A timm ViT that encodes only the visible patch tokens. ``forward(x, keep, n_visible=None)`` →
    (tokens (B, P + n_vis, D) after the final norm, P = prefix tokens (class/register), ids_restore (B, N)).
    ``keep=None`` encodes every token (the fine-tuning view)."""

    def __init__(self, arch: str, size: int, pretrained: bool = False, pos_embed: str | None = None,
                 **model_kwargs):
        super().__init__()
        model = timm.create_model(arch, pretrained=pretrained, img_size=size, **model_kwargs)
        for attr in ("patch_embed", "_pos_embed", "blocks", "norm"):
            if not hasattr(model, attr):
                raise ValueError(f"timm model '{arch}' is not a VisionTransformer (no {attr}); the MAE path needs one")
        if getattr(model, "dynamic_img_size", False):
            raise ValueError("dynamic_img_size ViTs are not supported: create the model at the pretraining size")
        model.reset_classifier(0)  # the head is never trained here; its keys are the ones export leaves out
        self.model, self.arch, self.size = model, arch, size
        self.model_kwargs = dict(model_kwargs)
        ph, pw = model.patch_embed.patch_size
        if ph != pw:
            raise ValueError(f"non-square patches {ph}×{pw} are not supported")
        self.stride = ph
        self.mask_stride = ph  # MAE drops whole tokens: the mask cell is the patch
        self.embed_dim = model.embed_dim
        self.num_prefix_tokens = model.num_prefix_tokens
        self.grid_size = tuple(model.patch_embed.grid_size)
        if not pretrained:
            _mae_init_vit(model)
        self.pos_embed_kind = pos_embed or ("learned" if pretrained else "sincos")
        if self.pos_embed_kind == "sincos" and getattr(model, "pos_embed", None) is not None:
            _fixed_sincos(model, self.grid_size)

    def export_model_kwargs(self) -> dict:
        """timm kwargs for the exported weights: img_size and the architecture ones (training-only
        regularizers such as drop_path_rate are left to the fine-tuning config)."""
        from .encoder import architecture_kwargs

        return {"img_size": self.size, **architecture_kwargs(self.model_kwargs)}

    def grid(self, size: int | tuple[int, int]) -> tuple[int, int]:
        return grid_for(size, self.stride)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None, n_visible: int | None = None):
        m = self.model
        t = m._pos_embed(m.patch_embed(x))  # (B, P + N, D): prefix tokens + position-embedded patch tokens
        P = self.num_prefix_tokens
        B, L, D = t.shape
        if keep is None:
            ids_restore = torch.arange(L - P, device=x.device).expand(B, -1)
        else:
            if keep.dtype != torch.bool or keep.shape != (B, 1, *self.grid_size):
                raise ValueError(f"keep must be bool (B, 1, h, w) = {(B, 1, *self.grid_size)}, got "
                                 f"{keep.dtype} {tuple(keep.shape)}")
            ids_keep, ids_restore = visible_index(keep, n_visible)
            vis = torch.gather(t[:, P:], 1, ids_keep[..., None].expand(-1, -1, D))
            t = torch.cat([t[:, :P], vis], 1)
        t = m.norm_pre(t)
        t = m.blocks(t)
        return m.norm(t), ids_restore

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        return encoder_state_dict_for_timm(self)


class MAEDecoder(nn.Module):
    """``forward(tokens (B, P + n_vis, D_enc), ids_restore (B, N)) → (B, N, p²·C)`` per-patch pixel predictions."""

    def __init__(self, embed_dim: int, grid: tuple[int, int], patch: int, out_chans: int, num_prefix_tokens: int,
                 dim: int = 192, depth: int = 2, heads: int = 3, mlp_ratio: float = 4.0):
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        # fixed (not learned) and recomputed from the grid, so it is not part of the state_dict
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, grid)[None], persistent=False)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, qkv_bias=True,
                                            norm_layer=partial(nn.LayerNorm, eps=1e-6)) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch * patch * out_chans)
        self._init()

    def _init(self):
        # MAE: xavier-uniform linears, zero biases, unit LayerNorms, N(0, 0.02) mask token
        nn.init.normal_(self.mask_token, std=0.02)
        _init_linears_and_norms(self)

    def inputs(self, tokens: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """The blocks' input (B, P + N, dim): embedded tokens, mask tokens in the masked slots, patch order, position
        embeddings (HPM's loss predictor reads the same tensor, :mod:`mwm.train.methods.hpm_mae`)."""
        x = self.embed(tokens)
        P = self.num_prefix_tokens
        B, N = ids_restore.shape
        vis = x[:, P:]
        filled = torch.cat([vis, self.mask_token.to(x.dtype).expand(B, N - vis.shape[1], -1)], 1)
        filled = torch.gather(filled, 1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))
        return torch.cat([x[:, :P], filled + self.pos_embed.to(x.dtype)], 1)  # prefix tokens carry no position

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Blocks, norm and pixel head on :meth:`inputs`' tensor → (B, N, p²·C)."""
        x = self.norm(self.blocks(x))
        return self.pred(x[:, self.num_prefix_tokens:])

    def forward(self, tokens: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        return self.head(self.inputs(tokens, ids_restore))


class MAE(MaskedModel):
    """``forward(x (B, C, H, W), keep bool (B, 1, h, w), n_visible=None) → {"loss", "pred" (B, C, H, W)}``;
    ``pred`` in target space (per-patch normalized when ``norm_pix``); :meth:`reconstruct` maps it back."""

    def forward(self, x: torch.Tensor, keep: torch.Tensor, n_visible: int | None = None,
                target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``target``: the map (B, 1, H, W) a map-target model reconstructs (``model.target``); default ``x``."""
        tokens, ids_restore = self.encoder(x, keep, n_visible)
        patches = self.decoder(tokens, ids_restore)
        chans = patches.shape[-1] // self.encoder.stride ** 2
        pred = unpatchify(patches, self.encoder.stride, keep.shape[-2:], chans)
        return {"loss": masked_mse(target_for(x, pred, target), pred, keep, self.norm_pix, self.eps), "pred": pred}

    def reconstruct(self, x: torch.Tensor, pred: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return reconstruct(x, pred, keep, self.norm_pix, self.eps)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        return encoder_state_dict_for_timm(self.encoder)


def create_mae(cfg: MAEConfig) -> MAE:
    kwargs = {"in_chans": cfg.in_chans}
    if cfg.drop_path_rate:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    if cfg.patch_size is not None:
        kwargs["patch_size"] = cfg.patch_size
    enc = ViTEncoder(cfg.arch, cfg.size, pretrained=cfg.pretrained, pos_embed=cfg.pos_embed, **kwargs)
    if cfg.mask_stride is not None and cfg.mask_stride != enc.stride:
        raise ValueError(_mask_stride_hint(cfg.mask_stride, enc.stride, cfg.arch))
    enc.grid(cfg.size)
    dec = MAEDecoder(enc.embed_dim, enc.grid_size, enc.stride, target_channels(cfg.target, cfg.in_chans),
                     enc.num_prefix_tokens,
                     dim=cfg.decoder_dim, depth=cfg.decoder_depth, heads=cfg.heads)
    return MAE(enc, dec, norm_pix=cfg.norm_pix, eps=cfg.eps)
