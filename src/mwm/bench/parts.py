"""Which bench parts are done: each part stores the identity (resolved config) it was made with.

A *part* is one unit of bench work with its own output: a gt-boxes ROI manifest, a pretraining run folder or a
transfer-task run folder. Its *identity* is the resolved config that made it — the command's full validated
config (defaults filled in) minus the settings that cannot change its results (:data:`PRETRAIN_IGNORED`,
:data:`TASK_IGNORED`), with the inputs it depends on replaced by their content hashes (a pretraining run's ROI
manifest, a task's ``encoder.pth`` by its tensors), so a changed ROI manifest reruns the guided pretraining and a
changed encoder reruns its tasks. The identity and its SHA-256 are written to ``bench_part.json`` inside a run folder
(``<stem>.bench_part.json`` beside a manifest) when the part starts, before any of its output.

A part is *done* when its record's identity equals the requested one and its finished-marker file
(``summary.json`` / ``metrics.json`` / the manifest) exists; *partial* (resume it) when the hash matches
but the marker is missing; *stale* when the hash differs or there is no record (made by an mwm before records
existed: whatever config it says it used cannot be checked against what actually ran, so it is not adopted).
A stale part is never deleted: :meth:`PartStore.retire` moves it to ``OUT/stale/<part>-<old hash[:8]>/``.

Equal identities: the same hash, or the same settings where an option the record does not have (added to mwm
after the part was made) holds its default now — a new option whose default keeps the old behaviour must not
throw away a long bench's finished parts. Such a record is rewritten with the current identity.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from ..config import flatten
from ..io import atomic_write_text, file_sha256

__all__ = ["PART_FILE", "PRETRAIN_IGNORED", "TASK_IGNORED", "Part", "PartStore", "identity_hash",
           "pretrain_identity", "task_identity", "rois_identity", "vlm_identity"]

PART_FILE = "bench_part.json"

# Settings that change how fast a part runs, what it logs or which pictures it draws — never its numbers —
# so changing them does not invalidate a finished part. `accelerator` / `device` are here too: CPU and GPU
# give the same results up to floating-point order, and a bench resumed on another machine should reuse its
# parts. (`resume` and `out` are bookkeeping; `workers` cannot change results because every sample's
# augmentation is seeded by (seed, epoch, sample), see mwm.train.data; reconstruction previews use their own
# generator, see mwm.train.recon.)
PRETRAIN_IGNORED = frozenset({"out", "resume", "workers", "log_every", "checkpoint_every", "recon_every",
                              "recon_images", "accelerator",
                              # a warning threshold, and a hash the run fills in from `init` itself
                              "min_roi_share", "init_sha256"})
TASK_IGNORED = frozenset({"out", "device", "log_every", "examples", "score_thresh"})

# Bumped when mwm changes what a kind of part computes under the same options (a new default behaviour), so
# parts recorded before are rerun instead of adopted as "options added since, at their defaults". A revision of 1
# adds nothing to the identity. task 2: the linear probe's regularisation sweep (issue 11).
REVISION = {"pretrain": 1, "task": 2, "rois": 1}

State = Literal["missing", "partial", "done", "stale"]


def _revised(identity: dict, kind: str) -> dict:
    return {**identity, "revision": REVISION[kind]} if REVISION[kind] > 1 else identity


def identity_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def pretrain_identity(pc: Any, rois_sha: str | None, saliency_sha: str | None = None) -> dict:
    """A PretrainConfig's identity: its resolved fields minus :data:`PRETRAIN_IGNORED`, the ROI manifest by
    content (``rois_sha``: SHA-256 of the manifest it trains on, None without ROIs) and, for the saliency
    strategies, its maps (``saliency_sha``: :func:`saliency_identity`)."""
    d = pc.model_dump(mode="json", exclude=set(PRETRAIN_IGNORED))
    d["rois"] = None if pc.rois is None else {"sha256": rois_sha}
    if saliency_sha is not None:
        d["rois"]["saliency_sha256"] = saliency_sha
    return {"part": "pretrain", **d}


def saliency_identity(manifest: Path) -> str:
    """The saliency maps a ``mwm localize --save-saliency`` manifest names, by content, with the ``--resize`` policy
    they were drawn with: maps edited or re-localized in place retire the arms trained on them."""
    from ..train.data import _localize_resize

    folder = Path(manifest).parent / "saliency"
    maps = _folder_sha256(folder) if folder.is_dir() else "none"
    return hashlib.sha256(f"{maps}\0{_localize_resize(manifest)}".encode()).hexdigest()


def task_identity(kind: str, tc: Any, encoder_sha: str | None) -> dict:
    """A transfer task config's identity: resolved fields minus :data:`TASK_IGNORED`; the weights by
    ``encoder_sha``, the SHA-256 of the encoder's tensors (:func:`mwm.weights.tensors_sha256`; None: ``weights:
    none``, random init)."""
    d = tc.model_dump(mode="json", exclude=set(TASK_IGNORED))
    d["weights"] = "none" if encoder_sha is None else {"sha256": encoder_sha}
    return _revised({"part": f"task:{kind}", **d}, "task")


def _folder_sha256(path: Path) -> str:
    """One hash over a folder's files (relative names + contents), e.g. a VLM export's weights and configs."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file() and not p.name.startswith(".")):
        h.update(f.relative_to(path).as_posix().encode() + b"\0" + file_sha256(f).encode() + b"\n")
    return h.hexdigest()


