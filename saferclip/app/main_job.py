"""saferclip-main: the whole pipeline on the built-in toy world, Original vs Safe-CLIP vs SafeR-CLIP vs HySAC.

    saferclip-main                       # make the toy world, fine-tune the three methods, evaluate, report
    saferclip-main seed=1                # another seed
    saferclip-main force=true            # retrain even when an identical finished run exists
    saferclip-main --quiet > table.md    # print only the final table

Steps: (1) the toy world (generated once); (2) the embedding cache and the neighbour index
(inside training, reused across runs); (3) fine-tuning with the experiments `toy_safeclip`,
`toy_saferclip` and `toy_hysac` (each picks its method's preset, `conf/method/*.yaml`); (4)
evaluation of the original and the fine-tuned models side by side; (5) the
report (report.html with retrieval galleries, JSON, Markdown, plots) and the exported
checkpoints. A run whose resolved config is unchanged is not retrained: re-running reuses
what is cached. Standard output ends with the headline table; when it is not a terminal
there are no progress bars (one line per epoch on stderr instead).

Every run is composed from the same config tree as `saferclip-train` (conf/main.yaml names the
overrides), so what the main job does can be reproduced run by run with `saferclip-train`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..errors import ConfigError
from ..model.trained import read_selection
from .cli import command, compose_help, wants_help
from .hydra_utils import CONF_DIR, check_int, pop_quiet, quiet_logging, setup_logging, to_container
from .overrides import check_command

log = logging.getLogger("saferclip.main")

DONE_MARKER = "finished.json"


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    """A config of the tree, outside @hydra.main: ``paths.run_dir`` (Hydra's run folder) is
    left empty, to be set by the caller before anything uses it."""
    from hydra import compose as hydra_compose

    cfg = hydra_compose(config_name=config_name, overrides=overrides)
    if "paths" in cfg:
        OmegaConf.update(cfg, "paths.run_dir", "", force_add=True)
    return cfg


def run_key(train_cfg: DictConfig) -> str:
    """A hash of everything that changes a training run's result (not where it is written)."""
    cfg = to_container(train_cfg)
    for where in ("run_dir", "output_dir", "cache_dir"):  # where things are written or cached
        cfg.get("paths", {}).pop(where, None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:12]


def check_runs(runs: dict[str, list[str]]) -> None:
    """Compose and check every run's training config before any run starts: a wrong
    override of the last run must not wait for the first one to finish training."""
    from .hydra_utils import check_train_config

    for name, overrides in runs.items():
        try:
            check_train_config(compose("train", overrides))
        except ConfigError as e:
            raise ConfigError(f"run {name!r}: {e}") from None


def train_or_reuse(name: str, overrides: list[str], runs_dir: Path, force: bool) -> dict[str, Any]:
    """Train one method unless an identical run already finished; returns its summary."""
    from ..files import file_lock

    cfg = compose("train", overrides)
    key = run_key(cfg)
    run_dir = Path(runs_dir).resolve() / f"{name}-{key}"
    done = run_dir / DONE_MARKER
    if done.is_file() and not force:
        log.info("%s: reusing the finished run %s (same config)", name, run_dir)
        return json.loads(done.read_text())
    # one training per run folder: a second main job or study sharing runs_dir waits for the
    # first to finish this run, then reuses it (a killed holder releases the lock)
    with file_lock(run_dir.parent / f".{run_dir.name}.lock"):
        if done.is_file() and not force:
            log.info("%s: reusing the run %s another process finished (same config)", name, run_dir)
            return json.loads(done.read_text())
        return _train_run(name, cfg, overrides, run_dir, force)


def _train_run(name: str, cfg: DictConfig, overrides: list[str], run_dir: Path, force: bool) -> dict[str, Any]:
    from ..files import write_json_atomic
    from .train import train

    done = run_dir / DONE_MARKER
    OmegaConf.update(cfg, "paths.run_dir", str(run_dir), force_add=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    if force:
        OmegaConf.update(cfg, "force", True, force_add=True)  # the user asked to retrain over it
    elif last.is_file():
        log.info("%s: resuming the interrupted run %s", name, run_dir)
        OmegaConf.update(cfg, "ckpt_path", str(last), force_add=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    result = train(cfg)
    summary = {
        "name": name,
        "run_dir": str(run_dir),
        "export": result.get("export"),
        "best_checkpoint": result.get("best_checkpoint"),
        "selection": result.get("selection"),
        "train_seconds": round(time.time() - start, 1),
        "overrides": overrides,
    }
    write_json_atomic(done, summary)
    return summary


def evaluated_models(name: str, trained: dict[str, Any], method: str) -> dict[str, dict[str, Any]]:
    """The evaluation entries of one trained run: one model, or for HySAC two, its safe mode
    (``<name>_safe``: queries traversed) and its moderation mode (``<name>_moderation``)."""
    if method != "hysac":
        return {name: trained}
    return {f"{name}_safe": {**trained, "mode": "safe"}, f"{name}_moderation": {**trained, "mode": "moderation"}}


def eval_showcase(cfg: DictConfig):
    """``eval.showcase`` of the main job's or the study's config, as ``evaluate_models`` takes it."""
    value = cfg.eval.get("showcase", True)
    return to_container(value) if OmegaConf.is_config(value) else value


MAIN_KEYS = ("seed", "world", "force", "out_dir", "runs_dir", "runs", "common", "eval")


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """Overrides of conf/main.yaml's own keys, and the rest (passed to every training run)."""
    own = [o for o in overrides if o.split("=")[0].lstrip("+~").split(".")[0] in MAIN_KEYS]
    return own, [o for o in overrides if o not in own]


def record_pair_stats(data: dict[str, Any]) -> None:
    """A toy world's pair statistics, measured once with the base model and saved with it
    (``pair_stats.json``), so that the report records them."""
    if data.get("make_toy"):
        from ..toyworld.pair_stats import format_pair_stats, pair_stats

        log.info(format_pair_stats(pair_stats(data["root"])))


def run(cfg: DictConfig, overrides: list[str]) -> dict[str, Any]:
    from ..evaluation.report import write_report
    from ..evaluation.runner import evaluate_models
    from ..toyworld.generate import ensure_toy_world

    from .cli import check_writable_folder
    from .hydra_utils import check_run_options

    check_run_options(cfg, ("seed", "force"))
    check_writable_folder(cfg.out_dir, "out_dir")
    check_writable_folder(cfg.runs_dir, "runs_dir")
    out_dir = Path(cfg.out_dir).resolve()
    world = cfg.get("world")
    if world is not None:
        check_int(world, "world", 0)
    # the world first: an explicit data.toy_seed among the overrides still wins
    common = ([] if world is None else [f"data.toy_seed={world}"]) + list(cfg.common) + list(overrides) + [f"seed={cfg.seed}"]
    check_runs({name: common + list(run_overrides) for name, run_overrides in cfg.runs.items()})
    train_base = compose("train", common)
    ensure_toy_world(to_container(train_base.data))
    record_pair_stats(to_container(train_base.data))
    timings: dict[str, float] = {}
    models: dict[str, dict[str, Any]] = {
        "original": {"arch": train_base.model.arch, "pretrained": train_base.model.pretrained}
    }
    training: dict[str, dict[str, Any]] = {}
    train_seconds: dict[str, float | None] = {}  # each run's training as it was timed, reused or not
    for name, run_overrides in cfg.runs.items():
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
        config={"main": to_container(cfg), "train_overrides": {k: list(v) for k, v in cfg.runs.items()}},
        oracle=cfg.eval.get("oracle"),
            showcase=eval_showcase(cfg),
    )
    timings["evaluation"] = round(time.time() - start, 1)
    results["meta"]["timings_seconds"] = timings
    results["meta"]["train_seconds"] = train_seconds
    report = write_report(results, out_dir / "report", force=True, training={k: v for k, v in training.items() if v})
    return {"results": results, "report": report, "models": models, "timings": timings}


MAIN_HELP = {
    "seed": "the seed of every run (default 0)",
    "world": "the toy world runs train and test on (default 1: never used for tuning; null: the data config's)",
    "force": "retrain even when an identical finished run exists",
    "out_dir": "where the report goes (outputs/main; open report/report.html)",
    "runs_dir": "where training runs go, shared with saferclip-study (outputs/runs)",
    "runs": "one entry per method: overrides of the training config",
    "common": "overrides of the training config for every run",
    "eval": "suites, split, the oracle row and report.html's galleries (eval.showcase) of the evaluation",
}


QUIET_HELP = {
    "--quiet": "(or -q) print only the final table; warnings and errors still go to stderr",
}


def main(argv: list[str] | None = None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    if wants_help(overrides):
        print(compose_help("saferclip-main", __doc__.splitlines()[0], "main", MAIN_HELP, QUIET_HELP))
        return 0
    overrides, quiet = pop_quiet(overrides)
    return command("saferclip-main", lambda: _run_and_print(overrides, quiet))


def _run_and_print(overrides: list[str], quiet: bool = False) -> None:
    """Run the main job; on stdout: where the report is and how long it took, then the
    headline table, last (with ``quiet`` only the table). Progress goes to stderr: bars on a
    terminal, one line per epoch when the output is a file (:mod:`saferclip.console`)."""
    from hydra import initialize_config_dir

    from ..evaluation.headline import headline_table

    setup_logging()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    if quiet:
        quiet_logging()
    start = time.time()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        check_command("saferclip-main", "main", overrides, MAIN_KEYS)  # every key and group, before any work
        own, rest = split_overrides(overrides)
        out = run(compose("main", own), rest)
    if not quiet:
        print(f"report: {out['report']['html']} (open it in a browser)")
        print(f"every metric: {out['report']['markdown']}")
        print(f"total {time.time() - start:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in out['timings'].items())})")
        print()
    print(headline_table(out["results"]), flush=True)


if __name__ == "__main__":
    sys.exit(main())
