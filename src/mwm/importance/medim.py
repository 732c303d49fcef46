"""MedIM's report-guided masking as importance maps: knowledge-driven (KWM, MeSH words) and sentence-driven (SDM).

MedIM (Xie et al., MICCAI 2023 / MedIA 2024; official code ``YtongXie/MedIM``) masks the image tokens that the
words of the radiology report attend to most. What this module takes from the official code:

* ``medim/models/medim/medim_train.py`` ``MedIM.forward``: word and patch embeddings are L2-normalised; the
  word→patch attention is ``softmax(word · patch / local_temperature, dim=patches)`` with ``local_temperature`` 0.1
  (``atten_scores_softimg``, one distribution over patches per word); KWM sums these distributions over the words
  whose MeSH flag is set (``att_MeSH = atten * mask_MeSH[:, 1:]``, ``.sum(1)``), SDM over the words of one selected
  sentence (``all_sents_mask == select_sent_id``); the masking ratio ``th`` is 0.5.
* ``pruning_sort_attDiversity`` (same file): the high-activated masking actually used ("diversity" variant): of the
  patches above the γ-quantile, a random 90 % are masked, and of the rest a random 10 % — our masking strategy
  ``saliency_topk_diverse`` (:func:`mwm.masking.policies.topk_diverse_keep`); ``pruning_sort_att`` (plain top-γ) is
  ``saliency_topk``.
* ``medim/datasets/pretrain_dataset.py`` ``get_caption`` and ``data/mesh/MeSH_pickle_train.py``
  ``create_path_2_sent_mapping``: the report is split into sentences at ``[0-9]+\\.`` and ``.``, each sentence into
  lower-cased ``\\w+`` words, sentences of ≤ 1 word are dropped; a word is a MeSH word when it *equals* an entry of
  the MeSH list (``mesh_ACE_pre.txt``: each line lower-cased, split at commas, trimmed) — single words only, so
  multi-word headings never match and neither do we; SDM draws its sentence among those with more than 3 words (any
  sentence when none has); subword tokens of a word are summed into one word feature (``encoder.py``
  ``BertEncoder.aggregate_tokens``, ``aggregate_method = "sum"``) before the projection.

How it maps onto ``mwm`` (see docs/DESIGN.md, deviations): MedIM trains the text and image encoders together with
the reconstruction and masks *encoder features*; here a frozen VLM (an ``mwm vlm`` folder, BiomedCLIP, any open_clip
model with a ViT image tower) computes the attention once per image, and the map is the importance source for
*input* masking in SparK/MAE (``mwm pretrain --rois OUT/rois.jsonl --masking saliency_topk|saliency_topk_diverse
--ratio 0.5``). Word features are the text tower's per-token outputs (after its final LayerNorm) summed over a
word's subword tokens and passed through the tower's projection into the joint space; patch features are the image
tower's patch tokens after its last block, final norm and projection (the CLIP "dense" features). SDM's sentence is
drawn once per image (seeded by the image id), not every epoch.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..data.types import ReadOptions
from ..errors import DataError, MWMError

__all__ = ["MedIMConfig", "MESH_FILE", "load_mesh", "parse_mesh", "split_sentences", "sentence_index", "ReportWords",
           "report_words", "word_weights", "text_token_features", "patch_features", "attention_maps", "medim_settings",
           "medim_maps"]

MESH_FILE = "mesh_terms.txt"  # packaged: MedIM's data/mesh/mesh_ACE_pre.txt (8,135 MeSH descriptor names)
STATUS_NO_REPORT = "no_report"
STATUS_NO_WORDS = "no_words"
STATUS_NO_MESH = "no_mesh_word"


class MedIMConfig(BaseModel):
    """`mwm importance medim`: report-guided importance maps (KWM / SDM) with a frozen VLM."""

    model_config = ConfigDict(extra="forbid")

    data: Path
    out: Path
    vlm: str = Field(description="an `mwm vlm` folder, hf-hub:org/repo or an open_clip name (ViT image tower)")
    vlm_pretrained: Optional[str] = None
    mode: Literal["kwm", "sdm"] = "kwm"
    captions: str = Field(default="auto", description="auto (npz captions, else template), npz, template, or a "
                                                      "FILE.csv (image,caption) / FILE.jsonl keyed by image id")
    template: str = "a {modality} image showing {class}"
    modality: str = "medical"
    mesh: Optional[Path] = Field(default=None, description="more MeSH terms, one per line (added to the packaged "
                                                          "list; same format: commas separate terms)")
    temperature: float = Field(default=0.1, gt=0, description="MedIM's local_temperature")
    min_sentence_words: int = Field(default=4, ge=1, description="SDM draws among sentences with at least this many "
                                                                "words (MedIM: more than 3), else among all")
    seed: int = Field(default=0, ge=0, description="SDM's sentence draw (with the image id)")
    split: Optional[str] = Field(default=None, description="None: pretraining's default (train when present, else all)")
    resize: Literal["pad", "stretch", "crop"] = "pad"
    batch_size: int = Field(default=64, ge=1)
    device: str = "auto"
    read: ReadOptions = ReadOptions()

    @field_validator("captions")
    @classmethod
    def _captions(cls, v: str) -> str:
        from ..localize.vlm_train import check_captions_spec

        return check_captions_spec(v)


# ----------------------------------------------------------------------------- words, sentences, MeSH


def parse_mesh(lines: Sequence[str]) -> set[str]:
    """MeSH list lines → the set of terms as MedIM matches them: lower-cased, split at commas, trimmed
    (``MeSH_pickle_train.py``; "Mammary Glands, Human" gives "mammary glands" and "human")."""
    out = set()
    for line in lines:
        for term in line.lower().split(","):
            term = " ".join(term.split())
            if term:
                out.add(term)
    return out


@lru_cache(maxsize=1)
def _packaged_mesh() -> frozenset[str]:
    text = resources.files("mwm.importance").joinpath(MESH_FILE).read_text(encoding="utf-8")
    return frozenset(parse_mesh(text.splitlines()))


def load_mesh(extra: str | Path | None = None) -> frozenset[str]:
    """The packaged MeSH vocabulary, plus the terms of ``extra`` (a text file, one term per line) when given."""
    terms = set(_packaged_mesh())
    if extra is not None:
        path = Path(extra).expanduser()
        if not path.is_file():
            raise DataError(f"--mesh {path}: no such file; give a text file with one MeSH term per line")
        terms |= parse_mesh(path.read_text(encoding="utf-8").splitlines())
    return frozenset(terms)


_SENT_SPLIT = re.compile(r"[0-9]+\.|\.")
_WORD = re.compile(r"[^\W_]+")  # MedIM's \w+ without "_" (BERT and CLIP's BPE split at underscores anyway)


def split_sentences(report: str) -> list[list[str]]:
    """A report → its sentences as lists of lower-cased words, as MedIM prepares reports
    (``create_path_2_sent_mapping``): newlines become spaces, sentences end at ``[0-9]+.`` and ``.``, words are
    runs of letters/digits, sentences of ≤ 1 word are dropped."""
    sents = []
    for piece in _SENT_SPLIT.split(report.replace("\n", " ")):
        words = _WORD.findall(piece.lower())
        if len(words) > 1:
            sents.append(words)
    return sents


def sentence_index(image_id: str, n_words: Sequence[int], seed: int = 0, min_words: int = 4) -> int:
    """SDM's sentence for an image: drawn uniformly among the sentences with ≥ ``min_words`` words (MedIM: > 3),
    or among all when none has, from a generator seeded by (``seed``, ``image_id``) — the same sentence on every
    run, machine and batch order."""
    pool = [k for k, n in enumerate(n_words) if n >= min_words] or list(range(len(n_words)))
    h = int.from_bytes(hashlib.sha256(f"{seed}\0{image_id}".encode("utf-8", "surrogatepass")).digest()[:8], "little")
    return pool[int(np.random.default_rng(h).integers(len(pool)))]


def _word_pieces(tokenizer, word: str) -> list[int]:
    """The token ids of one word, without special tokens (open_clip's BPE ``SimpleTokenizer`` or an HF tokenizer
    wrapped by open_clip's ``HFTokenizer``)."""
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "sot_token_id"):
        return list(tokenizer.encode(word))
    hf = getattr(tokenizer, "tokenizer", None)
    if hf is not None and callable(hf) and getattr(tokenizer, "tokenizer_mode", "") != "clips":
        clean = getattr(tokenizer, "clean_fn", None) or (lambda s: s)
        return list(hf(clean(word), add_special_tokens=False)["input_ids"])
    raise MWMError(f"MedIM maps need word-level tokens; the VLM's tokenizer {type(tokenizer).__name__} is not "
                   "open_clip's SimpleTokenizer or an HF tokenizer")


