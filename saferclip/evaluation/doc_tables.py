"""The result tables and quoted figures of the README and the docs (:data:`DOCUMENTS`), generated
from the committed result files: numbers that cannot go stale.

A document marks each generated region with a pair of HTML comments (invisible when rendered)::

    <!-- generated:main-table models=original,saferclip keys=unsafe_rate_a,U2V_R@1 -->
    | metric | original | SafeR-CLIP |
    ...
    <!-- /generated -->

    SafeR-CLIP reads <!-- generated:main-value model=saferclip key=unsafe_rate_a -->0.6<!-- /generated -->% unsafe.

The name says what is generated and from which file (``main-*``: ``docs/results/main.json``,
the ``results.json`` a ``saferclip-main`` report writes; ``study-*``: ``docs/results/study.json``,
``saferclip-study``'s), the ``key=value`` arguments which part; everything between the markers
is replaced. :func:`update_documents` rewrites the regions, :func:`check_documents` lists the
regions that differ from what their file gives (``scripts/update_doc_tables.py --check``: exit
1; a test runs it), :func:`import_result` copies a new result file in (``--from``), and
regenerates the README's screenshot of the main job's report when Chromium is there.

A picture region (:data:`PICTURES`) shows its image only when the image's stamp names the
committed result file it was drawn from (its SHA-256), so that no picture of other numbers is
shown: otherwise it renders empty. A picture drawn from its result file alone (``pool-plot``) is
redrawn by :func:`update_documents` whenever its stamp names another file; the README's
screenshot needs the report.html beside the results and Chromium, so only ``--from`` takes it.

Generators (arguments in brackets are optional):

The main job's and the study's generators (:mod:`saferclip.evaluation.main_tables`):

* ``main-table [models=a,b] [keys=k1,k2] [epochs=yes]``: the headline table of
  :func:`saferclip.evaluation.headline.headline_table` (the report's own), models under their
  display names; ``epochs=yes`` adds the exported epoch of each run (counted from 0).
* ``main-differences [pairs=a vs b,...]``: the paired differences (p-values included).
* ``main-value model= key= [interval=yes]``: one headline figure in % (``0.6`` or
  ``0.6 [0.0, 1.4]``); ``main-difference pair= key=``: one paired difference;
  ``main-share model= of= key=``: model's figure as a % of another's (``89%``);
  ``main-epoch run=``: the exported epoch and the epochs run; ``main-seconds [part=]``: the
  measured time; ``main-setting field=world|seed|split|date``; ``main-intervals``: what the
  intervals are; ``main-target model= key= at-least=|at-most= [of=]``: met or missed, by how much
  (``of=``: as a share of another model's figure);
  ``main-history run= metric= [from=] [range=yes]``: a run's validation curve;
  ``main-metric model= suite= metric= [task=]``: any figure of the report;
  ``main-screenshot``: the report's picture.
* ``study-table [models=] [keys=]`` and ``study-differences``: the study's tables;
  ``study-value model= key= [stat=mean|std|interval]``.
* ``robustness-*`` (``docs/results/robustness.json``, written by
  ``scripts/robustness_results.py``): the attack suite's, the adversarially trained runs' and
  the monitor's figures for docs/ROBUSTNESS.md (:mod:`saferclip.robustness.summary` lists them).
  Until that file is committed its regions say the figures are pending (:data:`PENDING`); a
  missing ``main.json`` or ``study.json`` is an error.
* ``pool-*`` (``docs/results/large_pool_growth.json``, ``scripts/bench_large_pool.py --json``)
  and ``ivf-speedup`` (``docs/results/ivf_100k.json``, ``scripts/bench_neighbours.py --json``):
  docs/GPU.md's scale figures (:mod:`saferclip.redirection.scale_summary` lists them), and the
  picture ``pool-plot``; pending, like the robustness figures, until measured
  (``scripts/run_scale_benchmarks.sh``).
* ``searches-table`` and ``searches-best method=`` (``docs/results/searches.json``,
  ``scripts/search_results.py``: the three ``saferclip-tune`` searches) and the picture
  ``searches-pareto``; ``misalignment-table`` (``docs/results/misalignment.json``,
  ``saferclip-study misalignment.enabled=true``), ``misalignment-targets pairing=<level>`` (the
  protocol's targets over that level's seeds) and the picture ``misalignment-plot``; both
  pending until measured.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SaferclipError
from ..files import write_json_atomic, write_text_atomic
from ..redirection.scale_summary import GENERATORS as SCALE_GENERATORS
from ..redirection.scale_summary import GROWTH_PLOT_CAPTION, ScaleSummaryError, draw_growth_plot
from ..redirection.scale_summary import pending as scale_pending
from ..robustness.summary import GENERATORS as ROBUSTNESS_GENERATORS
from ..robustness.summary import SummaryError
from ..robustness.summary import pending as robustness_pending
from ..robustness.sweep_summary import SWEEP_CAPTION, draw_sweep
from .main_tables import GENERATORS as MAIN_GENERATORS
from .main_tables import MainTableError
from .misalignment import (
    MISALIGNMENT_CAPTION,
    MisalignmentSummaryError,
    draw_misalignment,
    misalignment_region,
    targets_table,
)
from .misalignment import pending as misalignment_pending
from .plotting import OWN_MARK
from .searches import GENERATORS as SEARCH_GENERATORS
from .searches import PARETO_CAPTION, SearchSummaryError, draw_pareto_fronts
from .searches import pending as searches_pending

RESULTS_DIR = Path("docs") / "results"
DOCUMENTS = (
    Path("README.md"),
    Path("docs") / "RESULTS.md",
    Path("docs") / "ROBUSTNESS.md",
    Path("docs") / "ANALYSIS.md",
    Path("docs") / "GPU.md",
)
SOURCES = {
    "main": "main.json",
    "study": "study.json",
    "robustness": "robustness.json",
    "pool": "large_pool_growth.json",
    "ivf": "ivf_100k.json",
    "searches": "searches.json",
    "misalignment": "misalignment.json",
}
# what a result file must hold to be one (import_result's check: a section of this name)
SOURCE_SECTIONS = {
    "main": "results",
    "study": "summary",
    "robustness": "models",
    "pool": "sizes",
    "ivf": "runs",
    "searches": "searches",
    "misalignment": "levels",
}
# result files a document may quote before they are measured: while such a file is not
# committed, each of its regions shows what ``pending(name, block)`` gives (it says the figures
# are pending, and how to measure them) instead of failing; any other missing file is an error
PENDING = {
    "robustness": robustness_pending,
    "pool": scale_pending,
    "ivf": scale_pending,
    "searches": searches_pending,
    "misalignment": misalignment_pending,
}
SCREENSHOT = Path("docs") / "img" / "main_report.png"
SCREENSHOT_STAMP = RESULTS_DIR / "main_report.json"  # which main.json the picture shows
SCREENSHOT_SCRIPT = Path("scripts") / "report_screenshot.sh"
# the main report's plots shown in docs/RESULTS.md: (file under the report's plots/, image, stamp, caption)
MAIN_REPORT_PLOTS = {
    "main-curves": (
        "training_curves.png",
        Path("docs") / "img" / "main_training_curves.png",
        RESULTS_DIR / "main_training_curves.json",
        "validation curves of the main job's runs, epoch by epoch",
    ),
    "main-tradeoff": (
        "tradeoff.png",
        Path("docs") / "img" / "main_tradeoff.png",
        RESULTS_DIR / "main_tradeoff.json",
        "safety against what it costs, main job",
    ),
}
GROWTH_PLOT = Path("docs") / "img" / "large_pool_growth.png"
GROWTH_PLOT_STAMP = RESULTS_DIR / "large_pool_growth_plot.json"  # which large_pool_growth.json it was drawn from
PARETO_PLOT = Path("docs") / "img" / "search_pareto.png"
PARETO_PLOT_STAMP = RESULTS_DIR / "search_pareto_plot.json"
MISALIGNMENT_PLOT = Path("docs") / "img" / "misalignment.png"
MISALIGNMENT_PLOT_STAMP = RESULTS_DIR / "misalignment_plot.json"
ROBUSTNESS_SWEEP_PLOT = Path("docs") / "img" / "robustness_sweep.png"
ROBUSTNESS_SWEEP_PLOT_STAMP = RESULTS_DIR / "robustness_sweep_plot.json"


@dataclass(frozen=True)
class Picture:
    """An image a region shows when its stamp names the committed result file it was made from."""

    source: str  # the result file (a key of SOURCES)
    image: Path
    stamp: Path
    caption: str
    draw: Callable[[Mapping[str, Any], Path], None] | None = (
        None  # from the result file alone: update_documents redraws it
    )


PICTURES = {
    "main-screenshot": Picture(
        "main",
        SCREENSHOT,
        SCREENSHOT_STAMP,
        "The main job's report.html: the headline table, then what each model retrieves for the same unsafe captions "
        f"(red: unsafe, green: the query's safe twin, {OWN_MARK} its own unsafe image)",
    ),
    **{name: Picture("main", image, stamp, caption) for name, (_, image, stamp, caption) in MAIN_REPORT_PLOTS.items()},
    "pool-plot": Picture("pool", GROWTH_PLOT, GROWTH_PLOT_STAMP, GROWTH_PLOT_CAPTION, draw_growth_plot),
    "searches-pareto": Picture("searches", PARETO_PLOT, PARETO_PLOT_STAMP, PARETO_CAPTION, draw_pareto_fronts),
    "misalignment-plot": Picture(
        "misalignment", MISALIGNMENT_PLOT, MISALIGNMENT_PLOT_STAMP, MISALIGNMENT_CAPTION, draw_misalignment
    ),
    "robustness-sweep-plot": Picture(
        "robustness", ROBUSTNESS_SWEEP_PLOT, ROBUSTNESS_SWEEP_PLOT_STAMP, SWEEP_CAPTION, draw_sweep
    ),
}
MARKER = re.compile(
    r"<!-- generated:(?P<name>[a-z]+-[a-z-]+)(?P<args>(?:\s+[\w@-]+=(?:\"[^\"]*\"|[^\s\"]+))*)\s*-->(?P<body>.*?)<!-- /generated -->",
    re.S,
)
ARGUMENT = re.compile(r"([\w@-]+)=(?:\"([^\"]*)\"|([^\s\"]+))")
OPENING = "<!-- generated:"


class DocTableError(SaferclipError):
    """A marker or a result file the generator cannot use (one line naming it)."""


# ----------------------------------------------------------------------------- pictures
def _stamped(root: Path, picture: Picture, field: str = "results_sha256") -> str | None:
    """A field of ``picture``'s stamp (None: no stamp): by default the SHA-256 of the result file
    it was made from; ``drawn_by_sha256``, that of the code that drew it."""
    try:
        return json.loads((root / picture.stamp).read_text()).get(field)
    except (OSError, ValueError, AttributeError):
        return None


def picture_region(root: Path, name: str, document: Path) -> str:
    """Picture ``name``, linked relative to ``document`` (a path in the repository), when it was
    made from the committed result file; else nothing."""
    picture = PICTURES[name]
    source = root / RESULTS_DIR / SOURCES[picture.source]
    if not (source.is_file() and (root / picture.image).is_file()):
        return ""
    if _stamped(root, picture) != _sha256(source):
        return ""
    return f"![{picture.caption}]({Path(os.path.relpath(picture.image, document.parent)).as_posix()})"


def _drawing_code(picture: Picture) -> str | None:
    """The SHA-256 of the module that draws ``picture`` (None where it cannot be read): a picture
    drawn by older code is drawn again, as a table is regenerated when its data changes."""
    import inspect

    try:
        return _sha256(Path(inspect.getsourcefile(picture.draw)))
    except (TypeError, OSError):
        return None


def redraw_pictures(root: Path) -> list[str]:
    """Draw again each picture drawn from its result file alone whose image is missing, whose
    stamp names another file or whose drawing code changed since; returns the images drawn."""
    drawn = []
    for picture in PICTURES.values():
        source = root / RESULTS_DIR / SOURCES[picture.source]
        if picture.draw is None or not source.is_file():
            continue
        digest, code = _sha256(source), _drawing_code(picture)
        if (
            (root / picture.image).is_file()
            and _stamped(root, picture) == digest
            and (code is None or _stamped(root, picture, "drawn_by_sha256") == code)
        ):
            continue
        try:
            picture.draw(json.loads(source.read_text()), root / picture.image)
        except ValueError as e:
            raise DocTableError(f"{source}: not valid JSON ({e})") from None
        except (ScaleSummaryError, SearchSummaryError, MisalignmentSummaryError, SummaryError) as e:
            raise DocTableError(f"{source}: {e}") from None
        except (KeyError, TypeError, IndexError) as e:
            raise DocTableError(
                f"{source}: not a result file its picture can be drawn from ({type(e).__name__}: {e})"
            ) from None
        write_json_atomic(
            root / picture.stamp,
            {"results_sha256": digest, "drawn_from": SOURCES[picture.source], "drawn_by_sha256": code},
        )
        drawn.append(picture.image.as_posix())
    return drawn


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


GENERATORS: dict[str, tuple[str, Callable[[Mapping[str, Any], Mapping[str, str]], str], bool]] = {
    # name -> (source, generator, block: its own lines between the markers)
    **MAIN_GENERATORS,  # the main job's and the study's (saferclip.evaluation.main_tables)
    # the robustness experiments' (saferclip.robustness.summary; docs/ROBUSTNESS.md)
    **{name: ("robustness", generator, block) for name, (generator, block) in ROBUSTNESS_GENERATORS.items()},
    # the scale benchmarks' (saferclip.redirection.scale_summary; docs/GPU.md)
    **SCALE_GENERATORS,
    # the hyperparameter searches' (saferclip.evaluation.searches) and the misalignment study's
    **{name: ("searches", generator, block) for name, (generator, block) in SEARCH_GENERATORS.items()},
    "misalignment-table": ("misalignment", misalignment_region, True),
    "misalignment-targets": ("misalignment", targets_table, True),
}


# ----------------------------------------------------------------------------- documents
def load_source(root: Path, name: str) -> dict[str, Any]:
    path = root / RESULTS_DIR / SOURCES[name]
    if not path.is_file():
        raise DocTableError(
            f"{path}: missing; copy the result file there: scripts/update_doc_tables.py --from {name}=<path>"
        )
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise DocTableError(f"{path}: not valid JSON ({e})") from None


def render_document(text: str, root: Path, where: str) -> tuple[str, list[str]]:
    """``text`` with every generated region rewritten; and the regions that changed (``where``:
    the document's name, for the messages)."""
    sources: dict[str, dict[str, Any]] = {}
    changed: list[str] = []

    def replace(match: re.Match) -> str:
        name, raw_args, body = match.group("name"), match.group("args"), match.group("body")
        label = f"{where}: region generated:{name}{raw_args.rstrip()}"
        args = {k: (quoted if quoted else plain) for k, quoted, plain in ARGUMENT.findall(raw_args)}
        if name in PICTURES:
            block, content = True, picture_region(root, name, Path(where))
        else:
            if name not in GENERATORS:
                raise DocTableError(
                    f"{label}: unknown generator; expected one of {', '.join([*GENERATORS, *PICTURES])}"
                )
            source, generator, block = GENERATORS[name]
            if source not in sources:
                missing = source in PENDING and not (root / RESULTS_DIR / SOURCES[source]).is_file()
                sources[source] = None if missing else load_source(root, source)
            if sources[source] is None:
                content = PENDING[source](name, block)
            else:
                try:
                    content = generator(sources[source], args)
                except (
                    DocTableError,
                    MainTableError,
                    SummaryError,
                    ScaleSummaryError,
                    SearchSummaryError,
                    MisalignmentSummaryError,
                ) as e:
                    raise DocTableError(f"{label}: {e}") from None
        new_body = f"\n{content}\n" if block and content else ("\n" if block else content)
        if new_body != body:
            changed.append(label)
        return f"<!-- generated:{name}{raw_args} -->{new_body}<!-- /generated -->"

    rendered = MARKER.sub(replace, text)
    opened = text.count(OPENING)
    if opened != len(MARKER.findall(text)) or text.count("<!-- /generated -->") != opened:
        # a marker the pattern does not read would keep its stale content silently
        unread = [
            line.strip()
            for line in MARKER.sub("", text).splitlines()
            if OPENING in line or "<!-- /generated -->" in line
        ]
        raise DocTableError(
            f"{where}: a generated region that cannot be read (an opening without its end, or a bad argument): {unread[0][:120]}"
        )
    return rendered, changed


def check_documents(root: str | Path = ".") -> list[str]:
    """The generated regions of the documents that differ from their result files (a picture
    region differs when its picture was not made from the committed file: nothing is drawn)."""
    root = Path(root)
    differ = []
    for doc in DOCUMENTS:
        _, changed = render_document((root / doc).read_text(), root, doc.as_posix())
        differ += changed
    return differ


def update_documents(root: str | Path = ".") -> list[str]:
    """Redraw the pictures made from a result file alone whose stamp names another file
    (:func:`redraw_pictures`), then rewrite every generated region; returns the images drawn
    and the regions that changed."""
    root = Path(root)
    changed = [f"{image} (drawn from its result file)" for image in redraw_pictures(root)]
    for doc in DOCUMENTS:
        path = root / doc
        text, regions = render_document(path.read_text(), root, doc.as_posix())
        if regions:
            write_text_atomic(path, text)
        changed += regions
    return changed


def publishable(value: Any, root: Path) -> Any:
    """``value`` with every path under the repository ``root`` made relative to it (a committed
    file names no one's home folder)."""
    prefix = str(root.resolve()) + os.sep
    if isinstance(value, str):
        return value[len(prefix) :] if value.startswith(prefix) else value
    if isinstance(value, Mapping):
        return {k: publishable(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [publishable(v, root) for v in value]
    return value


def import_result(root: str | Path, name: str, path: str | Path) -> Path:
    """Copy a result file into ``docs/results/`` (``main``: a report's results.json; ``study``: a
    study.json; ``pool``, ``ivf``: the scale benchmarks' ``--json``), after checking it is one, with paths under the repository made relative and a
    report's ``records`` left out (one flat record per number, derived from ``results``:
    :func:`saferclip.evaluation.report.metric_records`); for ``main``, retake the README's
    screenshot of the report.html beside it when Chromium is there (else the picture is dropped)."""
    root, path = Path(root), Path(path)
    if name not in SOURCES:
        raise DocTableError(f"--from {name}=...: unknown result; expected one of {', '.join(SOURCES)}")
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DocTableError(f"{path}: not a readable JSON result file ({e})") from None
    expected = SOURCE_SECTIONS[name]
    if not isinstance(content, Mapping) or not isinstance(content.get(expected), (Mapping, list)):
        raise DocTableError(f"{path}: not a {name} result file (it has no {expected!r} section)")
    target = root / RESULTS_DIR / SOURCES[name]
    target.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(target, publishable({k: v for k, v in content.items() if k != "records"}, root))
    if name == "main":
        _retake_screenshot(root, path.parent / "report.html", target)
        _copy_report_plots(root, path.parent / "plots", target)
    return target


def _copy_report_plots(root: Path, plots: Path, results_file: Path) -> None:
    """The main report's plots that docs/RESULTS.md shows, copied from the report beside the
    imported results.json and stamped with it (a plot the report lacks is dropped, and said so)."""
    from ..files import atomic_path

    for file, image, stamp, _ in MAIN_REPORT_PLOTS.values():
        if not (plots / file).is_file():
            (root / stamp).unlink(missing_ok=True)
            print(f"{image} not copied (no {plots / file}): the docs show none until it is", file=sys.stderr)
            continue
        with atomic_path(root / image) as tmp:
            tmp.write_bytes((plots / file).read_bytes())
        write_json_atomic(root / stamp, {"results_sha256": _sha256(results_file), "report_plot": file})


def _retake_screenshot(root: Path, report: Path, results_file: Path) -> None:
    stamp = root / SCREENSHOT_STAMP
    browser = next(
        (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None
    )
    if browser is None or not report.is_file():
        stamp.unlink(missing_ok=True)
        why = "no Chromium here" if browser is None else f"no {report}"
        print(f"screenshot not retaken ({why}): the README shows none until it is", file=sys.stderr)
        return
    subprocess.run(
        ["bash", str(root / SCREENSHOT_SCRIPT), str(report), str(root / SCREENSHOT)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    write_json_atomic(stamp, {"results_sha256": _sha256(results_file), "report": report.name})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="update_doc_tables.py",
        description="Generate the documents' result tables, quoted figures and plots from docs/results/*.json "
        "(README.md, docs/RESULTS.md, docs/ROBUSTNESS.md, docs/ANALYSIS.md, docs/GPU.md).",
    )
    parser.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 naming each region that differs from its file"
    )
    parser.add_argument(
        "--from",
        dest="sources",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="first copy a result file in: main=outputs/main/report/results.json (NAME defaults to main), "
        "study=outputs/study/study.json, pool=<bench_large_pool.py --json>, "
        "ivf=<bench_neighbours.py --json>",
    )
    parser.add_argument("--root", default=".", help="the repository (default: the working directory)")
    args = parser.parse_args(argv)
    root = Path(args.root)
    missing = [doc.as_posix() for doc in DOCUMENTS if not (root / doc).is_file()]
    if missing:  # before anything is copied in: a wrong --root must not get a docs/results/ of its own
        print(f"update_doc_tables: {root}: not the repository (no {', '.join(missing)})", file=sys.stderr)
        return 2
    try:
        for spec in args.sources:
            name, _, path = spec.rpartition("=")
            print(f"copied {import_result(root, name or 'main', path)}")
        if args.check:
            differ = check_documents(root)
            for region in differ:
                print(f"differs from its result file: {region}")
            if differ:
                print("regenerate with: python scripts/update_doc_tables.py", file=sys.stderr)
            return 1 if differ else 0
        for region in update_documents(root):
            print(f"updated {region}")
        return 0
    except (DocTableError, OSError) as e:
        print(f"update_doc_tables: {e}", file=sys.stderr)
        return 2


__all__ = ["check_documents", "import_result", "main", "update_documents"]
