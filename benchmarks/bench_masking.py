"""Masking speed: µs per batch for every policy, versus a per-sample-loop two-region masker. Prints JSON.

The loop baseline is how the MWM reference draws its two-region mask: for each sample, find the ROI
patches, shuffle each region with ``randperm`` and keep the first k — one Python iteration and
several small kernels (and, on GPU, host syncs from ``nonzero``) per sample.

    python benchmarks/bench_masking.py [--batch 128] [--device cpu] [--repeats 50]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def loop_two_region(roi: torch.Tensor, r_in: float, r_out: float, g: torch.Generator) -> torch.Tensor:
    """Per-sample reference-style two-region masking. roi: (B, h, w) bool → keep (B, 1, h, w)."""
    B, h, w = roi.shape
    keep = torch.zeros(B, h * w, dtype=torch.bool, device=roi.device)
    for i in range(B):
        r = roi[i].flatten()
        inside = r.nonzero().flatten()
        outside = (~r).nonzero().flatten()
        k_in = round(len(inside) * (1 - r_in))
        k_out = round(len(outside) * (1 - r_out))
        keep[i, inside[torch.randperm(len(inside), generator=g, device=roi.device)[:k_in]]] = True
        keep[i, outside[torch.randperm(len(outside), generator=g, device=roi.device)[:k_out]]] = True
    return keep.view(B, 1, h, w)


def timeit(fn, repeats: int, sync) -> float:
    for _ in range(3):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t) / repeats * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()

    from mwm.masking import MaskingConfig, boxes_tensor, create_masker, roi_coverage, roi_patches

    dev = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    g = torch.Generator(device=dev).manual_seed(0)
    gen_cpu = torch.Generator().manual_seed(0)
    # ROI boxes of mixed sizes (2–60 % of the image), one per image
    c = torch.rand(args.batch, 2, generator=gen_cpu) * 0.6 + 0.2
    half = torch.rand(args.batch, 2, generator=gen_cpu) * 0.35 + 0.05
    boxes = torch.cat([c - half, c + half], 1).clamp(0, 1)[:, None].to(dev)
    valid = torch.ones(args.batch, 1, dtype=torch.bool, device=dev)
    out = {"benchmark": "masking", "device": str(dev), "batch": args.batch, "torch": torch.__version__,
           "threads": torch.get_num_threads(), "grids": {}}
    for grid in [(7, 7), (14, 14), (28, 28)]:
        res = {}
        for name, cfg in {
            "random": MaskingConfig(strategy="random", ratio=0.6),
            "roi": MaskingConfig(strategy="roi", ratio_in=0.8, ratio_out=0.2),
            "roi_overall": MaskingConfig(strategy="roi_overall", ratio=0.4, ratio_in=0.8),
            "soft": MaskingConfig(strategy="soft", ratio=0.4),
            "topk": MaskingConfig(strategy="topk", ratio=0.4),
        }.items():
            m = create_masker(cfg)
            res[name] = round(timeit(lambda: m(args.batch, grid, boxes, valid, g), args.repeats, sync), 1)
        roi = roi_patches(roi_coverage(boxes, valid, grid))
        loop_us = timeit(lambda: loop_two_region(roi, 0.8, 0.2, g), max(5, args.repeats // 5), sync)
        from mwm.masking import two_region_keep

        vec_us = timeit(lambda: two_region_keep(roi, 0.8, 0.2, g), args.repeats, sync)
        # exactness of the vectorized policy on this batch
        keep = two_region_keep(roi, 0.8, 0.2, g)[:, 0]
        n_in = roi.flatten(1).sum(1)
        exact = bool(((keep & roi).flatten(1).sum(1) == torch.round((n_in.double()) * 0.2).long()).all()
                     and ((keep & ~roi).flatten(1).sum(1) == torch.round((roi[0].numel() - n_in).double() * 0.8).long()).all())
        res["two_region_policy_only"] = round(vec_us, 1)
        res["loop_two_region"] = round(loop_us, 1)
        res["speedup_two_region_vs_loop"] = round(loop_us / vec_us, 1)
        res["two_region_exact"] = exact
        out["grids"][f"{grid[0]}x{grid[1]}"] = {"us_per_batch": res}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