def vlm_identity(vlm: str) -> dict | str:
    """A local VLM folder (or file) by content; a hub name as given (it names fixed weights)."""
    p = Path(vlm).expanduser()
    if p.is_dir():
        return {"sha256": _folder_sha256(p)}
    if p.is_file():
        return {"sha256": file_sha256(p)}
    return vlm


def rois_identity(data: Path, source: Any, size: int | None = None) -> dict:
    """An ROI manifest's identity: the data, expansion and box mode, the fallback manifest by content; ``perturb``
    and its ``seed`` (gt-boxes), ``kind`` (foreground); the run's weights by content hash and the scoring options
    (reconstruction-error); the VLM by content, the prompt and the localize options (generic-prompt); the filter's
    scales, the map ``size`` and scikit-image's version (meijering); ``split`` when set. Settings that cannot
    change the manifest (the seed without perturb, the kind of gt-boxes) are left out, so changing them rebuilds
    nothing."""
    src = source.source
    fb = source.fallback
    if src == "generic-prompt":
        from ..localize.pipeline import RUN_ONLY_FIELDS

        lc = source.localize_config(Path(data), Path("."))
        # limit stays in: it changes which images have an ROI
        opts = lc.model_dump(mode="json", exclude={"data", "vlm", "prompt", "split", *(RUN_ONLY_FIELDS - {"limit"})})
        return {"part": "rois", "source": src, "data": str(data), "vlm": vlm_identity(source.vlm),
                "prompt": source.prompt, "split": source.split, "options": opts}
    if src == "meijering":
        import skimage

        return {"part": "rois", "source": src, "data": str(data), "size": size, "sigmas": list(source.sigmas),
                "black_ridges": source.black_ridges, "split": source.split, "skimage": skimage.__version__}
    ident = {"part": "rois", "source": src, "data": str(data), "expand": source.expand,
             "box_mode": source.box_mode, "fallback": None if fb is None else {"sha256": file_sha256(fb)}}
    perturb = getattr(source, "perturb", None)
    ident["perturb"] = None if perturb is None else {**perturb.model_dump(mode="json"), "seed": source.seed}
    if src == "foreground":
        ident["kind"] = source.kind
    if src == "reconstruction-error":
        from ..localize.recon_error import run_sha256

        ident.update(run={"sha256": run_sha256(source.run)}, seed=source.seed,
                     **{k: getattr(source, k) for k in ("masks", "ratio", "level", "binarize", "components")})
        if source.binarize == "quantile":
            ident["quantile"] = source.quantile
    if getattr(source, "split", None) is not None:
        ident["split"] = source.split
    return ident


@dataclass
class Part:
    """One unit of bench work. ``path``: its run folder, or its file for a manifest; ``marker``: the file that
    exists once it finished; ``extra``: files beside ``path`` that belong to it (moved along when stale)."""

    label: str
    path: Path
    marker: Path
    identity: dict
    extra: list[Path] = field(default_factory=list)
    config: Any = None  # the pydantic config behind ``identity``: its field defaults judge options a record lacks

    @property
    def is_folder(self) -> bool:
        return self.marker != self.path

    @property
    def record(self) -> Path:
        return self.path / PART_FILE if self.is_folder else self.path.with_name(f"{self.path.stem}.{PART_FILE}")

    @property
    def hash(self) -> str:
        return identity_hash(self.identity)


def config_diff(old: dict, new: dict, limit: int = 3) -> str:
    """``"masking.ratio 0.6 → 0.25, epochs 1 → 2"``: the first ``limit`` settings that differ."""
    a, b = flatten(old), flatten(new)
    keys = [k for k in sorted(a.keys() | b.keys()) if k != "part" and a.get(k, "—") != b.get(k, "—")]

    def short(v: Any) -> str:
        s = json.dumps(v) if not isinstance(v, str) else v
        return s if len(s) <= 24 else s[:20] + "…"

    parts = [f"{k} {short(a.get(k, '—'))} → {short(b.get(k, '—'))}" for k in keys[:limit]]
    return ", ".join(parts) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