@dataclass
class ReportWords:
    """One report tokenized for the text tower. tokens: int64 (L,); words: the words that fit the context;
    spans: (start, stop) token positions of each word; sentence: the sentence index of each word."""

    tokens: torch.Tensor
    words: list[str]
    spans: list[tuple[int, int]]
    sentence: list[int]


def report_words(tokenizer, report: str, context_length: int) -> ReportWords:
    """Tokenize a report as MedIM feeds it to BERT (its sentences' words joined by spaces, punctuation gone) and
    locate each word's subword tokens. Words past the text context are dropped (MedIM truncates at 112 tokens).

    The tokens are the tokenizer's own output for the joined words; that the words' pieces sit at positions 1, …
    (after the start / CLS token) is checked, so a tokenizer that merges across words is refused, not misread."""
    from ..localize.vlm import tokenize

    words, sentence, pieces = [], [], []
    budget = context_length - 2  # start + end tokens
    for k, sent in enumerate(split_sentences(report)):
        for w in sent:
            p = _word_pieces(tokenizer, w)
            if not p or len(pieces) + len(p) > budget:
                continue
            words.append(w)
            sentence.append(k)
            pieces.extend(p)
    spans, pos = [], 1
    for w in words:
        n = len(_word_pieces(tokenizer, w))
        spans.append((pos, pos + n))
        pos += n
    tokens = tokenize(tokenizer, [" ".join(words)], context_length, warn=False)[0]
    if tokens[1:1 + len(pieces)].tolist() != pieces:
        raise MWMError(f"the VLM's tokenizer does not tokenize word by word (report {report[:60]!r}); MedIM maps need "
                       "each word's tokens")
    return ReportWords(tokens, words, spans, sentence)


