"""`mwm vlm …`: train a small CLIP on image–caption pairs, export a VLM to a folder for offline use."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config import resolve
from .common import ConfigOpt, SetOpt, console, handle_errors

app = typer.Typer(help="Vision–language models for localization: train one, export one for offline use.",
                  no_args_is_help=True)


@app.command()
@handle_errors
def train(
    data: Annotated[Path, typer.Argument(help="Folder, .npz, .csv or file of scans (the train split is used).")],
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Output folder: the VLM, checkpoints/, "
                                                                  "train_log.csv, config.yaml.")] = None,
    captions: Annotated[Optional[str], typer.Option(help="auto, npz, template, FILE.csv (image,caption) or "
                                                         "FILE.jsonl. [default: auto]")] = None,
    template: Annotated[Optional[str], typer.Option(help="Caption per class for --captions template. "
                                                         "[default: 'a {modality} image showing {class}']")] = None,
    modality: Annotated[Optional[str], typer.Option(help="Fills {modality} in the template. "
                                                         "[default: medical]")] = None,
    init: Annotated[Optional[str], typer.Option(help="tiny (new small CLIP), a VLM folder, hf-hub:org/repo or an "
                                                     "open_clip name. [default: tiny]")] = None,
    pretrained: Annotated[Optional[str], typer.Option(help="Weights for an open_clip --init name: tag, file or "
                                                           "random.")] = None,
    image_init: Annotated[Optional[str], typer.Option(help="imagenet or a timm checkpoint / encoder.pth for the "
                                                           "image tower, when it is a timm model (BiomedCLIP). "
                                                           "[default: none]")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs in total (also when resuming). [default: 15]")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Pairs per step. [default: 32]")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate (AdamW). [default: 5e-4]")] = None,
    size: Annotated[Optional[int], typer.Option(help="Decode size in pixels. [default: 64 for tiny, else the "
                                                     "VLM's input size]")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed. [default: 0]")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:N or auto. [default: auto]")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/checkpoints/last.pt.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar or per-epoch lines.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the final metrics as JSON on stdout.")] = False,
    config: ConfigOpt = None, set_: SetOpt = None,
):
    """Train a CLIP-style VLM on image–caption pairs and export it as a VLM folder (loadable offline).

    Sizes of the --init tiny model: --set model.KEY=VALUE, KEY one of patch_size, width, layers, heads, text_width, text_heads, text_layers, context_length, embed_dim; model.pool_type=avg pools the image tokens by their mean instead of the CLS token.

    Example: mwm vlm train phantoms.npz --out tinyclip
    """
    import json
    import warnings

    from ..localize.vlm_train import VLMTrainConfig, train_vlm

    cfg = resolve(VLMTrainConfig, config, set_, {
        "data": data, "out": out_dir, "captions": captions, "template": template, "modality": modality, "init": init,
        "pretrained": pretrained, "image_init": image_init, "epochs": epochs, "batch_size": batch_size, "lr": lr, "size": size, "seed": seed,
        "device": device})
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.filterwarnings("ignore", message=r".*(could not be read|cannot read).*")  # counted by decode
        m = train_vlm(cfg, resume=resume, progress=not quiet,
                      log=None if quiet else (lambda s: console.print(s, highlight=False)), console=console)
    console.print(f"wrote {cfg.out}: VLM folder (load with mwm.localize.vlm.load_vlm('{cfg.out}')), train_log.csv, "
                  f"checkpoints/; {m['epoch']} epochs, {m['seconds']:.0f}s; on {m['n_eval']} {m['eval_split']} images: "
                  f"text→image top-1 {m['t2i_top1']:.2f} (chance {m['chance_t2i_top1']:.2f}), "
                  f"top-5 {m['t2i_top5']:.2f} "
                  f"(chance {m['chance_t2i_top5']:.2f}); image→text top-1 {m['i2t_top1']:.2f} "
                  f"(chance {m['chance_i2t_top1']:.2f})", highlight=False)
    if json_out:
        print(json.dumps(m))


@app.command()
@handle_errors
def export(
    spec: Annotated[str, typer.Argument(help="hf-hub:org/repo, an open_clip name (with --pretrained) or a folder.")],
    out_dir: Annotated[Path, typer.Argument(metavar="DIR", help="Folder to write (open_clip_config.json, weights, "
                                                                "text/).")],
    pretrained: Annotated[Optional[str], typer.Option(help="Weights for an open_clip name: tag, file or "
                                                           "random.")] = None,
):
    """Save a VLM as a self-contained folder, e.g. BiomedCLIP on a connected machine for an air-gapped one.

    Example: mwm vlm export hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 biomedclip/
    """
    from ..localize.vlm import export_vlm, load_vlm

    vlm = load_vlm(spec, pretrained=pretrained)
    export_vlm(vlm.model, vlm.model_cfg, vlm.preprocess_cfg, out_dir, tokenizer=vlm.tokenizer)
    load_vlm(out_dir)  # prove it loads offline before saying so
    console.print(f"wrote {out_dir}: {vlm!r}; use it with --vlm {out_dir}", highlight=False)
