"""Seeded synthetic scan-like "phantoms" with lesions, masks, labels and captions.

Used by the test suite, the demo and the localization checks. Every image is a
grayscale slice: a *head* (ellipse with a bright skull ring around darker brain)
or a *body* (wider ellipse with a skin rim, two dark lung-like regions and a
bright vertebra) on a black background, with smoothed soft-tissue texture and
additive Gaussian noise. Outline size, position, aspect and tilt are jittered.

Lesions (0..``max_lesions`` per image) sit inside the tissue, never touching the
outline, lungs or vertebra, and never each other. Each has

* ``shape``: ``round`` | ``oval`` | ``irregular`` (radius modulated by harmonics)
* ``size``: ``small`` | ``medium`` | ``large`` (mean radius ≈ 5.5 / 9 / 12 % of the
  image side; small is ≥ 3 px at 64 px)
* ``intensity``: ``bright`` | ``dark`` relative to the surrounding tissue
* ``texture``: ``homogeneous`` | ``ring`` (rim-enhancing: rim at full contrast,
  core of opposite sign) | ``speckled``

Labels (``LABEL_NAMES``): ``normal`` (no lesion), ``malignant`` (at least one
lesion that is irregular or ring-textured), ``benign`` (otherwise). The class is
drawn first (``p_normal`` for normal, the rest split evenly) and lesions are
sampled to fit it, so classes are balanced and a classifier must look at the
lesion's shape/texture (size and intensity carry no label information).

Caption vocabulary (kept small for a tiny word-level CLIP)::

    a {head|body} scan with no lesion
    a {head|body} scan with a {LESION} in the {LOCATION}
    a {head|body} scan with {two|three|...} lesions: a {LESION} in the {LOCATION}, ... and a {LESION} in the {LOCATION}

    LESION   = {small|medium|large} {bright|dark} {round|oval|irregular} [ring|speckled] lesion
               (homogeneous lesions have no texture word)
    LOCATION = {upper|middle|lower} {left|center|right}, except the middle cell which is "center"

Location is the 3×3 cell of the image holding the lesion's center, in image
coordinates (left = small column index; no radiological left/right flip).
Lesions are listed top-to-bottom, then left-to-right.

A lesion too big for the room left is shrunk and its size word follows its
final radius; in tiny images (≲ 24 px) one may not fit at all, and the label is
always derived from the lesions actually placed. ``render_phantom`` returns each
image together with its lesion-free ``background`` (same anatomy and noise), so
``image != background`` is exactly the mask.

Determinism: image ``i`` depends only on ``(seed, i)`` (one child of
``SeedSequence(seed).spawn(n)`` per image), so a larger ``n`` extends a smaller
one. The train/val/test split is stratified by label and depends on all labels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import ndimage

from ..io import atomic_path

LABEL_NAMES: list[str] = ["normal", "benign", "malignant"]
SHAPES = ("round", "oval", "irregular")
SIZES = ("small", "medium", "large")
INTENSITIES = ("bright", "dark")
TEXTURES = ("homogeneous", "ring", "speckled")
ROW_WORDS = ("upper", "middle", "lower")
COL_WORDS = ("left", "center", "right")
SPLIT_NAMES = ("train", "val", "test")

# Mean lesion radius as a fraction of the image side, per size word.
_SIZE_RANGES = {"small": (0.05, 0.065), "medium": (0.08, 0.10), "large": (0.11, 0.13)}
_MIN_RADIUS_PX = 1.5  # below this a lesion is a dot; matters only for tiny images
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
# Distinct entropy for the split so it never shares a stream with an image.
_SPLIT_STREAM = 0x5B117


class PhantomConfig(BaseModel):
    """What to generate. Fractions must sum to 1."""

    model_config = ConfigDict(extra="forbid")

    n: int = Field(default=512, ge=1, description="number of images")
    size: int = Field(default=64, ge=16, description="image side in pixels")
    seed: int = Field(default=0, ge=0)
    max_lesions: int = Field(default=2, ge=1, le=10)
    p_normal: float = Field(default=0.34, ge=0.0, le=1.0, description="fraction of images with no lesion")
    anatomy: Literal["head", "body", "mixed"] = "head"
    noise: float = Field(default=0.03, ge=0.0, le=0.5, description="std of additive noise, intensities in [0, 1]")
    train_frac: float = Field(default=0.7, ge=0.0, le=1.0)
    val_frac: float = Field(default=0.15, ge=0.0, le=1.0)
    test_frac: float = Field(default=0.15, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _check_fracs(self) -> "PhantomConfig":
        total = self.train_frac + self.val_frac + self.test_frac
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train_frac + val_frac + test_frac must be 1, got {total:g}")
        return self


# ----------------------------------------------------------------------------- geometry


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-center coordinates (rows, cols), each float64 (S, S); pixel i covers [i, i+1)."""
    c = np.arange(size, dtype=np.float64) + 0.5
    rr, cc = np.meshgrid(c, c, indexing="ij")
    rr.setflags(write=False)
    cc.setflags(write=False)
    return rr, cc


