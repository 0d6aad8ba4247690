"""The web pages' server side: templates (Jinja2, autoescaped), the static files the pages load,
and the measured figures the landing page shows.

The figures are read at run time from the repository's docs (``docs/benchmarks.md``,
``docs/chaos.md``), never typed into a template: whatever the latest measured table says is what
the page says. A wheel installed without the docs shows where to find them instead.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import jinja2

WEB_DIR = Path(__file__).resolve().parent / "web"
DOCS_DIR = Path(__file__).resolve().parents[1] / "docs"
# Content types of the only files served, by suffix; every other name is a 404.
STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
# The pages load only same-origin scripts and styles: no inline script, no eval, no framing.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
# The columns of benchmarks.md's latest round table the landing page shows, with their caption.
FIGURE_COLUMNS = (
    ("ledger random / pgbench", "Ledger transfers per pgbench TPS (random accounts)"),
    ("ledger hot / random", "Hot account vs random accounts, ledger"),
    ("pipeline settled / pgbench", "Settled through queues and workers, per pgbench TPS"),
    ("lag p99 (ms)", "Settlement lag p99 at 60 % of capacity (ms)"),
    ("api accepted / pgbench", "Payments accepted by one API process, per pgbench TPS"),
)
_CHAOS = re.compile(r"\*\*(\d+) of (\d+) runs failed, in ([\d,]+) s\*\*")


@dataclass(frozen=True)
class Figure:
    label: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class Figures:
    source: str  # the heading of the section the table sits in
    rows: tuple[Figure, ...]
    chaos: str | None  # "0 of 45 runs failed, in 1,414 s"


def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(WEB_DIR / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        auto_reload=False,
    )


@functools.cache
def static_files() -> dict[str, tuple[bytes, str]]:
    """Every servable file (``js/x.js``, ``css/x.css``) with its content type, read once."""
    files = {}
    for path in sorted((WEB_DIR / "static").rglob("*")):
        kind = STATIC_TYPES.get(path.suffix)
        if path.is_file() and kind is not None:
            files[path.relative_to(WEB_DIR / "static").as_posix()] = (path.read_bytes(), kind)
    return files


def tables(markdown: str) -> list[tuple[str, list[str], list[list[str]]]]:
    """Every pipe table of a markdown text: the ``## `` heading above it, its header, its rows."""
    found: list[tuple[str, list[str], list[list[str]]]] = []
    heading, block = "", []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            block.append([cell.strip() for cell in line.strip().strip("|").split("|")])
            continue
        if len(block) >= 3 and set("".join(block[1])) <= set("-: "):
            found.append((heading, block[0], block[2:]))
        block = []
        if line.startswith("## "):
            heading = line[3:].strip()
    return found


def figures_from(benchmarks: str, chaos: str) -> Figures | None:
    """The last table of ``benchmarks`` that has every column of FIGURE_COLUMNS (the newest
    round of measurements), each column's values across its rows; None when there is none."""
    wanted = [column for column, _label in FIGURE_COLUMNS]
    chosen = [t for t in tables(benchmarks) if set(wanted) <= set(t[1])]
    if not chosen:
        return None
    heading, header, rows = chosen[-1]
    figures = tuple(
        Figure(label, tuple(row[header.index(column)] for row in rows
                            if len(row) == len(header)))
        for column, label in FIGURE_COLUMNS
    )  # fmt: skip
    match = _CHAOS.search(chaos)
    runs = f"{match[1]} of {match[2]} runs failed, in {match[3]} s" if match else None
    return Figures(heading, figures, runs)


@functools.cache
def figures(docs: Path = DOCS_DIR) -> Figures | None:
    """The landing page's figures, read once per process from the docs beside the code."""
    try:
        benchmarks = (docs / "benchmarks.md").read_text(encoding="utf-8")
    except OSError:
        return None
    try:
        chaos = (docs / "chaos.md").read_text(encoding="utf-8")
    except OSError:
        chaos = ""
    return figures_from(benchmarks, chaos)
