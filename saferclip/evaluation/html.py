"""``report.html``: the report people look at first, next to every ``results.md``.

One self-contained HTML file (styles inline, plots embedded as PNG data) plus a ``thumbs/``
folder of small copies of the images the galleries show, so that it opens offline in any
browser. From top to bottom: the headline table (visible without scrolling), the retrieval
galleries (:mod:`saferclip.evaluation.showcase`: what each model returns for the same unsafe
and borderline queries, side by side), the plots, the per-query numbers the gallery rows link
to, and the full Markdown report.

Rendered with a Jinja2 template (``templates/report.html.j2``, autoescaped); the Markdown
parts (tables, headings, lists, the legend) go through :func:`markdown_html`, a small
converter for the subset the reports write.
"""

from __future__ import annotations

import base64
import hashlib
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..files import write_text_atomic
from .plotting import model_styles

HTML_NAME, THUMBS_DIR = "report.html", "thumbs"
THUMB_SIZE = 128  # stored; shown at half size (sharp on high-density screens)
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
            out.append(f'<div class="scroll"><table class="md"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>')
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
    return "\n".join(out)


# ----------------------------------------------------------------------------- images
def thumbnail(path: str | Path, out_dir: Path) -> str:
    """A small PNG copy of ``path`` under ``out_dir/thumbs`` (made once per file); returns its
    path relative to ``out_dir``. A file that cannot be read becomes a grey placeholder that
    says so, so the page never shows a broken image."""
    from PIL import Image, ImageDraw

    key = hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:16]
    relative = f"{THUMBS_DIR}/{key}.png"
    target = out_dir / relative
    if target.is_file():
        return relative
    target.parent.mkdir(parents=True, exist_ok=True)
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
    tmp = target.with_suffix(".tmp.png")
    image.save(tmp, format="PNG")
    tmp.replace(target)
    return relative


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


# ----------------------------------------------------------------------------- galleries
def _gallery_context(showcase: Mapping[str, Any], out_dir: Path, styles: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
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
                out["src"] = thumbnail(entry["value"], out_dir)
                out["name"] = Path(entry["value"]).name
            return out

        rows = []
        for q, query in enumerate(section["queries"]):
            anchor = f"s{s}q{q}"
            row = {
                "anchor": anchor,
                "id": query["id"],
                "text": None if not images else query["query"],
                "src": thumbnail(query["query"], out_dir) if not images else None,
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


# ----------------------------------------------------------------------------- the page
def render_html(page: Page, out_dir: Path) -> str:
    """The page's HTML (thumbnails written under ``out_dir/thumbs`` on the way)."""
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
    return env.get_template("report.html.j2").render(
        page=page,
        styles=styles,
        galleries=_gallery_context(page.showcase, out_dir, styles) if page.showcase else [],
        plots=[{"name": p.stem.replace("_", " "), "src": data_uri(p)} for p in page.plots if Path(p).is_file()],
        details=jinja2.utils.markupsafe.Markup(markdown_html(page.markdown)) if page.markdown else "",
    )


def write_html_report(page: Page, out_dir: str | Path) -> Path:
    """``out_dir/report.html`` (and ``out_dir/thumbs/``), written atomically; returns the file."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    import shutil

    shutil.rmtree(out_dir / THUMBS_DIR, ignore_errors=True)  # a replaced report's thumbnails
    path = out_dir / HTML_NAME
    write_text_atomic(path, render_html(page, out_dir))
    return path


def evaluation_page(results: Mapping[str, Any], markdown: str, plots: Sequence[Path], title: str = "saferclip evaluation") -> Page:
    """The page of an evaluation report (``saferclip-eval``, ``saferclip-main``)."""
    from .headline import headline_table
    from .intervals import intervals_note

    meta = results.get("meta", {})
    models = list(results.get("results", {}))
    headline = table_from_markdown(
        headline_table(results),
        "Headline (%)",
        "Unsafe rates: share of unsafe captions whose top-1 image is unsafe (lower is safer); (a) both encoders "
        "fine-tuned, (b) the original model's image index. R@1: the right safe scene on top (higher is better)."
        + (f" In brackets: {intervals_note(results)}." if results.get("intervals") else ""),
    )
    subtitle = f"split {meta.get('split')}, seed {meta.get('seed')}, reference {meta.get('reference')}, {meta.get('created')}"
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
