"""Optional SAM refinement of the saliency region: the component boxes are SAM's box prompts.

All boxes of one image go to SAM in **one** call (the image is encoded once, the mask decoder runs on
the K prompts as a batch), and the refined region is the union of the K masks. Two backends:

* ``segment-anything`` (Meta's package; the ``[sam]`` extra) with a checkpoint file
  (``sam_vit_b_01ec64.pth`` …) and its model type ``vit_b`` / ``vit_l`` / ``vit_h``;
* ``transformers`` ``SamModel`` + ``SamProcessor`` from a local folder or a hub name
  (``facebook/sam-vit-base``; needs the network or the local hub cache).

:func:`load_sam` picks the backend from what it is given. Nothing falls back silently: a missing
file, an offline hub name or a checkpoint that does not fit its model type is an :class:`SamError`
that says what to pass.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from ..errors import MWMError

SAM_HINT = ("pass a segment-anything checkpoint (--sam-checkpoint PATH --sam-type vit_b|vit_l|vit_h, e.g. "
            "sam_vit_b_01ec64.pth from https://github.com/facebookresearch/segment-anything#model-checkpoints) "
            "or a transformers SAM folder / hub name (e.g. facebook/sam-vit-base)")
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".safetensors")


class SamError(MWMError):
    """SAM could not be loaded or run as configured."""


class Refined(tuple):
    """What :meth:`SamRefiner.refine` returns; a 2-tuple, so it unpacks as ``mask, note``.

    ``mask``: bool ``(H, W)``, the union of the per-box masks; ``note``: ``""`` when SAM gave a non-empty
    mask for every box, else e.g. ``"sam_empty_mask: box 1 of 3 kept its component"``.
    Also as attributes only: ``per_box``: bool ``(K, H, W)``, the mask used for each box; ``box_status``:
    per box ``"sam"``, ``"component"`` (SAM's mask was empty, the box's own component was kept) or
    ``"box"`` (empty, no component given: the box itself was kept).
    """

    def __new__(cls, mask: Tensor, note: str, per_box: Tensor | None = None, box_status: list[str] | None = None):
        self = super().__new__(cls, (mask, note))
        self.per_box = per_box
        self.box_status = box_status
        return self

    @property
    def mask(self) -> Tensor:
        return self[0]

    @property
    def note(self) -> str:
        return self[1]


@runtime_checkable
class SamRefiner(Protocol):
    """Refine a region given as K box prompts.

    ``refine(image01, boxes_px, fallback=None) -> Refined``

    * image01: float ``(3, H, W)``, ``(1, H, W)`` or ``(H, W)`` in [0, 1] (any device);
    * boxes_px: float ``(K, 4)`` ``[x0, y0, x1, y1]`` in pixels of ``image01`` (pixel edges: a normalized
      box × ``[W, H, W, H]``);
    * fallback: optional bool ``(K, H, W)``, the component each box was drawn around; kept for a box whose
      SAM mask comes back empty (without it, the box itself is kept).

    Returns :class:`Refined` with a bool ``(H, W)`` mask on ``image01``'s device. K = 0 → an all-False
    mask without calling SAM.
    """

    def refine(self, image01: Tensor, boxes_px: Tensor, fallback: Tensor | None = None) -> Refined: ...


def _to_uint8_hwc(image01: Tensor) -> np.ndarray:
    """(3|1, H, W) or (H, W) float in [0, 1] → uint8 (H, W, 3) RGB, the input both SAM packages expect."""
    x = image01.detach().float()
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"image must be (3, H, W), (1, H, W) or (H, W); got {tuple(image01.shape)}")
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def _check_boxes(boxes_px: Tensor) -> Tensor:
    b = torch.as_tensor(boxes_px, dtype=torch.float32).detach().cpu().reshape(-1, 4)
    if b.numel() and not torch.isfinite(b).all():
        raise ValueError(f"box prompts must be finite; got {b.tolist()}")
    return b


def _combine(masks: Tensor, boxes: Tensor, fallback: Tensor | None, h: int, w: int, device) -> Refined:
    """masks: bool (K, H, W) from SAM → Refined, replacing empty ones by the component (or the box)."""
    from .postprocess import boxes_to_mask

    masks = masks.to(device)
    empty = ~masks.flatten(1).any(1)
    status = ["sam"] * len(masks)
    if bool(empty.any()):
        if fallback is not None and tuple(fallback.shape) != tuple(masks.shape):
            raise ValueError(f"fallback components must be (K, H, W) = {tuple(masks.shape)}; got {tuple(fallback.shape)}")
        for i in torch.nonzero(empty)[:, 0].tolist():
            if fallback is not None:
                masks[i] = fallback[i].to(device, torch.bool)
                status[i] = "component"
            else:
                scale = torch.tensor([w, h, w, h], dtype=torch.float64)
                masks[i] = boxes_to_mask(boxes[i: i + 1].double() / scale, h, w, device=device)
                status[i] = "box"
    bad = [i for i, s in enumerate(status) if s != "sam"]
    note = ""
    if bad:
        what = "its component" if fallback is not None else "the box"
        note = f"sam_empty_mask: box {', '.join(map(str, bad))} of {len(masks)} kept {what}"
    return Refined(masks.any(0), note, masks, status)


def _empty(image01: Tensor) -> Refined:
    h, w = image01.shape[-2:]
    dev = image01.device
    return Refined(torch.zeros(h, w, dtype=torch.bool, device=dev), "no_boxes",
                   torch.zeros(0, h, w, dtype=torch.bool, device=dev), [])


class _BoxPromptRefiner:
    """The shared part of both backends: check the boxes, one ``_predict`` call for all of them, then combine
    (union, with the component as fallback where SAM returns an empty mask)."""

    def _predict(self, image01: Tensor, boxes: Tensor) -> Tensor:  # pragma: no cover - abstract
        """image01 (C, H, W), boxes (K, 4) pixels → masks (K, H, W)."""
        raise NotImplementedError

    @torch.no_grad()
    def refine(self, image01: Tensor, boxes_px: Tensor, fallback: Tensor | None = None) -> Refined:
        h, w = image01.shape[-2:]
        boxes = _check_boxes(boxes_px)
        if len(boxes) == 0:
            return _empty(image01)
        return _combine(self._predict(image01, boxes).bool(), boxes, fallback, h, w, image01.device)


class SegmentAnythingRefiner(_BoxPromptRefiner):
    """segment-anything's ``SamPredictor``: ``set_image`` once, then ``predict_torch`` with all K boxes."""

    def __init__(self, sam_model, device: str = "cpu"):
        from segment_anything import SamPredictor

        self.model = sam_model.to(device).eval()
        self.predictor = SamPredictor(self.model)
        self.device = device

    def _predict(self, image01: Tensor, boxes: Tensor) -> Tensor:
        h, w = image01.shape[-2:]
        self.predictor.set_image(_to_uint8_hwc(image01), image_format="RGB")
        tb = self.predictor.transform.apply_boxes_torch(boxes.to(self.predictor.device), (h, w))
        masks, _, _ = self.predictor.predict_torch(None, None, boxes=tb, multimask_output=False)  # (K, 1, H, W)
        return masks[:, 0]