def _ellipse_rho(size: int, cy: float, cx: float, a: float, b: float, angle: float) -> np.ndarray:
    """Normalized elliptical radius (S, S): 1 on the outline. a: row semi-axis, b: col semi-axis."""
    rr, cc = _grid(size)
    dy, dx = rr - cy, cc - cx
    cos, sin = np.cos(angle), np.sin(angle)
    u = dy * cos + dx * sin
    v = -dy * sin + dx * cos
    return np.sqrt((u / a) ** 2 + (v / b) ** 2)


def _soft_inside(rho: np.ndarray, scale_px: float) -> np.ndarray:
    """Antialiased indicator (S, S) in [0, 1] of rho < 1; scale_px converts rho to ~pixels."""
    return np.clip((1.0 - rho) * scale_px + 0.5, 0.0, 1.0)


def _texture(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Unit-std smoothed Gaussian noise (S, S): soft-tissue mottling."""
    t = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma=sigma, mode="reflect")
    return t / (t.std() + 1e-8)


@dataclass
class _Anatomy:
    """image: float64 (S, S) in [0, 1] without noise; allowed: bool (S, S) where lesions may lie."""

    name: str
    image: np.ndarray
    allowed: np.ndarray


def _head(rng: np.random.Generator, size: int) -> _Anatomy:
    """Skull ring (bright) around brain (mid-gray, slightly brighter centrally)."""
    s = float(size)
    cy, cx = s / 2 + rng.uniform(-0.04, 0.04) * s, s / 2 + rng.uniform(-0.04, 0.04) * s
    a = rng.uniform(0.38, 0.44) * s
    b = a * rng.uniform(0.74, 0.86)
    angle = rng.uniform(-0.15, 0.15)
    t = max(1.5, rng.uniform(0.035, 0.05) * s)
    outer = _soft_inside(_ellipse_rho(size, cy, cx, a, b, angle), b)
    rho_in = _ellipse_rho(size, cy, cx, a - t, b - t, angle)
    inner = _soft_inside(rho_in, b - t)
    brain = 0.42 + 0.06 * np.clip(1.0 - rho_in**2, 0.0, 1.0) + 0.03 * _texture(rng, size, max(1.0, s / 40))
    img = rng.uniform(0.85, 0.95) * (outer - inner) + brain * inner
    return _Anatomy("head", np.clip(img, 0.0, 1.0), inner >= 1.0)


def _body(rng: np.random.Generator, size: int) -> _Anatomy:
    """Wide ellipse: bright skin rim, soft tissue, two dark lungs (upper half), bright vertebra."""
    s = float(size)
    cy, cx = s / 2 + rng.uniform(-0.03, 0.03) * s, s / 2 + rng.uniform(-0.03, 0.03) * s
    a = rng.uniform(0.37, 0.42) * s
    b = rng.uniform(0.44, 0.47) * s
    angle = rng.uniform(-0.08, 0.08)
    t = max(1.0, 0.025 * s)
    outer = _soft_inside(_ellipse_rho(size, cy, cx, a, b, angle), a)
    inner = _soft_inside(_ellipse_rho(size, cy, cx, a - t, b - t, angle), a - t)
    tex = _texture(rng, size, max(1.0, s / 40))
    img = 0.65 * (outer - inner) + (0.5 + 0.035 * tex) * inner
    cos, sin = np.cos(angle), np.sin(angle)

    def at(du: float, dv: float) -> tuple[float, float]:
        # body-frame offset (down, right) → image coordinates, following the tilt
        return cy + du * cos - dv * sin, cx + du * sin + dv * cos

    blocked = np.zeros((size, size), dtype=bool)
    for side in (-1.0, 1.0):
        # lungs kept in the upper half and narrow so lesions have room below and between them
        ly, lx = at(-0.32 * a, side * 0.5 * b)
        lung = _soft_inside(_ellipse_rho(size, ly, lx, 0.42 * a * rng.uniform(0.9, 1.1),
                                         0.27 * b * rng.uniform(0.9, 1.1), angle + side * 0.15), 0.27 * b)
        img = img * (1 - lung) + (0.10 + 0.03 * tex) * lung
        blocked |= lung > 0
    vy, vx = at(0.7 * a, 0.0)
    r_v = 0.055 * s
    spine = _soft_inside(_ellipse_rho(size, vy, vx, r_v, r_v * 1.15, 0.0), r_v)
    img = img * (1 - spine) + 0.85 * spine
    blocked |= spine > 0
    return _Anatomy("body", np.clip(img, 0.0, 1.0), (inner >= 1.0) & ~blocked)


# ----------------------------------------------------------------------------- lesions


@dataclass
class _LesionSpec:
    """Sampled lesion parameters before placement; radius in px (mean radius)."""

    shape: str
    size: str
    intensity: str
    texture: str
    radius: float  # mean radius: the disk of equal area for ovals, the base radius for irregular
    contrast: float
    # shape parameters: oval aspect/orientation, irregular harmonics (k, amplitude, phase)
    aspect: float = 1.0
    orient: float = 0.0
    harmonics: list[tuple[int, float, float]] = field(default_factory=list)
    ring_frac: float = 0.35

    def max_radius(self) -> float:
        """Largest boundary radius over all angles, px (bounds the support)."""
        return self.radius * (1.0 + sum(abs(h[1]) for h in self.harmonics)) / np.sqrt(self.aspect)


def _size_word(radius_frac: float, drawn: str) -> str:
    """The drawn size word, or a smaller one when the radius fell below the drawn range."""
    if radius_frac >= _SIZE_RANGES[drawn][0]:
        return drawn
    fits = [w for w in SIZES if radius_frac >= _SIZE_RANGES[w][0]]
    return fits[-1] if fits else "small"


def _lesion_kind(shape: str, texture: str) -> str:
    """Per-lesion class: malignant iff irregular or ring-textured."""
    return "malignant" if shape == "irregular" or texture == "ring" else "benign"


def _sample_lesion(rng: np.random.Generator, size: int, combos: list[tuple[str, str]]) -> _LesionSpec:
    """Draw one lesion whose (shape, texture) is one of ``combos``; size and intensity are free."""
    shape, texture = combos[rng.integers(len(combos))]
    size_word = SIZES[rng.integers(3)]
    lo, hi = _SIZE_RANGES[size_word]
    spec = _LesionSpec(
        shape=shape, size=size_word, intensity=INTENSITIES[rng.integers(2)], texture=texture,
        radius=max(_MIN_RADIUS_PX, rng.uniform(lo, hi) * size), contrast=rng.uniform(0.26, 0.36),
        ring_frac=rng.uniform(0.3, 0.4),
    )
    if shape == "round":
        spec.aspect, spec.orient = rng.uniform(0.93, 1.0), rng.uniform(0, np.pi)
    elif shape == "oval":
        spec.aspect, spec.orient = rng.uniform(0.5, 0.68), rng.uniform(0, np.pi)
    else:  # irregular: lobulated outline from 3 random harmonics
        ks = rng.choice([2, 3, 4, 5, 6], size=3, replace=False)
        amps = rng.dirichlet(np.ones(3)) * rng.uniform(0.22, 0.32)
        phases = rng.uniform(0, 2 * np.pi, size=3)
        spec.harmonics = [(int(k), float(am), float(ph)) for k, am, ph in zip(ks, amps, phases)]
    return spec


def _boundary_radius(spec: _LesionSpec, theta: np.ndarray) -> np.ndarray:
    """Boundary radius (px) at each angle theta; same shape as theta."""
    if spec.harmonics:
        mod = sum(am * np.cos(k * theta + ph) for k, am, ph in spec.harmonics)
        return spec.radius * (1.0 + mod)
    # ellipse with the area of a disk of the mean radius: semi-axes r/sqrt(q) (along orient), r*sqrt(q)
    psi = theta - spec.orient
    a, b = spec.radius / np.sqrt(spec.aspect), spec.radius * np.sqrt(spec.aspect)
    return a * b / np.sqrt((b * np.cos(psi)) ** 2 + (a * np.sin(psi)) ** 2)


def _place(rng: np.random.Generator, room: np.ndarray, reach: float,
           placed: list[tuple[float, float, float]], gap: float) -> tuple[int, int] | None:
    """Pick a center pixel for a lesion whose support lies within ``reach - gap`` px of it.

    room: float (S, S), distance from each pixel to the nearest pixel where no
    lesion may lie; placed: (row, col, max radius) of earlier lesions, kept
    ``gap`` px away. A 3×3 cell is drawn uniformly among those with a valid
    center, then a pixel within it, so location words are spread rather than
    piling up in "center".
    """
    ok = room >= reach
    if placed:
        rr, cc = _grid(room.shape[0])
        for py, px, pr in placed:
            ok &= np.hypot(rr - py, cc - px) >= reach + pr
    rows, cols = np.nonzero(ok)
    if rows.size == 0:
        return None
    size = room.shape[0]
    cell = _cell_index(rows + 0.5, size) * 3 + _cell_index(cols + 0.5, size)
    cells = np.unique(cell)
    pick = cells[rng.integers(cells.size)]
    idx = np.flatnonzero(cell == pick)
    j = idx[rng.integers(idx.size)]
    return int(rows[j]), int(cols[j])


def _cell_index(coord_px: np.ndarray | float, size: int) -> np.ndarray | int:
    """Third of the image (0, 1, 2) holding a coordinate given in px (pixel centers at i + 0.5)."""
    return np.clip(np.floor(np.asarray(coord_px) / size * 3), 0, 2).astype(int)


def _render_lesion(rng: np.random.Generator, spec: _LesionSpec, cy: float, cx: float,
                   anat: np.ndarray) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """The lesion's window and, within it, its support and intensity change.

    Returns (window, support, delta): window is a (rows, cols) slice pair of the
    image bounding the lesion (work stays local: a few hundred pixels); support:
    bool (h, w), exactly the pixels the lesion alters; delta: float (h, w),
    ``alpha * (value - anat)`` with alpha in [0.5, 1] on the support (antialiased
    edge) and 0 elsewhere.
    """
    size = anat.shape[0]
    half = int(np.ceil(spec.max_radius())) + 1
    r0, c0 = int(cy) - half, int(cx) - half
    win = (slice(max(r0, 0), min(r0 + 2 * half + 1, size)), slice(max(c0, 0), min(c0 + 2 * half + 1, size)))
    rr, cc = _grid(size)
    dy, dx = rr[win] - cy, cc[win] - cx
    base = anat[win]
    edge = _boundary_radius(spec, np.arctan2(dy, dx)) - np.hypot(dy, dx)  # px inside the boundary
    support = edge >= 0.0
    # Soft edge limited to [0.5, 1] so every support pixel changes by ≥ half the contrast.
    alpha = np.where(support, np.clip(edge + 0.5, 0.5, 1.0), 0.0)
    local = float(base[support].mean())
    sign = 1.0 if spec.intensity == "bright" else -1.0
    target = float(np.clip(local + sign * spec.contrast, 0.05, 0.97))
    value = np.full(base.shape, target)
    if spec.texture == "ring":
        # rim-enhancing: rim at full contrast, core of opposite sign (e.g. necrotic centre)
        rim_w = max(1.0, spec.ring_frac * spec.radius)
        core = local - 0.5 * (target - local)
        value = np.where(edge < rim_w, target, core)
    elif spec.texture == "speckled":
        spk = ndimage.gaussian_filter(rng.standard_normal(base.shape), 0.6)
        spk = np.clip(spk / (spk.std() + 1e-8), -2.0, 2.0) / 2.0
        value = target + 0.45 * abs(target - local) * spk
    return win, support, alpha * (value - base)


def _lesion_record(spec: _LesionSpec, cy: float, cx: float, support: np.ndarray,
                   win: tuple[slice, slice], size: int) -> dict:
    """JSON-friendly description; center (row, col) and bbox [x0, y0, x1, y1] normalized to [0, 1]."""
    rows, cols = np.nonzero(support)
    rows, cols = rows + win[0].start, cols + win[1].start
    row_w = ROW_WORDS[int(_cell_index(cy, size))]
    col_w = COL_WORDS[int(_cell_index(cx, size))]
    location = "center" if (row_w, col_w) == ("middle", "center") else f"{row_w} {col_w}"
    return {
        "kind": _lesion_kind(spec.shape, spec.texture),
        "shape": spec.shape,
        "size": spec.size,
        "intensity": spec.intensity,
        "texture": spec.texture,
        "center": (cy / size, cx / size),
        "radius": float(spec.radius),
        "bbox": [cols.min() / size, rows.min() / size, (cols.max() + 1) / size, (rows.max() + 1) / size],
        "location": location,
    }


# ----------------------------------------------------------------------------- labels, captions


def label_of(lesions: list[dict]) -> int:
    """Index into LABEL_NAMES implied by an image's lesion records."""
    if not lesions:
        return LABEL_NAMES.index("normal")
    if any(_lesion_kind(les["shape"], les["texture"]) == "malignant" for les in lesions):
        return LABEL_NAMES.index("malignant")
    return LABEL_NAMES.index("benign")


def lesion_phrase(les: dict) -> str:
    """E.g. "a small bright round lesion" or "a large dark irregular ring lesion"."""
    words = [les["size"], les["intensity"], les["shape"]]
    if les["texture"] != "homogeneous":
        words.append(les["texture"])
    return "a " + " ".join(words) + " lesion"


def caption_of(anatomy: str, lesions: list[dict]) -> str:
    """Caption in the module's vocabulary (see module docstring)."""
    head = f"a {anatomy} scan with"
    if not lesions:
        return f"{head} no lesion"
    parts = [f"{lesion_phrase(les)} in the {les['location']}" for les in lesions]
    if len(parts) == 1:
        return f"{head} {parts[0]}"
    count = _NUMBER_WORDS[len(parts)] if len(parts) < len(_NUMBER_WORDS) else str(len(parts))
    return f"{head} {count} lesions: " + ", ".join(parts[:-1]) + " and " + parts[-1]


# ----------------------------------------------------------------------------- one image


@dataclass
class RenderedPhantom:
    """One phantom. image/background: uint8 (S, S), background is the same scan and
    noise without lesions; mask: uint8 (S, S) 0/1, the union of lesion supports."""

    image: np.ndarray
    background: np.ndarray
    mask: np.ndarray
    lesions: list[dict]
    label: int
    caption: str
    anatomy: str


_BENIGN_COMBOS = [(s, t) for s in ("round", "oval") for t in ("homogeneous", "speckled")]
_MALIGNANT_COMBOS = [(s, t) for s in SHAPES for t in TEXTURES if _lesion_kind(s, t) == "malignant"]
_ANY_COMBOS = [(s, t) for s in SHAPES for t in TEXTURES]


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def render_phantom(cfg: PhantomConfig, seq: np.random.SeedSequence) -> RenderedPhantom:
    """Draw one phantom from its own seed sequence (all randomness comes from ``seq``)."""
    rng = np.random.default_rng(seq)
    size = cfg.size
    p_abn = (1.0 - cfg.p_normal) / 2.0
    wanted = LABEL_NAMES[rng.choice(3, p=[cfg.p_normal, p_abn, p_abn])]
    anat_name = cfg.anatomy if cfg.anatomy != "mixed" else ("head", "body")[rng.integers(2)]
    anat = (_head if anat_name == "head" else _body)(rng, size)

    n_les = 0 if wanted == "normal" else int(rng.integers(1, cfg.max_lesions + 1))
    gap = max(1.5, 0.03 * size)  # clearance to the outline and between lesions, px
    room = ndimage.distance_transform_edt(anat.allowed) if n_les else None
    delta = np.zeros((size, size))
    mask = np.zeros((size, size), dtype=bool)
    placed: list[tuple[float, float, float]] = []
    records: list[dict] = []
    for j in range(n_les):
        # the first lesion fixes the class; extra lesions of a malignant image are unconstrained
        combos = _BENIGN_COMBOS if wanted == "benign" else (_MALIGNANT_COMBOS if j == 0 else _ANY_COMBOS)
        spec = _sample_lesion(rng, size, combos)
        center = None
        while center is None and spec.radius >= _MIN_RADIUS_PX:
            center = _place(rng, room, spec.max_radius() + gap, placed, gap)
            if center is None:
                spec.radius *= 0.85  # too big for the room left: shrink it
        if center is None:
            continue
        spec.size = _size_word(spec.radius / size, spec.size)  # a shrunk lesion is described as it is
        cy, cx = center[0] + 0.5, center[1] + 0.5
        win, support, d = _render_lesion(rng, spec, cy, cx, anat.image)
        delta[win] += d
        mask[win] |= support
        placed.append((cy, cx, spec.max_radius()))
        records.append(_lesion_record(spec, cy, cx, support, win, size))

    noise = rng.standard_normal((size, size)) * cfg.noise
    records.sort(key=lambda r: (_cell_index(r["center"][0] * size, size), r["center"][1], r["center"][0]))
    return RenderedPhantom(
        image=_to_uint8(anat.image + delta + noise),
        background=_to_uint8(anat.image + noise),
        mask=mask.astype(np.uint8),
        lesions=records,
        label=label_of(records),  # from what was placed, so label and lesions always agree
        caption=caption_of(anat_name, records),
        anatomy=anat_name,
    )


# ----------------------------------------------------------------------------- dataset


def stratified_split(labels: np.ndarray, fracs: tuple[float, float, float], rng: np.random.Generator) -> np.ndarray:
    """Split names (N,) with each label's images divided by ``fracs`` (largest remainder)."""
    out = np.empty(labels.shape[0], dtype="<U5")
    for lab in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == lab))
        quota = np.asarray(fracs) * idx.size
        counts = np.floor(quota).astype(int)
        rest = idx.size - counts.sum()
        counts[np.argsort(-(quota - counts), kind="stable")[:rest]] += 1
        bounds = np.concatenate([[0], np.cumsum(counts)])
        for k, name in enumerate(SPLIT_NAMES):
            out[idx[bounds[k]:bounds[k + 1]]] = name
    return out


