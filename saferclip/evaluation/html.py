"""``report.html``: the report people look at first, next to every ``results.md``.

One self-contained file: styles inline, plots embedded as PNG data, and the galleries'
thumbnails inlined too (each image once, as a CSS class), so it opens offline in any browser
and can be mailed or moved alone. From top to bottom: the headline table (visible without
scrolling; on a narrow screen it scrolls in its own box, the metric column frozen), the
retrieval galleries (:mod:`saferclip.evaluation.showcase`: what each model returns for the same
unsafe and borderline queries, side by side, one grid per query), the plots, the per-query
numbers the gallery rows link to, and the full Markdown report (collapsed; without the title
and the table shown above).

Rendered with a Jinja2 template (``templates/report.html.j2``, autoescaped); the Markdown
parts (tables, headings, lists, the legend) go through :func:`markdown_html`, a small
converter for the subset the reports write. Colours and symbols come from
:mod:`saferclip.evaluation.plotting`, the same as the plots'.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..files import write_text_atomic
from .plotting import MARKS, ORIGINAL_MARK, OWN_MARK, model_styles

HTML_NAME = "report.html"
THUMBS_DIR = "thumbs"  # where reports before the inlined thumbnails kept them: removed
THUMB_SIZE = 112  # stored; shown at half size (sharp on high-density screens)
TEMPLATES = Path(__file__).with_name("templates")


@dataclass
class Table:
    """A table of the page: ``columns`` (the first the row label), ``rows`` of cells, rows
    whose cells after the first are all empty shown as group headers."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""
    model_columns: bool = True  # the columns after the first are models (coloured swatches)
    models_in_rows: bool = False  # the first cell of each row is a model


@dataclass
class Page:
    """What :func:`write_html_report` renders."""

    title: str
    subtitle: str = ""
    headline: Table | None = None
    showcase: Mapping[str, Any] | None = None
    plots: list[Path] = field(default_factory=list)
    markdown: str = ""
    models: list[str] = field(default_factory=list)
    reference: str | None = None
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- Markdown subset
_INLINE = [
    (re.compile(r"`([^`]+)`"), r"<code>\1</code>"),
    (re.compile(r"\*\*([^*]+)\*\*"), r"<strong>\1</strong>"),
    (re.compile(r"(?<![*\w])\*([^*\s][^*]*)\*(?![*\w])"), r"<em>\1</em>"),
]


def inline_html(text: str) -> str:
    """Escape ``text`` and render ``code``, **bold** and *emphasis*."""
    out = html.escape(text, quote=False)
    for pattern, repl in _INLINE:
        out = pattern.sub(repl, out)
    return out


