"""Per-step overhead of the loss-guided methods (HPM, AnatoMask) against SparK with random masking. Prints JSON.

One *step* is what the trainer does per optimizer step: ``method.views(batch)`` (the keep-mask; for the guided
methods the EMA teacher's no-grad pass and the hard-then-random selection) → ``method.training_step`` → backward
→ AdamW step → ``method.on_after_optimizer_step`` (the teacher's EMA update). The methods are timed alternately
(spark, hpm, anatomask, spark, …) after warm-up steps, so load from other processes hits all alike; reported: the
median wall clock and process CPU time per step, the overhead against SparK (CPU time on cpu, wall clock on cuda)
and, separately timed, the parts the guided methods add:

* ``teacher``: the EMA teacher's forward (HPM: encoder + densify + loss predictor on the whole, unmasked image;
  AnatoMask: the whole SparK model — encoder + decoder — under the teacher's own random mask);
* ``select``: the hard-then-random keep-mask (one rank + one sort per batch);
* ``ema``: the teacher's EMA update;
* HPM's student also runs its loss-predictor head and the pairwise relative loss inside the step.

    python benchmarks/bench_methods.py                                 # resnet18 @ 64 px, batch 16, 8 × 8 grid
    python benchmarks/bench_methods.py --arch resnet50 --size 128 --batch 16 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def build(method: str, args):
    from mwm.train import PretrainConfig
    from mwm.train.methods import MethodContext, create_method

    model = {"method": method, "arch": args.arch, "size": args.size, "mask_stride": args.mask_stride}
    cfg = PretrainConfig(data="unused.npz", out="unused", model=model, epochs=10,
                         masking={"strategy": "random", "ratio": args.ratio})
    torch.manual_seed(0)
    m = create_method(cfg)
    device = torch.device(args.device)
    m.prepare(MethodContext(device, torch.Generator(device=device).manual_seed(0),
                            types.SimpleNamespace(has_rois=False)))
    m.on_epoch_start(9)  # the last epoch: α = 0.5, the most hard cells
    opt = torch.optim.AdamW(m.model.parameters(), lr=1e-4)
    return m, opt


def step(m, opt, batch) -> None:
    views = m.views(batch)
    loss, _ = m.training_step(views)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    m.on_after_optimizer_step(1)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> tuple[float, float]:
    _sync(device)
    w, c = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - w, time.process_time() - c


def parts(m, x: torch.Tensor, device: str, reps: int) -> dict:
    """Median seconds (wall, cpu) of the guided method's own additions."""
    from mwm.masking.policies import hard_then_random_keep

    xn = m.normalize(x)
    out: dict = {"teacher": [], "select": [], "ema": []}
    for _ in range(reps):
        with torch.no_grad():
            holder = {}
            out["teacher"].append(timed(lambda: holder.update(s=m.teacher_scores(xn)), device))
            scores, eligible = holder["s"]
            out["select"].append(timed(lambda: hard_then_random_keep(scores.float(), m.cfg.masking.ratio, m.n_hard,
                                                                      m.ctx.generator, eligible), device))
            out["ema"].append(timed(lambda: m.teacher.update(m.model), device))
    return {k: {"wall_s": statistics.median(t[0] for t in v), "cpu_s": statistics.median(t[1] for t in v)}
            for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--mask-stride", type=int, default=8)
    ap.add_argument("--ratio", type=float, default=0.6)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = ["spark", "hpm", "anatomask"]
    built = {n: build(n, args) for n in names}
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, args.size, args.size, generator=g).to(args.device)
    batch = (x, None, None)
    for _ in range(args.warmup):
        for n in names:
            step(*built[n], batch)
    times: dict = {n: [] for n in names}
    for _ in range(args.steps):
        for n in names:
            times[n].append(timed(lambda n=n: step(*built[n], batch), args.device))
    key = 1 if args.device == "cpu" else 0
    med = {n: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v)) for n, v in times.items()}
    base = med["spark"][key]
    result = {
        "config": {"arch": args.arch, "size": args.size, "batch": args.batch, "mask_grid": list(built["spark"][0].grid),
                   "ratio": args.ratio, "steps": args.steps, "threads": args.threads, "device": args.device,
                   "torch": torch.__version__, "machine": platform.machine()},
        "methods": {n: {"wall_s": w, "cpu_s": c, "overhead_vs_spark": med[n][key] / base}
                    for n, (w, c) in med.items()},
        "extra_forward_passes": {
            "spark": [],
            "hpm": ["EMA teacher: encoder + densify + loss predictor on the unmasked image (no grad)",
                    "student: loss-predictor head + pairwise relative loss (with grad)"],
            "anatomask": ["EMA teacher: SparK encoder + decoder under its own random mask (no grad)"]},
        "parts": {n: parts(built[n][0], x, args.device, max(3, args.steps // 2)) for n in ("hpm", "anatomask")},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
