"""Contrastive (CLIP) training of a vision–language model on image–caption pairs: ``mwm vlm train``.

Used to make a small VLM for data no public model knows (our phantoms, a new modality), or to
adapt one (``init`` = a VLM folder, ``hf-hub:…`` or an open_clip name). Images come from
:func:`mwm.data.open_source` + :func:`mwm.data.decode` (gray, one size), captions from the npz
``captions`` key, a CSV (``image,caption``) / JSONL (``{"image", "caption"}``) keyed by image id,
or a template over class names. The ``train`` split is used when the data has splits (else all).

Training: open_clip's ``ClipLoss``, AdamW (no decay on gains, biases, logit scale), linear warmup then
cosine, random resized crops (no flips: captions name left and right). Captions often repeat within a
batch ("a head scan with no lesion", class templates). ClipLoss needs no multi-positive variant for
that: identical captions get identical text embeddings, so its diagonal targets give the same loss and
the same gradients to both encoders as targets spread uniformly over the same-caption items (UniCL,
Yang et al., CVPR 2022, Eq. 3); tested in ``test_clip_loss_already_treats_repeated_captions_as_positives``.
Every epoch: retrieval on up to ``eval_size`` held-out images (``test`` split, else ``val``, else
training images), a row in ``OUT/train_log.csv`` and a checkpoint ``OUT/checkpoints/last.pt`` (atomic;
``resume=True`` continues from it). At the end the model is exported to ``OUT`` as a VLM folder that
:func:`~mwm.localize.vlm.load_vlm` loads offline. Shuffling and augmentation draw from a generator seeded by (seed, epoch), so a resumed
run sees the same batches as an uninterrupted one.

Retrieval metrics count a hit when the retrieved item carries the *same caption* (several images can
share one, e.g. "a head scan with no lesion"): ``t2i_top{k}``: for each distinct caption, one of the k
images closest to it has that caption; ``i2t_top{k}``: an image's caption is among the k distinct
captions closest to it. ``chance_*`` give the same numbers for random embeddings.
"""

from __future__ import annotations

import csv
import io
import json
import math
import string
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from ..config import atomic_write_text, save_config
from ..data.types import ReadOptions
from ..errors import DataError, MWMError
from .vlm import _atomic_save, count_tokens, export_vlm, load_vlm, prepare_images, resolve_device

CHECKPOINT = "checkpoints/last.pt"
LOG_FILE = "train_log.csv"
_LOG_COLUMNS = ["epoch", "step", "loss", "lr", "logit_scale", "t2i_top1", "t2i_top5", "i2t_top1", "i2t_top5",
                "seconds"]
_CKPT_FORMAT = "mwm-vlm-train/1"
_TEMPLATE_KEYS = {"modality", "class"}


class TinyClipConfig(BaseModel):
    """The ``init: tiny`` model: an open_clip native CLIP (ViT image tower, causal text transformer with
    open_clip's bundled BPE tokenizer, so it works offline). The image size is the training ``size``."""

    model_config = ConfigDict(extra="forbid")

    patch_size: int = Field(default=8, ge=1)
    width: int = Field(default=192, ge=4)
    layers: int = Field(default=6, ge=1)
    heads: int = Field(default=3, ge=1)
    text_width: int = Field(default=128, ge=4)
    text_heads: int = Field(default=2, ge=1)
    text_layers: int = Field(default=3, ge=1)
    # 40, not 32: the longest phantom caption (two lesions) is 37 BPE tokens with <sot>/<eot>.
    context_length: int = Field(default=40, ge=4)
    embed_dim: int = Field(default=128, ge=2)
    # How the image tower pools its tokens into the image embedding (open_clip's ``pool_type``). "tok": the CLS
    # token, as in CLIP. "avg": the mean of the patch tokens (no CLS read-out), so every patch token's own final
    # state enters the embedding; meant for saliency methods such as M2IB that score patch tokens.
    pool_type: Literal["tok", "avg"] = "tok"

    @model_validator(mode="after")
    def _check(self) -> "TinyClipConfig":
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        if self.text_width % self.text_heads:
            raise ValueError(f"text_width ({self.text_width}) must be divisible by text_heads ({self.text_heads})")
        return self

    def model_cfg(self, image_size: int) -> dict:
        """The open_clip model config (what ``open_clip_config.json`` stores as ``model_cfg``)."""
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {"image_size": image_size, "patch_size": self.patch_size, "width": self.width,
                           "layers": self.layers, "head_width": self.width // self.heads,
                           "pool_type": self.pool_type},
            "text_cfg": {"context_length": self.context_length, "vocab_size": 49408, "width": self.text_width,
                         "heads": self.text_heads, "layers": self.text_layers},
        }


