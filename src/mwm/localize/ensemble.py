"""Prompt ensembles: one M2IB saliency map from several prompts (the analogue of CLIP's prompt ensembling).

CLIP classifies with the mean of the text embeddings of several templates ("a photo of a {}", "a blurry
photo of a {}", …) because any single wording is noisy. Here the M2IB saliency maps of several prompts for
the same image are reduced pixel-wise — their mean (default) or median — *before* binarization, so one odd
wording cannot move the ROI on its own.

All prompts of all images run as one batch: the text embeddings come in precomputed (each distinct prompt
once), the (image, prompt) pairs are flattened into one M2IB batch, and the maps are reduced over the
prompt axis — no Python loop over prompts. Every pair of an image is keyed by the image's own key, so a
prompt's map inside an ensemble is the map `mwm localize --prompt` gives for that prompt alone (same noise
draws; M2IB is batch-invariant), and the ensemble equals the reduction of the single-prompt maps.

The reduced map is min–max normalized again (:func:`reduce_maps`), so it is a saliency map in the same
convention as a single one ([0, 1], minimum 0, maximum 1): ``--binarize threshold`` keeps its meaning
("above half of the peak"), and K-Means/Otsu (invariant to scale) are unaffected. One prompt (``P = 1``)
gives the single map unchanged, bit for bit.

Prompt strings: ``"a;b;c"`` is an ensemble of three prompts (:func:`split_prompt`); a string without ``;``
is one prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..errors import DataError, MWMError
from .m2ib import M2IBConfig, _normalize_maps, m2ib_saliency
from .vision import VisionStages

Reduce = Literal["mean", "median"]
SEPARATOR = ";"


def split_prompt(prompt: str) -> list[str]:
    """``"a lesion; a bright lesion"`` → ``["a lesion", "a bright lesion"]`` (parts stripped; a prompt without
    ``;`` comes back unchanged).

    Raises :class:`DataError` for an empty part (``"a;;b"``, a trailing ``;``): an ensemble member that
    names nothing is a typo, not a prompt.
    """
    if SEPARATOR not in prompt:
        return [prompt]  # one prompt, as given (a single prompt is encoded exactly as before ensembles existed)
    parts = [p.strip() for p in prompt.split(SEPARATOR)]
    if not all(parts):
        raise DataError(f"the prompt {prompt!r} has an empty part between ';' separators; an ensemble is "
                        "'prompt one;prompt two;…' with every part naming what to localize")
    return parts


FAMILY_KINDS = ("short", "synonyms", "lay", "descriptions", "all")


def parse_family(spec: str) -> tuple[str, str, str]:
    """``"brain-mri/tumour:descriptions"`` → ``("brain-mri", "tumour", "descriptions")``; the kind defaults to
    ``all``. Raises :class:`DataError` for another shape or an unknown kind."""
    head, _, kind = spec.partition(":")
    modality, _, target = head.partition("/")
    kind = kind.strip() or "all"
    if not modality.strip() or not target.strip() or "/" in target:
        raise DataError(f"--prompt-family {spec!r}: expected MODALITY/TARGET[:KIND], e.g. brain-mri/tumour or "
                        "brain-mri/tumour:descriptions (`mwm prompts list` shows what the library holds)")
    if kind not in FAMILY_KINDS:
        raise DataError(f"--prompt-family {spec!r}: unknown kind {kind!r}; use one of {', '.join(FAMILY_KINDS)}")
    return modality.strip(), target.strip(), kind


def family_prompts(spec: str) -> list[str]:
    """The prompts of a prompt-library family (``MODALITY/TARGET[:KIND]``), via
    ``mwm.localize.prompt_library.get_entry(modality, target).family(kind)`` (imported only when asked for).

    Raises :class:`DataError` naming the spec when the library lacks the entry, or gives no usable prompt.
    """
    modality, target, kind = parse_family(spec)
    try:
        from . import prompt_library
    except ImportError as e:
        raise DataError(f"--prompt-family {spec!r}: this mwm has no prompt library (mwm.localize.prompt_library: "
                        f"{e}); pass the prompts yourself, --prompt 'a;b;c'") from None
    try:
        prompts = list(prompt_library.get_entry(modality, target).family(kind))
    except (MWMError, LookupError, ValueError) as e:  # the library's own errors, named with the spec
        msg = e.args[0] if e.args else e
        raise DataError(f"--prompt-family {spec!r}: {msg}") from None
    prompts = [p.strip() for p in prompts if isinstance(p, str) and p.strip()]
    if not prompts:
        raise DataError(f"--prompt-family {spec!r}: the library gives no prompts of kind {kind!r} for "
                        f"{modality}/{target}")
    if any(SEPARATOR in p for p in prompts):
        raise DataError(f"--prompt-family {spec!r}: a library prompt contains {SEPARATOR!r}, which separates "
                        "ensemble members; report this")
    return prompts


@dataclass
class EnsembleResult:
    """saliency: (B, H, W) the reduced map in [0, 1]; fit: (B,) mean cosine(text, image) over the image's
    prompts; maps: (B, P, H, W) the per-prompt maps (NaN where ``valid`` is False)."""

    saliency: Tensor
    fit: Tensor
    maps: Tensor


def reduce_maps(maps: Tensor, reduce: Reduce = "mean", valid: Tensor | None = None) -> Tensor:
    """Per-prompt saliency maps → one map per image.

    Args:
        maps: float (B, P, H, W), each map in [0, 1] (NaN maps allowed: they make the result NaN, so the
            pipeline reports ``nan_saliency`` instead of hiding a broken member).
        reduce: ``mean`` or ``median`` over the image's valid prompts; the median of an even count is the
            mean of the two middle values (as numpy's), not torch's lower median.
        valid: bool (B, P), which prompts an image has (images may have different counts); default all.
    Returns:
        float (B, H, W), min–max normalized per image (a constant result stays 0). With P = 1 and every
        prompt valid, ``maps[:, 0]`` itself (bit-identical to the single-prompt map).
    """
    if maps.ndim != 4:
        raise ValueError(f"maps must be (B, P, H, W); got {tuple(maps.shape)}")
    B, P = maps.shape[:2]
    if valid is None:
        valid = torch.ones(B, P, dtype=torch.bool, device=maps.device)
    if valid.shape != (B, P):
        raise ValueError(f"valid must be (B, P) = {(B, P)}; got {tuple(valid.shape)}")
    if not bool(valid.any(1).all()):
        raise ValueError("every image needs at least one valid prompt")
    if P == 1:
        return maps[:, 0]
    v = valid[:, :, None, None]
    count = valid.sum(1).to(maps.dtype)[:, None, None]  # (B, 1, 1)
    if reduce == "mean":
        # where() rather than nanmean: a NaN in a valid member must stay NaN
        red = torch.where(v, maps, torch.zeros((), dtype=maps.dtype, device=maps.device)).sum(1) / count
    elif reduce == "median":
        has_nan = (torch.isnan(maps) & v).any(1)
        s = torch.where(v, torch.nan_to_num(maps, nan=0.0), torch.full((), float("inf"), dtype=maps.dtype,
                                                                       device=maps.device)).sort(1).values
        n = valid.sum(1)  # (B,): invalid entries sorted to the end as +inf
        lo = ((n - 1) // 2)[:, None, None, None].expand(B, 1, *maps.shape[2:])
        hi = (n // 2)[:, None, None, None].expand(B, 1, *maps.shape[2:])
        red = 0.5 * (s.gather(1, lo) + s.gather(1, hi))[:, 0]
        red = torch.where(has_nan, torch.full((), float("nan"), dtype=maps.dtype, device=maps.device), red)
    else:
        raise ValueError(f"unknown ensemble reduction {reduce!r}; use mean or median")
    return _normalize_maps(red)


def ensemble_saliency(stages: VisionStages, pixels: Tensor, text_emb: Tensor, cfg: M2IBConfig,
                      keys: list[str | int] | None = None, reduce: Reduce = "mean", valid: Tensor | None = None,
                      out_size: tuple[int, int] | None = None) -> EnsembleResult:
    """M2IB saliency of every (image, prompt) pair in one batch, reduced over the prompts.

    Args:
        stages: the VLM's vision tower (:class:`~mwm.localize.vision.VisionStages`).
        pixels: float (B, 3, S, S) preprocessed images.
        text_emb: float (B, P, D) the prompts' text embeddings per image (padding where ``valid`` is False).
        cfg: the M2IB settings.
        keys: B per-image noise keys (image ids); every prompt of an image uses its image's key, so each
            member map is the one the prompt alone gives. Default: the batch index.
        reduce: ``mean`` or ``median`` (:func:`reduce_maps`).
        valid: bool (B, P), which prompts each image has; default all. Only valid pairs are computed.
        out_size: (H, W) of the maps; default (S, S).
    Returns:
        :class:`EnsembleResult`: saliency (B, H, W), fit (B,) (mean over the image's prompts),
        maps (B, P, H, W).
    """
    if text_emb.ndim != 3 or text_emb.shape[0] != pixels.shape[0]:
        raise ValueError(f"text_emb must be (B, P, D) with B = {pixels.shape[0]}; got {tuple(text_emb.shape)}")
    B, P = text_emb.shape[:2]
    keys = list(range(B)) if keys is None else list(keys)
    if valid is None:
        valid = torch.ones(B, P, dtype=torch.bool, device=pixels.device)
    valid = valid.to(pixels.device)
    b_idx, p_idx = valid.nonzero(as_tuple=True)  # row-major: an image's prompts are adjacent, in order
    res = m2ib_saliency(stages, pixels[b_idx], text_emb[b_idx, p_idx], cfg,
                        keys=[keys[b] for b in b_idx.tolist()], out_size=out_size)
    H, W = res.saliency.shape[-2:]
    maps = torch.full((B, P, H, W), float("nan"), dtype=res.saliency.dtype, device=res.saliency.device)
    maps[b_idx, p_idx] = res.saliency
    fits = torch.zeros(B, P, dtype=res.fit.dtype, device=res.fit.device)
    fits[b_idx, p_idx] = res.fit
    fit = fits.sum(1) / valid.sum(1).to(fits.dtype)
    return EnsembleResult(reduce_maps(maps, reduce, valid), fit, maps)


__all__ = ["Reduce", "SEPARATOR", "FAMILY_KINDS", "parse_family", "family_prompts", "split_prompt", "reduce_maps",
           "ensemble_saliency", "EnsembleResult"]
