"""The main job (``saferclip-main``, :mod:`saferclip.app.commands.main_job`): the whole pipeline on the
built-in toy world, the original model against Safe-CLIP, SafeR-CLIP and HySAC.

Steps: (1) the toy world (generated once); (2) the embedding cache and the neighbour index
(inside training, reused across runs); (3) fine-tuning with the experiments `toy_safeclip`,
`toy_saferclip` and `toy_hysac` (each picks its method's preset, `conf/method/*.yaml`); (4)
evaluation of the original and the fine-tuned models side by side; (5) the
report (report.html with retrieval galleries, JSON, Markdown, plots) and the exported
checkpoints. A run whose resolved config is unchanged is not retrained: re-running reuses
what is cached. Standard output ends with the headline table; when it is not a terminal
there are no progress bars (one line per epoch on stderr instead).

Every run is composed from the same config tree as `saferclip-train` (conf/main.yaml names the
overrides), so what the main job does can be reproduced run by run with `saferclip-train`."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ...model.trained import read_selection
from ..hydra_utils import check_int, to_container
from .runs import check_runs, compose, eval_showcase, evaluated_models, main_runs, record_pair_stats, train_or_reuse

log = logging.getLogger("saferclip.main")

MAIN_KEYS = (
    "seed",
    "world",
    "force",
    "out_dir",
    "runs_dir",
    "runs",
    "common",
    "eval",
    "adversarial",
    "adversarial_overrides",
    "searches_dir",
)


def run(cfg: DictConfig, overrides: list[str]) -> dict[str, Any]:
    from ...evaluation.report import write_report
    from ...evaluation.runner import evaluate_models
    from ...toyworld.generate import ensure_toy_world
    from ..cli import check_writable_folder
    from ..hydra_utils import check_run_options

    check_run_options(cfg, ("seed", "force"))
    check_writable_folder(cfg.out_dir, "out_dir")
    check_writable_folder(cfg.runs_dir, "runs_dir")
    out_dir = Path(cfg.out_dir).resolve()
    world = cfg.get("world")
    if world is not None:
        check_int(world, "world", 0)
    # the world first: an explicit data.toy_seed among the overrides still wins
    common = (
        ([] if world is None else [f"data.toy_seed={world}"])
        + list(cfg.common)
        + list(overrides)
        + [f"seed={cfg.seed}"]
    )
    runs = main_runs(cfg)
    check_runs({name: common + list(run_overrides) for name, run_overrides in runs.items()})
    train_base = compose("train", common)
    ensure_toy_world(to_container(train_base.data))
    record_pair_stats(to_container(train_base.data))
    timings: dict[str, float] = {}
    models: dict[str, dict[str, Any]] = {
        "original": {"arch": train_base.model.arch, "pretrained": train_base.model.pretrained}
    }
    training: dict[str, dict[str, Any]] = {}
    train_seconds: dict[str, float | None] = {}  # each run's training as it was timed, reused or not
    for name, run_overrides in runs.items():
        start = time.time()
        summary = train_or_reuse(name, common + list(run_overrides), Path(cfg.runs_dir), bool(cfg.force))
        timings[name] = round(time.time() - start, 1)
        train_seconds[name] = summary.get("train_seconds")
        trained = {"arch": train_base.model.arch, "pretrained": summary["export"] or summary["run_dir"]}
        models.update(evaluated_models(name, trained, compose("train", common + list(run_overrides)).method.name))
        training[name] = read_selection(summary["run_dir"])
    start = time.time()
    results = evaluate_models(
        models,
        to_container(train_base.data),
        suites=list(cfg.eval.suites),
        reference="original",
        split=cfg.eval.split,
        batch_size=int(train_base.data.eval_batch_size),
        seed=int(cfg.seed),
        config={"main": to_container(cfg), "train_overrides": runs},
        oracle=cfg.eval.get("oracle"),
        showcase=eval_showcase(cfg),
    )
    timings["evaluation"] = round(time.time() - start, 1)
    results["meta"]["timings_seconds"] = timings
    results["meta"]["train_seconds"] = train_seconds
    report = write_report(
        results,
        out_dir / "report",
        force=True,
        training={k: v for k, v in training.items() if v},
        sections=lambda folder: searches_section(cfg.get("searches_dir"), folder),
    )
    return {"results": results, "report": report, "models": models, "timings": timings}


def searches_section(searches_dir: str | None, report_dir: Path) -> tuple[str, list[Path]]:
    """The report's "How the settings were chosen": the searches found under ``searches_dir``
    (``<method>/search.json``, as ``saferclip-tune`` writes them), their table and every method's
    Pareto front in one plot (validation unsafe rate against U→V over every trial × epoch);
    nothing when there is no search there."""
    import json

    from ...evaluation.searches import SEARCH_FILE, draw_pareto_fronts, searches_table

    if not searches_dir:
        return "", []
    found = {}
    for path in sorted(Path(searches_dir).glob(f"*/{SEARCH_FILE}")):
        try:
            found[path.parent.name] = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            log.warning("%s: unreadable (%s); the report leaves this search out", path, e)
    if not found:
        return "", []
    data = {"searches": found}
    plot = report_dir / "plots" / "search_pareto.png"
    draw_pareto_fronts(data, plot)
    markdown = (
        "\n## How the settings were chosen: the searches\n\n"
        f"From `{searches_dir}` (`saferclip-tune`, world 0's validation split only; the test split never read).\n\n"
        f"{searches_table(data, {})}\n\nEvery trial × epoch of each search and its Pareto front: plots/search_pareto.png.\n"
    )
    return markdown, [plot]
