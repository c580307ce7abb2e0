"""report.html: one style per model, the retrieval galleries (model-agnostic: scores or top-k),
the page's Markdown, and the page as a person sees it in headless Chromium (not blank, every
gallery image loads, the table above the fold at 1280x800)."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from saferclip.evaluation.html import markdown_html, thumbnail
from saferclip.evaluation.plotting import model_colours, model_styles
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
    view = gallery_view(section(), {"cosine": scores, "hyperbolic": -10 * (1 - scores), "given": {"top": [[4, 5, 6], [1, 7, 2]]}}, k=3)
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
    kw = dict(safe_paths=[f"v{i}" for i in range(n)], safe_owner=owner, unsafe_paths=[f"g{i}" for i in range(n)], unsafe_owner=owner,
              ids=[f"id{i}" for i in range(n)], count=3, seed=5)
    text, image = pair_sections("ViSU", [f"s{i}" for i in range(n)], [f"u{i}" for i in range(n)], **kw)
    assert text.rows == sample_rows(n, 3, 5) == pair_sections("ViSU", ["s"] * n, ["u"] * n, **kw)[0].rows
    i = text.rows[0]
    assert text.queries[0] == Query(f"id{i}", f"u{i}", twin=i, own=n + i) and text.gallery[n + i] == f"g{i}"
    assert image.direction == IMAGE_TO_TEXT and image.queries[0].query == f"g{i}" and image.gallery[image.queries[0].twin] == f"s{i}"
    (border,) = pair_sections("Borderline", [f"s{i}" for i in range(n)], [f"u{i}" for i in range(n)], queries="borderline", **kw)
    assert border.queries[0].query == f"s{i}" and border.query_field == "safe_text"


def test_markdown_subset_and_a_missing_image_becomes_a_placeholder(tmp_path):
    out = markdown_html("## Results\n\n| metric | a |\n|---|---:|\n| `x` **y** | 1.0 |\n\n- one\n- two <b>\n\n![p](plots/p.png)\n")
    assert "<h3>Results</h3>" in out and "<td><code>x</code> <strong>y</strong></td>" in out
    assert "<li>two &lt;b&gt;</li>" in out and "plots/p.png" not in out
    relative = thumbnail(tmp_path / "nowhere.png", tmp_path)
    from PIL import Image

    assert Image.open(tmp_path / relative).size == (128, 128)


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
    sec = GallerySection("visu_unsafe_text_to_image", "ViSU: unsafe caption → images", TEXT_TO_IMAGE,
                         [Query(str(i), f"a caption with something unsafe {i}", twin=i, own=4 + i) for i in range(3)], paths,
                         [False] * 4 + [True] * 4)
    cap = GallerySection("visu_unsafe_image_to_text", "ViSU: unsafe image → captions", IMAGE_TO_TEXT,
                         [Query("0", paths[4], twin=0, own=4)], [f"safe {i}" for i in range(4)] + [f"unsafe {i}" for i in range(4)],
                         [False] * 4 + [True] * 4)
    generator = torch.Generator().manual_seed(0)
    models = ("original", "safeclip", "saferclip")
    showcase = {"k": 5, "seed": 0, "sections": [
        gallery_view(s, {m: torch.rand(len(s.queries), 8, generator=generator) for m in models}) for s in (sec, cap)
    ]}
    results = {
        "meta": {"split": "test", "seed": 0, "suites": ["visu"], "reference": "original", "created": "now"},
        "data": {},
        "models": {m: {"arch": "micro", "source": m} for m in models},
        "results": {m: {"visu": {"U2VG_unsafe@1": u, "U2VG_ref_unsafe@1": u, "U2V_R@1": 0.5, "S2V_R@1": 0.9}}
                    for m, u in zip(models, (0.9, 0.2, 0.1))},
        "showcase": showcase,
    }
    report = write_report(results, tmp_path / "report")
    assert report["html"] == tmp_path / "report" / "report.html"
    return report["html"]


CHECK_SCRIPT = """<script>
window.addEventListener('load', () => {
  const ok = (img) => img.complete && img.naturalWidth > 0;
  const gallery = [...document.querySelectorAll('section.gallery img')];
  const plots = [...document.querySelectorAll('section.plots img')];
  const table = document.querySelector('table.headline').getBoundingClientRect();
  const out = {gallery: gallery.length, broken: gallery.filter(i => !ok(i)).map(i => i.getAttribute('src')),
               plots: plots.length, broken_plots: plots.filter(i => !ok(i)).length,
               table: [table.top, table.bottom, table.width], viewport: [innerWidth, innerHeight],
               text: document.body.innerText.trim().length};
  const pre = document.createElement('pre');
  pre.id = 'saferclip-check';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def headless(browser: str, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,800", "--virtual-time-budget=10000"]
    return subprocess.run([browser, *flags, *args], capture_output=True, text=True, timeout=60)


def page_check(browser: str, probe: Path) -> dict:
    dom = headless(browser, "--dump-dom", probe.as_uri())
    found = re.search(r'<pre id="saferclip-check">(.*?)</pre>', dom.stdout, re.S)
    assert found, f"the page's check did not run: {dom.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


@pytest.mark.slow
def test_the_report_in_a_real_browser(tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("no Chromium on this machine (.ci/run installs Debian's chromium; apt-get install chromium)")
    page = small_report(tmp_path)
    # the page's own check, next to it so that the relative thumbnails resolve
    probe = page.with_name("check.html")
    probe.write_text(page.read_text().replace("</body>", CHECK_SCRIPT + "\n</body>"))
    check = page_check(browser, probe)
    width, height = check["viewport"]  # headless Chromium keeps some of the 800 px for its window
    assert width == 1280 and 680 <= height <= 800
    assert check["text"] > 500  # not blank
    assert check["gallery"] == 3 * 3 * 5 + 1 and check["broken"] == []  # 3 queries x 3 models x top 5, 1 query image
    assert check["plots"] >= 2 and check["broken_plots"] == 0
    top, bottom, table_width = check["table"]
    assert 0 <= top and bottom <= height and table_width > 200, f"the headline table is not above the fold: {check['table']}"
    # the check sees a broken image (a thumbnail gone)
    gone = sorted((page.parent / "thumbs").glob("*.png"))[0]
    gone.unlink()
    assert f"thumbs/{gone.name}" in page_check(browser, probe)["broken"]
    # and as a person sees it: a screenshot that is not blank
    shot = tmp_path / "shot.png"
    headless(browser, f"--screenshot={shot}", page.as_uri())
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 800)
    assert len(image.getcolors(maxcolors=1 << 20) or []) > 50  # text, frames and thumbnails, not one flat colour
