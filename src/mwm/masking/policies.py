"""Policies: per-patch importance/ROI → keep-mask with exact counts, vectorized over the batch.

Every function returns ``keep``: bool ``(B, 1, h, w)``, True = visible to the encoder (the
contract in DESIGN.md). No per-sample Python loop and no host synchronisation: counts are
tensors, selection is a rank comparison, so the whole batch is a handful of kernels and the
same code runs on CPU and GPU. Randomness comes from an explicit ``torch.Generator``.

:data:`POLICIES` registers them by name (``uniform``, ``two-level``, ``two-level-overall``, ``soft``, ``topk``) for
the source × policy strategies of :mod:`mwm.masking.strategies`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


def _uniform(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=device)


def _argsort_rows(keys: torch.Tensor) -> torch.Tensor:
    """keys (B, N) → ascending order per row (B, N) int64.

    On CPU numpy's argsort is used: torch 2.14's CPU sort is 5–8× slower for rows of a few hundred
    entries (measured: 128×784 floats, 17 ms vs 2.3 ms), which made 28×28 grids slower than a loop.
    """
    if keys.device.type == "cpu" and not keys.requires_grad:
        return torch.from_numpy(np.argsort(keys.numpy(), axis=1))
    return keys.argsort(dim=1)


def _ranks(keys: torch.Tensor) -> torch.Tensor:
    """keys (B, N) → rank of each entry in ascending order (B, N), int64."""
    order = _argsort_rows(keys)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(keys.shape[1], device=keys.device).expand_as(order))
    return ranks


def n_keep(n: torch.Tensor | int, ratio: torch.Tensor | float) -> torch.Tensor:
    """Visible count ``round(n · (1 − ratio))`` (round half to even, as torch.round), in float64 so
    ratios such as 0.3 give the count a user expects."""
    n = torch.as_tensor(n)
    keep_frac = (1 - ratio.to(torch.float64)) if isinstance(ratio, torch.Tensor) else (1.0 - float(ratio))
    return torch.round(n.to(torch.float64) * keep_frac).to(torch.int64)


def random_keep(batch: int, grid: tuple[int, int], ratio: float, generator: torch.Generator | None = None,
                device=None) -> torch.Tensor:
    """SparK/MAE random masking: exactly ``round(N·(1−ratio))`` visible patches per sample. → (B, 1, h, w)."""
    h, w = grid
    n = h * w
    k = int(n_keep(n, ratio))
    keep = _ranks(_uniform((batch, n), generator, device)) < k
    return keep.view(batch, 1, h, w)


def two_region_keep(roi: torch.Tensor, ratio_in: torch.Tensor | float, ratio_out: torch.Tensor | float,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """MWM two-level masking: mask ``ratio_in`` of the ROI patches and ``ratio_out`` of the rest, exact per
    region and sample. roi: bool (B, h, w); ratios: floats or (B,) tensors. → keep (B, 1, h, w).

    Vectorized by one sort of the keys ``region + u`` (u uniform in [0, 1)): background patches land at
    sorted positions 0..n_out−1 and ROI patches at n_out..N−1, each region in random order; position p
    is kept when its offset inside its region is below that region's keep count; one scatter puts
    the decisions back in patch order.
    """
    B, h, w = roi.shape
    N = h * w
    r = roi.reshape(B, N)
    n_in = r.sum(1, keepdim=True)  # (B, 1)
    n_out = N - n_in
    k_in = n_keep(n_in, _col(ratio_in, r.device))
    k_out = n_keep(n_out, _col(ratio_out, r.device))
    order = _argsort_rows(_uniform((B, N), generator, r.device) + r)
    pos = torch.arange(N, device=r.device)
    keep_sorted = torch.where(pos < n_out, pos < k_out, (pos - n_out) < k_in)
    return torch.empty_like(keep_sorted).scatter_(1, order, keep_sorted).view(B, 1, h, w)


def _col(ratio: torch.Tensor | float, device) -> torch.Tensor | float:
    """A per-sample ratio tensor (B,) → (B, 1) so it broadcasts against (B, 1) counts; floats pass through."""
    return ratio.to(device).reshape(-1, 1) if isinstance(ratio, torch.Tensor) else ratio


def ratios_for_overall(roi: torch.Tensor, overall: float, ratio_in: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (ratio_in, ratio_out) that mask exactly ``round(N·overall)`` patches while masking the ROI at
    ``ratio_in`` where possible. The reference's overall ratio drifts with ROI size; this holds it fixed.
    The ROI is never masked at a lower ratio than the background (it gets at least its proportional share).

    roi: bool (B, h, w) → two (B,) float64 tensors. When the ROI is too small to take its share the
    background takes the rest; when the background cannot take the rest the ROI ratio rises.
    """
    B = roi.shape[0]
    N = roi[0].numel()
    n_in = roi.reshape(B, -1).sum(1).to(torch.float64)
    n_out = N - n_in
    m_total = torch.round(torch.tensor(N * overall, dtype=torch.float64))
    # at least the ROI's proportional share, so rounding never masks the ROI less than the background
    m_in = torch.maximum(torch.round(n_in * ratio_in), torch.ceil(m_total * n_in / N - 1e-9)).clamp(max=n_in)
    m_out = (m_total - m_in).clamp(min=0)
    m_out = torch.minimum(m_out, n_out)
    m_in = (m_total - m_out).clamp(max=n_in)  # if the background is full, the ROI takes the rest
    r_in = torch.where(n_in > 0, m_in / n_in.clamp_min(1), torch.zeros_like(n_in))
    r_out = torch.where(n_out > 0, m_out / n_out.clamp_min(1), torch.zeros_like(n_out))
    # n_keep rounds n·(1−r); feed exact fractions back so the counts land on m_in / m_out
    return r_in.to(roi.device), r_out.to(roi.device)


