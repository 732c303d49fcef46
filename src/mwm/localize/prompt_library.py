"""The description library: prompt families per modality and target, in place of MWM's LLM step.

Mask What Matters asks an LLM to "Describe the typical visual characteristics of a [category] in a [modality]
image" and prompts the VLM with the answer. mwm ships a library written by hand instead
(``prompt_library.yaml`` beside this module): for each modality and target a short phrase, synonyms and
abbreviations, lay wording and 3–5 descriptive sentences. Users extend or override it with a YAML file of the same
schema (:func:`load_library`), and can still ask an OpenAI-compatible endpoint they configure for descriptions
(:func:`generate_descriptions`; nothing is called unless a URL and a model are given).

    >>> get_entry("cxr", "Pneumonia").short
    'pneumonia'
    >>> get_entry("brain-mri", "tumour").family("synonyms")[:2]
    ['glioma', 'glioblastoma']
"""

from __future__ import annotations

import datetime as _dt
import difflib
import json
import re
import urllib.error
import urllib.request
from functools import lru_cache
from http.client import HTTPException
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import MWMError

Kind = Literal["short", "synonyms", "lay", "descriptions", "all"]
KINDS: tuple[str, ...] = ("short", "synonyms", "lay", "descriptions", "all")

PACKAGED_FILE = "prompt_library.yaml"

# The paper's question (MWM §3.2), verbatim but for the placeholders; stored in every generated entry's meta.
LLM_PROMPT_TEMPLATE = "Describe the typical visual characteristics of a {target} in a {modality} image"
# What we add so the answer parses into sentences (sent as the system message, also stored in meta).
LLM_FORMAT_INSTRUCTION = ("Answer with {n} short sentences, one per line, numbered 1., 2., and so on. Each sentence "
                          "describes how the {target} looks in the image (location, shape, size, brightness, "
                          "borders, texture). No introduction, no conclusion.")


# ----------------------------------------------------------------------------- schema


def _clean_strings(values: list[str]) -> list[str]:
    """Strip each string; an empty one is an error (it would be an empty prompt)."""
    out = []
    for i, v in enumerate(values):
        v = " ".join(str(v).split())
        if not v:
            raise ValueError(f"item {i} is empty")
        out.append(v)
    return out