def word_weights(rw: ReportWords, mode: str, mesh: frozenset[str] | set[str], image_id: str = "", seed: int = 0,
                 min_words: int = 4) -> torch.Tensor:
    """Which words' attention maps are summed (float (W,), 0/1): KWM the MeSH words, SDM the words of the image's
    sentence (:func:`sentence_index`)."""
    if mode == "kwm":
        return torch.tensor([float(w in mesh) for w in rw.words])
    if mode == "sdm":
        if not rw.words:
            return torch.zeros(0)
        n_sent = max(rw.sentence) + 1
        counts = [rw.sentence.count(k) for k in range(n_sent)]
        pick = sentence_index(image_id, counts, seed, min_words)
        return torch.tensor([float(s == pick) for s in rw.sentence])
    raise ValueError(f"mode {mode!r}: kwm or sdm")


# ----------------------------------------------------------------------------- features from the VLM


def text_token_features(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, Callable]:
    """Per-token outputs of the text tower and its projection into the joint space.

    Returns (hidden float (P, L, D) after the tower's final norm, ``project``: (…, D) → (…, E)), for open_clip's
    native ``CLIP`` (causal text transformer), ``CustomTextCLIP`` with a ``TextTransformer`` or with an HF text
    tower (BiomedCLIP's BERT: the last hidden states, before the CLS pooler).
    """
    text = getattr(model, "text", None)
    if text is None and hasattr(model, "token_embedding") and hasattr(model, "ln_final"):  # open_clip CLIP
        cast = model.transformer.get_cast_dtype()
        x = model.token_embedding(tokens).to(cast) + model.positional_embedding.to(cast)
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
        return x.float(), _projector(model.text_projection)
    if text is not None and hasattr(text, "ln_final") and hasattr(text, "_embeds"):  # open_clip TextTransformer
        x, mask = text._embeds(tokens)
        x = text.transformer(x, attn_mask=mask)
        if getattr(text, "cls_emb", None) is not None:
            x = x[:, :-1]
        return text.ln_final(x).float(), _projector(text.text_projection)
    if text is not None and hasattr(text, "transformer") and hasattr(text, "proj"):  # open_clip HFTextEncoder
        out = text.transformer(input_ids=tokens, attention_mask=(tokens != text.config.pad_token_id).long())
        return out.last_hidden_state.float(), text.proj
    raise MWMError(f"MedIM maps need per-token text features; text tower {type(text or model).__name__} is not "
                   "supported (open_clip CLIP, TextTransformer or HF text towers are)")


