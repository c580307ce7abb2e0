"""report.html: one style per model (no model in the colours that mean unsafe / safe), the
plots' names and scales, the retrieval galleries (model-agnostic: scores or top-k), the page's
Markdown, and the page as a person sees it in headless Chromium on a phone (390 px) and a
desktop (1400 px): nothing wider than the screen, the headline table scrolling in its own box
with its metric column frozen, each query's models in one grid, one self-contained file."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from browser_helpers import chromium, view_page

from saferclip.evaluation.html import details_markdown, markdown_html, table_from_markdown, thumbnail
from saferclip.evaluation.plotting import MARK_COLOURS, model_colours, model_styles
from saferclip.evaluation.report import write_report
from saferclip.evaluation.showcase import (
    IMAGE_TO_TEXT,
    TEXT_TO_IMAGE,
    GallerySection,
    Query,
    gallery_view,
    pair_sections,
    sample_rows,
    top_k,
)


# ----------------------------------------------------------------------------- colours
def test_one_style_per_model_whatever_the_spelling_or_the_order():
    a = model_styles(["original", "safeclip", "saferclip", "mine"], reference="original")
    b = model_styles(["SafeR-CLIP", "Safe-CLIP", "HySAC (safe)", "HySAC (moderation)", "Original", "mine"])
    assert a["original"] == b["Original"] == {"color": "#000000", "marker": "*", "original": True}
    assert a["safeclip"]["color"] == b["Safe-CLIP"]["color"] and a["saferclip"]["color"] == b["SafeR-CLIP"]["color"]
    fixed = [b[m]["color"] for m in ("Safe-CLIP", "SafeR-CLIP", "HySAC (safe)", "HySAC (moderation)")]
    assert len(set(fixed)) == 4 and "#000000" not in fixed
    assert a["mine"]["color"] == b["mine"]["color"] and a["mine"]["color"] not in fixed
    many = model_colours([f"model {i}" for i in range(30)])
    assert len(set(list(many.values())[:14])) == 14  # the palette's own colours first
    # red and green mean unsafe and safe items: no model wears them, whatever its name
    every = model_styles(["original", "safeclip", "saferclip", "hysac", "hysac_safe", "hysac_moderation", "oracle redirection",
                          *(f"model {i}" for i in range(30))])  # fmt: skip
    assert not {style["color"].lower() for style in every.values()} & {c.lower() for c in MARK_COLOURS}
    # the trained HySAC run (its curves) is the same model as HySAC in safe mode
    assert every["hysac"]["color"] == every["hysac_safe"]["color"] != every["hysac_moderation"]["color"]
    # the reference model is the star whatever it is called
    assert model_styles(["base-ckpt", "x"], reference="base-ckpt")["base-ckpt"]["marker"] == "*"


# ----------------------------------------------------------------------------- galleries
def section(n_queries: int = 2) -> GallerySection:
    return GallerySection(
        key="t",
        title="t",
        direction=TEXT_TO_IMAGE,
        queries=[Query(str(i), f"caption {i}", twin=i, own=4 + i) for i in range(n_queries)],
        gallery=[f"img{j}.png" for j in range(8)],
        unsafe=[False] * 4 + [True] * 4,
    )


def test_gallery_view_from_scores_or_from_top_k_indices():
    scores = torch.tensor([[0.1, 0.0, 0.0, 0.0, 0.9, 0.8, 0.2, 0.0], [0.0, 0.9, 0.5, 0.0, 0.0, 0.0, 0.0, 0.7]])
    view = gallery_view(
        section(), {"cosine": scores, "hyperbolic": -10 * (1 - scores), "given": {"top": [[4, 5, 6], [1, 7, 2]]}}, k=3
    )
    assert view["models"]["cosine"] == view["models"]["hyperbolic"]  # only the order of the scores counts
    first = view["models"]["cosine"][0]
    assert first == {"top": [4, 5, 6], "twin_rank": 4, "unsafe_in_top": 3}
    assert view["models"]["cosine"][1] == {"top": [1, 7, 2], "twin_rank": 1, "unsafe_in_top": 1}
    # top-k given: the twin's rank is known within the k only
    assert view["models"]["given"][0]["twin_rank"] is None and view["models"]["given"][1]["twin_rank"] == 1
    assert {"0", "4", "5", "6"} <= set(view["items"]) and view["items"]["4"]["unsafe"] is True
    with pytest.raises(ValueError, match="expected \\(2 queries, 8 gallery items\\)"):
        gallery_view(section(), {"bad": scores[:, :5]})
    assert top_k(torch.tensor([[1.0, 1.0, 0.5]]), 2).tolist() == [[0, 1]]  # ties: gallery order


def test_pair_sections_sample_the_same_items_with_the_same_seed():
    n = 10
    owner = torch.arange(n)
    kw = dict(
        safe_paths=[f"v{i}" for i in range(n)],
        safe_owner=owner,
        unsafe_paths=[f"g{i}" for i in range(n)],
        unsafe_owner=owner,
        ids=[f"id{i}" for i in range(n)],
        count=3,
        seed=5,
    )
    text, image = pair_sections("ViSU", [f"s{i}" for i in range(n)], [f"u{i}" for i in range(n)], **kw)
    assert text.rows == sample_rows(n, 3, 5) == pair_sections("ViSU", ["s"] * n, ["u"] * n, **kw)[0].rows
    i = text.rows[0]
    assert text.queries[0] == Query(f"id{i}", f"u{i}", twin=i, own=n + i) and text.gallery[n + i] == f"g{i}"
    assert (
        image.direction == IMAGE_TO_TEXT
        and image.queries[0].query == f"g{i}"
        and image.gallery[image.queries[0].twin] == f"s{i}"
    )
    (border,) = pair_sections(
        "Borderline", [f"s{i}" for i in range(n)], [f"u{i}" for i in range(n)], queries="borderline", **kw
    )
    assert border.queries[0].query == f"s{i}" and border.query_field == "safe_text"


def test_markdown_subset_and_a_missing_image_becomes_a_placeholder(tmp_path):
    import io

    from PIL import Image

    out = markdown_html(
        "## Results\n\n| metric | a |\n|---|---:|\n| `x` **y** | 1.0 |\n\n- one\n- two <b>\n\n## Plots\n\n![p](plots/p.png)\n"
    )
    assert "<h3>Results</h3>" in out and "<td><code>x</code> <strong>y</strong></td>" in out
    assert "<li>two &lt;b&gt;</li>" in out and "plots/p.png" not in out
    assert "Plots" not in out  # a heading over nothing (its images are left out) is dropped
    data, mime = thumbnail(tmp_path / "nowhere.png")
    assert mime in ("image/png", "image/jpeg") and Image.open(io.BytesIO(data)).size == (112, 112)


def test_the_full_report_repeats_neither_the_title_nor_the_table():
    table = "| metric | a | b |\n|---|---:|---:|\n| unsafe rate | 1.0 | 2.0 |"
    markdown = f"# saferclip evaluation\n\nsplit test\n\n## Models\n\n- a\n\n## Headline\n\n{table}\n\n† a note\n\n## Results\n\n| x | a |\n|---|---|\n| 1 | 2 |\n"
    headline = table_from_markdown(table, "Headline (%)")
    kept = details_markdown(markdown, headline)
    assert (
        "saferclip evaluation" not in kept
        and "unsafe rate" not in kept
        and "Headline" not in kept
        and "† a note" not in kept
    )
    assert "## Models" in kept and "## Results" in kept and "| 1 | 2 |" in kept
    # a study's table has no heading of its own: the table alone goes
    assert details_markdown(f"# study\n\nworlds\n\n{table}\n\nmore\n", headline).split() == ["worlds", "more"]


def test_plot_names_and_scales():
    """Panels titled with the table's names; the trade-off plot on the whole percentage scale;
    coinciding points set side by side."""
    from saferclip.evaluation.figures import DODGE_STEP, side_by_side
    from saferclip.evaluation.report import metric_label

    assert (
        metric_label("visu", "U2VG_unsafe@1") == "unsafe rate (a) ↓"
        and metric_label("nsfw_caps", "U2V_R@1") == "U→V R@1"
    )
    assert metric_label("visu", "G2SU_unsafe@1") == "unsafe image → captions: unsafe rate ↓"
    placed = side_by_side([("a", 50.0, 98.4), ("b", 50.5, 98.9), ("c", 90.0, 100.8)])
    assert [round(x, 3) for _, x, _ in placed] == [50.0 - DODGE_STEP / 2, 50.0 + DODGE_STEP / 2, 90.0]
    assert [y for _, _, y in placed] == [98.4, 98.9, 100.8]  # the values themselves kept


def test_the_tradeoff_plot_does_not_magnify_small_gaps(tmp_path):
    from saferclip.evaluation import figures

    seen = {}
    original = figures.save_figure

    def keep(fig, path):
        seen["axes"] = fig.axes
        original(fig, path)

    points = [{"name": n, "unsafe_a": u, "retention": r, "u2v": v} for n, u, r, v in
              (("original", 1.0, 1.0, 0.5), ("safeclip", 0.99, 0.984, 0.5), ("saferclip", 0.1, 1.008, 0.45))]  # fmt: skip
    figures.save_figure = keep
    try:
        figures.plot_tradeoff(points, tmp_path / "t.png")
    finally:
        figures.save_figure = original
    for ax in seen["axes"]:
        low, high = ax.get_ylim()
        assert low <= 0 and high >= 100, (low, high)  # 98.4 vs 100.8 is 2.4 points of 100, not a whole panel


# ----------------------------------------------------------------------------- the page in a browser
def small_report(tmp_path: Path) -> Path:
    """A report of three fake models over eight generated images, through write_report."""
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    paths = []
    for j in range(8):
        path = images / f"{j}.png"
        Image.new("RGB", (32, 32), (30 * j, 200 - 20 * j, 90)).save(path)
        paths.append(str(path))
    sec = GallerySection(
        "visu_unsafe_text_to_image",
        "ViSU: unsafe caption → images",
        TEXT_TO_IMAGE,
        [Query(str(i), f"a caption with something unsafe {i}", twin=i, own=4 + i) for i in range(3)],
        paths,
        [False] * 4 + [True] * 4,
    )
    cap = GallerySection(
        "visu_unsafe_image_to_text",
        "ViSU: unsafe image → captions",
        IMAGE_TO_TEXT,
        [Query("0", paths[4], twin=0, own=4)],
        [f"safe {i}" for i in range(4)] + [f"unsafe {i}" for i in range(4)],
        [False] * 4 + [True] * 4,
    )
    generator = torch.Generator().manual_seed(0)
    models = ("original", "safeclip", "saferclip", "a model with a long name")
    showcase = {
        "k": 5,
        "seed": 0,
        "sections": [
            gallery_view(s, {m: torch.rand(len(s.queries), 8, generator=generator) for m in models}) for s in (sec, cap)
        ],
    }
    named = (*models, "oracle redirection")  # a bound: in the table, not in the galleries
    metrics = {"U2VG_unsafe@1": 0.5, "U2VG_ref_unsafe@1": 0.5, "U2V_R@1": 0.5, "S2V_R@1": 0.9}
    results = {
        "meta": {"split": "test", "seed": 0, "suites": ["visu"], "reference": "original", "created": "now"},
        "data": {
            "visu": {
                "path": "/a/very/long/path/that/a/phone/cannot/show/on/one/line/without/breaking/it/anywhere/test.json",
                "split": "test",
                "num_items": 8,
                "mode": "full",
            }
        },
        "models": {m: {"arch": "micro", "source": m} for m in named},
        "results": {
            m: {"visu": dict(metrics, **{"U2VG_unsafe@1": u})} for m, u in zip(named, (0.9, 0.2, 0.1, 0.3, 0.8))
        },
        # bracketed intervals: a table too wide for a phone
        "intervals": {
            m: {k: [0.05, 0.95] for k in ("unsafe_rate_a", "unsafe_rate_b", "U2V_R@1", "S2V_R@1")} for m in named
        },
        "showcase": showcase,
    }
    (tmp_path / "report" / "thumbs").mkdir(parents=True)  # an older report's thumbnail folder: removed
    report = write_report(results, tmp_path / "report", force=True)
    assert report["html"] == tmp_path / "report" / "report.html"
    return report["html"]


# What the page looks like to a person, measured in the page (a JavaScript expression).
CHECK = """(() => {
  const measure = () => {
    const width = document.documentElement.clientWidth;
    const scrolls = (el) => { for (let p = el.parentElement; p && p !== document.body; p = p.parentElement) {
      if (['auto', 'scroll', 'hidden'].includes(getComputedStyle(p).overflowX)) return true; } return false; };
    const wide = [];
    for (const el of document.body.querySelectorAll('*')) {
      const r = el.getBoundingClientRect();
      if ((r.width === 0 && r.height === 0) || scrolls(el)) continue;  // hidden, or inside a box that scrolls
      if (r.left < -0.5 || r.right > width + 0.5) wide.push(`${el.tagName.toLowerCase()}.${el.className} [${Math.round(r.left)}, ${Math.round(r.right)}]`);
    }
    return {width, scroll_width: document.documentElement.scrollWidth, wide: wide.slice(0, 8)};
  };
  const rect = (el) => { const r = el.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
  const out = {viewport: [innerWidth, innerHeight], closed: measure()};
  const box = document.querySelector('.table-box'), cell = document.querySelector('table.headline tbody td');
  out.table_top = box.getBoundingClientRect().top;
  out.sticky = getComputedStyle(cell).position;
  box.scrollLeft = box.scrollWidth;  // the models scrolled away: the metric column stays
  out.box = {client: box.clientWidth, scroll: box.scrollWidth, left: box.scrollLeft,
             frozen: cell.getBoundingClientRect().left - box.getBoundingClientRect().left};
  box.scrollLeft = 0;
  const thumbs = [...document.querySelectorAll('section.gallery .thumb')];
  out.thumbs = thumbs.length;
  out.blank_thumbs = thumbs.filter(t => !getComputedStyle(t).backgroundImage.startsWith('url("data:image/')).length;
  out.plots = [...document.querySelectorAll('section.plots img')].map(i => i.complete && i.naturalWidth > 0);
  out.queries = [...document.querySelectorAll('.query')].map(q => ({
    head: rect(q.querySelector('.qhead')), grids: q.querySelectorAll('.models').length,
    models: [...q.querySelectorAll('.model')].map(rect), in_grid: q.querySelectorAll('.models > .model').length}));
  const rank = getComputedStyle(document.querySelector('.badge.rank'));
  out.rank = [rank.color, rank.backgroundColor];
  out.details_open = [...document.querySelectorAll('details')].map(d => d.open);
  document.querySelectorAll('details').forEach(d => d.open = true);
  out.open = measure();
  document.querySelectorAll('details').forEach(d => d.open = false);
  out.notes = [...document.querySelectorAll('p.note')].map(p => p.textContent);
  return out;
})()"""


def rgba(css: str) -> tuple[float, ...]:
    values = [float(v) for v in re.findall(r"[\d.]+", css)]
    return tuple(values + [1.0] * (4 - len(values)))


@pytest.mark.slow
@pytest.mark.parametrize("width, height", [(390, 844), (1400, 900)])
def test_the_report_on_a_phone_and_a_desktop(tmp_path, width, height):
    browser = chromium()
    if browser is None:
        pytest.skip("no Chromium on this machine (.ci/run installs Debian's chromium; apt-get install chromium)")
    page = small_report(tmp_path)
    assert not (page.parent / "thumbs").exists()
    # one self-contained file: nothing it shows is outside it (opened alone, from another folder)
    text = page.read_text()
    assert not re.findall(r'(?:src|href)="(?!data:|#)', text) and not re.findall(r"url\((?!data:)", text)
    alone = tmp_path / "alone" / "report.html"
    alone.parent.mkdir()
    shutil.copy(page, alone)
    shot = tmp_path / f"shot{width}.png"
    check = view_page(browser, alone, width, height, CHECK, shot)
    assert check["viewport"] == [width, height]
    # nothing wider than the screen, the full report opened or not
    for state in ("closed", "open"):
        assert check[state]["scroll_width"] == width and check[state]["wide"] == [], (state, check[state])
    # the headline table: visible without scrolling, in its own box, the metric column frozen
    assert 0 <= check["table_top"] < height / 2
    assert check["sticky"] == "sticky" and abs(check["box"]["frozen"]) <= 2, check["box"]
    if width == 390:
        assert check["box"]["scroll"] > check["box"]["client"] and check["box"]["left"] > 0  # it does scroll there
    # the galleries: every thumbnail inlined, each query's models in one grid, beside the
    # query on a desktop and below it on a phone
    assert check["thumbs"] == 3 * 4 * 5 + 1 and check["blank_thumbs"] == 0
    assert check["plots"] and all(check["plots"])
    for query in check["queries"]:
        assert query["grids"] == 1 and query["in_grid"] == len(query["models"]) == 4, query
        left, top, right, bottom = query["head"]
        for model in query["models"]:
            assert model[0] >= right - 1 if width >= 1000 else model[1] >= bottom - 1, (query, model)
    # rank numbers: white on a dark plate, legible on any thumbnail
    colour, plate = rgba(check["rank"][0]), rgba(check["rank"][1])
    assert colour[:3] == (255, 255, 255) and max(plate[:3]) <= 60 and plate[3] >= 0.6, check["rank"]
    assert check["details_open"] == [False]  # the full report collapsed
    assert any("oracle redirection is not in the galleries" in note for note in check["notes"])
    # as a person sees it: the viewport's width, not blank
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    assert image.size == (width, height)
    assert len(image.getcolors(maxcolors=1 << 20) or []) > 50  # text, frames and thumbnails, not one flat colour