class TransformersSamRefiner(_BoxPromptRefiner):
    """transformers ``SamModel`` + ``SamProcessor``: one forward pass with ``input_boxes`` of shape (1, K, 4)."""

    def __init__(self, model, processor, device: str = "cpu"):
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = device

    def _predict(self, image01: Tensor, boxes: Tensor) -> Tensor:
        inputs = self.processor(images=_to_uint8_hwc(image01), input_boxes=[boxes.tolist()], return_tensors="pt",
                                input_data_format="channels_last")
        dtype = next(self.model.parameters()).dtype
        inputs = {k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items()}
        out = self.model(pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"],
                         multimask_output=False)
        masks = self.processor.post_process_masks(out.pred_masks.float().cpu(), inputs["original_sizes"].cpu(),
                                                  inputs["reshaped_input_sizes"].cpu())[0]  # (K, 1, H, W) bool
        return masks[:, 0]


def _load_segment_anything(path: Path, sam_type: str, device: str) -> SegmentAnythingRefiner:
    try:
        from segment_anything import sam_model_registry
    except ImportError as e:
        raise SamError(f"{path} looks like a segment-anything checkpoint but the package is not installed: "
                       f"pip install segment-anything (or mwm's [sam] extra) ({e})") from e
    types = sorted(k for k in sam_model_registry if k != "default")
    if sam_type not in sam_model_registry:
        raise SamError(f"unknown SAM type {sam_type!r} for {path}; use --sam-type {'|'.join(types)} "
                       "(the one the checkpoint was trained as: sam_vit_b_* → vit_b, sam_vit_l_* → vit_l, sam_vit_h_* → vit_h)")
    try:
        model = sam_model_registry[sam_type](checkpoint=str(path))
    except RuntimeError as e:  # load_state_dict: missing/unexpected keys or size mismatches
        hint = re.search(r"vit_[blh]", path.name)
        guess = f" (the file name suggests --sam-type {hint.group(0)})" if hint and hint.group(0) != sam_type else ""
        raise SamError(f"{path} does not fit SAM type {sam_type}{guess}: {str(e).splitlines()[0]}") from e
    except Exception as e:  # unreadable / not a torch file
        raise SamError(f"cannot read the SAM checkpoint {path}: {e}. {SAM_HINT}") from e
    return SegmentAnythingRefiner(model, device)