class PromptEntry(BaseModel):
    """One modality/target of the library: its prompt families.

    ``aliases`` are other names accepted for the target by :func:`get_entry`; ``meta`` is free-form provenance
    (``mwm prompts generate`` stores the LLM template, endpoint and model there)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    modality: str
    target: str
    short: str = Field(min_length=1)
    synonyms: list[str] = []
    lay: list[str] = []
    descriptions: list[str] = []
    aliases: list[str] = []
    meta: dict[str, Any] = {}

    @field_validator("short")
    @classmethod
    def _short(cls, v: str) -> str:
        return _clean_strings([v])[0]

    @field_validator("synonyms", "lay", "descriptions", "aliases")
    @classmethod
    def _lists(cls, v: list[str]) -> list[str]:
        return _clean_strings(v)

    def family(self, kind: Kind = "all") -> list[str]:
        """The prompts of one family, or all of them (short, synonyms, lay, descriptions; duplicates dropped).

        Args:
            kind: ``short`` (one phrase), ``synonyms``, ``lay``, ``descriptions`` or ``all``.
        Returns:
            A new list of prompt strings, in library order.
        """
        if kind not in KINDS:
            raise MWMError(f"unknown prompt family {kind!r}; use one of {', '.join(KINDS)}")
        if kind == "short":
            return [self.short]
        if kind != "all":
            return list(getattr(self, kind))
        return list(dict.fromkeys([self.short, *self.synonyms, *self.lay, *self.descriptions]))


class _ModalitySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Optional[str] = None  # wording in the LLM template, e.g. "chest X-ray"
    aliases: list[str] = []


class _EntrySpec(BaseModel):
    """An entry as a file gives it: every field optional, so a user file can override only some."""

    model_config = ConfigDict(extra="forbid")
    short: Optional[str] = None
    synonyms: Optional[list[str]] = None
    lay: Optional[list[str]] = None
    descriptions: Optional[list[str]] = None
    aliases: Optional[list[str]] = None
    meta: Optional[dict[str, Any]] = None


class _LibraryFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = 1
    modalities: dict[str, _ModalitySpec] = {}
    entries: dict[str, Optional[dict[str, Optional[_EntrySpec]]]] = {}


# ----------------------------------------------------------------------------- names


def _key(name: str) -> str:
    """Matching key: lower case, letters and digits only ("Chest X-ray" → "chestxray")."""
    return re.sub(r"[^0-9a-z]+", "", str(name).lower())


def canonical_name(name: str) -> str:
    """A name as the library keys it: lower case, words joined by '_' ("Knee MRI" → "knee_mri")."""
    return re.sub(r"[^0-9a-z]+", "_", str(name).lower()).strip("_")


def _suggest(name: str, index: dict[str, str]) -> list[str]:
    """Canonical names whose key or alias is close to ``name`` (difflib), best first."""
    close = difflib.get_close_matches(_key(name), list(index), n=5, cutoff=0.6)
    return list(dict.fromkeys(index[k] for k in close))[:3]


def _did_you_mean(sugg: list[str]) -> str:
    return f"; did you mean {' or '.join(repr(s) for s in sugg)}?" if sugg else "."


# ----------------------------------------------------------------------------- the library


class PromptLibrary:
    """The packaged library, possibly with user files merged over it (see :func:`load_library`).

    Attributes:
        sources: the files merged, packaged first.
        modality_names: canonical modality → the wording used in the LLM template.
    """

    def __init__(self, entries: dict[tuple[str, str], PromptEntry], modality_names: dict[str, str],
                 modality_aliases: dict[str, list[str]], sources: list[str]):
        self.sources = sources
        self.modality_names = modality_names
        self._entries = entries
        self._modality_index = _build_index({m: [m, *modality_aliases.get(m, [])] for m in modality_names},
                                            "modality", sources)
        self._target_index: dict[str, dict[str, str]] = {}
        for m in modality_names:
            names = {t: [t, *e.aliases] for (mm, t), e in entries.items() if mm == m}
            self._target_index[m] = _build_index(names, f"target of {m}", sources)

    # -- lookups
    def resolve_modality(self, modality: str) -> str:
        """Canonical modality for a name or alias (case, spaces, '-' and '_' ignored).

        Raises:
            MWMError: unknown, listing the modalities and the closest names.
        """
        hit = self._modality_index.get(_key(modality))
        if hit is None:
            known = ", ".join(self.modality_names)
            raise MWMError(f"unknown modality {modality!r} in the prompt library"
                           f"{_did_you_mean(_suggest(modality, self._modality_index))} Known modalities: {known} "
                           f"(aliases such as brain-mri, cxr, ct are accepted); add others with a user library "
                           f"(--library FILE.yaml).")
        return hit

    def resolve(self, modality: str, target: str) -> tuple[str, str]:
        """(canonical modality, canonical target); MWMError naming what exists and the closest names."""
        m = self.resolve_modality(modality)
        index = self._target_index.get(m, {})
        hit = index.get(_key(target))
        if hit is None:
            known = ", ".join(t for (mm, t) in self._entries if mm == m) or "none"
            elsewhere = [mm for mm, idx in self._target_index.items() if mm != m and _key(target) in idx]
            also = f" ({target!r} exists for {', '.join(elsewhere)}.)" if elsewhere else ""
            raise MWMError(f"no target {target!r} for modality {m} in the prompt library"
                           f"{_did_you_mean(_suggest(target, index))} Targets for {m}: {known}.{also} Add one with "
                           f"a user library (--library FILE.yaml, or `mwm prompts generate … --out FILE.yaml`).")
        return m, hit

    def get_entry(self, modality: str, target: str) -> PromptEntry:
        """The entry for a modality and target, by canonical name or alias (a copy: callers may change it)."""
        return self._entries[self.resolve(modality, target)].model_copy(deep=True)

    def list_entries(self) -> list[PromptEntry]:
        """Every entry, packaged order first, then those user files add."""
        return [e.model_copy(deep=True) for e in self._entries.values()]


def _build_index(names: dict[str, list[str]], what: str, sources: list[str]) -> dict[str, str]:
    """Matching key → canonical name; two names sharing a key is an error naming the files."""
    index: dict[str, str] = {}
    for canon, aliases in names.items():
        for alias in aliases:
            k = _key(alias)
            if not k:
                continue
            if index.get(k, canon) != canon:
                raise MWMError(f"prompt library ({', '.join(sources)}): {what} name {alias!r} is used by both "
                               f"{index[k]!r} and {canon!r}; remove it from the aliases of one of them")
            index[k] = canon
    return index


def _format_validation(err: ValidationError) -> str:
    """Pydantic errors as "entry brain_mri/tumor: descriptions: Input should be a valid list; …"."""
    parts = []
    for e in err.errors():
        loc = [str(x) for x in e["loc"]]
        if loc and loc[0] == "entries" and len(loc) >= 3:
            where = f"entry {loc[1]}/{loc[2]}" + (f": {'.'.join(loc[3:])}" if len(loc) > 3 else "")
        elif loc and loc[0] == "modalities" and len(loc) >= 2:
            where = f"modality {loc[1]}" + (f": {'.'.join(loc[2:])}" if len(loc) > 2 else "")
        else:
            where = ".".join(loc) or "top level"
        parts.append(f"{where}: {e['msg']}")
    return "; ".join(parts[:5]) + (f"; … ({len(parts) - 5} more)" if len(parts) > 5 else "")


def _read_file(text: str, source: str) -> _LibraryFile:
    """Parse and validate one library file; errors name the file and the bad entry."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise MWMError(f"prompt library {source} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise MWMError(f"prompt library {source} must be a mapping with 'entries:' (and optionally 'modalities:'), "
                       f"got a {type(raw).__name__}")
    try:
        return _LibraryFile.model_validate(raw)
    except ValidationError as e:
        raise MWMError(f"prompt library {source}: {_format_validation(e)} (schema: see the packaged "
                       f"mwm/localize/{PACKAGED_FILE})") from None


