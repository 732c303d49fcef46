"""`mwm importance …`: per-image importance maps computed once (MedIM report attention, M&M Meijering ridges),
written as a saliency-map manifest for `mwm pretrain --rois OUT/rois.jsonl --masking saliency_topk|saliency_soft|
saliency_topk_diverse`.

One command per importance source; each is a function decorated with ``@app.command(...)`` in this file.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config import resolve
from .common import ConfigOpt, QuietOpt, ResizeOpt, SetOpt, console, count_bar, handle_errors

app = typer.Typer(help="Importance maps computed once per image, for the saliency masking strategies of "
                       "`mwm pretrain`.", no_args_is_help=True)


@app.command("medim")
@handle_errors
def medim(
    data: Annotated[Path, typer.Argument(help="Folder, .npz, .csv or file of scans.")],
    vlm: Annotated[Optional[str], typer.Option(help="VLM: an `mwm vlm` folder, hf-hub:org/repo or an open_clip "
                                                    "name (ViT image tower).")] = None,
    mode: Annotated[Optional[str], typer.Option(help="kwm (MeSH words of the report) or sdm (one sentence). "
                                                     "[default: kwm]")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder: rois.jsonl, saliency/, "
                                                              "meta.json.")] = None,
    captions: Annotated[Optional[str], typer.Option(help="Reports: auto (npz captions, else --template), npz, "
                                                         "template, FILE.csv (image,caption) or FILE.jsonl. "
                                                         "[default: auto; template when --template is given]")] = None,
    template: Annotated[Optional[str], typer.Option(help="Report per class, e.g. 'a brain MRI showing {class}' "
                                                         "({modality} also filled).")] = None,
    mesh: Annotated[Optional[Path], typer.Option(help="More MeSH terms, one per line (added to the packaged "
                                                      "list).")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="Softmax temperature over patches. "
                                                              "[default: 0.1]")] = None,
    split: Annotated[Optional[str], typer.Option(help="Split to map (all: every image). [default: train when "
                                                      "present, else all]")] = None,
    seed: Annotated[Optional[int], typer.Option(help="SDM's sentence draw per image id. [default: 0]")] = None,
    resize: ResizeOpt = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per VLM pass. [default: 64]")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:N or auto. [default: auto]")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace maps made with other settings in "
                                                                "--out.")] = False,
    quiet: QuietOpt = False,
    config: ConfigOpt = None, set_: SetOpt = None,
):
    """MedIM's report-guided importance: each image's report attends over its patches through a frozen VLM;
    KWM sums the attention of the report's MeSH words, SDM of one sentence's words. Computed once; a rerun with
    the same settings does nothing.

    Then: mwm pretrain DATA --rois OUT/rois.jsonl --masking saliency_topk_diverse --ratio 0.5 (MedIM's
    high-activated masking; saliency_topk: plain top-γ).

    Example: mwm importance medim scans.npz --vlm tinyclip/ --mode kwm --out medim_kwm/
    """
    from ..errors import MWMError
    from ..importance.medim import MedIMConfig, medim_maps

    if out is None and not config:
        raise MWMError("give --out DIR for the maps (rois.jsonl, saliency/, meta.json)")
    if vlm is None and not config:
        raise MWMError("give --vlm: an `mwm vlm train` folder, hf-hub:org/repo or an open_clip name")
    if template is not None and captions is None:
        captions = "template"
    cfg = resolve(MedIMConfig, config, set_, {
        "data": data, "out": out, "vlm": vlm, "mode": mode, "captions": captions, "template": template,
        "mesh": mesh, "temperature": temperature, "split": split, "seed": seed, "resize": resize,
        "batch_size": batch_size, "device": device})
    with count_bar("medim maps") if not quiet else contextlib.nullcontext() as bar:
        s = medim_maps(cfg, overwrite=overwrite, progress=bar)
    if s.get("cached"):
        console.print(f"{s['manifest']}: already made with these settings; nothing to do")
        return
    st = ", ".join(f"{k} {v}" for k, v in sorted(s["statuses"].items()))
    console.print(f"{s['images']} images ({st}) in {s['seconds']} s → {s['manifest']}")


@app.command("meijering")
@handle_errors
def meijering(
    data: Annotated[Path, typer.Argument(help="Folder, .npz, .csv or file of scans.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder: rois.jsonl, saliency/, "
                                                              "meta.json.")] = None,
    sigmas: Annotated[str, typer.Option(help="Filter scales in pixels of the --size image, comma-separated.")
                      ] = "1,2,3",
    black_ridges: Annotated[bool, typer.Option("--black-ridges/--no-black-ridges",
                                               help="Dark ridges on a bright background (e.g. fundus vessels) "
                                                    "instead of bright ones (contrast vessels, ribs, edges, "
                                                    "lesion rims).")] = False,
    split: Annotated[Optional[str], typer.Option(help="Split to map (all: every image). [default: train when "
                                                      "present, else all]")] = None,
    size: Annotated[int, typer.Option(help="Side of the square the scans are filtered at; give the --size you "
                                           "pretrain at.")] = 224,
    resize: ResizeOpt = None,
    workers: Annotated[int, typer.Option(help="Filter threads.")] = 1,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace maps made with other settings in "
                                                                "--out.")] = False,
    quiet: QuietOpt = False,
):
    """M&M's Meijering-based masking, reading (a): each scan's Meijering ridge response (scikit-image,
    multi-scale), min–max normalised per image; a mask cell's importance is its mean response. Computed once; a
    rerun with the same settings does nothing.

    Then: mwm pretrain DATA --rois OUT/rois.jsonl --masking saliency_topk --ratio 0.6 (or saliency_soft).

    Example: mwm importance meijering scans.npz --out meij/ --sigmas 1,2,3 --size 128
    """
    from ..errors import MWMError
    from ..importance.meijering import parse_sigmas, write_meijering_manifest

    if out is None:
        raise MWMError("give --out DIR for the maps (rois.jsonl, saliency/, meta.json)")
    if workers < 1:
        raise MWMError(f"--workers {workers}: give 1 or more threads")
    with count_bar("meijering maps") if not quiet else contextlib.nullcontext() as bar:
        s = write_meijering_manifest(data, out, sigmas=parse_sigmas(sigmas), black_ridges=black_ridges, split=split,
                                     size=size, resize=resize or "pad", workers=workers, overwrite=overwrite,
                                     progress=bar)
    if s["cached"]:
        console.print(f"{s['manifest']}: already made with these settings; nothing to do")
        return
    console.print(f"{s['images']} images in {s['seconds']:.1f} s ({s['images_per_s']:.1f} images/s filtering) → "
                  f"{s['manifest']}", highlight=False)


__all__ = ["app"]
