"""Synthetic phantoms: determinism, mask exactness, label/caption consistency, splits, npz format."""

from __future__ import annotations

import re
import zipfile

import numpy as np
import pytest
from pydantic import ValidationError
from scipy import ndimage

from mwm.data.synthetic import LABEL_NAMES, PhantomConfig, generate, render_phantom

LOCATIONS = "upper left|upper center|upper right|middle left|center|middle right|lower left|lower center|lower right"
LESION_RE = re.compile(
    r"a (small|medium|large) (bright|dark) (round|oval|irregular)(?: (ring|speckled))? lesion in the (" + LOCATIONS + r")"
)
N = 300


@pytest.fixture(scope="module")
def ph():
    """One mixed head/body set shared by the read-only checks."""
    return generate(PhantomConfig(n=N, seed=3, anatomy="mixed"))


def _expected_location(center: tuple[float, float]) -> str:
    row = ("upper", "middle", "lower")[min(int(center[0] * 3), 2)]
    col = ("left", "center", "right")[min(int(center[1] * 3), 2)]
    return "center" if (row, col) == ("middle", "center") else f"{row} {col}"


def test_same_config_is_byte_identical():
    cfg = PhantomConfig(n=24, seed=11, anatomy="mixed")
    a, b = generate(cfg), generate(cfg)
    for key in ("images", "masks", "labels", "split", "mask_valid"):
        assert getattr(a, key).tobytes() == getattr(b, key).tobytes(), key
    assert a.captions == b.captions and a.lesions == b.lesions


def test_different_seeds_differ():
    a = generate(PhantomConfig(n=8, seed=0))
    b = generate(PhantomConfig(n=8, seed=1))
    assert all(not np.array_equal(a.images[i], b.images[i]) for i in range(8))


def test_prefix_property():
    small = generate(PhantomConfig(n=10, seed=5, anatomy="mixed"))
    big = generate(PhantomConfig(n=20, seed=5, anatomy="mixed"))
    assert small.images.tobytes() == big.images[:10].tobytes()
    assert small.masks.tobytes() == big.masks[:10].tobytes()
    np.testing.assert_array_equal(small.labels, big.labels[:10])
    assert small.captions == big.captions[:10] and small.lesions == big.lesions[:10]


def test_shapes_and_dtypes(ph):
    assert ph.images.shape == (N, 64, 64) and ph.images.dtype == np.uint8
    assert ph.masks.shape == (N, 64, 64) and ph.masks.dtype == np.uint8
    assert set(np.unique(ph.masks)) <= {0, 1}
    assert ph.labels.dtype == np.int64 and ph.labels.shape == (N,)
    assert ph.label_names == ["normal", "benign", "malignant"] == LABEL_NAMES
    assert ph.mask_valid.dtype == bool and ph.mask_valid.all()
    assert len(ph.captions) == len(ph.lesions) == N
    assert ph.filenames[123] == "phantom_000123.png"
    # black background, bright anatomy somewhere
    assert ph.images[:, 0, :].mean() < 10 and ph.images.max() > 200


def test_mask_empty_iff_normal_iff_no_lesion_caption(ph):
    for i in range(N):
        empty = ph.masks[i].sum() == 0
        normal = ph.labels[i] == LABEL_NAMES.index("normal")
        no_lesion = "no lesion" in ph.captions[i]
        assert empty == normal == no_lesion == (len(ph.lesions[i]) == 0), (i, ph.captions[i])


def test_label_follows_lesion_details(ph):
    for i in range(N):
        lesions = ph.lesions[i]
        for les in lesions:
            mal = les["shape"] == "irregular" or les["texture"] == "ring"
            assert les["kind"] == ("malignant" if mal else "benign")
        if not lesions:
            want = "normal"
        elif any(les["shape"] == "irregular" or les["texture"] == "ring" for les in lesions):
            want = "malignant"
        else:
            want = "benign"
        assert LABEL_NAMES[ph.labels[i]] == want, (i, lesions)


def test_size_and_intensity_do_not_give_the_label_away(ph):
    """Benign and malignant lesions share sizes and intensities, so a classifier must see shape/texture."""
    les = {(LABEL_NAMES[ph.labels[i]], l["size"], l["intensity"]) for i in range(N) for l in ph.lesions[i]}
    for cls in ("benign", "malignant"):
        assert {(s, b) for c, s, b in les if c == cls} == {(s, b) for s in ("small", "medium", "large")
                                                          for b in ("bright", "dark")}


def test_mask_is_exactly_the_changed_pixels():
    cfg = PhantomConfig(n=1, seed=7, anatomy="mixed")
    seqs = np.random.SeedSequence(cfg.seed).spawn(60)
    n_lesion = 0
    for seq in seqs:
        shot = render_phantom(cfg, seq)
        changed = shot.image != shot.background
        np.testing.assert_array_equal(changed, shot.mask.astype(bool))
        if shot.lesions:
            n_lesion += 1
            # visible: on average at least ~20 gray levels of contrast over the lesion
            diff = np.abs(shot.image.astype(int) - shot.background.astype(int))[changed]
            assert diff.mean() > 20
            # never touching the outline: no skull/rim/vertebra (bright) or lung (dark) next to a lesion
            near = ndimage.binary_dilation(changed, iterations=2)
            assert shot.background[near].max() < 200 and shot.background[near].min() > 60, shot.caption
    assert n_lesion > 20


def test_small_lesions_are_at_least_3px():
    ph = generate(PhantomConfig(n=200, seed=2, anatomy="mixed"))
    radii = [l["radius"] for ls in ph.lesions for l in ls if l["size"] == "small"]
    assert radii and min(radii) >= 3.0
    areas = [int(c.sum()) for c in ph.masks if c.any()]
    assert min(areas) >= 15  # even the smallest image's lesions cover a visible patch