def _merge(files: list[tuple[_LibraryFile, str]]) -> PromptLibrary:
    """Merge files in order, later fields over earlier ones, and validate each resulting entry.

    A later file may key a modality or target by any alias the earlier ones define ("cxr", "tumour")."""
    names: dict[str, str] = {}
    aliases: dict[str, list[str]] = {}
    fields: dict[tuple[str, str], dict[str, Any]] = {}
    origin: dict[tuple[str, str], str] = {}

    def modality_of(name: str) -> str:
        k = _key(name)
        for m in names:
            if k in {_key(m), *(_key(a) for a in aliases.get(m, []))}:
                return m
        return canonical_name(name)

    def target_of(m: str, name: str) -> str:
        k = _key(name)
        for (mm, t), f in fields.items():
            if mm == m and k in {_key(t), *(_key(a) for a in f.get("aliases", []))}:
                return t
        return canonical_name(name)

    for lib, source in files:
        for name, spec in lib.modalities.items():
            m = modality_of(name)
            if spec.name:
                names[m] = spec.name
            names.setdefault(m, m.replace("_", " "))
            aliases[m] = list(dict.fromkeys([*aliases.get(m, []), *spec.aliases]))
        for name, targets in lib.entries.items():
            m = modality_of(name)
            names.setdefault(m, m.replace("_", " "))
            for tname, spec in (targets or {}).items():
                key = (m, target_of(m, tname))
                given = spec.model_dump(exclude_none=True) if spec is not None else {}
                fields.setdefault(key, {}).update(given)
                origin[key] = source
    entries = {}
    for (m, t), f in fields.items():
        if not m or not t:
            raise MWMError(f"prompt library {origin[(m, t)]}: a modality or target name needs letters or digits")
        try:
            entries[(m, t)] = PromptEntry(modality=m, target=t, **f)
        except ValidationError as e:
            msg = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'entry'}: {err['msg']}" for err in e.errors())
            raise MWMError(f"prompt library {origin[(m, t)]}: entry {m}/{t}: {msg}") from None
    return PromptLibrary(entries, names, aliases, [s for _, s in files])


@lru_cache(maxsize=1)
def _packaged() -> tuple[_LibraryFile, str]:
    res = resources.files(__package__).joinpath(PACKAGED_FILE)
    return _read_file(res.read_text(encoding="utf-8"), str(res)), str(res)


def load_library(path: str | Path | None = None) -> PromptLibrary:
    """The packaged library, with the user file ``path`` (same schema) merged over it.

    A user entry's fields replace the packaged ones, fields it leaves out keep them; new modalities and targets
    are added (a new target needs at least ``short``).

    Args:
        path: a user YAML library, or None for the packaged one alone.
    Returns:
        A :class:`PromptLibrary`.
    Raises:
        MWMError: the file is missing, not YAML, or has a bad entry (the message names the file and the entry).
    """
    files = [_packaged()]
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise MWMError(f"prompt library {p} not found" + (" (it is a folder)" if p.is_dir() else "")
                           + "; give a YAML file like the one `mwm prompts generate … --out FILE.yaml` writes")
        files.append((_read_file(p.read_text(encoding="utf-8"), str(p)), str(p)))
    return _merge(files)


@lru_cache(maxsize=1)
def _default_library() -> PromptLibrary:
    return load_library(None)


