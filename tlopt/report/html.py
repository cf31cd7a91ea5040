"""The report's markup: one self-contained HTML page (styles inline, images as data URIs).

Every text that comes from a study (names, parameter values) is escaped here, so the page
shows it as text whatever it contains.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from typing import Any

CSS = """
body { font: 15px/1.45 system-ui, sans-serif; color: #222; margin: 0 auto; max-width: 1100px;
       padding: 0 1.2em 3em; }
h1 { margin-top: 1.2em; } h2 { border-bottom: 2px solid #ddd; margin-top: 2.2em; }
h3 { margin-top: 1.6em; }
nav ul { columns: 2; } figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #e4e4e4; }
figcaption { color: #555; font-size: 0.92em; }
p.missing { color: #8a5a00; background: #fff6e0; padding: 0.5em 0.8em; border-radius: 4px; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.93em; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.7em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f3f3f3; } pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; }
"""


def esc(value: Any) -> str:
    """A value as HTML text."""
    return html.escape(str(value), quote=True)


def image(name: str, png: bytes, caption: str) -> str:
    """A figure embedded as a data URI, with the name of the PNG written beside the page."""
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure id="fig-{esc(name)}"><img src="data:image/png;base64,{data}" '
        f'alt="{esc(caption)}" data-file="{esc(name)}.png">'
        f'<figcaption>{esc(caption)} (<a href="{esc(name)}.png">{esc(name)}.png</a>)'
        "</figcaption></figure>"
    )


def missing(reason: str) -> str:
    """The sentence shown in place of a figure that could not be drawn."""
    return f'<p class="missing">{esc(reason)}</p>'


def table(
    columns: Sequence[str], rows: Sequence[Sequence[Any]], row_ids: Sequence[str] = ()
) -> str:
    """A table whose first column names the row; numbers are right-aligned.

    ``row_ids`` become ``data-row`` attributes (for scripts and tests that read the page).
    """
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = []
    for i, row in enumerate(rows):
        cells = "".join(
            f'<td class="num">{esc(v)}</td>' if j and _numeric(v) else f"<td>{esc(v)}</td>"
            for j, v in enumerate(row)
        )
        rid = f' data-row="{esc(row_ids[i])}"' if i < len(row_ids) else ""
        body.append(f"<tr{rid}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def section(sid: str, title: str, body: str, level: int = 2) -> str:
    """A titled section with an anchor the table of contents links to."""
    return f'<section id="{esc(sid)}"><h{level}>{esc(title)}</h{level}>{body}</section>'


def page(title: str, intro: str, contents: Sequence[tuple[str, str]], body: str) -> str:
    """The whole page: title, an introduction, a table of contents, then the sections."""
    toc = "".join(f'<li><a href="#{esc(sid)}">{esc(t)}</a></li>' for sid, t in contents)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{esc(title)}</h1><p>{intro}</p><nav><ul>{toc}</ul></nav>{body}</body></html>\n"
    )


def _numeric(value: Any) -> bool:
    text = str(value).replace(",", "").rstrip(" %sminB")
    try:
        float(text)
    except ValueError:
        return False
    return True