def _projector(proj) -> Callable:
    if proj is None:
        return lambda x: x
    if isinstance(proj, torch.nn.Module):
        return proj
    return lambda x: x @ proj.to(x.dtype)


def patch_features(vlm, pixels: torch.Tensor) -> torch.Tensor:
    """Normalized VLM input (B, 3, S, S) → patch embeddings (B, h·w, E) in the joint space: the patch tokens after
    the last block, the tower's final norm and its projection (row-major over the VLM's patch grid)."""
    from ..localize.vision import OpenClipViTStages, TimmViTStages

    st = vlm.stages
    x = st.run_blocks(st.embed(pixels), 0)
    if isinstance(st, OpenClipViTStages):
        v = st.visual
        if getattr(v, "attn_pool", None) is not None:
            raise MWMError(f"{vlm.name}: an attention-pooled image tower has no per-patch embeddings for MedIM maps")
        x = v.ln_post(x)[:, st.num_prefix_tokens:]
        return _projector(v.proj)(x).float()
    if isinstance(st, TimmViTStages):
        t = st.trunk
        x = t.norm(x)[:, st.num_prefix_tokens:]
        x = getattr(t, "fc_norm", torch.nn.Identity())(x)
        return st.visual.head(x).float()
    raise MWMError(f"{vlm.name}: unsupported image tower for MedIM maps")


def attention_maps(words: torch.Tensor, weights: torch.Tensor, patches: torch.Tensor,
                   temperature: float = 0.1) -> torch.Tensor:
    """MedIM's word→patch attention summed over the chosen words.

    words (B, W, E), weights (B, W) (0/1: which words count), patches (B, N, E) → float (B, N):
    ``Σ_w weight_w · softmax_n(ŵ · p̂_n / temperature)`` with L2-normalised ŵ, p̂ (``medim_train.py``:
    ``atten_scores_softimg``, then ``att_MeSH.sum(1)``).
    """
    sim = F.normalize(words.float(), dim=-1) @ F.normalize(patches.float(), dim=-1).transpose(1, 2)  # (B, W, N)
    att = torch.softmax(sim / temperature, dim=-1)
    return (att * weights.float()[..., None]).sum(1)


