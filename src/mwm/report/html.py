"""A self-contained HTML report: sections of text, tables and pictures (paths relative to the page).

Pictures are referenced, not embedded, so the report stays small and a user can open each PNG on its own;
the whole folder is what gets shared. Everything is escaped.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..io import atomic_write_text

__all__ = ["Section", "write_report", "table_html"]

_STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
figure{margin:.6em 0 1.2em 0} img{max-width:100%;image-rendering:pixelated;border:1px solid #eee}
figcaption{font-size:.9em;color:#555} table{border-collapse:collapse;margin:.6em 0}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right} th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left} code{background:#f4f4f4;padding:0 .2em}
.note{color:#555;font-size:.95em}"""


@dataclass
class Section:
    """title; paragraphs (plain text, escaped); tables: (caption, header, rows); figures: (path, caption);
    links: (href, text)."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[tuple[str, list[str], list[list]]] = field(default_factory=list)
    figures: list[tuple[Path, str]] = field(default_factory=list)
    links: list[tuple[str, str]] = field(default_factory=list)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return html.escape("" if v is None else str(v))


def table_html(header: list[str], rows: list[list], caption: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(path: str | Path, title: str, intro: list[str], sections: list[Section]) -> Path:
    """Write the page atomically; figure/link paths are made relative to the page's folder. Missing figures
    are listed as missing instead of drawn as broken images."""
    path = Path(path)
    root = path.parent.resolve()

    def rel(p: Path | str) -> str:
        return os.path.relpath(Path(p).resolve(), root).replace(os.sep, "/")

    parts = [f"<h1>{html.escape(title)}</h1>"] + [f"<p class='note'>{html.escape(t)}</p>" for t in intro]
    for s in sections:
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        parts += [f"<p>{html.escape(t)}</p>" for t in s.paragraphs]
        parts += [table_html(h, r, c) for c, h, r in s.tables]
        for p, cap in s.figures:
            if Path(p).is_file():
                parts.append(f"<figure><img src='{html.escape(rel(p))}' alt='{html.escape(cap)}'>"
                             f"<figcaption>{html.escape(cap)}</figcaption></figure>")
            else:
                parts.append(f"<p class='note'>(missing picture: {html.escape(str(p))})</p>")
        if s.links:
            parts.append("<ul>" + "".join(f"<li><a href='{html.escape(rel(h))}'>{html.escape(t)}</a></li>"
                                          for h, t in s.links) + "</ul>")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>\n")
    atomic_write_text(path, page)
    return path
