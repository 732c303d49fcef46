"""Noisy prompts, reproducibly: misspellings (``typos``) and dropped words (``dropout``).

Users type prompts by hand; a study of prompt robustness needs the misspelled and truncated versions of a
prompt as well as the careful ones. Both functions are pure: the same text, rate and seed give the same
output on every machine (a ``numpy`` generator seeded from the seed and the text's CRC-32, never Python's
randomised ``hash``).

The rate fixes the *number* of edits, not a per-character coin flip, so a short prompt at rate 0.1 still
gets an edit and two seeds differ only in where: ``typos`` makes ``max(1, round(rate × letters))`` character
edits, ``dropout`` drops ``round(rate × words)`` words (at least one, never every word). Rate 0 returns the
text unchanged.
"""

from __future__ import annotations

import string
import zlib

import numpy as np

NOISE_KINDS = ("typos", "dropout")
TYPO_OPS = ("swap", "insert", "delete", "substitute")
_LETTERS = string.ascii_lowercase


def _rng(text: str, seed: int, salt: str) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(f"{salt}\0{text}".encode("utf-8"))])


def n_typos(text: str, rate: float) -> int:
    """How many character edits :func:`typos` makes: ``max(1, round(rate × letters))`` (0 for rate 0 or no letter)."""
    letters = sum(c.isalpha() for c in text)
    if rate <= 0 or letters == 0:
        return 0
    return max(1, int(round(rate * letters)))


def typos(text: str, rate: float, seed: int = 0) -> str:
    """``text`` with :func:`n_typos` random character edits, each one of: swap a letter with its right
    neighbour, insert a random letter after it, delete it, or substitute another letter for it. Edits touch
    letters only (spaces and punctuation stay, so the words stay words), one edit per letter position.

    Args:
        text: the prompt; rate: edits per letter, in [0, 1]; seed: the noise seed.
    Returns:
        the noisy prompt (never empty: a deletion that would empty it substitutes instead).
    """
    if not 0 <= rate <= 1:
        raise ValueError(f"typo rate must be in [0, 1]; got {rate}")
    k = n_typos(text, rate)
    if k == 0:
        return text
    rng = _rng(text, seed, "typos")
    chars = list(text)
    positions = [i for i, c in enumerate(chars) if c.isalpha()]
    picked = sorted(rng.choice(positions, size=min(k, len(positions)), replace=False).tolist(), reverse=True)
    for i in picked:  # right to left, so an insertion or deletion does not shift the positions still to edit
        op = TYPO_OPS[int(rng.integers(len(TYPO_OPS)))]
        if op == "delete" and sum(c.strip() != "" for c in chars) <= 1:
            op = "substitute"
        c = chars[i]
        if op == "swap" and i + 1 < len(chars) and chars[i + 1] != c:
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
        elif op == "insert":
            chars.insert(i + 1, _LETTERS[int(rng.integers(26))])
        elif op == "delete":
            del chars[i]
        else:  # substitute (also a swap at the end of the text or with an equal neighbour)
            other = [x for x in _LETTERS if x != c.lower()]
            new = other[int(rng.integers(len(other)))]
            chars[i] = new.upper() if c.isupper() else new
    return "".join(chars)


def n_dropped(text: str, rate: float) -> int:
    """How many words :func:`word_dropout` drops: ``max(1, round(rate × words))``, at most ``words − 1``."""
    n = len(text.split())
    if rate <= 0 or n <= 1:
        return 0
    return min(n - 1, max(1, int(round(rate * n))))


def word_dropout(text: str, rate: float, seed: int = 0) -> str:
    """``text`` with :func:`n_dropped` random words removed (words = runs of non-space; joined by one space).

    Args:
        text: the prompt; rate: share of words to drop, in [0, 1]; seed: the noise seed.
    Returns:
        the shorter prompt; a one-word prompt comes back unchanged.
    """
    if not 0 <= rate <= 1:
        raise ValueError(f"dropout rate must be in [0, 1]; got {rate}")
    words = text.split()
    k = n_dropped(text, rate)
    if k == 0:
        return text
    drop = set(_rng(text, seed, "dropout").choice(len(words), size=k, replace=False).tolist())
    return " ".join(w for i, w in enumerate(words) if i not in drop)


def parse_noise(spec: str | dict | None) -> dict[str, float]:
    """``"typos=0.1,dropout=0.2"`` (or a dict, or ``"none"``/empty) → ``{"typos": 0.1, "dropout": 0.2}``.

    Raises ValueError naming the bad part (an unknown kind, a rate outside [0, 1]).
    """
    if spec is None:
        return {}
    if isinstance(spec, dict):
        items = list(spec.items())
    else:
        s = spec.strip()
        if s.lower() in ("", "none", "off"):
            return {}
        items = []
        for part in s.split(","):
            k, eq, v = part.partition("=")
            if not eq:
                raise ValueError(f"noise {part!r}: expected KIND=RATE, e.g. typos=0.1,dropout=0.1")
            items.append((k.strip(), v.strip()))
    out: dict[str, float] = {}
    for k, v in items:
        if k not in NOISE_KINDS:
            raise ValueError(f"unknown noise kind {k!r}; use {', '.join(NOISE_KINDS)} (e.g. typos=0.1,dropout=0.1)")
        try:
            r = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"noise {k}={v!r}: the rate must be a number in [0, 1]") from None
        if not 0 <= r <= 1:
            raise ValueError(f"noise {k}={r}: the rate must be in [0, 1]")
        out[k] = r
    return out


def noisy_variants(sources: list[str], noise: dict[str, float], seed: int = 0,
                   samples: int = 1) -> dict[str, list[str]]:
    """Noise families: for each kind in ``noise`` (``typos`` / ``dropout`` → rate), ``samples`` noisy versions
    of every source prompt, in source order; sample ``s`` of a source uses seed ``seed + s``.

    Returns:
        ``{kind: [prompt, …]}``, each list ``len(sources) × samples`` long (a version may equal its source,
        e.g. dropout of a one-word prompt).
    """
    fns = {"typos": typos, "dropout": word_dropout}
    return {kind: [fns[kind](src, rate, seed + s) for src in sources for s in range(samples)]
            for kind, rate in noise.items()}


__all__ = ["NOISE_KINDS", "typos", "word_dropout", "n_typos", "n_dropped", "parse_noise", "noisy_variants"]