@torch.no_grad()
def _report_features(vlm, reports: list[ReportWords]) -> tuple[torch.Tensor, torch.Tensor]:
    """Word embeddings of distinct reports → (U, W_max, E) and a validity mask (U, W_max)."""
    w_max = max(1, max(len(r.words) for r in reports))
    tokens = torch.stack([r.tokens for r in reports]).to(vlm.device)
    hidden, project = text_token_features(vlm.model, tokens)
    agg = torch.zeros(len(reports), w_max, tokens.shape[1], device=hidden.device)
    for u, r in enumerate(reports):
        for k, (a, b) in enumerate(r.spans):
            agg[u, k, a:b] = 1.0  # MedIM sums a word's subword features
    emb = project(agg @ hidden).float()
    valid = agg.sum(-1) > 0
    return emb, valid


@torch.no_grad()
def _maps_for(vlm, images: np.ndarray, reports: list[ReportWords], weights: list[torch.Tensor], temperature: float,
              size: int) -> torch.Tensor:
    """uint8 images (B, 3, S, S) at the VLM's size with their reports and word weights → maps (B, size, size) in
    [0, 1]: the attention on the VLM's patch grid, each patch's value on its pixels (nearest), min–max per image."""
    pos: dict[int, int] = {}
    uniq: list[ReportWords] = []
    for r in reports:  # the text tower runs once per distinct report of the batch
        if id(r) not in pos:
            pos[id(r)] = len(uniq)
            uniq.append(r)
    emb, _ = _report_features(vlm, uniq)
    rows = torch.tensor([pos[id(r)] for r in reports], device=emb.device)
    wmat = torch.zeros(len(reports), emb.shape[1], device=emb.device)
    for k, wt in enumerate(weights):
        wmat[k, :len(wt)] = wt.to(emb.device)
    imgs = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    patches = patch_features(vlm, vlm.preprocess(imgs))
    m = attention_maps(emb[rows], wmat, patches, temperature).cpu()
    h, w = vlm.stages.grid
    m = F.interpolate(m.view(-1, 1, h, w), size=(size, size), mode="nearest")[:, 0]
    lo = m.flatten(1).amin(1)[:, None, None]
    span = m.flatten(1).amax(1)[:, None, None] - lo
    return torch.where(span > 0, (m - lo) / span.clamp_min(1e-12), torch.zeros_like(m))


# ----------------------------------------------------------------------------- the run


def medim_settings(cfg: MedIMConfig, ids: list[str], captions_digest: str, mesh_digest: str, split: str) -> dict:
    """What defines the maps (meta.json ``settings``; a rerun must match)."""
    return {"method": f"medim-{cfg.mode}", "vlm": cfg.vlm, "vlm_pretrained": cfg.vlm_pretrained, "mode": cfg.mode,
            "temperature": cfg.temperature, "captions": cfg.captions, "template": cfg.template,
            "modality": cfg.modality, "captions_digest": captions_digest, "mesh_digest": mesh_digest,
            "min_sentence_words": cfg.min_sentence_words, "seed": cfg.seed, "data": str(Path(cfg.data).resolve()),
            "split": split, "read": cfg.read.model_dump(mode="json"), "resize": cfg.resize,
            "ids_digest": hashlib.sha256("\n".join(ids).encode("utf-8", "surrogatepass")).hexdigest()[:16]}