def soft_keep(importance: torch.Tensor, ratio: float, temperature: float = 0.25,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Importance-weighted sampling: mask exactly ``N − round(N·(1−ratio))`` patches, drawn without replacement
    with probability ∝ exp(importance / temperature) (Gumbel-top-k), so important patches are masked more
    often but any patch may stay visible. importance: (B, h, w) in [0, 1]. → keep (B, 1, h, w)."""
    B, h, w = importance.shape
    x = importance.reshape(B, -1).float()
    k = int(n_keep(h * w, ratio))
    u = _uniform(x.shape, generator, x.device).clamp_(1e-12, 1 - 1e-12)
    gumbel = -torch.log(-torch.log(u))
    score = x / temperature + gumbel  # high score = masked first
    keep = _ranks(-score) >= (h * w - k)
    return keep.view(B, 1, h, w)


def topk_keep(importance: torch.Tensor, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mask the ``N − round(N·(1−ratio))`` most important patches (ties broken at random). → (B, 1, h, w)."""
    B, h, w = importance.shape
    x = importance.reshape(B, -1).float()
    k = int(n_keep(h * w, ratio))
    u = _uniform(x.shape, generator, x.device) * 1e-6  # tie-break only
    keep = _ranks(-(x + u)) >= (h * w - k)
    return keep.view(B, 1, h, w)


def realised_ratios(keep: torch.Tensor, roi: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Mask ratios actually drawn, as 0-d tensors (no host sync): overall, and inside/outside the ROI."""
    masked = ~keep.flatten(1)
    out = {"mask_ratio": masked.float().mean()}
    if roi is not None:
        r = roi.flatten(1)
        n_in = r.sum()
        n_out = r.numel() - n_in
        out["mask_ratio_in"] = (masked & r).sum() / n_in.clamp_min(1)
        out["mask_ratio_out"] = (masked & ~r).sum() / n_out.clamp_min(1)
        out["roi_fraction"] = r.float().mean()
    return out


# -- the policy registry: importance → keep-mask -----------------------------------------------------------------
#
# A policy is ``fn(importance, batch, cfg) -> keep`` plus ``visible(cfg, n)`` (the visible count per image when it
# is fixed, else None) and the Importance fields it needs; :mod:`mwm.masking.strategies` pairs it with a source.


@dataclass(frozen=True)
class Policy:
    name: str
    fn: Callable
    visible: Callable[[object, int], int | None]
    needs: frozenset[str]

    def __call__(self, importance, batch, cfg) -> torch.Tensor:
        return self.fn(importance, batch, cfg)


POLICIES: dict[str, Policy] = {}


def _keep_count(cfg, n: int) -> int:
    return int(n_keep(n, cfg.ratio))


def register_policy(name: str, needs: tuple[str, ...] = (), visible: Callable[[object, int], int | None] = _keep_count):
    def deco(fn: Callable) -> Callable:
        POLICIES[name] = Policy(name, fn, visible, frozenset(needs))
        return fn

    return deco


@register_policy("uniform")
def _uniform_policy(imp, batch, cfg) -> torch.Tensor:
    """Uniform at ``ratio`` (SparK / MAE). Drawn where the region lives when there is one (the boxes' device)."""
    device = imp.region.device if imp.region is not None else batch.device
    return random_keep(batch.batch_size, batch.grid, cfg.ratio, batch.generator, device)


@register_policy("two-level", needs=("region",), visible=lambda cfg, n: None)
def _two_level_policy(imp, batch, cfg) -> torch.Tensor:
    """``ratio_in`` inside the region, ``ratio_out`` outside (the overall ratio follows the region's size). Images
    without a region: uniformly at ``ratio`` (``no_roi: ratio``) or at ``ratio_out`` (``no_roi: background``, the MWM
    reference's all-background region mask)."""
    roi = imp.region
    no_roi_ratio = cfg.ratio_out if cfg.no_roi == "background" else cfg.ratio
    r_in = torch.full((batch.batch_size,), cfg.ratio_in, dtype=torch.float64, device=roi.device)
    present = imp.present if imp.present is not None else torch.ones_like(r_in, dtype=torch.bool)
    r_out = torch.where(present, torch.tensor(cfg.ratio_out, dtype=torch.float64, device=roi.device),
                        torch.tensor(no_roi_ratio, dtype=torch.float64, device=roi.device))
    return two_region_keep(roi, r_in, r_out, batch.generator)


def _masked_count(cfg, n: int) -> int:
    return n - int(torch.round(torch.tensor(n * cfg.ratio, dtype=torch.float64)))


@register_policy("two-level-overall", needs=("region",), visible=_masked_count)
def _two_level_overall_policy(imp, batch, cfg) -> torch.Tensor:
    """Two-level with exactly ``round(N · ratio)`` cells masked in every image: the region at ``ratio_in`` where
    its size allows, the rest from the background (:func:`ratios_for_overall`)."""
    r_in, r_out = ratios_for_overall(imp.region, cfg.ratio, cfg.ratio_in)
    return two_region_keep(imp.region, r_in, r_out, batch.generator)


@register_policy("soft", needs=("score",))
def _soft_policy(imp, batch, cfg) -> torch.Tensor:
    """Gumbel-top-k at ``ratio``: masked with probability ∝ exp(score / ``temperature``)."""
    return soft_keep(imp.score, cfg.ratio, cfg.temperature, batch.generator)


@register_policy("topk", needs=("score",))
def _topk_policy(imp, batch, cfg) -> torch.Tensor:
    """The highest-scoring cells masked first at ``ratio`` (ties at random)."""
    return topk_keep(imp.score, cfg.ratio, batch.generator)


def topk_diverse_keep(importance: torch.Tensor, ratio: float, top_share: float = 0.9,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """MedIM's "diversity" high-activated masking (``YtongXie/MedIM``, ``medim/models/medim/medim_train.py``
    ``MedIM.pruning_sort_attDiversity``): most masked cells are drawn at random among the most important ones, a few
    among the rest, so the visible set is not always the same low-importance cells.

    Exactly ``M = N − round(N·(1−ratio))`` cells are masked per image (as :func:`topk_keep`):
    ``round(top_share·M)`` drawn uniformly among the M most important cells (ties at random), the other
    ``M − round(top_share·M)`` uniformly among the remaining ``N − M`` (when they do not fit, the top set takes the
    surplus). MedIM draws ``int(0.9·|top|)`` from the top set and ``int(0.1·|rest|)`` from the rest: at its γ = 0.5
    the same split up to flooring (14 × 14: 88 + 9 cells, ours 88 + 10), at other ratios not γ·N cells; ours keeps
    the count exact.
    importance: (B, h, w). → keep (B, 1, h, w).
    """
    B, h, w = importance.shape
    n = h * w
    x = importance.reshape(B, n).float()
    m = n - int(n_keep(n, ratio))
    n_rest = min(m - int(round(top_share * m)), n - m)
    n_top = m - n_rest
    tie = _uniform(x.shape, generator, x.device) * 1e-6
    in_top = _ranks(-(x + tie)) < m  # the M most important cells
    # one sort: top cells first in random order, then the rest in random order; mask the first n_top of each group
    order = _argsort_rows((~in_top).to(x.dtype) + _uniform(x.shape, generator, x.device))
    pos = torch.arange(n, device=x.device)
    masked_sorted = ((pos < n_top) | ((pos >= m) & (pos < m + n_rest))).expand(B, n).contiguous()
    masked = torch.empty_like(masked_sorted).scatter_(1, order, masked_sorted)
    return (~masked).view(B, 1, h, w)


@register_policy("topk-diverse", needs=("score",))
def _topk_diverse_policy(imp, batch, cfg) -> torch.Tensor:
    """MedIM's diversity variant of top-k at ``ratio``: ``top_share`` of the masked cells at random among the most
    important ones, the rest at random elsewhere (:func:`topk_diverse_keep`)."""
    return topk_diverse_keep(imp.score, cfg.ratio, cfg.top_share, batch.generator)


def hard_then_random_keep(scores: torch.Tensor, ratio: float, n_hard: int, generator: torch.Generator | None = None,
                          eligible: torch.Tensor | None = None) -> torch.Tensor:
    """Loss-guided masking (HPM, Wang et al. CVPR 2023; AnatoMask, Li et al. ECCV 2024): of the
    ``M = N − round(N·(1−ratio))`` masked cells per image, the ``n_hard`` with the highest score ("hardest") are
    masked, the other ``M − n_hard`` are drawn uniformly among the remaining cells — the rule of HPM's
    ``MaskedAutoencoderViT.generate_mask`` (``Haochen-Wang409/HPM``, ``models_mae_learn_loss.py``) and AnatoMask's
    ``SparK.generate_mask`` (``ricklisz/AnatoMask``, ``.../pretrain/AnatoMask.py``), which loop over the images and
    shuffle on the host; here one rank + one sort per batch, exact counts.

    Args:
        scores: (B, h, w) — higher = harder (masked first); compared within an image only.
        ratio: the overall mask ratio (M as :func:`random_keep` counts it).
        n_hard: hard cells per image, ``0 ≤ n_hard ≤ M`` (clamped); 0 = random masking.
        eligible: optional bool (B, h, w): only these cells may count as hard (AnatoMask: the cells the teacher
            had to reconstruct). An image with fewer eligible cells than ``n_hard`` masks all of them as hard and
            draws the rest at random.

    Returns:
        keep (B, 1, h, w), True = visible; exactly ``N − M`` visible cells per image.
    """
    B, h, w = scores.shape
    n = h * w
    m = n - int(n_keep(n, ratio))
    k = max(0, min(int(n_hard), m))
    x = scores.reshape(B, n).float()
    if eligible is not None:
        x = x.masked_fill(~eligible.reshape(B, n), float("-inf"))
    # the k highest scores (ties: the sort's order); -inf (not eligible) never counts as hard
    hard = (_ranks(-x) < k) & (x > float("-inf"))
    # keys: hard cells above every other cell, the others in random order; mask the M highest keys
    key = hard.to(torch.float32) * 2 + _uniform(x.shape, generator, x.device)
    masked = _ranks(-key) < m
    return (~masked).view(B, 1, h, w)
