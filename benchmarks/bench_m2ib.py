"""M2IB speed: the authors' formulation (one image at a time) versus mwm's batched M2IB. Prints JSON.

Reference formulation (M2IB's ``IBAInterpreter._train_bottleneck``, unchanged in the MWM authors'
fork, called per image): every step re-encodes the prompt for each of the ``noise_copies`` copies
and runs the whole vision tower on every copy; the model weights are left trainable, so backward
also computes their gradients (through the text tower too). The prompt goes in *unpadded*, as the
authors' scripts tokenize it (``tokenizer.encode(text, add_special_tokens=True)``: [CLS] … [SEP]),
not padded to the context length. The saliency is the capacity buffered in the last forward pass.
mwm: text encoded once, blocks 0..L once under no_grad, only blocks L+1.. in the loop, frozen
weights, many images per batch.

Both use the same model (BiomedCLIP-shaped: timm ViT-B/16 + BERT-base text tower, context 256,
random weights) and the same layer / steps / copies (MWM defaults 7 / 10 / 10).

Besides seconds per image, the JSON has the FLOPs per image of each formulation
(``torch.utils.flop_counter``; its registry lacks the CPU fused attention kernel, so
``_scaled_dot_product_flash_attention_for_cpu`` and its backward get torch's own SDPA formulas
added), the machine's FLOP/s measured on a large fp32 matmul at the same thread count, and the
share of it each formulation reaches. The FLOPs are exact per step, so they are counted on one
and two steps and extrapolated to ``--steps``. On the CPU, seconds are process CPU time (with one
thread: the time a core worked for this process, whatever else shares the machine); wall seconds
are reported beside them. On CUDA, seconds are wall time.

    python benchmarks/bench_m2ib.py [--images 4] [--batch-sizes 1,4] [--threads 1] [--out bench.json]

``--threads`` sets torch's intra-op threads (default 1: a CPU shared with other jobs); run with
OMP_NUM_THREADS set to the same number.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def _cpu_sdpa_flop(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flop(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# The CPU fused attention kernels torch's FLOP registry lacks (formulas: 2 matmuls forward, 5 backward).
CPU_SDPA_FLOPS = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop,
                  aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flop}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (multiply-add = 2) of everything ``fn`` runs, CPU fused attention included."""
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as fc:
        fn()
    return fc.get_total_flops()


def per_image_flops(run: Callable[[int], object], steps: int) -> int:
    """FLOPs of ``run(steps)`` from counts at 1 and 2 steps (every step costs the same)."""
    one, two = count_flops(lambda: run(1)), count_flops(lambda: run(2))
    return one + (steps - 1) * (two - one)


class Clock:
    """Seconds as this process sees them: CPU time on the CPU (on a machine shared with other jobs, wall
    time counts their turns too; with one thread, CPU time is the time a core worked for us), wall time
    on CUDA. ``wall()`` is always wall time."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.kind = "wall" if self.cuda else "process CPU time"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return time.perf_counter()
        return time.process_time()

    @staticmethod
    def wall() -> float:
        return time.perf_counter()


def matmul_flops_per_s(device: torch.device, clock: Clock, n: int = 2048, reps: int = 5) -> float:
    """Best-of-``reps`` fp32 FLOP/s of an n×n @ n×n matmul: the machine's practical FLOP limit."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = clock()
        a @ b
        best = min(best, clock() - t)
    return 2 * n**3 / best


def prompt_tokens(vlm, prompt: str) -> torch.Tensor:
    """(1, n) token ids as the authors' scripts make them: with special tokens, no padding.

    For a Hugging Face tokenizer (BiomedCLIP's BERT) that is ``tokenizer.encode(text, add_special_tokens=True)``;
    open_clip's own BPE text tower needs its fixed context (positional embedding, causal mask), so it is padded.
    """
    hf = getattr(vlm.tokenizer, "tokenizer", None)
    if hf is not None and callable(hf):
        return torch.tensor([hf.encode(prompt, add_special_tokens=True)])
    return vlm.tokenizer([prompt])


def reference_saliency(vlm, image01: torch.Tensor, tokens: torch.Tensor, layer: int, beta: float, steps: int,
                       copies: int, lr: float = 1.0) -> torch.Tensor:
    """One image, the authors' way. image01: (1, 3, H, W) in [0, 1]; tokens: (1, n) → token KL (T,)."""
    model, st = vlm.model, vlm.stages
    model.requires_grad_(True)  # the reference never freezes the CLIP weights (nor zeroes their grads)
    tokens = tokens.to(image01.device).expand(copies, -1)
    pixels = vlm.preprocess(image01).expand(copies, -1, -1, -1)
    with torch.no_grad():
        T, D = st.run_blocks(st.embed(pixels[:1]), 0, layer + 1).shape[1:]
    alpha = torch.full((1, T, D), 5.0, device=image01.device, requires_grad=True)
    opt = torch.optim.Adam([alpha], lr=lr)
    cap = None
    for _ in range(steps):
        opt.zero_grad()
        text = model.encode_text(tokens)
        x = st.run_blocks(st.embed(pixels), 0, layer + 1)
        lam = torch.sigmoid(alpha).expand(copies, -1, -1)
        mu, var = x * lam, (1 - lam) ** 2
        cap = -0.5 * (1 + torch.log(var) - mu**2 - var)  # buffered: the saliency is the last pass's
        z = mu + var.sqrt() * torch.randn_like(mu)
        img = st.head(st.run_blocks(z, layer + 1))
        loss = beta * cap.mean() - F.cosine_similarity(text, img, eps=1e-6).mean()
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    return torch.nansum(cap.mean(0), -1).detach()


