"""The model card's evaluation fields from an evaluation report: the run's own
(``report/results.json`` or ``results.md``, written by
:func:`saferclip.evaluation.write_report`), one named explicitly, or a results dict or table.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .public_names import public_model_name, public_path

# where a run keeps its evaluation report (saferclip.evaluation.report's file names)
REPORT_DIR, REPORT_JSON, REPORT_MARKDOWN = "report", "results.json", "results.md"


def find_report(run_dir: str | os.PathLike) -> Path | None:
    """The run's evaluation report (``report/results.json``, else ``report/results.md``)."""
    folder = Path(run_dir) / REPORT_DIR
    for name in (REPORT_JSON, REPORT_MARKDOWN):
        if (folder / name).is_file():
            return folder / name
    return None


def _markdown_results(text: str) -> str:
    """The "## Results" section of a results.md (the whole text if it has none)."""
    match = re.search(r"^## Results[ \t]*\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    return (match.group(1) if match else text).strip()


def _report_card(results: Mapping[str, Any], where: str | None, roots: tuple = ()) -> dict[str, Any]:
    """Card fields from the ``results`` dict of :func:`saferclip.evaluation.evaluate_models`;
    paths shown relative to ``roots`` (:func:`saferclip.export.public_names.public_path`)."""
    from ..evaluation.headline import headline_table
    from ..evaluation.intervals import intervals_note
    from ..evaluation.report import (  # the evaluation package, only when needed
        LEGEND,
        results_table,
    )

    per_model = results.get("results") or {}
    main = {m: {s: r for s, r in suites.items() if s != "cost"} for m, suites in per_model.items()}
    cost = {m: {"cost": suites["cost"]} for m, suites in per_model.items() if "cost" in suites}
    headline = ""
    if results.get("intervals"):  # the headline figures with their intervals first
        headline = f"{headline_table(results)}\n\nIn brackets: {intervals_note(results)}.\n\n"
    out: dict[str, Any] = {"evaluation": headline + results_table({**results, "results": main}) + "\n\n" + LEGEND}
    if cost:
        out["over_defensiveness"] = results_table({**results, "results": cost})
    meta, data = results.get("meta") or {}, results.get("data") or {}
    parts = []
    for suite, d in data.items():
        if suite == "zeroshot" and isinstance(d, Mapping):
            parts.append(f"zero-shot tasks {', '.join(map(str, d))}")
        elif isinstance(d, Mapping) and d.get("path"):
            parts.append(f"{suite} `{public_path(d['path'], roots)}`")
    described = "; ".join(parts) or "not recorded"
    described += f" (split `{meta.get('split')}`, seed {meta.get('seed')}"
    described += f"; reference model `{public_model_name(meta['reference'])}`)" if meta.get("reference") else ")"
    if where:
        described += f"; full report: `{public_path(where, roots)}`"
    out["evaluation_data"] = described
    return out


def evaluation_card(evaluation: Any, roots: tuple = ()) -> dict[str, Any]:
    """Model-card fields (``evaluation``, ``evaluation_data``, ``over_defensiveness``) from
    an evaluation given as: a report file (``results.json`` / ``results.md``) or a folder
    holding one; the results dict a report is written from; a ``{metric: value}`` or
    ``{model: {metric: value}}`` table; or a Markdown table (a string with ``|``). Local
    paths in the fields are shown relative to ``roots`` (the run folder, the repository)."""
    if evaluation is None:
        return {}
    if isinstance(evaluation, Mapping):
        if isinstance(evaluation.get("results"), Mapping):
            return _report_card(evaluation, None, roots)
        return {"evaluation": dict(evaluation)}
    if isinstance(evaluation, str) and "|" in evaluation and not Path(evaluation).exists():
        return {"evaluation": evaluation}
    if not isinstance(evaluation, (str, os.PathLike)):
        raise TypeError(
            f"evaluation: expected a report path, a results dict or a table, not {type(evaluation).__name__}"
        )
    path = Path(evaluation).expanduser()
    if path.is_dir():
        found = [path / n for n in (REPORT_JSON, REPORT_MARKDOWN) if (path / n).is_file()] or [
            p for p in (find_report(path),) if p is not None
        ]
        if not found:
            raise FileNotFoundError(f"{path}: no evaluation report ({REPORT_JSON} or {REPORT_MARKDOWN}) in this folder")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such evaluation report")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: unreadable evaluation report ({e})") from None
    if path.suffix == ".json":
        try:
            results = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not a JSON evaluation report ({e})") from None
        if not (isinstance(results, Mapping) and isinstance(results.get("results"), Mapping)):
            raise ConfigError(f"{path}: not a saferclip evaluation report (no 'results' entry)")
        try:
            return _report_card(results, str(path), roots)
        except ImportError:  # saferclip.evaluation missing: the Markdown report beside it will do
            if not (path.parent / REPORT_MARKDOWN).is_file():
                raise ConfigError(f"{path}: cannot format the report without saferclip.evaluation") from None
            path = path.parent / REPORT_MARKDOWN
            text = path.read_text()
    return {
        "evaluation": _markdown_results(text),
        "evaluation_data": f"see the full report `{public_path(path, roots)}`",
    }


__all__ = ["REPORT_DIR", "REPORT_JSON", "REPORT_MARKDOWN", "evaluation_card", "find_report"]