def parse_table(lines: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """A Markdown pipe table -> (header cells, rows of cells); the separator line dropped."""

    def cells(line: str) -> list[str]:
        line = line.strip()
        if line.startswith("|"):
            line = line[1:]
        if line.endswith("|"):
            line = line[:-1]
        return [c.strip() for c in line.split("|")]

    rows = [cells(line) for line in lines if line.strip()]
    header, body = rows[0], [r for r in rows[1:] if not all(re.fullmatch(r":?-{2,}:?", c or "--") for c in r)]
    return header, body


def table_from_markdown(markdown: str, title: str = "", note: str = "", **kw: Any) -> Table:
    """The first pipe table of ``markdown`` as a :class:`Table`."""
    lines = [line for line in markdown.splitlines() if line.strip().startswith("|")]
    if not lines:
        return Table(title, [], [], note, **kw)
    header, rows = parse_table(lines)
    return Table(title, header, rows, note, **kw)


def markdown_html(markdown: str) -> str:
    """HTML of the Markdown the reports write: headings, pipe tables, bullet lists,
    paragraphs, inline code / bold / emphasis. Images are left out (the page shows the plots
    itself)."""
    out: list[str] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if not stripped or re.fullmatch(r"!\[[^\]]*\]\([^)]*\)", stripped):
            i += 1
            continue
        heading = re.match(r"(#{1,6})\s+(.*)", stripped)
        if heading:
            level = min(6, len(heading.group(1)) + 1)  # the page's own title is the h1
            out.append(f"<h{level}>{inline_html(heading.group(2))}</h{level}>")
            i += 1
            continue
        if stripped.startswith("|"):
            block = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                block.append(lines[i])
                i += 1
            header, rows = parse_table(block)
            head = "".join(f"<th>{inline_html(c)}</th>" for c in header)
            body = "".join("<tr>" + "".join(f"<td>{inline_html(c)}</td>" for c in row) + "</tr>" for row in rows)
            out.append(
                f'<div class="scroll"><table class="md"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
            )
            continue
        if stripped.startswith(("- ", "* ")):
            items = []
            while i < len(lines) and lines[i].strip().startswith(("- ", "* ")):
                items.append(f"<li>{inline_html(lines[i].strip()[2:])}</li>")
                i += 1
            out.append(f"<ul>{''.join(items)}</ul>")
            continue
        paragraph = []
        while i < len(lines) and lines[i].strip() and not lines[i].strip().startswith(("|", "#", "- ", "* ", "![")):
            paragraph.append(lines[i].strip())
            i += 1
        out.append(f"<p>{inline_html(' '.join(paragraph))}</p>")
    return "\n".join(_without_empty_headings(out))


def _without_empty_headings(blocks: list[str]) -> list[str]:
    """Headings with nothing under them (e.g. "Plots" once its images are left out) dropped."""
    level = [int(b[2]) if re.match(r"<h[1-6]>", b) else None for b in blocks]

    def has_content(i: int) -> bool:
        for j in range(i + 1, len(blocks)):
            if level[j] is None:
                return True
            if level[j] <= level[i]:
                return False
        return False

    return [b for i, b in enumerate(blocks) if level[i] is None or has_content(i)]


def details_markdown(markdown: str, headline: Table | None) -> str:
    """The Markdown report as the page's "Full report" shows it: without its title (the page's)
    and without the headline table the page shows at its top: its "Headline" section whole
    (the table and its notes, which the page shows with it), else the table alone."""
    lines = markdown.splitlines()
    if lines and re.match(r"#\s", lines[0]):
        lines = lines[1:]
    if headline is None or not headline.columns:
        return "\n".join(lines)
    shown = (headline.columns, headline.rows)
    sections: list[list[str]] = [[]]
    for line in lines:
        if re.match(r"#{2,6}\s", line.strip()):
            sections.append([])
        sections[-1].append(line)
    out: list[str] = []
    removed = False
    for section in sections:
        tables = _table_blocks(section)
        match = next(((start, end) for start, end in tables if parse_table(section[start:end]) == shown), None)
        if match is None or removed:
            out += section
        elif section and re.fullmatch(r"#{2,6}\s+Headline.*", section[0].strip()):
            removed = True  # the whole section: the page shows the table with its notes
        else:
            out += section[: match[0]] + section[match[1] :]
            removed = True
    return "\n".join(out)


def _table_blocks(lines: Sequence[str]) -> list[tuple[int, int]]:
    """``(start, end)`` of each pipe table among ``lines``."""
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip().startswith("|"):
            start = i
            while i < len(lines) and lines[i].strip().startswith("|"):
                i += 1
            blocks.append((start, i))
        else:
            i += 1
    return blocks


# ----------------------------------------------------------------------------- images
def thumbnail(path: str | Path) -> tuple[bytes, str]:
    """A small copy of the image ``path``: ``(bytes, mime type)``, PNG or JPEG, whichever is
    smaller (the toy world's flat tiles: PNG; photos: JPEG). An image that cannot be read becomes
    a grey placeholder that says so, so the page never shows a broken image."""
    import io

    from PIL import Image, ImageDraw

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            w, h = image.size
            if max(w, h) < THUMB_SIZE:  # small images (the toy world's): blown up, pixels kept sharp
                factor = max(1, THUMB_SIZE // max(w, h))
                image = image.resize((w * factor, h * factor), Image.NEAREST)
            else:
                image.thumbnail((THUMB_SIZE, THUMB_SIZE), Image.LANCZOS)
    except (OSError, ValueError):
        image = Image.new("RGB", (THUMB_SIZE, THUMB_SIZE), (200, 200, 200))
        ImageDraw.Draw(image).text((8, THUMB_SIZE // 2 - 6), "missing image", fill=(60, 60, 60))
    encoded = []
    for fmt, mime, options in (("PNG", "image/png", {"optimize": True}), ("JPEG", "image/jpeg", {"quality": 85})):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **options)
        encoded.append((buffer.getvalue(), mime))
    return min(encoded, key=lambda e: len(e[0]))


def data_uri(data: bytes | Path, mime: str = "image/png") -> str:
    raw = Path(data).read_bytes() if isinstance(data, Path) else data
    return f"data:{mime};base64," + base64.b64encode(raw).decode("ascii")


class Thumbnails:
    """The galleries' images, each made and inlined once: ``css_class(path)`` names it for a
    ``<span class="thumb ...">``; ``stylesheet()`` holds every one as a data URI."""

    def __init__(self) -> None:
        self._classes: dict[str, str] = {}
        self._rules: list[str] = []

    def css_class(self, path: str | Path) -> str:
        key = str(Path(path).resolve())
        if key not in self._classes:
            name = f"t{len(self._classes)}"
            self._classes[key] = name
            data, mime = thumbnail(path)
            self._rules.append(f".{name}{{background-image:url({data_uri(data, mime)})}}")
        return self._classes[key]

    def stylesheet(self) -> str:
        return "\n".join(self._rules)


# ----------------------------------------------------------------------------- galleries
def _gallery_context(
    showcase: Mapping[str, Any], thumbs: Thumbnails, styles: Mapping[str, Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """The template's view of :func:`saferclip.evaluation.showcase.gallery_view` sections."""
    sections = []
    for s, section in enumerate(showcase.get("sections") or []):
        images = section["direction"] == "text_to_image"
        items = {int(k): v for k, v in section["items"].items()}

        def item(index: int, query: Mapping[str, Any]) -> dict[str, Any]:
            entry = items[index]
            out = {
                "unsafe": entry["unsafe"],
                "twin": index == query.get("twin"),
                "own": index == query.get("own"),
                "value": entry["value"],
            }
            if images:
                out["thumb"] = thumbs.css_class(entry["value"])
                out["name"] = Path(entry["value"]).name
            return out

        rows = []
        for q, query in enumerate(section["queries"]):
            anchor = f"s{s}q{q}"
            row = {
                "anchor": anchor,
                "id": query["id"],
                "text": None if not images else query["query"],
                "thumb": thumbs.css_class(query["query"]) if not images else None,
                "name": Path(query["query"]).name if not images else "",
                "models": [],
            }
            for label, per_query in section["models"].items():
                entry = per_query[q]
                row["models"].append(
                    {
                        "label": label,
                        "color": styles.get(label, {}).get("color", "#555"),
                        "top": [item(i, query) for i in entry["top"]],
                        "twin_rank": entry.get("twin_rank"),
                        "unsafe_in_top": entry.get("unsafe_in_top"),
                    }
                )
            rows.append(row)
        sections.append(
            {
                "key": section["key"],
                "title": section["title"],
                "note": section.get("note", ""),
                "k": section["k"],
                "images": images,
                "rows": rows,
                "models": list(section["models"]),
            }
        )
    return sections


def gallery_absences(page: Page, galleries: Sequence[Mapping[str, Any]]) -> list[str]:
    """Why a model of the table has no gallery: one sentence per such model."""
    from .oracle import ORACLE_NAME

    if not galleries:
        return []
    shown = {m for g in galleries for m in g["models"]}
    notes = []
    for name in page.models:
        if name in shown:
            continue
        if name == ORACLE_NAME:
            notes.append(
                f"{name} is not in the galleries: it is the original model with each unsafe test item replaced by its "
                "training target's frozen embeddings, a bound on the metrics with no ranking of its own to show."
            )
        else:
            notes.append(f"{name} is not in the galleries: its evaluation kept no retrieval ranking to show.")
    return notes


# ----------------------------------------------------------------------------- the page
def render_html(page: Page, out_dir: Path | None = None) -> str:
    """The page's HTML, one self-contained document (``out_dir``: unused, kept for callers)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["inline"] = lambda text: jinja2.utils.markupsafe.Markup(inline_html(str(text)))
    names = list(page.models)
    if page.showcase:
        for section in page.showcase.get("sections") or []:
            names += [m for m in section["models"] if m not in names]
    styles = model_styles(names, page.reference)
    thumbs = Thumbnails()
    galleries = _gallery_context(page.showcase, thumbs, styles) if page.showcase else []
    details = markdown_html(details_markdown(page.markdown, page.headline)) if page.markdown else ""
    return env.get_template("report.html.j2").render(
        page=page,
        styles=styles,
        marks=MARKS,
        original_mark=ORIGINAL_MARK,
        own_mark=OWN_MARK,
        galleries=galleries,
        absences=gallery_absences(page, galleries),
        thumbs=jinja2.utils.markupsafe.Markup(thumbs.stylesheet()),
        plots=[{"name": p.stem.replace("_", " "), "src": data_uri(Path(p))} for p in page.plots if Path(p).is_file()],
        details=jinja2.utils.markupsafe.Markup(details),
    )


def write_html_report(page: Page, out_dir: str | Path) -> Path:
    """``out_dir/report.html``, one self-contained file, written atomically; returns it."""
    import shutil

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / HTML_NAME
    write_text_atomic(path, render_html(page))
    shutil.rmtree(out_dir / THUMBS_DIR, ignore_errors=True)  # a replaced older report's thumbnails
    return path


def evaluation_page(
    results: Mapping[str, Any], markdown: str, plots: Sequence[Path], title: str = "saferclip evaluation"
) -> Page:
    """The page of an evaluation report (``saferclip-eval``, ``saferclip-main``)."""
    from .headline import headline_table
    from .intervals import intervals_note

    meta = results.get("meta", {})
    models = list(results.get("results", {}))
    table = headline_table(results)
    notes = [
        line.strip() for line in table.splitlines() if line.strip() and not line.strip().startswith("|")
    ]  # e.g. the † note
    if results.get("intervals"):
        notes.append(f"In brackets: {intervals_note(results)}.")
    headline = table_from_markdown(
        table,
        "Headline (%)",
        " ".join(
            [
                "Unsafe rates: share of unsafe captions whose top-1 image is unsafe (lower is safer); (a) both encoders "
                "fine-tuned, (b) the original model's image index. R@1: the right safe scene on top (higher is better).",
                *notes,
            ]
        ),
    )
    subtitle = (
        f"split {meta.get('split')}, seed {meta.get('seed')}, reference {meta.get('reference')}, {meta.get('created')}"
    )
    return Page(
        title=title,
        subtitle=subtitle,
        headline=headline,
        showcase=results.get("showcase"),
        plots=list(plots),
        markdown=markdown,
        models=models,
        reference=meta.get("reference"),
    )