def list_entries(library: PromptLibrary | None = None) -> list[PromptEntry]:
    """Every entry of ``library`` (default: the packaged one)."""
    return (library or _default_library()).list_entries()


def get_entry(modality: str, target: str, library: PromptLibrary | None = None) -> PromptEntry:
    """The entry for ``modality``/``target`` (names or aliases, any case) of ``library`` (default: packaged).

    Raises:
        MWMError: unknown modality or target, listing what exists and the closest names.
    """
    return (library or _default_library()).get_entry(modality, target)


# ----------------------------------------------------------------------------- optional LLM generation

_MARKER = re.compile(r"^\s*(?:[-*•·–]|\(?\d{1,2}\s*[.):]|\(?[a-z][.)])\s+", re.IGNORECASE)
_BOLD_LABEL = re.compile(r"^\*\*[^*]{1,60}?\*\*\s*:?\s*(?=\S)")


def parse_sentences(text: str, n: int | None = None) -> list[str]:
    """An LLM answer → description sentences.

    Numbered or bulleted lines are the sentences (a preamble or closing line without a marker is dropped); an
    answer without any marker is split into sentences. Markdown bold and bold "**Label:**" prefixes go.

    Args:
        text: the message content.
        n: keep at most this many (None: all).
    Returns:
        Sentences, duplicates dropped, in order.
    """
    lines = [ln for ln in text.splitlines() if ln.strip()]
    marked = [_MARKER.sub("", ln, count=1) for ln in lines if _MARKER.match(ln)]
    if marked:
        items = marked
    else:
        items = re.split(r"(?<=[.!?])\s+", " ".join(ln.strip() for ln in lines))
    out = []
    for item in items:
        s = _BOLD_LABEL.sub("", item.strip(), count=1).replace("**", "").replace("__", "").strip().strip('"').strip()
        if len(s) >= 3 and not s.endswith(":"):
            out.append(" ".join(s.split()))
    out = list(dict.fromkeys(out))
    return out if n is None else out[:n]


def _display_names(modality: str, target: str) -> tuple[str, str]:
    """The wording for the template: the library's modality name and target ("cxr" → "chest X-ray")."""
    lib = _default_library()
    try:
        m = lib.resolve_modality(modality)
    except MWMError:
        return modality.strip(), target.strip()
    try:
        _, t = lib.resolve(m, target)
        return lib.modality_names[m], t.replace("_", " ")
    except MWMError:
        return lib.modality_names[m], target.strip()


def _chat_url(url: str) -> str:
    """``{url}/chat/completions``; a URL already ending so is kept as is."""
    u = url.strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+", u):
        raise MWMError(f"LLM endpoint {url!r} is not an http(s) URL; give the API base, e.g. "
                       f"--llm-url http://localhost:8000/v1")
    return u if u.endswith("/chat/completions") else u + "/chat/completions"