def padded_text_flops(vlm, prompt: str, copies: int) -> int:
    """FLOPs of one step's text tower (forward + weight-gradient backward) with the prompt padded to the context."""
    tokens = vlm.tokenizer([prompt]).expand(copies, -1).to(vlm.device)
    vlm.model.requires_grad_(True)
    try:
        return count_flops(lambda: vlm.model.encode_text(tokens).sum().backward())
    finally:
        vlm.model.zero_grad(set_to_none=True)
        vlm.model.requires_grad_(False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4, help="images for the batched runs")
    ap.add_argument("--ref-images", type=int, default=1, help="images for the reference run (slow)")
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (match OMP_NUM_THREADS)")
    ap.add_argument("--layer", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--copies", type=int, default=10)
    ap.add_argument("--text-layers", type=int, default=12)
    ap.add_argument("--out", default=None, help="also write the JSON here (atomically)")
    args = ap.parse_args()

    from mwm.localize.m2ib import M2IBConfig, m2ib_saliency
    from mwm.localize.vlm import build_biomedclip_like, load_vlm

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    with tempfile.TemporaryDirectory() as d:
        build_biomedclip_like(d, text_layers=args.text_layers, text_width=768)
        vlm = load_vlm(d, device=str(dev))
    prompt = "brain tumor"
    tokens = prompt_tokens(vlm, prompt)
    imgs = torch.rand(max(args.images, args.ref_images), 3, 224, 224, device=dev)
    clock = Clock(dev)
    peak = matmul_flops_per_s(dev, clock)
    result = {"benchmark": "m2ib", "device": str(dev), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine(),
              "model": f"BiomedCLIP-shaped (ViT-B/16 + BERT-base {args.text_layers} layers, ctx 256), random weights",
              "layer": args.layer, "steps": args.steps, "noise_copies": args.copies,
              "prompt_tokens_reference": int(tokens.shape[1]), "context_length": vlm.context_length,
              "seconds": clock.kind, "matmul_gflop_per_s": round(peak / 1e9, 1)}

    # FLOPs per image (counted on 1 and 2 steps, extrapolated)
    ref_flops = per_image_flops(lambda s: reference_saliency(vlm, imgs[:1], tokens, args.layer, 0.1, s, args.copies),
                                args.steps)
    text = vlm.encode_text([prompt])  # once per distinct prompt, as the pipeline does
    cfg = M2IBConfig(layer=args.layer, steps=args.steps, noise_copies=args.copies)
    mwm_flops = per_image_flops(
        lambda s: m2ib_saliency(vlm.stages, vlm.preprocess(imgs[:1]), text, cfg.model_copy(update={"steps": s})),
        args.steps)
    result["flops_per_image"] = {"reference_tflop": round(ref_flops / 1e12, 3), "mwm_tflop": round(mwm_flops / 1e12, 3),
                                 "ratio": round(ref_flops / mwm_flops, 2)}
    pad = padded_text_flops(vlm, prompt, args.copies)
    result["padded_prompt_text_tower_gflop_per_step"] = round(pad / 1e9, 1)  # what a padded reference would add

    reference_saliency(vlm, imgs[:1], tokens, args.layer, 0.1, 1, args.copies)  # warm-up
    t, w = clock(), clock.wall()
    for i in range(args.ref_images):
        reference_saliency(vlm, imgs[i:i + 1], tokens, args.layer, 0.1, args.steps, args.copies)
    ref, ref_wall = (clock() - t) / args.ref_images, (clock.wall() - w) / args.ref_images
    result["reference"] = {"s_per_image": round(ref, 3), "wall_s_per_image": round(ref_wall, 3),
                           "images": args.ref_images, "share_of_matmul_flop_per_s": round(ref_flops / ref / peak, 3)}

    batched = {}
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        n = max(bs, args.images // bs * bs)
        t, w = clock(), clock.wall()
        text = vlm.encode_text([prompt])  # cached after the first call
        for b0 in range(0, n, bs):
            x = imgs[b0:b0 + bs] if b0 + bs <= len(imgs) else torch.rand(bs, 3, 224, 224, device=dev)
            m2ib_saliency(vlm.stages, vlm.preprocess(x), text, cfg, keys=list(range(b0, b0 + bs)))
        s = (clock() - t) / n
        batched[str(bs)] = {"s_per_image": round(s, 3), "wall_s_per_image": round((clock.wall() - w) / n, 3),
                            "speedup_vs_reference": round(ref / s, 2), "images": n,
                            "share_of_matmul_flop_per_s": round(mwm_flops / s / peak, 3)}
    result["batched"] = batched
    text_out = json.dumps(result, indent=2)
    print(text_out)
    if args.out:
        from mwm.io import atomic_write_text

        atomic_write_text(args.out, text_out + "\n")


if __name__ == "__main__":
    main()
