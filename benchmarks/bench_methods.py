"""Per-step overhead of the guided methods against their plain MIM baseline with random masking. Prints JSON.

CNN family: HPM and AnatoMask against SparK; ViT family: HPM on MAE (``hpm_mae``) and AttMask (``attmask``) against
MAE.

One *step* is what the trainer does per optimizer step: ``method.views(batch)`` (the keep-mask; for the guided
methods the EMA teacher's no-grad pass and the hard-then-random selection) → ``method.training_step`` → backward
→ AdamW step → ``method.on_after_optimizer_step`` (the teacher's EMA update). The methods of a family are
timed alternately (spark, hpm, anatomask, spark, …) after warm-up steps, so load from other processes hits all
alike; reported: the median wall clock and process CPU time per step, the overhead against the family's baseline
(CPU time on cpu, wall clock on cuda) and, separately timed, the parts the guided methods add:

* ``teacher``: the EMA teacher's forward (HPM: encoder + densify + loss predictor on the whole, unmasked image;
  AnatoMask: the whole SparK model — encoder + decoder — under the teacher's own random mask; HPM-MAE: the ViT on
  every token + the transformer loss predictor; AttMask: the ViT on every token up to the last block's attention);
* ``select``: the keep-mask from the teacher's scores (hard-then-random: one rank + one sort per batch; AttMask:
  one stable sort, + one top-k with hints);
* ``ema``: the teacher's EMA update;
* HPM's student also runs its loss-predictor head and the pairwise relative loss inside the step.

    python benchmarks/bench_methods.py                          # resnet18 @ 64 px 8 × 8 grid; vit_tiny/8 @ 64 px
    python benchmarks/bench_methods.py --family vit --vit-arch vit_small_patch16_224 --size 224 --vit-patch 16
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


FAMILIES = {"cnn": ["spark", "hpm", "anatomask"], "vit": ["mae", "hpm_mae", "attmask"]}


def build(method: str, args):
    from mwm.train import PretrainConfig
    from mwm.train.methods import MethodContext, create_method

    if method in FAMILIES["vit"]:
        model = {"method": method, "arch": args.vit_arch, "size": args.size, "patch_size": args.vit_patch}
        if method == "attmask":
            model["mode"] = args.attmask_mode
    else:
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


def _teacher_and_select(m):
    """(teacher forward, keep-mask from its output) of a guided method, as its ``views`` runs them."""
    from mwm.masking.policies import hard_then_random_keep
    from mwm.train.methods.attmask import attmask_keep

    if hasattr(m, "teacher_attention"):  # AttMask
        c = m.cfg.model
        return m.teacher_attention, lambda att: attmask_keep(att.float(), m.cfg.masking.ratio, c.mode, c.show_max,
                                                             c.show_ratio, m.ctx.generator)
    return m.teacher_scores, lambda s: hard_then_random_keep(s[0].float(), m.cfg.masking.ratio, m.n_hard,
                                                             m.ctx.generator, s[1])


def parts(m, x: torch.Tensor, device: str, reps: int) -> dict:
    """Median seconds (wall, cpu) of the guided method's own additions."""
    xn = m.normalize(x)
    teacher, select = _teacher_and_select(m)
    out: dict = {"teacher": [], "select": [], "ema": []}
    for _ in range(reps):
        with torch.no_grad():
            holder = {}
            out["teacher"].append(timed(lambda: holder.update(s=teacher(xn)), device))
            out["select"].append(timed(lambda: select(holder["s"]), device))
            out["ema"].append(timed(lambda: m.teacher.update(m.model), device))
    return {k: {"wall_s": statistics.median(t[0] for t in v), "cpu_s": statistics.median(t[1] for t in v)}
            for k, v in out.items()}


EXTRA = {
    "spark": [], "mae": [],
    "hpm": ["EMA teacher: encoder + densify + loss predictor on the unmasked image (no grad)",
            "student: loss-predictor head + pairwise relative loss (with grad)"],
    "anatomask": ["EMA teacher: SparK encoder + decoder under its own random mask (no grad)"],
    "hpm_mae": ["EMA teacher: ViT on every token + transformer loss predictor (no grad)",
                "student: transformer loss predictor (the decoder's depth/width) + pairwise relative loss (with grad)"],
    "attmask": ["EMA teacher: ViT on every token up to the last block's attention, [CLS] row (no grad)"],
}


def run_family(names: list[str], args) -> dict:
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
    base = med[names[0]][key]
    first = built[names[0]][0]
    return {
        "model": {"arch": first.cfg.model.arch, "mask_grid": list(first.grid), "baseline": names[0]},
        "methods": {n: {"wall_s": w, "cpu_s": c, f"overhead_vs_{names[0]}": med[n][key] / base}
                    for n, (w, c) in med.items()},
        "extra_forward_passes": {n: EXTRA[n] for n in names},
        "parts": {n: parts(built[n][0], x, args.device, max(3, args.steps // 2)) for n in names[1:]},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", choices=["cnn", "vit", "both"], default="both")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--vit-arch", default="vit_tiny_patch16_224")
    ap.add_argument("--vit-patch", type=int, default=8, help="ViT patch size (8 at 64 px: the 8 × 8 grid)")
    ap.add_argument("--attmask-mode", default="high", choices=["high", "hint", "low"])
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
    families = ["cnn", "vit"] if args.family == "both" else [args.family]
    result = {
        "config": {"size": args.size, "batch": args.batch, "ratio": args.ratio, "steps": args.steps,
                   "threads": args.threads, "device": args.device, "attmask_mode": args.attmask_mode,
                   "torch": torch.__version__, "machine": platform.machine()},
        **{f: run_family(FAMILIES[f], args) for f in families},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
