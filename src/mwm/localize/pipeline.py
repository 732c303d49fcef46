"""`mwm localize`: scans + prompt → ROI manifest (rois.jsonl + meta.json), saliency maps, gallery.

Resumable and shardable: every finished batch is appended to the manifest as whole lines in one
write (a run killed mid-write leaves at most one truncated last line, which the reader drops), and
images already in the manifest are skipped on the next run. ``--shard i/n`` takes every n-th image
and writes ``rois.part-i-of-n.jsonl``; whichever run finds every image done merges the parts into
``rois.jsonl`` in dataset order (one atomic rename, so two shards finishing together cannot tear it).

One output folder holds one configuration. ``meta.json`` records the *settings* — everything that
shapes the ROIs (:func:`run_settings`) — and a run into a folder whose settings differ stops with an
error naming what differs, unless ``overwrite`` starts over. The settings are claimed atomically (a
hard link of a complete meta.json), so of two runs started together with other settings, one fails.
Each run holds a folder lock (``.mwm.lock``; shard ``i/n``: ``.mwm.lock-shard-i-of-n``, so the shards
of one run share the folder) and refuses to start beside a run of the other kind.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .. import __version__
from ..config import atomic_write_text, flatten, parse_shard
from ..io import live_locks
from ..data import ReadOptions, open_source
from ..data.transforms import Fit, to_tensor
from ..errors import DataError, MWMError, ReadError
from ..report.overlays import save_map_png
from ..rois.manifest import (append_records, done_records, make_record, manifest_paths, safe_file_name,
                             write_manifest)
from .ensemble import EnsembleResult, Reduce, ensemble_saliency, family_prompts, split_prompt
from .m2ib import M2IBConfig, resolve_layer


class LocalizeConfig(BaseModel):
    """Everything `mwm localize` does, with MWM's defaults."""

    model_config = ConfigDict(extra="forbid")

    data: Path
    out: Path
    prompt: str | None = Field(default=None, description="what to localize; 'a;b;c' is an ensemble of three prompts")
    prompts_file: Path | None = Field(default=None, description="JSON: {image id or class name: prompt}")
    prompt_family: str | None = Field(default=None, description="MODALITY/TARGET[:KIND] of the prompt library, as an "
                                      "ensemble (instead of --prompt; KIND short|synonyms|lay|descriptions|all)")
    ensemble: Reduce = Field(default="mean", description="how the saliency maps of an ensemble's prompts combine "
                             "(pixel-wise, before binarization)")
    vlm: str = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    vlm_pretrained: str | None = None
    m2ib: M2IBConfig = M2IBConfig()
    binarize: Literal["kmeans", "otsu", "threshold", "crf"] = "kmeans"
    threshold: float = Field(default=0.5, ge=0, le=1)
    components: int = Field(default=1, ge=1, description="keep the k largest connected components")
    box_mode: Literal["union", "per_component"] = "union"
    expand: float = Field(default=0.1, ge=0, description="box margin ratio per side")
    sam: str | None = Field(default=None, description="SAM checkpoint file, or transformers SAM dir/hub name")
    sam_type: str = "vit_b"
    split: str | None = None
    limit: int | None = Field(default=None, ge=1, description="only the first N images (after split/shard)")
    batch_size: int = Field(default=16, ge=1)
    device: str = "auto"
    shard: str | None = Field(default=None, description="i/n: this run takes images i, i+n, i+2n, … (0-based)")
    save_saliency: bool = False
    save_masks: bool = False
    gallery: int = Field(default=24, ge=0, description="images shown in index.html")
    resize: Literal["pad", "stretch", "crop"] = "pad"
    read: ReadOptions = ReadOptions()

    @field_validator("shard")
    @classmethod
    def _shard(cls, v: str | None) -> str | None:
        if v is not None:
            parse_shard(v)
        return v

    def shard_index(self) -> tuple[int, int]:
        return (0, 1) if self.shard is None else parse_shard(self.shard)


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