def test_bbox_contains_each_mask_component(ph):
    s = ph.images.shape[1]
    for i in range(N):
        boxes = []
        for les in ph.lesions[i]:
            x0, y0, x1, y1 = les["bbox"]
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
            c0, r0, c1, r1 = (round(v * s) for v in (x0, y0, x1, y1))
            boxes.append((r0, r1, c0, c1))
            cy, cx = les["center"]
            assert y0 <= cy <= y1 and x0 <= cx <= x1
            # tight: mask pixels on every side of the box
            sub = ph.masks[i, r0:r1, c0:c1]
            assert sub[0].any() and sub[-1].any() and sub[:, 0].any() and sub[:, -1].any()
        comps, k = ndimage.label(ph.masks[i], structure=np.ones((3, 3)))
        for lab in range(1, k + 1):
            rows, cols = np.nonzero(comps == lab)
            assert any(r0 <= rows.min() and rows.max() < r1 and c0 <= cols.min() and cols.max() < c1
                       for r0, r1, c0, c1 in boxes), (i, lab)


def test_caption_words_match_lesions(ph):
    counts = {2: "two", 3: "three"}
    for i in range(N):
        cap, lesions = ph.captions[i], ph.lesions[i]
        anat = ph.anatomy[i]
        assert cap.startswith(f"a {anat} scan with ")
        found = LESION_RE.findall(cap)
        assert len(found) == len(lesions), cap
        if len(lesions) > 1:
            assert f"with {counts[len(lesions)]} lesions: " in cap
        for (size, inten, shape, tex, loc), les in zip(found, lesions):
            assert (size, inten, shape) == (les["size"], les["intensity"], les["shape"])
            assert (tex or "homogeneous") == les["texture"]
            assert loc == _expected_location(les["center"]) == les["location"], (cap, les["center"])
    # the vocabulary is used: several locations, both anatomies, every texture word
    text = " ".join(ph.captions)
    assert len(set(re.findall(LOCATIONS, text))) >= 6
    assert "head scan" in text and "body scan" in text and " ring lesion" in text and " speckled lesion" in text


def test_classes_roughly_balanced(ph):
    counts = np.bincount(ph.labels, minlength=3)
    assert counts.sum() == N
    assert (counts >= 0.25 * N).all() and (counts <= 0.42 * N).all(), counts


def test_split_fractions_and_stratification(ph):
    assert set(ph.split.tolist()) == {"train", "val", "test"}
    fracs = {"train": 0.7, "val": 0.15, "test": 0.15}
    for lab in range(3):
        idx = ph.labels == lab
        for name, f in fracs.items():
            assert abs(int((ph.split[idx] == name).sum()) - f * idx.sum()) <= 1, (lab, name)
    again = generate(PhantomConfig(n=N, seed=3, anatomy="mixed"))
    np.testing.assert_array_equal(again.split, ph.split)
    other = generate(PhantomConfig(n=30, seed=3, train_frac=0.5, val_frac=0.5, test_frac=0.0))
    assert set(other.split.tolist()) == {"train", "val"}


def test_npz_round_trip_without_pickle(tmp_path):
    ph = generate(PhantomConfig(n=12, seed=4, anatomy="mixed"))
    out = ph.save_npz(tmp_path / "sub" / "phantoms.npz")
    assert out == tmp_path / "sub" / "phantoms.npz"
    assert [p.name for p in out.parent.iterdir()] == ["phantoms.npz"]  # no temp file left behind
    keys = {"images", "labels", "label_names", "split", "filenames", "masks", "mask_valid", "captions"}
    with zipfile.ZipFile(out) as zf:
        assert {n.removesuffix(".npy") for n in zf.namelist()} == keys
    with np.load(out) as z:  # allow_pickle defaults to False: object arrays would raise here
        assert set(z.files) == keys
        assert z["images"].dtype == np.uint8 and z["masks"].dtype == np.uint8
        assert z["labels"].dtype == np.int64 and z["mask_valid"].dtype == bool
        for k in ("label_names", "split", "filenames", "captions"):
            assert z[k].dtype.kind == "U", k
        np.testing.assert_array_equal(z["images"], ph.images)
        np.testing.assert_array_equal(z["masks"], ph.masks)
        np.testing.assert_array_equal(z["labels"], ph.labels)
        assert z["label_names"].tolist() == LABEL_NAMES
        assert z["split"].tolist() == ph.split.tolist()
        assert z["captions"].tolist() == ph.captions
        assert z["filenames"].tolist() == [f"phantom_{i:06d}.png" for i in range(12)]
    ph.save_npz(out)  # overwriting in place works too
    with np.load(out) as z:
        assert z["images"].shape == (12, 64, 64)


def test_other_sizes_and_anatomies():
    ph = generate(PhantomConfig(n=12, size=96, anatomy="body", max_lesions=3, seed=1))
    assert ph.images.shape == (12, 96, 96) and set(ph.anatomy) == {"body"}
    assert max(len(l) for l in ph.lesions) <= 3
    tiny = generate(PhantomConfig(n=6, size=16, anatomy="mixed"))
    assert tiny.images.shape == (6, 16, 16)
    assert (generate(PhantomConfig(n=10, p_normal=1.0)).labels == 0).all()


@pytest.mark.parametrize("bad", [
    {"size": 8}, {"n": 0}, {"seed": -1}, {"max_lesions": 0}, {"p_normal": 1.5}, {"anatomy": "leg"},
    {"noise": -0.1}, {"train_frac": 0.8}, {"colour": "red"},
])
def test_bad_config_rejected(bad):
    with pytest.raises(ValidationError):
        PhantomConfig(**bad)