def check_captions_spec(v: str) -> str:
    """A ``captions`` option: ``auto``, ``npz``, ``template`` or a .csv / .jsonl file of image,caption."""
    if v not in ("auto", "npz", "template") and not v.lower().endswith((".csv", ".jsonl")):
        raise ValueError(f"'{v}' is not auto, npz, template, or a .csv / .jsonl file of image,caption")
    return v


class VLMTrainConfig(BaseModel):
    """`mwm vlm train`: CLIP-style training on image–caption pairs."""

    model_config = ConfigDict(extra="forbid")

    data: Path
    out: Path
    captions: str = Field(default="auto", description="auto (npz captions, else template), npz, template, "
                                                      "or a FILE.csv (image,caption) / FILE.jsonl keyed by image id")
    template: str = "a {modality} image showing {class}"
    modality: str = "medical"
    init: str = Field(default="tiny", description="tiny, a VLM folder, hf-hub:org/repo, or an open_clip name")
    pretrained: Optional[str] = Field(default=None, description="weights for an open_clip name: tag, file or random")
    image_init: str = Field(default="none", description="none, imagenet or a timm checkpoint/encoder.pth for the "
                            "image tower, when it is a timm model (open_clip TimmModel, as in BiomedCLIP)")
    model: TinyClipConfig = TinyClipConfig()
    # Tuned on 512 phantoms at 64 px (358 train) with the tiny model: batch 32 / lr 5e-4 beat 64 / 1e-3 and
    # 32 / 1e-3 on held-out retrieval (t2i top-5 0.49 vs 0.46 / 0.32) with fewer loss spikes.
    epochs: int = Field(default=15, ge=1)
    batch_size: int = Field(default=32, ge=2)
    lr: float = Field(default=5e-4, gt=0)
    weight_decay: float = Field(default=0.1, ge=0)
    warmup: float = Field(default=0.1, ge=0, lt=1, description="fraction of all steps with linear warmup")
    grad_clip: Optional[float] = Field(default=1.0, gt=0)
    size: Optional[int] = Field(default=None, ge=8, description="decode size; default 64 for tiny, else the VLM's")
    crop_scale: tuple[float, float] = (0.7, 1.0)
    train_split: str = "train"
    eval_split: str = "test"
    eval_size: int = Field(default=64, ge=2)
    seed: int = Field(default=0, ge=0)
    device: str = "auto"
    read: ReadOptions = ReadOptions()

    @field_validator("captions")
    @classmethod
    def _captions(cls, v: str) -> str:
        return check_captions_spec(v)

    @field_validator("template")
    @classmethod
    def _template(cls, v: str) -> str:
        try:
            keys = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None}
        except ValueError as e:
            raise ValueError(f"template '{v}': {e}") from e
        if keys - _TEMPLATE_KEYS:
            raise ValueError(f"template '{v}' uses {sorted(keys - _TEMPLATE_KEYS)}; only {{modality}} and {{class}} "
                             "are filled in")
        return v

    @field_validator("crop_scale")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError(f"crop_scale {v} must satisfy 0 < min <= max <= 1")
        return v


class VLMTrainError(MWMError):
    """A training run that cannot start or resume as asked."""


# ----------------------------------------------------------------------------- data


@dataclass
class Pairs:
    """Decoded images with one caption each. images: uint8 (N, 1, S, S)."""

    ids: list[str]
    images: torch.Tensor
    captions: list[str]
    split: str

    def __len__(self) -> int:
        return len(self.ids)


