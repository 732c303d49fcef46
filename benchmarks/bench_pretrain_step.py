"""SparK (or MAE) pretraining step vs a dense classification step of the same timm backbone. Prints JSON.

One *step* = forward + backward + AdamW step. Sparse: ``SparK`` (sparse encoder + light decoder + masked loss)
with a random keep-mask at ratio 0.6 drawn at the model's mask grid; for a ViT arch, ``MAE`` (token dropping +
light transformer decoder). Dense: the timm model with its classification head and cross-entropy, same batch,
size and architecture options. Warm-up steps are excluded; the two are timed alternately (sparse, dense, sparse, …) so
that load from other processes hits both alike. Reported per config: median seconds per step, wall clock and
process CPU time (on a shared CPU the CPU time is the stable one; with ``--threads 1`` it is the work done),
and ``ratio`` = sparse / dense (CPU time on cpu, wall clock on cuda).

Ablations of the optimisations (the library default is ``--bn masked`` with a channels-last decoder):
``--bn gather`` swaps the sparse BatchNorm for SparK's gather/scatter formulation (``x[visible]`` → BN1d →
scatter into zeros); ``--bn autograd`` uses the same masked sums as the library but lets autograd
differentiate them op by op (and takes the statistics with ``var_mean``), which is what the hand-written backward
replaces; ``--decoder-nchw`` runs the decoder in NCHW; ``--compile`` wraps the sparse model in ``torch.compile``
(not a library option: on this CPU a resnet18 / 128 px / batch 64 SparK step went from 3.20 to 2.93 CPU-s, −8 %,
after a compilation of ~15 min wall on the shared machine, longer than the gain over a 12-epoch run).

    python benchmarks/bench_pretrain_step.py                       # resnet18@64 b32, resnet50@128 b16
    python benchmarks/bench_pretrain_step.py --configs resnet50:128:16 --decoder-width 512 --steps 5

A config is ``arch:size:batch`` with optional ``:key=value,…`` options, to compare ways of getting a fine mask
grid (issue 11): ``mask_stride=8`` (SparK's keep-mask finer than the output stride), ``output_stride=16`` (timm's
dilated last stage; the sparse encoder keeps the deepest level per stride), ``patch_size=8`` (MAE on a ViT with
8-px patches). Each result records its ``mask_grid``.

    python benchmarks/bench_pretrain_step.py --configs resnet18:64:32 resnet18:64:32:mask_stride=8 \
        resnet18:128:32:output_stride=16 vit_small_patch16_224:64:32:patch_size=8
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


def parse_spec(spec: str) -> tuple[str, int, int, dict]:
    """``arch:size:batch[:k=v,k=v]`` → (arch, size, batch, {k: int(v)})."""
    arch, size, batch, *rest = spec.split(":")
    opts = {}
    for item in ",".join(rest).split(","):
        if item:
            k, v = item.split("=")
            opts[k] = int(v)
    unknown = set(opts) - {"mask_stride", "output_stride", "patch_size"}
    if unknown:
        raise SystemExit(f"{spec}: unknown option(s) {sorted(unknown)}; use mask_stride, output_stride, patch_size")
    return arch, int(size), int(batch), opts


def build_models(arch: str, size: int, opts: dict, args):
    """(MIM model, dense timm classifier) for one config; the dense model gets the same architecture options."""
    import timm

    from mwm.mim import LightDecoder, SparK, SparKConfig, SparseEncoder, create_mim_model

    vit = arch.startswith(("vit", "deit"))
    arch_kw = {k: v for k, v in opts.items() if k in ("output_stride", "patch_size")}
    dense = timm.create_model(arch, pretrained=False, num_classes=10, **arch_kw, **({"img_size": size} if vit else {}))
    if vit:
        return create_mim_model({"method": "mae", "arch": arch, "size": size, **opts}), dense
    cfg = SparKConfig(arch=arch, size=size, densify_kernel=args.densify_kernel, decoder_block=args.block,
                      decoder_channels_last=not args.decoder_nchw, mask_stride=opts.get("mask_stride"),
                      **({"decoder_width": args.decoder_width} if args.decoder_width else {}))
    if "output_stride" not in opts:
        return create_mim_model(cfg), dense
    # SparKConfig has no output_stride option (not a library feature): build the same parts by hand
    enc = SparseEncoder(arch, mask_stride=opts.get("mask_stride"), output_stride=opts["output_stride"])
    dec = LightDecoder(enc.channels, enc.reductions, width=cfg.decoder_width, out_chans=3, densify_norm="bn",
                       block=cfg.decoder_block, densify_kernel=cfg.densify_kernel,
                       channels_last=cfg.decoder_channels_last)
    return SparK(enc, dec), dense


def bench_one(spec: str, args, dev: torch.device, sync) -> dict:
    from mwm.masking import random_keep

    arch, size, batch, opts = parse_spec(spec)
    torch.manual_seed(0)
    sparse, dense = build_models(arch, size, opts, args)
    sparse, dense = sparse.to(dev), dense.to(dev)
    run_sparse = torch.compile(sparse) if args.compile else sparse  # the optimizer keeps the eager parameters
    opt_s = torch.optim.AdamW(sparse.parameters(), lr=1e-4)
    opt_d = torch.optim.AdamW(dense.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    grid = sparse.grid(size)

    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed")

    def sparse_step():
        keep = random_keep(batch, grid, args.ratio, g, dev)
        with amp:
            loss = run_sparse(x, keep)["loss"]
        opt_s.zero_grad(set_to_none=True)
        loss.backward()
        opt_s.step()

    def dense_step():
        with amp:
            loss = F.cross_entropy(dense(x), y)
        opt_d.zero_grad(set_to_none=True)
        loss.backward()
        opt_d.step()

    t = time_pair(sparse_step, dense_step, args.steps, args.warmup, sync)
    key = "wall" if dev.type == "cuda" else "cpu"
    spark = hasattr(sparse.decoder, "block_kind")
    return {
        "arch": arch, "size": size, "batch": batch, "options": opts, "method": "spark" if spark else "mae",
        "mask_grid": list(grid), "mask_ratio": args.ratio, "precision": args.precision,
        "decoder_width": sparse.decoder.width if spark else None,
        "decoder_block": sparse.decoder.block_kind if spark else None,
        "densify_kernel": args.densify_kernel, "decoder_channels_last": not args.decoder_nchw, "bn": args.bn,
        "compile": args.compile,
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
    ap.add_argument("--configs", nargs="*", default=["resnet18:64:32", "resnet50:128:16"],
                    help="arch:size:batch[:mask_stride=8|output_stride=16|patch_size=8]")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--ratio", type=float, default=0.6)
    ap.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (1: stable on a shared machine)")
    ap.add_argument("--decoder-width", type=int, default=None, help="default: the model's own default")
    ap.add_argument("--densify-kernel", type=int, default=3, choices=[1, 3])
    ap.add_argument("--block", default="light", choices=["light", "spark"])
    ap.add_argument("--bn", default="masked", choices=["masked", "gather", "autograd"])
    ap.add_argument("--decoder-nchw", action="store_true")
    ap.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"],
                    help="bf16-mixed: both steps under bf16 autocast (on CPU, fast where oneDNN has AMX / AVX512-BF16)")
    ap.add_argument("--compile", action="store_true", help="torch.compile (inductor) the sparse model; the warm-up "
                    "steps include the compilation, which is not timed")
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
        out["results"].append(bench_one(spec, args, dev, sync))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
