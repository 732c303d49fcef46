"""M2IB speed: the reference formulation (one image at a time) versus mwm's batched M2IB. Prints JSON.

Reference formulation (M2IB's ``IBAInterpreter._train_bottleneck``, which MWM calls per image):
every step re-encodes the prompt for each of the ``noise_copies`` copies and runs the whole
vision tower on every copy; model weights are left trainable (so backward also computes their
gradients), and images are processed one at a time.
mwm: text encoded once, blocks 0..L once under no_grad, only blocks L+1.. in the loop, frozen
weights, many images per batch.

Both use the same model (BiomedCLIP-shaped: timm ViT-B/16 + BERT-base text tower, context 256,
random weights) and the same layer / steps / copies (MWM defaults 7 / 10 / 10).

    python benchmarks/bench_m2ib.py [--images 4] [--batch-sizes 1,4] [--device cpu] [--ref-images 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import torch
import torch.nn.functional as F


def reference_saliency(vlm, image01: torch.Tensor, prompt: str, layer: int, beta: float, steps: int, copies: int,
                       lr: float = 1.0) -> torch.Tensor:
    """One image, the reference's way. image01: (1, 3, H, W) in [0, 1] → token KL (T,)."""
    model, st = vlm.model, vlm.stages
    model.requires_grad_(True)  # the reference never freezes the CLIP weights
    tokens = vlm.tokenizer([prompt]).to(image01.device).expand(copies, -1)
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
        cap = -0.5 * (1 + torch.log(var) - mu**2 - var)
        z = mu + var.sqrt() * torch.randn_like(mu)
        img = st.head(st.run_blocks(z, layer + 1))
        loss = beta * cap.mean() - F.cosine_similarity(text, img, eps=1e-6).mean()
        loss.backward()
        opt.step()
    model.requires_grad_(False)
    return cap.mean(0).sum(-1).detach()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4, help="images for the batched runs")
    ap.add_argument("--ref-images", type=int, default=1, help="images for the reference run (slow)")
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layer", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--copies", type=int, default=10)
    ap.add_argument("--text-layers", type=int, default=12)
    args = ap.parse_args()

    from mwm.localize.m2ib import M2IBConfig, m2ib_saliency
    from mwm.localize.vlm import build_biomedclip_like, load_vlm

    torch.manual_seed(0)
    dev = torch.device(args.device)
    with tempfile.TemporaryDirectory() as d:
        build_biomedclip_like(d, text_layers=args.text_layers, text_width=768)
        vlm = load_vlm(d, device=str(dev))
    prompt = "brain tumor"
    imgs = torch.rand(max(args.images, args.ref_images), 3, 224, 224, device=dev)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    result = {"benchmark": "m2ib", "device": str(dev), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine(), "model": "BiomedCLIP-shaped (ViT-B/16 + BERT-base, ctx 256), random weights",
              "layer": args.layer, "steps": args.steps, "noise_copies": args.copies}

    reference_saliency(vlm, imgs[:1], prompt, args.layer, 0.1, 1, args.copies)  # warm-up
    sync()
    t = time.perf_counter()
    for i in range(args.ref_images):
        reference_saliency(vlm, imgs[i:i + 1], prompt, args.layer, 0.1, args.steps, args.copies)
    sync()
    ref = (time.perf_counter() - t) / args.ref_images
    result["reference_s_per_image"] = round(ref, 3)

    cfg = M2IBConfig(layer=args.layer, steps=args.steps, noise_copies=args.copies)
    batched = {}
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        n = max(bs, args.images // bs * bs)
        t = time.perf_counter()
        text = vlm.encode_text([prompt])  # once, as the pipeline does
        for b0 in range(0, n, bs):
            x = imgs[b0:b0 + bs] if b0 + bs <= len(imgs) else torch.rand(bs, 3, 224, 224, device=dev)
            m2ib_saliency(vlm.stages, vlm.preprocess(x), text, cfg, keys=list(range(b0, b0 + bs)))
        sync()
        s = (time.perf_counter() - t) / n
        batched[str(bs)] = {"s_per_image": round(s, 3), "speedup_vs_reference": round(ref / s, 2), "images": n}
    result["batched"] = batched
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