def _read_caption_file(path: Path) -> dict[str, str]:
    """CSV ``image,caption`` or JSONL ``{"image": id, "caption": text}`` → {id: caption}."""
    if not path.is_file():
        raise DataError(f"caption file {path} does not exist")
    out: dict[str, str] = {}
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            cols = [c.strip().lower() for c in reader.fieldnames or []]
            if "image" not in cols or "caption" not in cols:
                raise DataError(f"{path}: needs a header with columns image,caption (got {reader.fieldnames})")
            for row in reader:
                row = {k.strip().lower(): v for k, v in row.items() if k}
                out[str(row["image"]).strip()] = str(row["caption"] or "").strip()
    else:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                out[str(obj["image"]).strip()] = str(obj["caption"]).strip()
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{path}:{n}: expected a JSON object with \"image\" and \"caption\" ({e})") from e
    return out


def captions_for(ids: list[str], labels: np.ndarray, label_names: list[str], npz_captions: list[str] | None,
                 cfg: VLMTrainConfig, caption_map: dict[str, str] | None = None) -> list[str | None]:
    """One caption per image (None where there is none), following ``cfg.captions``."""
    mode = cfg.captions
    if mode == "auto":
        if npz_captions is not None and any(c for c in npz_captions):
            mode = "npz"
        elif label_names and len(labels) and (np.asarray(labels) >= 0).all():
            mode = "template"
        else:
            raise DataError(f"{cfg.data} has neither captions nor class labels: pass --captions FILE.csv "
                            "(image,caption) or FILE.jsonl")
    if mode == "npz":
        if npz_captions is None:
            raise DataError(f"{cfg.data} has no captions (npz key 'captions'); pass --captions template to caption "
                            "by class name, or --captions FILE.csv / FILE.jsonl")
        return [c if c else None for c in npz_captions]
    if mode == "template":
        if not label_names:
            raise DataError(f"{cfg.data} has no class labels for --captions template; pass --captions FILE.csv")
        return [cfg.template.format_map({"modality": cfg.modality, "class": label_names[k].replace("_", " ")})
                if 0 <= k < len(label_names) else None for k in np.asarray(labels).tolist()]
    assert caption_map is not None
    return [caption_map.get(i) or None for i in ids]


def _decode_pairs(src, size: int, split: str | None, cfg: VLMTrainConfig, caption_map, limit: int | None = None
                  ) -> Pairs:
    from ..data import decode

    arr = decode(src, size, channels=1, split=split)
    caps = captions_for(arr.ids, arr.labels, arr.label_names, arr.captions, cfg, caption_map)
    keep = [k for k, c in enumerate(caps) if c]
    if len(arr) and not keep:
        hint = f" (ids look like {arr.ids[:3]}; the file has {list(caption_map)[:3]})" if caption_map else ""
        raise DataError(f"none of the {len(arr)} images of {cfg.data}{' split ' + split if split else ''} has a "
                        f"caption{hint}")
    if len(keep) < len(arr):
        warnings.warn(f"{len(arr) - len(keep)} of {len(arr)} images have no caption and are left out", stacklevel=2)
    keep = keep[:limit] if limit else keep
    return Pairs([arr.ids[k] for k in keep], torch.from_numpy(arr.images[keep]), [caps[k] for k in keep],
                 split or "")


def load_pairs(cfg: VLMTrainConfig, size: int) -> tuple[Pairs, Pairs]:
    """(training pairs, evaluation pairs). Evaluation: ``eval_split``, else ``val``, else the first training images."""
    from ..data import open_source

    src = open_source(cfg.data, cfg.read)
    splits = {s for s in src.splits if s}
    caption_map = None
    if cfg.captions not in ("auto", "npz", "template"):
        caption_map = _read_caption_file(Path(cfg.captions).expanduser())
    train_split = cfg.train_split if cfg.train_split in splits else None
    train = _decode_pairs(src, size, train_split, cfg, caption_map)
    if len(train) < 2:
        raise DataError(f"{cfg.data}: {len(train)} captioned training image(s); contrastive training needs at least 2")
    for ev in (cfg.eval_split, "val"):
        if ev in splits and ev != train_split:
            pairs = _decode_pairs(src, size, ev, cfg, caption_map, limit=cfg.eval_size)
            if len(pairs) >= 2:
                return train, pairs
    return train, Pairs(train.ids[:cfg.eval_size], train.images[:cfg.eval_size], train.captions[:cfg.eval_size],
                        f"{train.split or 'all'} (no held-out split)")


# ----------------------------------------------------------------------------- pure pieces


