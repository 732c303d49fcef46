"""Vision–language models for stage 1: a prompt → text embedding, an image → image embedding.

:class:`VLM` wraps a frozen open_clip model with its tokenizer, its preprocessing (open_clip's
``preprocess_cfg``: size, interpolation, resize mode, mean, std; applied to batched tensors)
and the stage view of its vision tower (:func:`mwm.localize.vision.vision_stages`), which is what
M2IB needs to put a bottleneck after one block.

Where a model comes from (:func:`load_vlm`):

* ``hf-hub:org/repo`` (e.g. BiomedCLIP) through open_clip; needs the network or the HF cache.
* an open_clip architecture name (``ViT-B-16``) with ``pretrained=`` a tag or a weights file,
  or ``pretrained="random"`` to ask for untrained weights explicitly.
* a local folder (air-gapped machines): ``open_clip_config.json`` + one weights file, plus, for a
  Hugging Face text tower, its ``config.json`` and tokenizer files in a sub-folder named by a
  *relative* path in ``text_cfg.hf_model_name`` / ``hf_tokenizer_name`` (we write ``./text``).
  :func:`export_vlm` writes such folders, :func:`build_biomedclip_like` writes a BiomedCLIP-shaped
  one with random weights (what the tests load), ``mwm vlm train`` ends with one.

Nothing falls back silently to random weights: a missing weights file is an error naming it.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from copy import deepcopy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MWMError
from ..io import atomic_path, atomic_write_text
from .vision import VisionStages, vision_stages

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_pytorch_model.bin"  # what we write
# The names open_clip's ``_find_checkpoint_in_dir`` prefers, in its order; a folder without any of
# them is refused rather than guessed (open_clip would pick any *.safetensors / *.bin / *.pth).
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "pytorch_model.pth",
                "model.pth")
# Any one of these makes a folder loadable by transformers' AutoTokenizer.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")
TEXT_DIR = "text"  # sub-folder for an HF text tower's config and tokenizer
BIOMEDCLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
BIOMEDCLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BIOMEDCLIP_HUB = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"


class VLMError(MWMError):
    """A VLM spec, folder or input that cannot be used as given."""


class PromptError(VLMError, ValueError):
    """A text prompt that cannot be encoded (empty)."""


# ----------------------------------------------------------------------------- small pure helpers


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None → cuda when available, else cpu; anything else as torch understands it."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise VLMError(f"device '{device}' is not a torch device (use cpu, cuda, cuda:1 or auto)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VLMError(f"device '{device}' asked for but CUDA is not available here; pass --device cpu")
    return dev


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, (int, float)) else (int(v[0]), int(v[1]))


def _three(v) -> tuple[float, ...]:
    """A mean/std from a preprocess_cfg (one number or one per channel) → 3 floats, as open_clip reads it."""
    return tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else (float(v),) * 3


# open_clip's resize_mode → the mwm.data.transforms.Fit policy with the same geometry.
RESIZE_POLICY = {"shortest": "crop", "longest": "pad", "squash": "stretch"}


def resized_size(h: int, w: int, size: tuple[int, int], resize_mode: str) -> tuple[int, int]:
    """(h', w') an h×w image is resized to before the centre crop / pad, as open_clip's ``image_transform`` does.

    ``shortest`` to a square size is torchvision's ``Resize(int)`` (short side → size, long side truncated);
    other shortest/longest cases are open_clip's ``ResizeKeepRatio`` (rounded); ``squash`` is ``size``.
    """
    th, tw = size
    if resize_mode == "squash":
        return th, tw
    if resize_mode == "shortest" and th == tw:
        new_long = int(th * max(h, w) / min(h, w))
        return (th, new_long) if h <= w else (new_long, th)
    ratio = (max if resize_mode == "longest" else min)(h / th, w / tw)
    return round(h / ratio), round(w / ratio)


def _center_crop_or_pad(x: torch.Tensor, out_h: int, out_w: int, fill: float) -> torch.Tensor:
    """open_clip's ``center_crop_or_pad`` (and torchvision's ``CenterCrop``) on (..., H, W)."""
    h, w = x.shape[-2:]
    if out_h > h or out_w > w:
        dw, dh = max(out_w - w, 0), max(out_h - h, 0)
        x = F.pad(x, (dw // 2, (dw + 1) // 2, dh // 2, (dh + 1) // 2), value=fill)
        h, w = x.shape[-2:]
    top, left = int(round((h - out_h) / 2.0)), int(round((w - out_w) / 2.0))
    return x[..., top:top + out_h, left:left + out_w]


def prepare_images(images: torch.Tensor, image_size: tuple[int, int], mean: Sequence[float], std: Sequence[float],
                   min_side: int = 1, what: str = "the VLM's patch grid", interpolation: str = "bilinear",
                   resize_mode: str = "squash", fill_color: int = 0) -> torch.Tensor:
    """Images in [0, 1] → the model's input, as open_clip's eval ``image_transform`` makes it, batched.

    images: float (B, C, H, W) with C = 1 or 3 (uint8 is divided by 255; (B, H, W) is gray).
    interpolation / resize_mode / fill_color: open_clip's ``PreprocessCfg`` fields (``bicubic`` or
    ``bilinear``; ``shortest``: short side → size then centre crop, ``longest``: long side → size then
    centre pad with ``fill_color``, ``squash``: straight to size). The defaults (bilinear, squash) are
    what mwm's own training uses; :meth:`VLM.preprocess` passes the model's config.
    Returns float32 (B, 3, S_h, S_w): gray repeated to 3 channels, resized with antialias (PIL's kernels;
    clamped to [0, 1] as PIL's uint8 output is), normalized with ``mean``/``std``. Differentiable in ``images``.
    """
    if not isinstance(images, torch.Tensor):
        raise VLMError(f"images must be a torch.Tensor (B, C, H, W) in [0, 1], got {type(images).__name__}")
    if interpolation == "random":
        interpolation = "bicubic"  # open_clip: 'random' is for training; eval transforms use bicubic
    if interpolation not in ("bicubic", "bilinear") or resize_mode not in RESIZE_POLICY:
        raise VLMError(f"unsupported preprocessing interpolation={interpolation!r} resize_mode={resize_mode!r}: "
                       f"set the VLM's preprocess_cfg to bicubic|bilinear and one of {', '.join(RESIZE_POLICY)}")
    x = images
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise VLMError(f"images must be (B, 1 or 3, H, W), got shape {tuple(images.shape)}")
    h, w = x.shape[-2:]
    if h < min_side or w < min_side:
        raise VLMError(f"images are {h}×{w} px, smaller than two patches ({min_side} px) of {what}; "
                       f"decode them at a larger size (e.g. --size {max(image_size)}) or use a VLM with smaller "
                       "patches")
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    size = (int(image_size[0]), int(image_size[1]))
    if (h, w) != size:
        new = resized_size(h, w, size, resize_mode)
        if resize_mode == "shortest" and size[0] != size[1]:
            interpolation = "bicubic"  # open_clip builds this case's ResizeKeepRatio without its interpolation
        if new != (h, w):
            x = F.interpolate(x, size=new, mode=interpolation, antialias=True, align_corners=False).clamp(0, 1)
        x = _center_crop_or_pad(x, *size, fill=fill_color / 255.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def count_tokens(tokenizer, text: str) -> int | None:
    """Tokens ``text`` takes with special tokens and without truncation; None if the tokenizer can't say."""
    hf = getattr(tokenizer, "tokenizer", None)
    if hf is not None and callable(hf):  # open_clip HFTokenizer / SigLipTokenizer wrap a transformers tokenizer
        clean = getattr(tokenizer, "clean_fn", None) or (lambda s: s)
        mode = getattr(tokenizer, "tokenizer_mode", "")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ids = hf(clean(text), truncation=False, add_special_tokens=mode != "clips", verbose=False)["input_ids"]
        return len(ids) + (3 if mode == "clips" else 0)
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "sot_token_id"):  # SimpleTokenizer: <sot> BPE <eot>
        return len(tokenizer.encode(text)) + 2
    return None


