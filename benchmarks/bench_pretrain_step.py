"""SparK pretraining step vs a dense classification step of the same timm backbone. Prints JSON.

One *step* = forward + backward + AdamW step. Sparse: ``SparK`` (sparse encoder + light decoder + masked loss)
with a random keep-mask at ratio 0.6. Dense: the timm model with its classification head and cross-entropy,
same batch and size. Warm-up steps are excluded; the two are timed alternately (sparse, dense, sparse, …) so
that load from other processes hits both alike. Reported per config: median seconds per step, wall clock and
process CPU time (on a shared CPU the CPU time is the stable one; with ``--threads 1`` it is the work done),
and ``ratio`` = sparse / dense (CPU time on cpu, wall clock on cuda).

Ablations of the optimisations (the library default is ``--bn masked`` with a channels-last decoder):
``--bn gather`` swaps the sparse BatchNorm for SparK's gather/scatter formulation (``x[visible]`` → BN1d →
scatter into zeros); ``--bn autograd`` uses the same masked sums as the library but lets autograd
differentiate them op by op (and takes the statistics with ``var_mean``), which is what the hand-written backward
replaces; ``--decoder-nchw`` runs the decoder in NCHW.

    python benchmarks/bench_pretrain_step.py                       # resnet18@64 b32, resnet50@128 b16
    python benchmarks/bench_pretrain_step.py --configs resnet50:128:16 --decoder-width 512 --steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def gather_bn_forward(self, x):
    """SparK's sparse BN: gather visible (N_vis, C), BatchNorm1d, scatter back (for comparison only)."""
    f = self._frame()
    if f.dense:
        return torch.nn.BatchNorm2d.forward(self, x)
    m = f.mask(x.shape[-2:], torch.bool)[:, 0]
    bhwc = x.permute(0, 2, 3, 1)
    nc = F.batch_norm(bhwc[m], self.running_mean, self.running_var, self.weight, self.bias,
                      self.training, self.momentum or 0.1, self.eps)
    out = torch.zeros_like(bhwc)
    out[m] = nc
    return out.permute(0, 3, 1, 2)


def autograd_bn_forward(self, x):
    """Masked-sum BatchNorm differentiated by autograd (for comparison only)."""
    f = self._frame()
    if f.dense:
        return torch.nn.BatchNorm2d.forward(self, x)
    C = x.shape[1]
    m, n = f.mask(x.shape[-2:], x.dtype), f.count(x.shape[-2:])
    if self.training:
        var_all, mean_all = torch.var_mean(x, (0, 2, 3), correction=0)
        N = x.numel() // C
        mean = mean_all * N / n
        var = ((var_all + mean_all * mean_all) * N / n - mean * mean).clamp_min(0)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
    else:
        mean, var = self.running_mean, self.running_var
    scale = torch.rsqrt(var + self.eps) * self.weight
    shift = self.bias - mean * scale
    return torch.addcmul(shift.view(1, C, 1, 1), x, scale.view(1, C, 1, 1)) * m


def time_pair(step_a, step_b, steps: int, warmup: int, sync) -> dict:
    for _ in range(warmup):
        step_a()
        step_b()
    sync()
    res = {"a_wall": [], "a_cpu": [], "b_wall": [], "b_cpu": []}
    for _ in range(steps):
        for key, fn in (("a", step_a), ("b", step_b)):
            w, c = time.perf_counter(), time.process_time()
            fn()
            sync()
            res[f"{key}_wall"].append(time.perf_counter() - w)
            res[f"{key}_cpu"].append(time.process_time() - c)
    return {k: statistics.median(v) for k, v in res.items()}


def bench_one(arch: str, size: int, batch: int, args, dev: torch.device, sync) -> dict:
    import timm

    from mwm.masking import random_keep
    from mwm.mim import SparKConfig, create_mim_model

    torch.manual_seed(0)
    cfg = SparKConfig(arch=arch, size=size, densify_kernel=args.densify_kernel, decoder_block=args.block,
                      decoder_channels_last=not args.decoder_nchw,
                      **({"decoder_width": args.decoder_width} if args.decoder_width else {}))
    sparse = create_mim_model(cfg).to(dev)
    dense = timm.create_model(arch, pretrained=False, num_classes=10).to(dev)
    opt_s = torch.optim.AdamW(sparse.parameters(), lr=1e-4)
    opt_d = torch.optim.AdamW(dense.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    grid = sparse.grid(size)

    def sparse_step():
        keep = random_keep(batch, grid, args.ratio, g, dev)
        loss = sparse(x, keep)["loss"]
        opt_s.zero_grad(set_to_none=True)
        loss.backward()
        opt_s.step()

    def dense_step():
        loss = F.cross_entropy(dense(x), y)
        opt_d.zero_grad(set_to_none=True)
        loss.backward()
        opt_d.step()

    t = time_pair(sparse_step, dense_step, args.steps, args.warmup, sync)
    key = "wall" if dev.type == "cuda" else "cpu"
    return {
        "arch": arch, "size": size, "batch": batch, "mask_ratio": args.ratio,
        "decoder_width": sparse.decoder.width, "decoder_block": sparse.decoder.block_kind,
        "densify_kernel": args.densify_kernel, "decoder_channels_last": not args.decoder_nchw, "bn": args.bn,
        "params_M": {"encoder": round(sum(p.numel() for p in sparse.encoder.parameters()) / 1e6, 2),
                     "decoder": round(sum(p.numel() for p in sparse.decoder.parameters()) / 1e6, 2)},
        "sparse_step_s": {"wall": round(t["a_wall"], 4), "cpu": round(t["a_cpu"], 4)},
        "dense_step_s": {"wall": round(t["b_wall"], 4), "cpu": round(t["b_cpu"], 4)},
        "ratio": round(t["a_" + key] / t["b_" + key], 3),
        "ratio_wall": round(t["a_wall"] / t["b_wall"], 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--configs", nargs="*", default=["resnet18:64:32", "resnet50:128:16"], help="arch:size:batch")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--ratio", type=float, default=0.6)
    ap.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (1: stable on a shared machine)")
    ap.add_argument("--decoder-width", type=int, default=None, help="default: the model's own default")
    ap.add_argument("--densify-kernel", type=int, default=3, choices=[1, 3])
    ap.add_argument("--block", default="light", choices=["light", "spark"])
    ap.add_argument("--bn", default="masked", choices=["masked", "gather", "autograd"])
    ap.add_argument("--decoder-nchw", action="store_true")
    args = ap.parse_args()

    dev = torch.device(args.device)
    if dev.type == "cpu":
        torch.set_num_threads(args.threads)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    if args.bn != "masked":
        from mwm.mim.sparse import SparseBatchNorm2d

        SparseBatchNorm2d.forward = {"gather": gather_bn_forward, "autograd": autograd_bn_forward}[args.bn]
    out = {"benchmark": "pretrain_step", "device": str(dev),
           "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
           "threads": torch.get_num_threads(), "torch": torch.__version__, "steps": args.steps,
           "warmup": args.warmup, "results": []}
    for spec in args.configs:
        arch, size, batch = spec.split(":")
        out["results"].append(bench_one(arch, int(size), int(batch), args, dev, sync))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