def generate_descriptions(modality: str, target: str, *, url: str, model: str, n: int = 4,
                          api_key: str | None = None, timeout: float = 30) -> tuple[list[str], dict]:
    """Ask an OpenAI-compatible chat endpoint the paper's question and parse the answer into sentences.

    Only the standard library is used (urllib); nothing is sent unless ``url`` and ``model`` are given.

    Args:
        modality, target: names as the user gives them; library names and aliases become their wording
            ("cxr" → "chest X-ray", "bright_lesion" → "bright lesion").
        url: API base, e.g. ``http://localhost:8000/v1`` (``/chat/completions`` is appended).
        model: model name the endpoint serves.
        n: sentences wanted.
        api_key: sent as ``Authorization: Bearer …`` when given (never stored in meta).
        timeout: seconds for the whole request.
    Returns:
        (sentences, meta): meta holds ``template``, ``prompt`` (the filled template), ``system``, ``url``,
        ``model``, ``n``, ``response_id`` and ``generated_at``.
    Raises:
        MWMError: no URL/model, unreachable endpoint, HTTP error, malformed or empty answer; the message names
            the URL and what to check.
    """
    if not url or not model:
        raise MWMError("LLM generation needs both an endpoint URL and a model name (--llm-url, --llm-model); "
                       "nothing was sent")
    if n < 1:
        raise MWMError(f"n must be at least 1, got {n}")
    endpoint = _chat_url(url)
    mod_name, target_name = _display_names(modality, target)
    prompt = LLM_PROMPT_TEMPLATE.format(target=target_name, modality=mod_name)
    system = LLM_FORMAT_INSTRUCTION.format(n=n, target=target_name)
    body = {"model": model, "messages": [{"role": "system", "content": system},
                                         {"role": "user", "content": prompt + "."}]}
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(endpoint, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST")
    check = "check --llm-url (the API base, e.g. http://localhost:8000/v1), --llm-model and the API key"
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as e:
        detail = e.read(300).decode("utf-8", "replace").strip() if e.fp is not None else ""
        raise MWMError(f"LLM endpoint {endpoint} answered HTTP {e.code} {e.reason}"
                       f"{': ' + detail if detail else ''}; {check}") from None
    except urllib.error.URLError as e:
        raise MWMError(f"cannot reach LLM endpoint {endpoint}: {e.reason}; check that the server is running and "
                       f"that --llm-url is its API base (e.g. http://localhost:8000/v1)") from None
    except TimeoutError:
        raise MWMError(f"LLM endpoint {endpoint} did not answer within {timeout:g} s; check that the server is "
                       f"running and the model is loaded, or raise the timeout") from None
    except (HTTPException, OSError) as e:
        raise MWMError(f"LLM endpoint {endpoint} failed: {type(e).__name__}: {e}; {check}") from None
    text = raw.decode("utf-8", "replace")
    try:
        answer = json.loads(text)
    except json.JSONDecodeError:
        raise MWMError(f"LLM endpoint {endpoint} returned malformed JSON ({text[:120]!r}); check that --llm-url is "
                       f"an OpenAI-compatible API base (…/v1)") from None
    try:
        content = answer["choices"][0]["message"]["content"]
        if not isinstance(content, str):
            raise TypeError
    except (KeyError, IndexError, TypeError):
        raise MWMError(f"LLM endpoint {endpoint} answered without choices[0].message.content ({text[:120]!r}); "
                       f"check that it is an OpenAI-compatible chat completions API") from None
    sentences = parse_sentences(content, n)
    if not sentences:
        raise MWMError(f"LLM endpoint {endpoint} (model {model}) returned no usable sentences "
                       f"({content[:120]!r}); try another model")
    meta = {"template": LLM_PROMPT_TEMPLATE, "prompt": prompt, "system": system, "url": url.strip(),
            "model": model, "n": n, "response_id": answer.get("id") if isinstance(answer, dict) else None,
            "generated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    return sentences, meta


# ----------------------------------------------------------------------------- writing user files


def add_generated_entry(path: str | Path, modality: str, target: str, descriptions: list[str],
                        meta: dict) -> tuple[str, str]:
    """Write (or update) ``path``, a user library, with generated descriptions for one modality/target.

    A target the packaged library has gets only ``descriptions`` and ``meta`` (its other fields keep the packaged
    values when merged); a new one also gets ``short`` (its name) and a ``modalities`` record for a new modality.
    Other entries already in ``path`` are kept (comments are not). The write is atomic.

    Returns:
        The (modality, target) keys written.
    """
    from ..io import atomic_write_text

    p = Path(path).expanduser()
    if p.exists():
        if not p.is_file():
            raise MWMError(f"--out {p} is a folder; give a YAML file name")
        load_library(p)  # refuse to rewrite a broken file: the error names it and the bad entry
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    else:
        data = {}
    lib = _default_library()
    entry: dict[str, Any] = {}
    try:
        m = lib.resolve_modality(modality)
    except MWMError:
        m = canonical_name(modality)
        data.setdefault("modalities", {}).setdefault(m, {"name": modality.strip(), "aliases": []})
    try:
        _, t = lib.resolve(m, target)
    except MWMError:
        t = canonical_name(target)
        entry["short"] = target.strip()
    if not m or not t:
        raise MWMError(f"modality {modality!r} / target {target!r}: a name needs letters or digits")
    targets = data.setdefault("entries", {}).setdefault(m, {}) or {}
    data["entries"][m] = targets
    old = targets.get(t) or {}
    targets[t] = {**old, **entry, "descriptions": list(descriptions), "meta": dict(meta)}
    data.setdefault("version", 1)
    header = ("# mwm prompt library (user file), merged over the packaged one by `mwm prompts show --library FILE`\n"
              "# and mwm.localize.prompt_library.load_library(FILE). Fields an entry leaves out keep the packaged\n"
              "# values. Generated entries record the LLM template and endpoint under meta.\n")
    ordered = {k: data[k] for k in ("version", "modalities", "entries") if k in data}
    ordered.update({k: v for k, v in data.items() if k not in ordered})
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p, header + yaml.safe_dump(ordered, sort_keys=False, allow_unicode=True, width=110))
    load_library(p)  # what we wrote must load
    return m, t
