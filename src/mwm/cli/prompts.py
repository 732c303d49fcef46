"""`mwm prompts …`: the description library (short phrase, synonyms, lay wording, descriptions), LLM generation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..errors import MWMError
from .common import console, handle_errors, out

app = typer.Typer(help="The prompt library: short phrases, synonyms, lay wording and descriptions per modality and "
                       "target; optional generation from an OpenAI-compatible LLM.", no_args_is_help=True)

LibraryOpt = Annotated[Optional[Path], typer.Option("--library", help="User library YAML merged over the packaged "
                                                                      "one (e.g. written by `mwm prompts generate`).")]


@app.command("list")
@handle_errors
def list_(
    library: LibraryOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the entries as JSON instead of a table.")] = False,
):
    """List the modalities and targets of the library.

    Example: mwm prompts list --library my_prompts.yaml
    """
    from ..localize.prompt_library import load_library

    lib = load_library(library)
    entries = lib.list_entries()
    if json_out:
        print(json.dumps([e.model_dump() for e in entries], indent=2, ensure_ascii=False))
        return
    t = Table(title="prompt library" + (f" (+ {library})" if library else ""))
    for col in ("modality", "target", "short phrase", "#synonyms", "#lay", "#descriptions"):
        t.add_column(col, justify="right" if col.startswith("#") else "left", no_wrap=col.startswith("#"))
    for e in entries:
        t.add_row(e.modality, e.target, e.short, str(len(e.synonyms)), str(len(e.lay)), str(len(e.descriptions)))
    out.print(t)


@app.command()
@handle_errors
def show(
    modality: Annotated[str, typer.Argument(help="Modality or alias: brain-mri, cxr, chest-ct, phantom, …")],
    target: Annotated[str, typer.Argument(help="Target or alias: tumor/tumour, edema, lungs, pneumonia, …")],
    kind: Annotated[str, typer.Option(help="all, short, synonyms, lay or descriptions.")] = "all",
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON: modality, target, kind, prompts (and, for "
                                                          "--kind all, each family).")] = False,
    library: LibraryOpt = None,
):
    """Show one entry's prompts; with --kind other than all, one prompt per line (ready for scripts).

    Example: mwm prompts show brain-mri tumour --kind synonyms
    """
    from ..localize.prompt_library import KINDS, load_library

    if kind not in KINDS:
        raise MWMError(f"--kind {kind!r} is not one of {', '.join(KINDS)}")
    e = load_library(library).get_entry(modality, target)
    prompts = e.family(kind)  # type: ignore[arg-type]
    if json_out:
        doc = {"modality": e.modality, "target": e.target, "kind": kind, "prompts": prompts}
        if kind == "all":
            doc.update(short=e.short, synonyms=e.synonyms, lay=e.lay, descriptions=e.descriptions, aliases=e.aliases,
                       meta=e.meta)
        print(json.dumps(doc, indent=2, ensure_ascii=False))
        return
    if kind != "all":
        for p in prompts:
            print(p)
        return
    out.print(f"[bold]{e.modality} / {e.target}[/bold]" + (f"  (also: {', '.join(e.aliases)})" if e.aliases else ""),
              highlight=False)
    out.print(f"[bold]short[/bold]: {e.short}", highlight=False)
    for fam in ("synonyms", "lay", "descriptions"):
        items = getattr(e, fam)
        out.print(f"[bold]{fam}[/bold] ({len(items)}):", highlight=False)
        for p in items:
            out.print(f"  - {p}", highlight=False, markup=False, soft_wrap=True)
    if e.meta:
        out.print(f"[bold]meta[/bold]: {json.dumps(e.meta, ensure_ascii=False)}", highlight=False)


@app.command()
@handle_errors
def generate(
    modality: Annotated[str, typer.Argument(help="Modality (library name, alias or free text, e.g. 'knee MRI').")],
    target: Annotated[str, typer.Argument(help="Target (library name, alias or free text, e.g. 'meniscal tear').")],
    llm_url: Annotated[Optional[str], typer.Option("--llm-url", help="OpenAI-compatible API base, e.g. "
                                                                     "http://localhost:8000/v1 (POST "
                                                                     "URL/chat/completions).")] = None,
    llm_model: Annotated[Optional[str], typer.Option("--llm-model", help="Model name the endpoint serves.")] = None,
    n: Annotated[int, typer.Option("--n", min=1, max=20, help="Sentences to ask for.")] = 4,
    out_file: Annotated[Optional[Path], typer.Option("--out", help="User library YAML to write or update (atomic); "
                                                                   "without it the entry is printed.")] = None,
    api_key: Annotated[Optional[str], typer.Option("--llm-api-key", envvar="MWM_LLM_API_KEY",
                                                   help="Bearer token for the endpoint (or env MWM_LLM_API_KEY); "
                                                        "never written to the file.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.")] = 60.0,
):
    """Ask an LLM the paper's question ("Describe the typical visual characteristics of a {target} in a {modality}
    image") and store the answer as a user-library entry, with the template, endpoint and model in its meta.

    Nothing is sent unless --llm-url and --llm-model are given.

    Example: mwm prompts generate brain-mri tumor --llm-url http://localhost:8000/v1 --llm-model qwen2.5-7b-instruct --out my_prompts.yaml
    """
    import yaml

    from ..localize.prompt_library import add_generated_entry, generate_descriptions

    if not llm_url or not llm_model:
        raise MWMError("mwm prompts generate needs --llm-url (an OpenAI-compatible API base, e.g. "
                       "http://localhost:8000/v1) and --llm-model; nothing was sent")
    sentences, meta = generate_descriptions(modality, target, url=llm_url, model=llm_model, n=n, api_key=api_key,
                                            timeout=timeout)
    if out_file is None:
        print(yaml.safe_dump({"descriptions": sentences, "meta": meta}, sort_keys=False, allow_unicode=True,
                             width=110), end="")
        return
    m, t = add_generated_entry(out_file, modality, target, sentences, meta)
    for s in sentences:
        out.print(f"  - {s}", highlight=False, markup=False, soft_wrap=True)
    console.print(f"wrote {m}/{t} ({len(sentences)} descriptions) to {out_file}; use it with "
                  f"`mwm prompts show {m} {t} --library {out_file}`", highlight=False, markup=False)