def random_resized_crop(x: torch.Tensor, scale: tuple[float, float] = (0.7, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), generator: torch.Generator | None = None
                        ) -> torch.Tensor:
    """A random crop per image, resized back to the input size, for a whole batch in one ``grid_sample``.

    x: float (B, C, H, W). Each crop covers a fraction of the area drawn from ``scale`` with an aspect
    ratio drawn log-uniformly from ``ratio`` and lies inside the image. Returns float (B, C, H, W).
    """
    b = x.shape[0]
    r = torch.rand(b, 4, generator=generator)  # on the CPU so a seed gives the same crops on any device
    area = scale[0] + (scale[1] - scale[0]) * r[:, 0]
    aspect = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * r[:, 1])
    w = torch.sqrt(area * aspect).clamp(max=1.0)  # crop width / image width
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (2 * r[:, 2] - 1) * (1 - w)  # crop centre in [-1, 1] coordinates, the crop stays inside
    cy = (2 * r[:, 3] - 1) * (1 - h)
    zero = torch.zeros_like(w)
    theta = torch.stack([torch.stack([w, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1).to(x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to 1 over ``warmup_steps``, then cosine to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def retrieval_metrics(image_feats: torch.Tensor, caption_feats: torch.Tensor, caption_index: torch.Tensor,
                      ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Retrieval between M images and their U distinct captions, counting a hit by caption identity.

    image_feats: (M, E), caption_feats: (U, E), both L2-normalized; caption_index: int (M,), the caption
    of each image. Returns ``t2i_top{k}``, ``i2t_top{k}``, their chance levels ``chance_t2i_top{k}``,
    ``chance_i2t_top{k}`` (random embeddings) and ``majority_i2t_top{k}`` (every image answered with the k
    most frequent captions), all in [0, 1].
    """
    m, u = image_feats.shape[0], caption_feats.shape[0]
    sim = caption_feats.float() @ image_feats.float().T  # (U, M)
    counts = torch.bincount(caption_index, minlength=u).double()  # images per caption
    out: dict[str, float] = {}
    for k in ks:
        kt, ki = min(k, m), min(k, u)
        top_img = sim.topk(kt, dim=1).indices  # (U, kt)
        out[f"t2i_top{k}"] = (caption_index[top_img] == torch.arange(u)[:, None]).any(1).double().mean().item()
        top_cap = sim.T.topk(ki, dim=1).indices  # (M, ki)
        out[f"i2t_top{k}"] = (top_cap == caption_index[:, None]).any(1).double().mean().item()
        # P(k random images include one of the n_u with caption u) = 1 - C(M - n_u, k) / C(M, k)
        miss = torch.ones(u, dtype=torch.float64)
        for j in range(kt):
            miss = miss * ((m - counts - j).clamp(min=0) / (m - j))
        out[f"chance_t2i_top{k}"] = (1 - miss).mean().item()
        out[f"chance_i2t_top{k}"] = ki / u
        # what answering the k most frequent captions for every image scores (the trivial solution)
        out[f"majority_i2t_top{k}"] = (counts.sort(descending=True).values[:ki].sum() / m).item()
    return out


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on gains, biases, norms and the logit scale (as open_clip's training does)."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
        (no_decay if skip else decay).append(p)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
    return [g for g in groups if g["params"]]


# ----------------------------------------------------------------------------- model


@dataclass
class _Setup:
    model: nn.Module
    tokenizer: Callable
    model_cfg: dict
    preprocess_cfg: dict
    image_size: tuple[int, int]
    context_length: int
    patch: int


def _build_model(cfg: VLMTrainConfig, device: torch.device) -> _Setup:
    """The model to train: a fresh tiny CLIP at ``cfg.size`` (default 64), or a loaded VLM made trainable."""
    import open_clip
    from open_clip.transform import PreprocessCfg

    if cfg.init == "tiny":
        size = cfg.size or 64
        model_cfg = cfg.model.model_cfg(size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = open_clip.CLIP(**model_cfg)
        pp = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(PreprocessCfg(size=size)).items()}
        tok = open_clip.SimpleTokenizer(context_length=cfg.model.context_length)
        return _Setup(model.to(device).train(), tok, model_cfg, pp, (size, size), cfg.model.context_length,
                      cfg.model.patch_size)
    vlm = load_vlm(cfg.init, device=device, pretrained=cfg.pretrained)
    model = vlm.model.train().requires_grad_(True)
    return _Setup(model, vlm.tokenizer, vlm.model_cfg, vlm.preprocess_cfg, vlm.image_size, vlm.context_length,
                  max(vlm.patch_size))


def apply_image_init(model: nn.Module, model_cfg: dict, spec: str) -> dict | None:
    """Load timm weights into a VLM's image tower (``--image-init``): ``imagenet`` or a checkpoint file / run
    folder, read and checked by :func:`mwm.weights.resolve_init` as ``mwm pretrain --init`` does. Applies where the
    tower is a timm model (open_clip's ``TimmModel``: BiomedCLIP's ViT-B/16, or any ``timm_model_name`` config),
    e.g. to start BiomedCLIP fine-tuning from an encoder pretrained on the user's scans.

    Args:
        model: the open_clip model (``model.visual.trunk`` is the timm trunk).
        model_cfg: its open_clip config (``vision_cfg.timm_model_name`` names the arch).
        spec: ``none`` | ``imagenet`` | PATH.

    Returns:
        None for ``none``; else ``{source, sha256, tensors, unused}`` for metrics.json.
    """
    from ..weights import resolve_init

    if spec.strip().lower() in ("none", "random"):
        return None
    trunk = getattr(getattr(model, "visual", None), "trunk", None)
    arch = (model_cfg.get("vision_cfg") or {}).get("timm_model_name")
    if trunk is None or not arch:
        raise VLMTrainError(f"--image-init {spec}: the image tower is open_clip's own "
                            f"{type(getattr(model, 'visual', model)).__name__}, not a timm model, so timm weights do "
                            "not apply; start from a VLM with a timm image tower (--init DIR|hf-hub:…, e.g. "
                            "BiomedCLIP), or drop --image-init")
    kwargs = {"img_size": tuple(trunk.patch_embed.img_size)} if hasattr(trunk, "patch_embed") else {}
    init = resolve_init(spec, arch, kwargs)
    try:
        missing, unexpected = trunk.load_state_dict(init.state_dict, strict=False)
    except RuntimeError as e:  # shape mismatches raise even with strict=False
        raise VLMTrainError(f"--image-init {spec} does not fit the image tower '{arch}': "
                            f"{str(e).splitlines()[-1].strip()}") from e
    if missing:
        raise VLMTrainError(f"--image-init {spec}: no weights for {sorted(missing)[:5]} of the image tower '{arch}'")
    return {"source": init.source, "sha256": init.sha256, "tensors": len(init.state_dict) - len(unexpected),
            "unused": sorted(unexpected)}


def _tokenize_all(tokenizer, captions: list[str], context_length: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Distinct captions tokenized once → (tokens (U, L), index (N,) into them, the distinct captions)."""
    uniq = list(dict.fromkeys(captions))
    pos = {c: i for i, c in enumerate(uniq)}
    long = [c for c in uniq if (count_tokens(tokenizer, c) or 0) > context_length]
    if long:
        warnings.warn(f"{len(long)} of {len(uniq)} distinct captions are longer than the text context "
                      f"({context_length} tokens) and are truncated, e.g. '{long[0]}'", stacklevel=3)
    tokens = tokenizer(uniq, context_length=context_length)
    return tokens, torch.tensor([pos[c] for c in captions], dtype=torch.long), uniq


# ----------------------------------------------------------------------------- training


def _config_diff(saved: dict, now: dict, ignore=("epochs", "device", "out")) -> list[str]:
    """Options that differ between a checkpoint's config and this run's (the data path compared resolved)."""
    def norm(d: dict) -> dict:
        return {**d, "data": str(Path(d.get("data", "")).expanduser().resolve())}

    saved, now = norm(saved), norm(now)
    return [f"{k}: {saved.get(k)!r} → {now.get(k)!r}" for k in sorted(set(saved) | set(now))
            if k not in ignore and saved.get(k) != now.get(k)]


def _with_defaults(saved: dict) -> dict:
    """A checkpoint's config with options added since it was written filled in with their defaults
    (e.g. ``model.pool_type``), so such a checkpoint still resumes; the raw dict if it no longer validates."""
    try:
        return VLMTrainConfig.model_validate(saved).model_dump(mode="json")
    except ValueError:
        return saved


def _write_log(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_LOG_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


@torch.no_grad()
def _evaluate(model: nn.Module, ev: Pairs, tokens: torch.Tensor, index: torch.Tensor, prep: Callable,
              device: torch.device, batch_size: int) -> dict[str, float]:
    was_training = model.training
    model.eval()
    feats = [model.encode_image(prep(ev.images[k:k + batch_size].to(device).float() / 255.0), normalize=True).float()
             for k in range(0, len(ev), batch_size)]
    txt = model.encode_text(tokens.to(device), normalize=True).float()
    model.train(was_training)
    return retrieval_metrics(torch.cat(feats).cpu(), txt.cpu(), index)


def train_vlm(cfg: VLMTrainConfig, resume: bool = False, progress: bool = True,
              log: Callable[[str], None] | None = None, console=None) -> dict:
    """Train (or continue training) a VLM and export it to ``cfg.out``; returns the final metrics.

    Metrics: the last epoch's ``loss``, retrieval (``t2i_top1/5``, ``i2t_top1/5`` and ``chance_*``, see the
    module docstring), ``epoch`` (epochs done in total), ``epochs_run`` (in this call), ``n_train``,
    ``n_eval``, ``eval_split``, ``seconds`` (this call's wall time) and ``out``. ``progress``: a rich
    progress bar on ``console`` (default: stderr); ``log``: called with one line per epoch.
    """
    from open_clip import ClipLoss
    from rich.console import Console

    t_start = time.perf_counter()
    say = log or (lambda s: None)
    out = Path(cfg.out)
    ckpt_path = out / CHECKPOINT
    device = resolve_device(cfg.device)
    if ckpt_path.is_file() and not resume:
        raise VLMTrainError(f"{ckpt_path} exists from an earlier run: pass --resume to continue it, or choose "
                            f"another --out (delete {out / 'checkpoints'} to start over)")
    if resume and not ckpt_path.is_file():
        raise VLMTrainError(f"--resume: no checkpoint at {ckpt_path}; drop --resume to start a new run")
    ck = None
    if resume:  # check the options before the slow part
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if not isinstance(ck, dict) or ck.get("format") != _CKPT_FORMAT:
            raise VLMTrainError(f"{ckpt_path} is not a `mwm vlm train` checkpoint")
        diff = _config_diff(_with_defaults(ck["config"]), cfg.model_dump(mode="json"))
        if diff:
            raise VLMTrainError(f"{ckpt_path} was trained with other options ({'; '.join(diff)}); resume with the "
                                "same options (only --epochs and --device may change) or use another --out")

    setup = _build_model(cfg, device)
    # a resumed run's checkpoint holds the tower already: the init file is not read again
    image_init = apply_image_init(setup.model, setup.model_cfg, cfg.image_init) if ck is None else None
    if image_init is not None:
        say(f"image tower from {image_init['source']} ({image_init['tensors']} tensors, sha256 "
            f"{image_init['sha256'][:12]}…)")
    size = cfg.size or setup.image_size[0]  # decode at the model's input size unless told otherwise
    if size < 2 * setup.patch:
        raise VLMTrainError(f"--size {size} is smaller than two {setup.patch}-px patches of the model; use "
                            f"--size {max(2 * setup.patch, 32)} or more")
    train, ev = load_pairs(cfg, size)
    tokens, index, _ = _tokenize_all(setup.tokenizer, train.captions, setup.context_length)
    ev_tokens, ev_index, ev_uniq = _tokenize_all(setup.tokenizer, ev.captions, setup.context_length)
    mean, std = setup.preprocess_cfg["mean"], setup.preprocess_cfg["std"]

    def prep(x01: torch.Tensor) -> torch.Tensor:
        return prepare_images(x01, setup.image_size, mean, std)

    model = setup.model
    # fused: one pass over each tensor per step instead of ~10 (the 49408×width token table dominates tiny CLIPs)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6,
                            fused=True)
    n = len(train)
    bs = min(cfg.batch_size, n)
    steps_per_epoch = n // bs  # drop the ragged last batch: a tiny batch makes a noisy contrastive loss
    total = steps_per_epoch * cfg.epochs
    warmup_steps = max(1, round(cfg.warmup * total))
    rows: list[dict] = []
    start_epoch, step = 0, 0
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start_epoch, step, rows = int(ck["epoch"]), int(ck["step"]), list(ck["log"])
        say(f"resuming {ckpt_path} after epoch {start_epoch} (step {step})")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    loss_fn = ClipLoss()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    say(f"training on {n} pairs ({train.split or 'all'}), evaluating on {len(ev)} ({ev.split}, {len(ev_uniq)} distinct "
        f"captions); {cfg.epochs} epochs × {steps_per_epoch} steps of {bs} on {device}")

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(),
                   console=console or Console(stderr=True), transient=True, disable=not progress)
    epochs_run = 0
    with bar:
        task = bar.add_task("train", total=(cfg.epochs - start_epoch) * steps_per_epoch, epoch=start_epoch + 1,
                            loss="-")
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # same batches with or without resume
            perm = torch.randperm(n, generator=g)
            model.train()
            losses = []
            for b in range(steps_per_epoch):
                idx = perm[b * bs:(b + 1) * bs]
                lr = cfg.lr * lr_factor(step, warmup_steps, total)
                for group in opt.param_groups:
                    group["lr"] = lr
                x = train.images[idx].to(device).float() / 255.0
                x = prep(random_resized_crop(x, cfg.crop_scale, generator=g))
                with autocast:
                    img = model.encode_image(x, normalize=True)
                    txt = model.encode_text(tokens[index[idx]].to(device), normalize=True)
                    loss = loss_fn(img.float(), txt.float(), model.logit_scale.exp())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                with torch.no_grad():  # as in CLIP: the temperature may not go below 1/100
                    model.logit_scale.clamp_(0, math.log(100))
                step += 1
                losses.append(loss.item())
                bar.update(task, advance=1, epoch=epoch + 1, loss=f"{losses[-1]:.3f}")
            metrics = _evaluate(model, ev, ev_tokens, ev_index, prep, device, bs)
            row = {"epoch": epoch + 1, "step": step, "loss": float(np.mean(losses)), "lr": lr,
                   "logit_scale": model.logit_scale.detach().exp().item(),
                   **{k: metrics[k] for k in _LOG_COLUMNS if k in metrics}, "seconds": time.perf_counter() - t0}
            rows.append(row)
            epochs_run += 1
            _atomic_save({"format": _CKPT_FORMAT, "epoch": epoch + 1, "step": step, "model": model.state_dict(),
                          "optimizer": opt.state_dict(), "config": cfg.model_dump(mode="json"), "log": rows},
                         ckpt_path)
            _write_log(out / LOG_FILE, rows)
            say(f"epoch {epoch + 1}/{cfg.epochs}: loss {row['loss']:.3f}, text→image top-1 {metrics['t2i_top1']:.2f} "
                f"top-5 {metrics['t2i_top5']:.2f}, image→text top-1 {metrics['i2t_top1']:.2f} "
                f"(chance {metrics['chance_t2i_top1']:.2f} / {metrics['chance_i2t_top1']:.2f}), {row['seconds']:.1f}s")
    if epochs_run == 0:  # resumed a finished run: report its state again
        metrics = _evaluate(model, ev, ev_tokens, ev_index, prep, device, bs)
    model.eval()
    export_vlm(model, setup.model_cfg, setup.preprocess_cfg, out, tokenizer=setup.tokenizer)
    save_config(cfg, out / "config.yaml")
    last = rows[-1] if rows else {}
    result = {"loss": last.get("loss"), **metrics, "epoch": start_epoch + epochs_run, "epochs_run": epochs_run,
              "n_train": n, "n_eval": len(ev), "eval_split": ev.split, "eval_distinct_captions": len(ev_uniq),
              "seconds": time.perf_counter() - t_start, "out": str(out),
              **({"image_init": image_init} if image_init is not None else {})}
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=2) + "\n")
    return result


__all__ = ["VLMTrainConfig", "TinyClipConfig", "train_vlm", "apply_image_init", "load_pairs", "captions_for", "retrieval_metrics",
           "random_resized_crop", "lr_factor", "Pairs", "VLMTrainError"]