_NO_DEFAULT = object()


def _default_at(config: Any, key: str) -> Any:
    """The default of the option at dotted ``key`` of a pydantic ``config`` (JSON form), walking the config's own
    nested models; ``_NO_DEFAULT`` when there is none (a required field, a dict entry, no config)."""
    from pydantic import BaseModel

    *parents, leaf = key.split(".")
    obj = config
    for name in parents:
        obj = getattr(obj, name, None)
    if not isinstance(obj, BaseModel) or leaf not in type(obj).model_fields:
        return _NO_DEFAULT
    f = type(obj).model_fields[leaf]
    if f.is_required():
        return _NO_DEFAULT
    value = f.get_default(call_default_factory=True)
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else json.loads(json.dumps(value,
                                                                                                  default=str))


def same_settings(stored: dict | None, current: dict, config: Any) -> bool:
    """True when a record's identity ``stored`` equals ``current`` except for options the record lacks whose
    current value is their default in ``config`` (options added to mwm since the part was made)."""
    if not isinstance(stored, dict) or config is None:
        return False
    a, b = flatten(stored), flatten(current)
    for k in a.keys() | b.keys():
        if k in a and k in b:
            if a[k] != b[k]:
                return False
        elif k in a:  # an option that no longer exists: its effect cannot be judged
            return False
        else:
            default = _default_at(config, k)
            if default is _NO_DEFAULT or default != b[k]:
                return False
    return True


class PartStore:
    """Checks, records and retires the parts under one bench output folder ``out``."""

    def __init__(self, out: Path, log: Callable[[str], None]):
        self.out = Path(out)
        self.log = log

    def _read(self, part: Part) -> dict | None:
        try:
            rec = json.loads(part.record.read_text(encoding="utf-8"))
            return rec if isinstance(rec, dict) and isinstance(rec.get("hash"), str) else None
        except (OSError, ValueError):
            return None

    def state(self, part: Part) -> State:
        rec = self._read(part)
        if rec is None:
            if not part.path.exists() or part.is_folder and part.path.is_dir() and not any(part.path.iterdir()):
                return "missing"
            return "stale"  # made by an mwm without part records (or its record was lost): not adopted
        if rec["hash"] != part.hash:
            if not same_settings(rec.get("identity"), part.identity, part.config):
                return "stale"
            self.write_record(part)  # only options added since, at their defaults: adopt under the new identity
        return "done" if part.marker.is_file() else "partial"

    def check(self, part: Part, retire: bool = True, quiet: bool = False) -> State:
        """The part's state; a stale part is moved aside (``retire``) and then counts as missing. ``quiet``: a
        part another process (bench shard) owns: say nothing about it."""
        st = self.state(part)
        if st == "stale":
            if not retire:
                if quiet:
                    return st
                self.log(f"{part.label} {self.why_stale(part)}: left out (run without --tables-only to redo it)")
                return st
            self.retire(part)
            return "missing"
        return st

    def why_stale(self, part: Part) -> str:
        rec = self._read(part)
        if rec is None:
            return "has no stored config hash (made by an older mwm)"
        return f"was made with another config ({config_diff(rec.get('identity') or {}, part.identity)})"

    def retire(self, part: Part) -> Path:
        """Move a stale part to ``OUT/stale/<part path>-<old hash[:8]>/`` (never delete results); log one line."""
        rec = self._read(part)
        why = self.why_stale(part)
        try:
            rel = part.path.relative_to(self.out)
        except ValueError:
            rel = Path(part.path.name)
        name = "-".join(rel.with_suffix("").parts if not part.is_folder else rel.parts)
        base = self.out / "stale" / f"{name}-{rec['hash'][:8] if rec else 'nohash'}"
        dest, n = base, 2
        while dest.exists():  # the same stale part retired before (e.g. restored by hand and changed again)
            dest, n = base.with_name(f"{base.name}~{n}"), n + 1
        dest.parent.mkdir(parents=True, exist_ok=True)
        if part.is_folder:
            shutil.move(str(part.path), str(dest))
        else:
            dest.mkdir()
            for p in (part.path, part.record, *part.extra):
                if p.exists():
                    shutil.move(str(p), str(dest / p.name))
        self.log(f"{part.label} {why}: moved it to {dest}, running it again")
        return dest

    def write_record(self, part: Part) -> None:
        """Record the identity (run folders: when the part starts, so a killed part resumes only under the same
        config; manifests: once written)."""
        if part.is_folder:
            part.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(part.record, json.dumps({"hash": part.hash, "identity": part.identity}, indent=1))