@dataclass
class Phantoms:
    """A generated dataset.

    images: uint8 (N, S, S); masks: uint8 (N, S, S) 0/1; labels: int64 (N,);
    split: str (N,) of train/val/test; captions: N strings; lesions: N lists of
    dicts (see module docstring); mask_valid: bool (N,), all True; anatomy: N strings.
    """

    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    label_names: list[str]
    split: np.ndarray
    captions: list[str]
    lesions: list[list[dict]]
    mask_valid: np.ndarray
    anatomy: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def filenames(self) -> list[str]:
        return [f"phantom_{i:06d}.png" for i in range(len(self))]

    def save_npz(self, path: str | os.PathLike) -> Path:
        """Write the shared npz format (no pickled objects) atomically; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {
            "images": self.images,
            "labels": self.labels.astype(np.int64),
            "label_names": np.asarray(self.label_names, dtype=str),
            "split": np.asarray(self.split, dtype=str),
            "filenames": np.asarray(self.filenames, dtype=str),
            "masks": self.masks,
            "mask_valid": self.mask_valid.astype(bool),
            "captions": np.asarray(self.captions, dtype=str),
        }
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez_compressed(tmp, **arrays)
        return path


def generate(cfg: PhantomConfig | None = None) -> Phantoms:
    """Generate ``cfg.n`` phantoms; same cfg → byte-identical arrays."""
    cfg = cfg or PhantomConfig()
    shots = [render_phantom(cfg, seq) for seq in np.random.SeedSequence(cfg.seed).spawn(cfg.n)]
    labels = np.array([s.label for s in shots], dtype=np.int64)
    split_rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, _SPLIT_STREAM]))
    return Phantoms(
        images=np.stack([s.image for s in shots]),
        masks=np.stack([s.mask for s in shots]),
        labels=labels,
        label_names=list(LABEL_NAMES),
        split=stratified_split(labels, (cfg.train_frac, cfg.val_frac, cfg.test_frac), split_rng),
        captions=[s.caption for s in shots],
        lesions=[s.lesions for s in shots],
        mask_valid=np.ones(cfg.n, dtype=bool),
        anatomy=[s.anatomy for s in shots],
    )