def _digest(items) -> str:
    h = hashlib.sha256()
    for s in items:
        h.update((s or "").encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()[:16]


def medim_maps(cfg: MedIMConfig, overwrite: bool = False, progress: Callable[[int], None] | None = None) -> dict:
    """Compute MedIM KWM/SDM maps for ``cfg.data`` and write them as a saliency-map manifest in ``cfg.out``
    (:func:`mwm.importance.maps.write_map_manifest`). A finished run with the same settings is returned at once.

    Returns ``{"manifest", "images", "ok", "statuses": {status: count}, "seconds", "cached"}``.
    """
    from ..data import decode, open_source, pick_split
    from ..localize.pipeline import pick_device
    from ..localize.vlm import load_vlm
    from ..localize.vlm_train import _read_caption_file, captions_for
    from .maps import check_output, write_map_manifest

    t0 = time.perf_counter()
    src = open_source(cfg.data, cfg.read)
    split = pick_split(src, cfg.split)
    caption_map = None
    if cfg.captions not in ("auto", "npz", "template"):
        caption_map = _read_caption_file(Path(cfg.captions).expanduser())
    mesh = load_mesh(cfg.mesh) if cfg.mode == "kwm" else frozenset()
    idx = src.indices(None if split == "all" else split)
    if not idx:
        raise DataError(f"{cfg.data}: no images in split {split!r}")
    all_caps = getattr(src, "captions", None)
    caps_src = [all_caps[i] for i in idx] if all_caps is not None else None
    caps = captions_for([src.ids[i] for i in idx], np.asarray([src.labels[i] for i in idx]), src.label_names,
                        caps_src, cfg, caption_map)
    ids0 = [src.ids[i] for i in idx]
    settings = medim_settings(cfg, ids0, _digest(caps), _digest(sorted(mesh)), split)
    done = check_output(cfg.out, settings, overwrite)
    if done is not None:
        return {"manifest": str(done), "images": len(ids0), "cached": True, "seconds": 0.0}

    device = pick_device(cfg.device)
    vlm = load_vlm(cfg.vlm, device=str(device), pretrained=cfg.vlm_pretrained)
    size = vlm.image_size[0]
    if vlm.image_size[0] != vlm.image_size[1]:
        raise MWMError(f"{vlm.name}: non-square VLM input {vlm.image_size}; MedIM maps need a square one")
    ds = decode(src, size, 3, cfg.resize, split=None if split == "all" else split)
    cap_of = dict(zip(ids0, caps))
    caps = [cap_of.get(i) for i in ds.ids]

    # words and their weights per image; the text tower runs per batch on the batch's distinct reports
    rws = {c: report_words(vlm.tokenizer, c, vlm.context_length) for c in dict.fromkeys(c for c in caps if c)}
    statuses, weights, prompts = [], [], []
    for sid, c in zip(ds.ids, caps):
        rw = rws.get(c) if c else None
        wt = word_weights(rw, cfg.mode, mesh, sid, cfg.seed, cfg.min_sentence_words) if rw and rw.words else None
        statuses.append(STATUS_NO_REPORT if rw is None else STATUS_NO_WORDS if wt is None
                        else "ok" if wt.sum() > 0 else STATUS_NO_MESH)
        weights.append(wt)
        prompts.append(" ".join(w for w, k in zip(rw.words, wt.tolist()) if k) if wt is not None else "")
    h, w = vlm.stages.grid

    def batches() -> Iterator[torch.Tensor]:
        for b0 in range(0, len(ds), cfg.batch_size):
            sel = [k for k in range(b0, min(b0 + cfg.batch_size, len(ds))) if statuses[k] == "ok"]
            out = torch.zeros(min(cfg.batch_size, len(ds) - b0), size, size)
            if sel:
                out[[k - b0 for k in sel]] = _maps_for(vlm, ds.images[sel], [rws[caps[k]] for k in sel],
                                                       [weights[k] for k in sel], cfg.temperature, size)
            if progress is not None:
                progress(len(out))
            yield out

    manifest = write_map_manifest(cfg.out, ds.ids, ds.orig_sizes, batches(), settings, cfg.resize,
                                  statuses=statuses, prompts=prompts, overwrite=overwrite,
                                  meta={"vlm_info": {"name": vlm.name, "image_size": list(vlm.image_size),
                                                     "grid": [h, w]}})
    counts: dict[str, int] = {}
    for s in statuses:
        counts[s] = counts.get(s, 0) + 1
    return {"manifest": str(manifest), "images": len(ds), "ok": counts.get("ok", 0), "statuses": counts,
            "seconds": round(time.perf_counter() - t0, 2), "cached": False}