def tokenize(tokenizer, texts: list[str], context_length: int, warn: bool = True) -> torch.Tensor:
    """texts → int64 (P, context_length); texts longer than the context are truncated with one warning each."""
    if warn:
        for t in texts:
            n = count_tokens(tokenizer, t)
            if n is not None and n > context_length:
                warnings.warn(f"prompt '{t}' takes {n} tokens, more than the text context of {context_length}; "
                              f"it is truncated to the first {context_length}", stacklevel=3)
    return tokenizer(texts, context_length=context_length)


# ----------------------------------------------------------------------------- the model wrapper


class VLM:
    """A frozen open_clip model ready for localization.

    Attributes: ``model`` (eval, no grads), ``tokenizer`` (callable: list[str] → int64 (P, L)),
    ``image_size`` (S_h, S_w), ``mean``/``std`` (3 floats), ``interpolation``/``resize_mode`` (open_clip's
    ``PreprocessCfg`` fields; defaults bicubic / shortest), ``context_length``, ``device``, ``name``
    (the spec it was loaded from), ``stages`` (:class:`~mwm.localize.vision.VisionStages`),
    ``model_cfg``/``preprocess_cfg`` (dicts, as :func:`export_vlm` takes them; ``preprocess_cfg`` complete).
    """

    def __init__(self, model: nn.Module, tokenizer: Callable, name: str, device: torch.device | str = "cpu",
                 model_cfg: dict | None = None, preprocess_cfg: dict | None = None):
        import open_clip
        from open_clip.transform import PreprocessCfg, merge_preprocess_dict

        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = str(name)
        self.model_cfg = deepcopy(model_cfg) if model_cfg is not None else {}
        # open_clip's defaults (PreprocessCfg: bicubic, shortest side + centre crop) under the model's own
        # settings, as open_clip's image_transform would use them
        pp = merge_preprocess_dict(PreprocessCfg(), dict(preprocess_cfg or open_clip.get_model_preprocess_cfg(model)
                                                         or {}))
        try:
            self.stages: VisionStages = vision_stages(model.visual)
        except TypeError as e:  # a CNN tower (RN50…): M2IB needs token blocks
            raise VLMError(f"{name}: {e}") from e
        self.image_size: tuple[int, int] = self.stages.image_size
        pp["size"] = list(self.image_size)
        self.preprocess_cfg = pp
        self.mean: tuple[float, ...] = _three(pp["mean"])
        self.std: tuple[float, ...] = _three(pp["std"])
        self.interpolation: str = str(pp["interpolation"])
        self.resize_mode: str = str(pp["resize_mode"])
        ctx = getattr(tokenizer, "context_length", None) or getattr(model, "context_length", None)
        self.context_length: int = int(ctx)
        self._text_cache: dict[str, torch.Tensor] = {}

    def __repr__(self) -> str:
        return (f"VLM({self.name!r}, image_size={self.image_size}, patch={self.patch_size}, grid={self.stages.grid}, "
                f"embed_dim={self.embed_dim}, context_length={self.context_length}, device={self.device})")

    @property
    def patch_size(self) -> tuple[int, int]:
        """Pixels per patch (p_h, p_w) at the model's input size."""
        return (self.image_size[0] // self.stages.grid[0], self.image_size[1] // self.stages.grid[1])

    @property
    def embed_dim(self) -> int:
        """E, the size of the joint embedding space."""
        if "embed_dim" in self.model_cfg:
            return int(self.model_cfg["embed_dim"])
        return int(self.encode_text(["a"]).shape[-1])

    def to(self, device: str | torch.device) -> "VLM":
        """Move the model; cached text embeddings are dropped (recomputed on the new device)."""
        self.device = resolve_device(device)
        self.model.to(self.device)
        self._text_cache.clear()
        return self

    def encode_text(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """prompts → float (P, E), L2-normalized, no grad. Each distinct prompt is encoded once and cached.

        An empty prompt raises :class:`PromptError`; one longer than ``context_length`` tokens warns and is truncated.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise PromptError("no prompts given: pass at least one description such as 'brain tumor'")
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise PromptError(f"prompt {i} is empty ({p!r}): give the region in words, e.g. 'brain tumor' or "
                                  "'the lungs'")
        todo = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        if todo:
            tokens = tokenize(self.tokenizer, todo, self.context_length).to(self.device)
            with torch.no_grad():
                feats = self.model.encode_text(tokens, normalize=True).float()
            self._text_cache.update(zip(todo, feats))
        return torch.stack([self._text_cache[p] for p in prompts])

    @property
    def resize_policy(self) -> str:
        """The :class:`mwm.data.transforms.Fit` policy with the geometry of :meth:`preprocess` for a
        non-square image (``crop`` for open_clip's ``shortest``, ``pad`` for ``longest``, ``stretch`` for
        ``squash``), up to a pixel of rounding. Images already at ``image_size`` are not moved at all."""
        return RESIZE_POLICY[self.resize_mode]

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """float (B, C, H, W) in [0, 1], C = 1 or 3 → float (B, 3, S, S) normalized, on ``device``.

        The model's own preprocessing (``preprocess_cfg``: interpolation, resize mode, mean/std), as
        open_clip's ``image_transform`` applies it to a PIL image, on the whole batch at once. Images
        already at ``image_size`` are only normalized, so their geometry is unchanged.
        Raises :class:`VLMError` for images smaller than two patches of the model's grid.
        """
        if isinstance(images, torch.Tensor):
            images = images.to(self.device)
        pp = self.preprocess_cfg
        return prepare_images(images, self.image_size, self.mean, self.std, min_side=2 * max(self.patch_size),
                              what=f"the VLM {self.name} ({max(self.patch_size)}-px patches)",
                              interpolation=self.interpolation, resize_mode=self.resize_mode,
                              fill_color=int(pp.get("fill_color", 0)))

    def encode_image(self, images01: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """float (B, C, H, W) in [0, 1] → float (B, E), L2-normalized, no grad (in chunks of ``batch_size``)."""
        out = []
        with torch.no_grad():
            for k in range(0, images01.shape[0], batch_size):
                x = self.preprocess(images01[k:k + batch_size])
                out.append(self.model.encode_image(x, normalize=True).float())
        return torch.cat(out) if out else torch.zeros(0, 0)


# ----------------------------------------------------------------------------- loading


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:400]


def find_weights(folder: Path) -> Path | None:
    """The weights file open_clip would load from ``folder`` (first of :data:`WEIGHT_FILES`), or None."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def _resolve_ref(root: Path, value: str | None, key: str, cfg_file: Path) -> str | None:
    """A text_cfg path → absolute when it names something inside ``root``; hub names pass through."""
    if not value:
        return value
    p = Path(value).expanduser()
    cand = p if p.is_absolute() else root / p
    if cand.exists():
        return str(cand.resolve())
    if p.is_absolute() or value.startswith(("./", "../", ".\\")):
        raise VLMError(f"{cfg_file}: text_cfg.{key} = '{value}' but {cand} does not exist; put the text tower's "
                       f"config.json and tokenizer files there (re-export with export_vlm / `mwm vlm export`)")
    return value  # a hub name such as microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract


def _check_text_files(model_dir: str | None, tok_dir: str | None, root: Path) -> None:
    """Name the exact file missing from a local HF text tower (transformers' own errors are cryptic)."""
    if model_dir and Path(model_dir).is_dir() and not (Path(model_dir) / "config.json").is_file():
        raise VLMError(f"{Path(model_dir) / 'config.json'} is missing: the text tower's transformers config "
                       f"(write it with model.text.config.save_pretrained('{model_dir}') or re-export {root})")
    if tok_dir and Path(tok_dir).is_dir() and not any((Path(tok_dir) / f).is_file() for f in TOKENIZER_FILES):
        raise VLMError(f"{tok_dir} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}; e.g. vocab.txt with "
                       f"tokenizer_config.json for BERT): copy the tokenizer there or re-export {root}")


def read_vlm_config(folder: str | Path) -> dict:
    """``folder/open_clip_config.json`` as a dict with ``model_cfg`` and ``preprocess_cfg`` (paths as written)."""
    folder = Path(folder)
    cfg_file = folder / CONFIG_FILE
    if not cfg_file.is_file():
        raise VLMError(f"{cfg_file} is missing: a VLM folder needs {CONFIG_FILE} and a weights file "
                       f"({WEIGHTS_FILE}); make one with `mwm vlm train`, `mwm vlm export` or build_biomedclip_like")
    try:
        data = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VLMError(f"{cfg_file}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("model_cfg"), dict):
        raise VLMError(f"{cfg_file} lacks model_cfg: expected {{\"model_cfg\": {{embed_dim, vision_cfg, text_cfg}}, "
                       "\"preprocess_cfg\": {mean, std}} as open_clip and export_vlm write it")
    mc = data["model_cfg"]
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in mc]
    if missing:
        raise VLMError(f"{cfg_file}: model_cfg lacks {', '.join(missing)}")
    data.setdefault("preprocess_cfg", {})
    return data


def _load_dir(folder: Path, device: torch.device, name: str) -> VLM:
    import open_clip
    from open_clip.tokenizer import HFTokenizer

    folder = folder.expanduser().resolve()
    if not folder.is_dir():
        raise VLMError(f"{folder} is a file, not a VLM folder: pass a folder with {CONFIG_FILE} and weights, "
                       f"or an open_clip name with pretrained={folder} (--vlm ViT-B-16 --pretrained {folder})")
    data = read_vlm_config(folder)
    cfg_file = folder / CONFIG_FILE
    weights = find_weights(folder)
    if weights is None:
        raise VLMError(f"{folder} has no weights file: expected {WEIGHTS_FILE} (or one of "
                       f"{', '.join(n for n in WEIGHT_FILES if n != WEIGHTS_FILE)}); copy the checkpoint there or "
                       "re-export the model (export_vlm / `mwm vlm export`); random weights are never used silently")
    model_cfg = data["model_cfg"]
    text_cfg = dict(model_cfg.get("text_cfg") or {})
    hf_model = _resolve_ref(folder, text_cfg.get("hf_model_name"), "hf_model_name", cfg_file)
    hf_tok = _resolve_ref(folder, text_cfg.get("hf_tokenizer_name"), "hf_tokenizer_name", cfg_file)
    _check_text_files(hf_model, hf_tok, folder)
    if hf_model:
        text_cfg["hf_model_name"] = hf_model
        text_cfg["hf_model_pretrained"] = False  # the weights come from our checkpoint
    if hf_tok:
        text_cfg["hf_tokenizer_name"] = hf_tok
    try:
        # open_clip reads the json and weights itself (strict loading, preprocess cfg); we only hand it
        # the text_cfg with paths made absolute (its own local-dir loader would resolve them against the CWD).
        model = open_clip.create_model(f"local-dir:{folder}", device=device, require_pretrained=True,
                                       text_cfg=text_cfg)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        hint = ""
        if hf_model and not Path(hf_model).exists():
            hint = (f"; text_cfg.hf_model_name '{hf_model}' is neither a folder inside {folder} nor in the local HF "
                    f"cache: put its config.json and tokenizer in {folder / TEXT_DIR} and set it to './{TEXT_DIR}'")
        raise VLMError(f"cannot build the VLM in {folder} from {CONFIG_FILE} and {weights.name}: {_short(e)}{hint}") \
            from e
    ctx = int(text_cfg.get("context_length", 77))
    try:
        if hf_tok:
            tokenizer = HFTokenizer(hf_tok, context_length=ctx, tokenizer_mode=text_cfg.get("tokenizer_mode"),
                                    **(text_cfg.get("tokenizer_kwargs") or {}))
        else:
            tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    except (OSError, ValueError) as e:
        raise VLMError(f"cannot load the tokenizer of {folder} ({hf_tok or 'open_clip BPE'}): {_short(e)}") from e
    resolved = deepcopy(model_cfg)
    resolved["text_cfg"] = text_cfg
    return VLM(model, tokenizer, name=name, device=device, model_cfg=resolved,
               preprocess_cfg=open_clip.get_model_preprocess_cfg(model))


def _hub_advice(spec: str) -> str:
    state = "HF_HUB_OFFLINE=1 is set" if _offline() else "the hub is unreachable or the repo is unknown"
    return (f"{state}. Pass a local VLM folder instead (--vlm DIR, made once on a connected machine with "
            f"`mwm vlm export {spec} DIR`), or unset HF_HUB_OFFLINE on a machine with network")


def _load_hub(spec: str, device: torch.device) -> VLM:
    import open_clip

    try:
        model = open_clip.create_model(spec, device=device, require_pretrained=True)
        tokenizer = open_clip.get_tokenizer(spec)
        model_cfg = open_clip.get_model_config(spec)
    except Exception as e:  # network, cache and repo errors come in many types (OSError, HTTPError, RuntimeError…)
        raise VLMError(f"cannot load {spec} from the Hugging Face hub ({_short(e)}): {_hub_advice(spec)}") from e
    return VLM(model, tokenizer, name=spec, device=device, model_cfg=model_cfg,
               preprocess_cfg=open_clip.get_model_preprocess_cfg(model))


def _load_builtin(name: str, pretrained: str | None, device: torch.device) -> VLM:
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(name)
    if not pretrained:
        raise VLMError(f"'{name}' is an open_clip architecture without weights: say which with --pretrained TAG "
                       f"({', '.join(tags) or 'no tags known'}; needs the network or the HF cache), --pretrained "
                       "FILE (a checkpoint), or --pretrained random for untrained weights (tests only)")
    try:
        if pretrained == "random":
            model = open_clip.create_model(name, pretrained=None, device=device, pretrained_image=False,
                                           pretrained_text=False)
        else:
            model = open_clip.create_model(name, pretrained=pretrained, device=device, require_pretrained=True)
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as e:
        where = "file" if Path(pretrained).suffix in (".bin", ".pt", ".pth", ".safetensors") else "tag"
        fix = (f"check the file {pretrained} matches {name}" if where == "file" and Path(pretrained).is_file() else
               f"pass a weights file that exists, or one of the tags {', '.join(tags)} with network access "
               "(or its file in the HF cache)")
        raise VLMError(f"cannot load {name} with pretrained='{pretrained}' ({_short(e)}): {fix}") from e
    return VLM(model, tokenizer, name=name, device=device, model_cfg=open_clip.get_model_config(name),
               preprocess_cfg=open_clip.get_model_preprocess_cfg(model))


def load_vlm(spec: str | Path, device: str | torch.device = "cpu", pretrained: str | None = None) -> VLM:
    """Load a frozen :class:`VLM`.

    spec: ``hf-hub:org/repo``; an open_clip name (``ViT-B-16``) with ``pretrained`` a tag, a weights
    file or ``"random"``; or a local folder (optionally ``local-dir:PATH``) with ``open_clip_config.json``
    and weights. Every failure is a :class:`VLMError` that says what to pass instead.
    """
    import open_clip

    dev = resolve_device(device)
    s = str(spec).strip()
    if pretrained and (s.startswith(("hf-hub:", "local-dir:")) or Path(s).expanduser().exists()):
        warnings.warn(f"pretrained='{pretrained}' is ignored: {s} brings its own weights", stacklevel=2)
    if not s:
        raise VLMError("empty VLM spec: pass a folder, hf-hub:org/repo or an open_clip name such as ViT-B-16")
    if s.startswith("hf-hub:"):
        return _load_hub(s, dev)
    if s.startswith("local-dir:"):
        s = s[len("local-dir:"):]
        if not Path(s).expanduser().exists():
            raise VLMError(f"VLM folder {s} does not exist")
    if Path(s).expanduser().exists():
        return _load_dir(Path(s), dev, name=str(spec))
    if s in open_clip.list_models():
        return _load_builtin(s, pretrained, dev)
    looks_like_path = "/" in s or "\\" in s or s.startswith(".")
    raise VLMError(f"'{s}' is " + ("not an existing folder" if looks_like_path else
                                   "neither an existing folder nor an open_clip model name") +
                   f": pass a VLM folder, {BIOMEDCLIP_HUB}, or a name such as ViT-B-16 with --pretrained")


# ----------------------------------------------------------------------------- writing VLM folders


def _atomic_save(obj, path: str | Path) -> None:
    """torch.save, atomically."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _jsonable(v):
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def _copy_tokenizer(src, dest: Path) -> None:
    """Copy tokenizer files (a folder: its tokenizer/config files; or a list of files) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    if isinstance(src, (str, Path)) and Path(src).is_dir():
        files = [f for f in Path(src).iterdir() if f.is_file() and not f.name.endswith((".bin", ".safetensors",
                                                                                       ".pth", ".pt", ".h5"))]
    else:
        files = [Path(f) for f in ([src] if isinstance(src, (str, Path)) else src)]
    for f in files:
        if not f.is_file():
            raise VLMError(f"tokenizer file {f} does not exist")
        if f.resolve() != (dest / f.name).resolve():
            shutil.copy2(f, dest / f.name)


def export_vlm(model: nn.Module, model_cfg: dict, preprocess_cfg: dict, out_dir: str | Path,
               tokenizer_files: str | Path | Sequence[str | Path] | None = None, tokenizer=None) -> Path:
    """Write a folder :func:`load_vlm` loads offline; returns it.

    Writes ``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``) and ``open_clip_pytorch_model.bin``
    (the state dict, atomically; the json last, so a half-written export is not loadable). For a
    Hugging Face text tower the transformers config (from ``model.text.config``) and the tokenizer go to
    ``out_dir/text/`` and the json says ``./text``. The tokenizer comes from ``tokenizer_files`` (a folder
    or files), else from ``tokenizer`` (an open_clip HFTokenizer: ``save_pretrained``), else from a local
    folder named by ``text_cfg.hf_tokenizer_name``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = deepcopy(model_cfg)
    text_cfg = dict(cfg.get("text_cfg") or {})
    vision_cfg = dict(cfg.get("vision_cfg") or {})
    if vision_cfg.get("timm_model_pretrained"):
        vision_cfg["timm_model_pretrained"] = False  # the trunk weights are in our checkpoint
    text_dir = out / TEXT_DIR
    if text_cfg.get("hf_model_name"):
        hf_config = getattr(getattr(model, "text", None), "config", None)
        if hf_config is None:
            raise VLMError("model_cfg names an HF text tower (hf_model_name) but model.text has no transformers config")
        hf_config.save_pretrained(text_dir)
        text_cfg["hf_model_name"] = f"./{TEXT_DIR}"
        text_cfg.pop("hf_model_pretrained", None)
    if text_cfg.get("hf_tokenizer_name"):
        src = text_cfg["hf_tokenizer_name"]
        if tokenizer_files is not None:
            _copy_tokenizer(tokenizer_files, text_dir)
        elif tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(text_dir))
        elif Path(src).is_dir():
            _copy_tokenizer(src, text_dir)
        else:
            raise VLMError(f"export_vlm: the tokenizer '{src}' is not a local folder; pass tokenizer_files=FOLDER "
                           "or tokenizer=vlm.tokenizer")
        text_cfg["hf_tokenizer_name"] = f"./{TEXT_DIR}"
    cfg["text_cfg"], cfg["vision_cfg"] = text_cfg, vision_cfg
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    _atomic_save(state, out / WEIGHTS_FILE)
    pp = _jsonable(dict(preprocess_cfg or {}))
    _write_json(out / CONFIG_FILE, {"model_cfg": _jsonable(cfg), "preprocess_cfg": pp})
    return out


# A small WordPiece vocabulary for the offline BiomedCLIP-shaped model: every word of the phantom
# captions (mwm.data.synthetic), common radiology words, and single characters + ``##`` pieces so
# that any lowercase word still tokenizes (character by character) instead of becoming [UNK].
_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_WORDS = """
a an the of in on at to with without and or no not is are this that there image images scan scans showing shows
show view of from by as for left right center central middle upper lower top bottom anterior posterior medial lateral
superior inferior head body brain skull chest lung lungs heart liver kidney kidneys spleen pancreas bone bones spine
vertebra vertebrae rib ribs abdomen abdominal pelvis breast thyroid prostate bladder colon stomach eye retina skin
neck knee hip shoulder wrist hand foot one two three four five six seven eight nine ten single multiple several
lesion lesions tumor tumors tumour mass masses nodule nodules cyst cysts polyp polyps cancer carcinoma metastasis
metastases glioma glioblastoma meningioma edema effusion pneumonia opacity opacities consolidation infiltrate
fracture fractures hemorrhage bleed bleeding stroke infarct infarction calcification calcifications atelectasis
emphysema fibrosis pneumothorax cardiomegaly enlarged enlargement abnormal abnormality normal benign malignant
healthy disease finding findings region area structure organ tissue soft dense density small medium large big tiny
huge bright dark round oval irregular ring speckled homogeneous heterogeneous smooth rough well defined ill margin
margins border borders enhancing enhancement hyperdense hypodense hyperintense hypointense solid cystic necrotic
sign signs signal intensity low high size shape texture contrast mri ct x ray xray radiograph ultrasound pet
mammogram mammography dermoscopy fundus histology pathology slide axial coronal sagittal slice slices t1 t2 flair
weighted medical clinical patient image of photo picture scan radiology frontal lateral projection pa ap
"""
_PUNCT = list(":,.;()-/'\"%+?!")


def default_vocab() -> list[str]:
    """The built-in WordPiece vocabulary (specials first) used by :func:`build_biomedclip_like`."""
    from ..data import synthetic as syn

    words = _WORDS.split()
    words += [w for group in (syn.SHAPES, syn.SIZES, syn.INTENSITIES, syn.TEXTURES, syn.ROW_WORDS, syn.COL_WORDS,
                              syn._NUMBER_WORDS) for w in group]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    pieces = _PUNCT + letters + ["##" + c for c in letters]
    return list(dict.fromkeys(_SPECIAL + words + pieces))


def build_biomedclip_like(out_dir: str | Path, text_layers: int = 12, text_width: int = 768,
                          vision: str = "vit_base_patch16_224", seed: int = 0, vocab: Sequence[str] | None = None,
                          context_length: int = 256) -> Path:
    """Write a VLM folder shaped like BiomedCLIP, with random weights, loadable offline by :func:`load_vlm`.

    Same ``open_clip_config.json`` structure as ``microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``
    (timm ``vision`` tower at 224 px with a linear projection to 512, BERT text tower with an MLP
    projection and CLS pooling, context 256, BiomedCLIP mean/std), but the BERT is built from a local
    ``BertConfig`` (``text_layers`` × ``text_width``) with a small WordPiece vocabulary (:func:`default_vocab`
    or ``vocab``), stored in ``out_dir/text/``. Returns ``out_dir``.
    """
    from open_clip import CustomTextCLIP
    from transformers import BertConfig

    out = Path(out_dir)
    text_dir = out / TEXT_DIR
    text_dir.mkdir(parents=True, exist_ok=True)
    words = list(dict.fromkeys(_SPECIAL + [w for w in (vocab if vocab is not None else default_vocab()) if w]))
    (text_dir / "vocab.txt").write_text("\n".join(words) + "\n")
    _write_json(text_dir / "tokenizer_config.json", {
        "tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": context_length,
        "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
        "mask_token": "[MASK]"})
    heads = max(1, text_width // 64)
    if text_width % heads:
        heads = 1
    BertConfig(vocab_size=len(words), hidden_size=text_width, num_hidden_layers=text_layers,
               num_attention_heads=heads, intermediate_size=4 * text_width,
               max_position_embeddings=max(512, context_length), pad_token_id=0).save_pretrained(text_dir)
    model_cfg = {
        "embed_dim": 512,
        "vision_cfg": {"timm_model_name": vision, "timm_model_pretrained": False, "timm_pool": "",
                       "timm_proj": "linear", "image_size": 224},
        "text_cfg": {"hf_model_name": f"./{TEXT_DIR}", "hf_tokenizer_name": f"./{TEXT_DIR}", "hf_proj_type": "mlp",
                     "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": context_length},
    }
    build_cfg = deepcopy(model_cfg)
    build_cfg["text_cfg"].update(hf_model_name=str(text_dir.resolve()), hf_tokenizer_name=str(text_dir.resolve()),
                                 hf_model_pretrained=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CustomTextCLIP(**build_cfg)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    _atomic_save(state, out / WEIGHTS_FILE)
    _write_json(out / CONFIG_FILE, {"model_cfg": model_cfg, "preprocess_cfg": {
        "mean": list(BIOMEDCLIP_MEAN), "std": list(BIOMEDCLIP_STD)}})
    return out


__all__ = ["VLM", "VLMError", "PromptError", "load_vlm", "export_vlm", "build_biomedclip_like", "prepare_images",
           "resized_size", "RESIZE_POLICY",
           "count_tokens", "tokenize", "resolve_device", "read_vlm_config", "find_weights", "default_vocab",
           "BIOMEDCLIP_HUB", "BIOMEDCLIP_MEAN", "BIOMEDCLIP_STD"]