# -- prompts -----------------------------------------------------------------------------------
def read_prompts_file(path: str | Path) -> tuple[dict[str, str], bytes]:
    """A prompts JSON (``{image id or class name or "default": prompt}``) → (table, the file's bytes).

    Raises :class:`DataError` naming the file (and the line, for text that is not UTF-8 or not JSON).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read the prompts file ({e.strerror or e})") from e
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: the prompts file is not UTF-8 text (byte 0x{raw[e.start]:02x}); save it as "
                        'UTF-8 JSON, e.g. {"default": "brain tumor"}') from None
    try:
        table = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: the prompts file is not valid JSON ({e.msg} at column {e.colno}); "
                        'it must be one JSON object, e.g. {"default": "brain tumor"}') from None
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        raise DataError(f"{path}: expected a JSON object mapping image ids or class names to prompt strings")
    return table, raw


def fallback_prompt(cfg) -> str | None:
    """The prompt for images the prompts file does not name: ``--prompt``, or the ``--prompt-family`` ensemble
    joined with ``;`` (resolved from the prompt library now, so the manifest records the very prompts used)."""
    family = getattr(cfg, "prompt_family", None)
    if family is not None and cfg.prompt is not None:
        raise DataError("give --prompt or --prompt-family, not both (a family is an ensemble prompt; to add prompts "
                        "to it, pass them all as --prompt 'a;b;c')")
    return ";".join(family_prompts(family)) if family is not None else cfg.prompt


def prompt_resolver(cfg: LocalizeConfig, label_names: list[str], table: dict[str, str] | None = None):
    """A function (image id, label) → prompt: image id, then class name, then ``default``, then --prompt (or the
    --prompt-family ensemble). A prompt ``"a;b;c"`` is an ensemble (:func:`~mwm.localize.ensemble.split_prompt`).
    ``table``: the prompts file already read (:func:`read_prompts_file`); default: read ``cfg.prompts_file``."""
    if table is None:
        table = read_prompts_file(cfg.prompts_file)[0] if cfg.prompts_file is not None else {}
    fallback = fallback_prompt(cfg)
    if fallback is None and not table:
        raise DataError("give a prompt: --prompt 'brain tumor', --prompt-family brain-mri/tumour, or "
                        "--prompts-file prompts.json")

    def resolve(image_id: str, label: int) -> str:
        p = table.get(image_id)
        if p is None and 0 <= label < len(label_names):
            p = table.get(label_names[label])
        if p is None:
            p = table.get("default", fallback)
        if p is None:
            raise DataError(f"no prompt for image {image_id} (class {label_names[label] if 0 <= label < len(label_names) else 'none'}): "
                            "add it (or a 'default') to the prompts file, or pass --prompt")
        if not p.strip():
            raise DataError(f"the prompt for image {image_id} is empty; prompts must name what to localize")
        split_prompt(p)  # an empty ensemble member is an error here, before any work
        return p

    return resolve


append_lines = append_records  # the name before the manifest I/O moved to mwm.rois.manifest


# -- one configuration per folder ----------------------------------------------------------------
#: LocalizeConfig fields that do not change any ROI: a run may resume a folder with other values of these
RUN_ONLY_FIELDS = frozenset({"out", "batch_size", "device", "gallery", "limit", "shard", "save_saliency", "save_masks"})
#: what ``overwrite`` deletes (files, then folders), besides ``rois.part-*-of-*.jsonl``
OUTPUT_FILES = ("rois.jsonl", "meta.json", "config.yaml", "index.html")
OUTPUT_DIRS = ("saliency", "masks", "gallery")


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()[:16]


def _path_or_name(v: str | None) -> str | None:
    """A local file/folder as its absolute path (so the same folder matches from any working directory);
    a hub or built-in name as given."""
    if v is None:
        return None
    p = Path(v).expanduser()
    return str(p.resolve()) if p.exists() else v


def run_settings(cfg: LocalizeConfig, ids: list[str], prompts_bytes: bytes | None,
                 family: str | None = None) -> dict:
    """The settings that shape the ROIs: what must be equal for two runs to share one manifest.

    Every config field but :data:`RUN_ONLY_FIELDS`, with the data as its name + a digest of its image ids
    (a moved or node-local copy of the same data matches), the prompts file as a digest of its content
    (an edited file does not match), local VLM/SAM paths made absolute, and settings that a run does not
    use (``threshold`` unless ``binarize=threshold``, ``sam_type`` without SAM) left out. ``family``: the
    ``--prompt-family`` ensemble as resolved from the library (``"a;b;c"``), recorded as
    ``family_prompts`` so an edited library does not resume a folder made with its older text.
    """
    d = cfg.model_dump(mode="json", exclude=set(RUN_ONLY_FIELDS))
    d["data"] = {"name": Path(cfg.data).expanduser().resolve().name, "n_images": len(ids),
                 "ids": _digest("\n".join(ids).encode("utf-8", "surrogatepass"))}
    d["prompts_file"] = None if prompts_bytes is None else _digest(prompts_bytes)
    for k in ("vlm", "vlm_pretrained", "sam"):
        d[k] = _path_or_name(d[k])
    if cfg.binarize != "threshold":
        d["threshold"] = None
    if cfg.sam is None:
        d["sam_type"] = None
    if family is not None:
        d["family_prompts"] = family
    return d


def settings_diff(old: dict, new: dict) -> list[str]:
    """``["vlm: 'a' there, 'b' now", …]`` for every setting (dotted, e.g. ``m2ib.steps``) that differs.

    Only settings both record are compared: a setting added to (or removed from) a later mwm must not stop
    every older folder from resuming.
    """
    fo, fn = flatten(old), flatten(new)
    return [f"{k}: {fo[k]!r} there, {fn[k]!r} now" for k in sorted(fo.keys() & fn.keys()) if fo[k] != fn[k]]


def _stored_settings(meta: dict) -> dict | None:
    """The settings a meta.json records; for one written before settings were recorded, its config less
    the run-only fields (data and prompts file by name only)."""
    if isinstance(meta.get("settings"), dict):
        return meta["settings"]
    cfg = meta.get("config")
    if not isinstance(cfg, dict):
        return None
    d = {k: v for k, v in cfg.items() if k not in RUN_ONLY_FIELDS}
    for k in ("data", "prompts_file"):
        if d.get(k) is not None:
            d[k] = Path(str(d[k])).name
    return d


def _legacy_view(cfg: LocalizeConfig) -> dict:
    """Our settings in the shape :func:`_stored_settings` gives an old meta.json."""
    d = cfg.model_dump(mode="json", exclude=set(RUN_ONLY_FIELDS))
    for k in ("data", "prompts_file"):
        if d.get(k) is not None:
            d[k] = Path(str(d[k])).name
    return d


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the run's meta.json ({e}); it records the settings of the ROIs "
                        "in this folder. Choose another --out, or pass --overwrite to start over") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: not a localize meta.json (a JSON object); choose another --out or pass --overwrite")
    return meta


def check_settings(out: Path, settings: dict, cfg: LocalizeConfig, meta: dict | None = None) -> None:
    """Raise :class:`MWMError` naming every difference when ``out/meta.json`` records other settings."""
    path = out / "meta.json"
    if meta is None:
        if not path.is_file():
            return
        meta = _read_meta(path)
    stored = _stored_settings(meta)
    if stored is None:
        return
    diff = settings_diff(stored, settings if "settings" in meta else _legacy_view(cfg))
    if diff:
        # "loses nothing" only when no ROI is written and no other run (the lock we hold is one) may write some
        has_rois = (out / "rois.jsonl").is_file() or any(out.glob("rois.part-*-of-*.jsonl")) or len(
            live_locks(out, "")) > 1
        raise MWMError(f"{out} holds a localize run with other settings ({'; '.join(diff)}). A folder holds one "
                       "configuration, so its ROIs are not resumed with these: use the same settings to resume, "
                       "choose another --out, or pass --overwrite to delete its manifest, saliency, masks and "
                       "gallery and start over" + ("" if has_rois else " (it has no ROI records yet, so "
                                                   "--overwrite loses nothing)"))


def claim_settings(out: Path, meta: dict, cfg: LocalizeConfig) -> None:
    """Write ``out/meta.json`` unless it records other settings (then :func:`check_settings` raises).

    A fresh folder is claimed with ``os.link`` of a complete temporary file — atomic, and failing when
    another run created meta.json first — so two runs started together with other settings cannot both
    pass; a run with the same settings replaces meta.json (atomically) with its own config.
    """
    path = out / "meta.json"
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".meta.json.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(meta, indent=2))
        os.chmod(tmp, 0o644)
        try:
            os.link(tmp, path)
            return
        except FileExistsError:
            pass
        except OSError:
            pass  # a file system without hard links: check, then replace (a narrow race remains)
        check_settings(out, meta["settings"], cfg)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _check_other_runs(out: Path, shard: tuple[int, int], overwrite: bool) -> None:
    """Shards of one run share a folder; an unsharded run does not run beside shards, nor ``overwrite``
    beside anything (it would delete their work)."""
    from ..io import describe_holder, live_locks, shard_lock_name

    for p, info in live_locks(out, shard_lock_name(shard)):
        shard_lock = p.name.startswith(".mwm.lock-shard-")
        if overwrite:
            why = "--overwrite would delete its work; wait for it to finish"
        elif shard[1] == 1 and shard_lock:
            why = "it is a shard of a sharded run; finish or stop the shards, or run this as a shard too"
        elif shard[1] > 1 and p.name == ".mwm.lock":
            why = "an unsharded run appends to rois.jsonl, which shards replace when they merge; wait for it"
        else:
            continue
        raise MWMError(f"{out} is in use by another {info.get('what', 'run')}: {describe_holder(info)}; {why}. "
                       f"If that process is gone, delete {p}")


def clear_outputs(out: Path) -> None:
    """Delete what `mwm localize` wrote in ``out`` (manifest, parts, meta, config, gallery, saliency, masks)."""
    for p in [*(out / n for n in OUTPUT_FILES), *out.glob("rois.part-*-of-*.jsonl")]:
        p.unlink(missing_ok=True)
    for d in OUTPUT_DIRS:
        if (out / d).is_dir():
            shutil.rmtree(out / d)


def _check_done_prompts(out: Path, done: dict[str, dict], idx: list[int], ids: list[str], labels: list[int],
                        resolve) -> None:
    """Records already in ``out`` must carry the prompt this run gives their image (catches a folder
    whose meta.json is missing or predates recorded settings)."""
    for i in idx:
        r = done.get(ids[i])
        if r is None or "prompt" not in r:
            continue
        try:
            want = resolve(ids[i], labels[i])
        except DataError:
            continue
        if r["prompt"] != want:
            raise MWMError(f"{out}: image {ids[i]!r} was localized with the prompt {r['prompt']!r}, but this run "
                           f"would use {want!r}. A folder holds one configuration: use the same prompts to resume, "
                           "choose another --out, or pass --overwrite to start over")


# -- one batch: prompts → saliency → ROIs (shared with `mwm localize-robustness`) -----------------------
def prompt_embeddings(vlm, prompts) -> dict[str, torch.Tensor]:
    """Text embeddings of every distinct member of the given (ensemble) prompts, each encoded once."""
    parts = sorted({p for q in set(prompts) for p in split_prompt(q)})
    return dict(zip(parts, vlm.encode_text(parts))) if parts else {}


def batch_saliency(vlm, pixels: torch.Tensor, prompts: list[str], keys: list[str], text: dict[str, torch.Tensor],
                   m2ib: M2IBConfig, reduce: Reduce = "mean",
                   out_size: tuple[int, int] | None = None) -> EnsembleResult:
    """M2IB saliency of a batch of images, each with its own (ensemble) prompt, in one batched pass.

    Args:
        vlm: the loaded VLM; pixels: float (B, 3, S, S) preprocessed; prompts: B prompt strings (``"a;b"`` =
        an ensemble); keys: B noise keys (image ids); text: :func:`prompt_embeddings` of the prompts.
    Returns:
        :class:`~mwm.localize.ensemble.EnsembleResult`; for single prompts ``saliency`` is exactly
        :func:`~mwm.localize.m2ib.m2ib_saliency`'s.
    """
    members = [split_prompt(p) for p in prompts]
    P = max(len(m) for m in members)
    # padded to P per image (the padding repeats a member and is never computed: ``valid`` is False there)
    emb = torch.stack([text[m[min(k, len(m) - 1)]] for m in members for k in range(P)])
    emb = emb.view(len(members), P, -1).to(pixels.device)
    valid = torch.tensor([[k < len(m) for k in range(P)] for m in members], device=pixels.device)
    return ensemble_saliency(vlm.stages, pixels, emb, m2ib, keys=keys, reduce=reduce, valid=valid, out_size=out_size)


@dataclass
class BatchROIs:
    """What :func:`saliency_to_rois` gives per image: ``status`` (``ok`` or why there is no ROI), ``boxes`` in
    the image's own frame (normalized), ``boxes_sq`` on the VLM's square input, ``masks`` (the kept region,
    bool (S, S), after SAM when used) and ``notes`` (SAM's, or None)."""

    status: list[str]
    boxes: list[list[list[float]]]
    boxes_sq: list[list[list[float]]]
    masks: list[torch.Tensor]
    notes: list[str | None]


def saliency_to_rois(sal: torch.Tensor, imgs01: torch.Tensor, sizes: list[tuple[int, int]], cfg, size: int,
                     sam=None) -> BatchROIs:
    """Saliency (B, S, S) → binarize → largest components → [SAM] → boxes → margin → the image's frame.

    Args:
        sal: float (B, S, S) saliency; imgs01: float (B, 3, S, S) the images in [0, 1] as the VLM saw them (for
        the CRF and SAM); sizes: (h, w) of each image as read; cfg: any config with ``binarize``, ``threshold``,
        ``components``, ``box_mode``, ``expand`` and ``resize`` (:class:`LocalizeConfig`,
        :class:`~mwm.localize.robustness.RobustnessConfig`); size: S; sam: a loaded SAM refiner or None.
    Returns:
        :class:`BatchROIs`.
    """
    from .postprocess import binarize, expand_boxes, largest_components, mask_to_boxes

    binary, status = binarize(sal, cfg.binarize, cfg.threshold, image=imgs01)
    kept = largest_components(binary, cfg.components)
    out = BatchROIs([], [], [], [], [])
    for j, (h, w) in enumerate(sizes):
        st = status[j]
        m = kept[j]
        note = None
        if st == "ok" and sam is not None and bool(m.any()):
            # all component boxes of the image in one SAM call; an empty SAM mask keeps its component
            m, sam_note = sam.refine(imgs01[j], kept.boxes[j].float() * size, fallback=kept.components[j])
            note = sam_note or None
        boxes_sq = mask_to_boxes(m, cfg.box_mode) if st == "ok" else []
        if st == "ok" and not boxes_sq:
            st = "empty_roi"
        boxes_sq = expand_boxes(boxes_sq, cfg.expand)
        fit = Fit.of(h, w, size, cfg.resize)
        boxes = [fit.unbox(b, h, w, size) for b in boxes_sq]
        boxes = [b for b in boxes if b[2] > b[0] and b[3] > b[1]]
        if st == "ok" and not boxes:
            st = "empty_roi"
        out.status.append(st)
        out.boxes.append(boxes)
        out.boxes_sq.append(boxes_sq)
        out.masks.append(m)
        out.notes.append(note)
    return out


# -- the run -------------------------------------------------------------------------------------
def _gallery_ids(ids: list[str], k: int) -> set[str]:
    """A deterministic, evenly spread sample of ids for the gallery."""
    if k <= 0 or not ids:
        return set()
    step = max(1, len(ids) // k)
    return set(ids[::step][:k])


def localize(cfg: LocalizeConfig, progress=None, log=print, overwrite: bool = False) -> dict:
    """Run the pipeline; returns a summary dict. ``progress(n)`` is called per image processed.

    Resumes what ``cfg.out`` holds when its settings (:func:`run_settings`) equal ``cfg``'s, and raises
    :class:`MWMError` naming the differences otherwise. ``overwrite``: first delete what an earlier run
    wrote there (:func:`clear_outputs`) — refused while another localize run holds a lock on the folder.
    """
    from ..io import lock_folder, shard_lock_name

    out = Path(cfg.out)
    shard = cfg.shard_index()
    with lock_folder(out, name=shard_lock_name(shard), what="localize run"):
        _check_other_runs(out, shard, overwrite)
        if overwrite:
            clear_outputs(out)
        return _localize(cfg, out, shard, progress)


def _localize(cfg: LocalizeConfig, out: Path, shard: tuple[int, int], progress) -> dict:
    from ..config import save_config
    from .postprocess import require_crf
    from .vlm import load_vlm

    t0 = time.perf_counter()
    src = open_source(cfg.data, cfg.read)
    table, prompts_bytes = read_prompts_file(cfg.prompts_file) if cfg.prompts_file is not None else ({}, None)
    family = fallback_prompt(cfg) if cfg.prompt_family is not None else None
    resolve_prompt = prompt_resolver(cfg, src.label_names, table)
    ids = src.ids
    settings = run_settings(cfg, ids, prompts_bytes, family)
    check_settings(out, settings, cfg)  # before any slow work; claim_settings repeats it atomically
    all_idx = src.indices(cfg.split)
    if not all_idx:
        raise DataError(f"{cfg.data}: no images in split '{cfg.split}'")
    if cfg.limit:
        all_idx = all_idx[: cfg.limit]
    my_idx = all_idx[shard[0]:: shard[1]]
    part_path, merged_path = manifest_paths(out, shard)
    done = done_records(out)
    _check_done_prompts(out, done, all_idx, ids, src.labels, resolve_prompt)
    todo = [i for i in my_idx if ids[i] not in done]
    gallery_ids = _gallery_ids([ids[i] for i in all_idx], cfg.gallery)

    device = pick_device(cfg.device)
    vlm = load_vlm(cfg.vlm, device=str(device), pretrained=cfg.vlm_pretrained)
    size = vlm.image_size[0]
    grid = vlm.stages.grid
    sam = None
    if cfg.sam:
        from .sam import load_sam

        sam = load_sam(cfg.sam, sam_type=cfg.sam_type, device=str(device))
    resolve_layer(cfg.m2ib.layer, len(vlm.stages.blocks))  # fail before any work on a bad --layer
    if cfg.binarize == "crf":
        require_crf()  # likewise on a missing optional package
    _write_meta(cfg, out, vlm, len(all_idx), settings)
    save_config(cfg, out / "config.yaml")  # after the settings check: a refused run leaves the folder as it was

    # text embeddings: once per distinct prompt (each member of an ensemble prompt "a;b;c")
    prompts_of = {i: resolve_prompt(ids[i], src.labels[i]) for i in todo}
    text = prompt_embeddings(vlm, prompts_of.values())

    n_ok = n_bad = 0
    for b0 in range(0, len(todo), cfg.batch_size):
        batch = todo[b0: b0 + cfg.batch_size]
        recs: list[dict] = []
        samples = []
        for i in batch:
            try:
                s = src.read(i)
            except ReadError as e:
                if cfg.read.strict:
                    raise
                warnings.warn(str(e), stacklevel=2)
                recs.append(make_record(ids[i], 0, 0, prompts_of[i], [], f"unreadable: {e.reason}"))
                continue
            h, w = s.image.shape[:2]
            if min(h, w) < max(grid):
                recs.append(make_record(s.id, w, h, prompts_of[i], [], "too_small",
                                    note=f"{w}x{h} px is smaller than the VLM's {grid[1]}x{grid[0]} patch grid"))
                continue
            if _is_constant(s.image):
                # M2IB on a blank image still gives a varied map (the VLM's position embeddings), which
                # min–max normalization stretches to [0, 1]: decide here, before any saliency is computed
                recs.append(make_record(s.id, w, h, prompts_of[i], [], "constant_saliency",
                                    note="every pixel has the same value: nothing to localize"))
                continue
            samples.append((i, s))
        if samples:
            imgs01 = torch.stack([to_tensor(s.image, size, 3, cfg.resize) for _, s in samples]).to(device)
            pixels = vlm.preprocess(imgs01)
            res = batch_saliency(vlm, pixels, [prompts_of[i] for i, _ in samples], [s.id for _, s in samples],
                                 text, cfg.m2ib, cfg.ensemble, out_size=(size, size))
            sal = res.saliency
            rois = saliency_to_rois(sal, imgs01, [s.image.shape[:2] for _, s in samples], cfg, size, sam)
            for j, (i, s) in enumerate(samples):
                h, w = s.image.shape[:2]
                st, boxes, boxes_sq, m = rois.status[j], rois.boxes[j], rois.boxes_sq[j], rois.masks[j]
                rec = make_record(s.id, w, h, prompts_of[i], boxes, st, note=rois.notes[j])
                if st == "ok" and boxes and _area(boxes) > 0.95:
                    rec["flags"] = ["roi_covers_image"]
                rec["fit"] = round(float(res.fit[j]), 5)
                if cfg.save_saliency:
                    rec["saliency"] = save_map_png(out / "saliency", s.id, sal[j])
                if cfg.save_masks:
                    rec["mask"] = save_map_png(out / "masks", s.id, m.float())
                if s.id in gallery_ids:
                    _gallery_panel(out / "gallery", s, imgs01[j], sal[j], m, boxes_sq, rec)
                recs.append(rec)
        append_records(part_path, recs)
        for r in recs:
            n_ok += r["status"] == "ok"
            n_bad += r["status"] != "ok"
        if progress is not None:
            progress(len(batch))

    done = done_records(out)
    merged = False
    if all(ids[i] in done for i in all_idx) and (shard[1] > 1 or not merged_path.is_file() or todo):
        order = [done[ids[i]] for i in all_idx]
        write_manifest(merged_path, order)
        merged = True
    write_gallery(out, cfg)
    summary = {"processed": len(todo), "ok": n_ok, "failed": n_bad, "skipped_done": len(my_idx) - len(todo),
               "total": len(all_idx), "manifest": str(merged_path if merged or shard[1] == 1 else part_path),
               "seconds": round(time.perf_counter() - t0, 2)}
    return summary


def _is_constant(image: np.ndarray) -> bool:
    """True for an image whose pixels all have one value (all black, all white, …); NaN is not constant."""
    from .postprocess import CONSTANT_RANGE

    a = np.asarray(image)
    if a.size == 0:
        return True
    lo, hi = float(a.min()), float(a.max())
    return hi - lo < CONSTANT_RANGE * max(1.0, abs(lo), abs(hi))


def _area(boxes: list[list[float]]) -> float:
    from .postprocess import boxes_to_mask

    return float(boxes_to_mask(boxes, 64, 64).float().mean())


def _gallery_panel(folder: Path, s, img01: torch.Tensor, sal: torch.Tensor, mask: torch.Tensor,
                   boxes_sq: list, rec: dict) -> None:
    from ..report.overlays import draw_boxes, gray_rgb, heatmap, hstack, save_png, tint, upscale

    base = gray_rgb(img01.mean(0).cpu().numpy())
    panels = [base, heatmap(sal.cpu().numpy(), base), tint(base, mask.cpu().numpy()),
              draw_boxes(base, boxes_sq, width=max(1, base.shape[0] // 100))]
    save_png(hstack([upscale(p) for p in panels]), folder / (safe_file_name(s.id) + ".png"))
    atomic_write_text(folder / (safe_file_name(s.id) + ".json"), json.dumps(rec))


def write_gallery(out: Path, cfg: LocalizeConfig) -> Path:
    """index.html over every panel in out/gallery (so a resumed run's gallery is complete)."""
    import html

    folder = out / "gallery"
    rows = []
    for js in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        rec = json.loads(js.read_text())
        boxes = ", ".join("[" + ", ".join(f"{v:.2f}" for v in b) + "]" for b in rec["boxes"]) or "none"
        rows.append(f"<figure><img src='gallery/{html.escape(js.stem)}.png' loading='lazy'>"
                    f"<figcaption><b>{html.escape(rec['image'])}</b> — {html.escape(rec['status'])} — "
                    f"prompt “{html.escape(rec['prompt'])}” — boxes {boxes}</figcaption></figure>")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>mwm localize — {html.escape(str(cfg.data))}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} figure{{margin:0 0 1.2em 0}} img{{image-rendering:pixelated;max-width:100%}}
figcaption{{font-size:0.9em;color:#333}}</style></head><body>
<h1>Localization gallery</h1>
<p>Data <code>{html.escape(str(cfg.data))}</code>, VLM <code>{html.escape(cfg.vlm)}</code>, M2IB layer {cfg.m2ib.layer if cfg.m2ib.layer is not None else 'auto'}, β {cfg.m2ib.beta},
{cfg.m2ib.steps} steps × {cfg.m2ib.noise_copies} copies, binarize {cfg.binarize}, {cfg.components} component(s), expand {cfg.expand}.
Each row: scan (as the VLM sees it) · M2IB saliency · binary mask · final box(es).</p>
{''.join(rows) or '<p>No gallery images yet.</p>'}
</body></html>"""
    atomic_write_text(out / "index.html", page)
    return out / "index.html"


def _write_meta(cfg: LocalizeConfig, out: Path, vlm, n: int, settings: dict) -> None:
    import importlib.metadata as md

    def ver(p: str) -> str | None:
        try:
            return md.version(p)
        except md.PackageNotFoundError:
            return None

    meta = {"settings": settings, "config": cfg.model_dump(mode="json"), "mwm": __version__, "n_images": n,
            "vlm": {"name": vlm.name, "image_size": list(vlm.image_size), "grid": list(vlm.stages.grid),
                    "blocks": len(vlm.stages.blocks)},
            "m2ib_layer": resolve_layer(cfg.m2ib.layer, len(vlm.stages.blocks)),
            "versions": {p: ver(p) for p in ("torch", "open_clip_torch", "timm", "transformers", "segment-anything")},
            "python": platform.python_version()}
    claim_settings(out, meta, cfg)


_safe_name = safe_file_name  # former private names, kept for callers outside the package
_save_map = save_map_png