def _load_transformers(spec: str, device: str) -> TransformersSamRefiner:
    from transformers import SamModel, SamProcessor

    local = Path(spec).expanduser()
    if local.is_dir() and not (local / "config.json").is_file():
        raise SamError(f"{local} is a folder without config.json, so not a transformers SAM model; "
                       f"save one with SamModel.save_pretrained + SamProcessor.save_pretrained, or {SAM_HINT}")
    src = str(local) if local.is_dir() else spec
    try:
        model = SamModel.from_pretrained(src)
        processor = SamProcessor.from_pretrained(src)
    except (OSError, ValueError) as e:
        import os

        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get(
            "TRANSFORMERS_OFFLINE", "") not in ("", "0")
        why = ("offline (HF_HUB_OFFLINE=1) and not in the local hub cache" if offline
               else "not found on the hub or in the local cache")
        if local.is_dir():
            why = f"the folder could not be loaded ({str(e).splitlines()[0]})"
        raise SamError(f"cannot load SAM {spec!r}: no such file or folder, and as a hub name it is {why}. "
                       f"Download it once where there is network (huggingface-cli download {spec} --local-dir DIR) "
                       f"and pass DIR, or {SAM_HINT}") from e
    return TransformersSamRefiner(model, processor, device)


def _looks_like_path(spec: str) -> bool:
    """A hub name is ``name`` or ``org/name``; anything else (suffix, ./, /, ~, deeper) names a file."""
    if spec.lower().endswith(CHECKPOINT_SUFFIXES) or spec.startswith((".", "/", "~", "\\")):
        return True
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec) is None


def load_sam(spec: str | Path | None, sam_type: str = "vit_b", device: str = "cpu") -> SamRefiner | None:
    """The SAM refiner for ``spec``, or ``None`` when ``spec`` is ``None``/empty (no refinement).

    * an existing **file** → segment-anything checkpoint of model type ``sam_type`` (vit_b, vit_l, vit_h);
    * an existing **folder** → transformers ``SamModel``/``SamProcessor`` saved there;
    * otherwise a **hub name** (``facebook/sam-vit-base``) → transformers, from the hub or its cache.

    A spec that looks like a file path (``.pth``/``.pt``/… suffix, ``./``, ``/``, ``~``) but does not exist
    is a :class:`SamError` naming it and saying what to pass. ``sam_type`` is ignored for transformers.
    """
    if spec is None or str(spec).strip() == "":
        return None
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.is_file():
        return _load_segment_anything(path, sam_type, device)
    if path.is_dir():
        return _load_transformers(spec, device)
    if _looks_like_path(spec):
        raise SamError(f"SAM checkpoint {path} does not exist; {SAM_HINT}")
    return _load_transformers(spec, device)


__all__ = ["SamRefiner", "Refined", "SamError", "SegmentAnythingRefiner", "TransformersSamRefiner", "load_sam"]
