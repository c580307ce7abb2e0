"""The runs the pipelines share: one config tree, one run folder per config, reused when finished.

* :func:`compose`: a config of the tree outside ``@hydra.main`` (``paths.run_dir`` left to the caller);
* :func:`run_key`: the hash of what changes a training run's result; a run's folder is
  ``<runs_dir>/<name>-<key>`` and :data:`DONE_MARKER` in it says the run finished;
* :func:`check_runs`: every run's config checked before the first one trains;
* :func:`train_or_reuse`: train one run unless an identical one finished (one process per folder);
* the run registry: :func:`find_main_runs` (the main job's finished runs, for ``main_runs=true``
  of ``saferclip-analyze`` / ``saferclip-attack``: :func:`with_main_runs`) and
  :func:`evaluated_models` (a run's evaluation entries; HySAC's two modes);
* :func:`split_overrides` and :func:`run_composed`: a pipeline command's overrides split into its
  own config's and the training runs', checked, composed and run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ...errors import ConfigError
from ..hydra_utils import CONF_DIR, quiet_logging, setup_logging, to_container

log = logging.getLogger("saferclip.runs")

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
    # an option that is off changes nothing: runs from before it existed keep their key
    method = cfg.get("method") or {}
    if isinstance(method.get("adversarial"), dict) and not method["adversarial"].get("enabled", False):
        method.pop("adversarial")
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:12]


def check_runs(runs: dict[str, list[str]]) -> None:
    """Compose and check every run's training config before any run starts: a wrong
    override of the last run must not wait for the first one to finish training. Each
    override is checked as a command line's is first (a run's overrides also come from lists
    in the pipeline's config, ``runs``, ``common``, ``adversarial_overrides``, which no command
    line check sees): ``run 'x_adv': method.adversarial.epsilon: no such key; did you mean
    method.adversarial.epsilon_255?``, not Hydra's advice to append the key."""
    from ..hydra_utils import check_train_config
    from ..overrides import check_overrides

    for name, overrides in runs.items():
        try:
            check_overrides("saferclip", "train", overrides)
            check_train_config(compose("train", overrides))
        except ConfigError as e:
            raise ConfigError(f"run {name!r}: {e}") from None


def train_or_reuse(name: str, overrides: list[str], runs_dir: Path, force: bool) -> dict[str, Any]:
    """Train one method unless an identical run already finished; returns its summary."""
    from ...files import file_lock

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
    from ...files import write_json_atomic
    from ..engine.fit import train

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


ADVERSARIAL_SUFFIX = "_adv"


def main_runs(cfg: DictConfig) -> dict[str, list[str]]:
    """The runs a main-job config asks for: ``runs``, and with ``adversarial=true`` one more per
    method, ``<name>_adv``: the same overrides plus ``method.adversarial.enabled=true`` and
    ``adversarial_overrides`` (the default job's runs, keys and results are unchanged)."""
    from ..hydra_utils import check_bool

    runs = {name: list(overrides) for name, overrides in cfg.runs.items()}
    check_bool(cfg.get("adversarial", False), "adversarial")
    if cfg.get("adversarial", False):
        extra = ["method.adversarial.enabled=true", *list(cfg.get("adversarial_overrides") or [])]
        runs.update({f"{name}{ADVERSARIAL_SUFFIX}": overrides + extra for name, overrides in list(runs.items())})
    return runs


def split_overrides(overrides: Sequence[str], own_keys: Sequence[str]) -> tuple[list[str], list[str]]:
    """The overrides of a pipeline config's own keys (``own_keys``: conf/main.yaml's, study's,
    tune's), and the rest (passed to every training run)."""
    own = [o for o in overrides if o.split("=")[0].lstrip("+~").split(".")[0] in own_keys]
    return own, [o for o in overrides if o not in own]


def run_composed(
    prog: str,
    config_name: str,
    own_keys: Sequence[str],
    overrides: Sequence[str],
    run: Callable[[DictConfig, list[str]], dict[str, Any]],
    quiet: bool = False,
) -> dict[str, Any]:
    """A pipeline command's work: logging set up (``quiet``: warnings only), every override
    checked against the config before any work (:func:`saferclip.app.overrides.check_command`),
    then ``run(<config_name composed from its own overrides>, <the rest>)``. Returns what
    ``run`` returns."""
    from hydra import initialize_config_dir

    from ..overrides import check_command

    setup_logging()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    if quiet:
        quiet_logging()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        check_command(prog, config_name, list(overrides), tuple(own_keys))  # every key and group, before any work
        own, rest = split_overrides(overrides, own_keys)
        return run(compose(config_name, own), rest)


def record_pair_stats(data: dict[str, Any]) -> None:
    """A toy world's pair statistics, measured once with the base model and saved with it
    (``pair_stats.json``), so that the report records them."""
    if data.get("make_toy"):
        from ...toyworld.pair_stats import format_pair_stats, pair_stats

        log.info(format_pair_stats(pair_stats(data["root"])))


def find_main_runs(
    runs_dir: str | Path | None = None, hyperbolic: bool = False, adversarial: bool = False
) -> dict[str, dict[str, Any]]:
    """The main job's finished runs: ``{name: {"pretrained", "run_dir", "exact"}}``. The run of
    ``saferclip-main``'s current config (same hash) when it finished, else the most recently
    finished run of that name (``exact`` False; the log says which). ``adversarial``: the
    adversarially trained ``<name>_adv`` runs too, where they exist."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    # inside the Hydra app the config tree is initialised; called from elsewhere, open it here
    tree = (
        nullcontext()
        if GlobalHydra().is_initialized()
        else initialize_config_dir(config_dir=CONF_DIR, version_base="1.3")
    )
    with tree:
        main = compose("main", ["adversarial=true"] if adversarial else [])
        runs = Path(str(runs_dir or main.runs_dir))
        expected: dict[str, Path | None] = {}
        methods: dict[str, str] = {}
        for name, overrides in main_runs(main).items():
            try:
                cfg = compose("train", list(main.common) + list(overrides) + [f"seed={main.seed}"])
                methods[name] = str(cfg.method.name)
                if cfg.method.name == "hysac" and not hyperbolic:
                    # the heads, geometry and over-defensiveness parts assume a Euclidean CLIP;
                    # HySAC's own detector (distance from the origin) is in every evaluation
                    log.info("the main job's %s run is hyperbolic: not analysed here", name)
                    continue
                expected[name] = runs / f"{name}-{run_key(cfg)}"
            except Exception as e:  # a config the main job could not compose either: fall back
                log.warning("could not compose the main job's %s run (%s); looking for any finished one", name, e)
                expected[name] = None
    found: dict[str, dict[str, Any]] = {}
    for name, exact in expected.items():
        if exact is not None and (exact / DONE_MARKER).is_file():
            run_dir, is_exact = exact, True
        else:
            done = sorted(runs.glob(f"{name}-*/{DONE_MARKER}"), key=lambda p: p.stat().st_mtime)
            if not done:
                continue
            run_dir, is_exact = done[-1].parent, False
        try:
            summary = json.loads((run_dir / DONE_MARKER).read_text())
        except (OSError, json.JSONDecodeError):
            summary = {}
        export = summary.get("export")
        pretrained = export if export and Path(export).is_dir() else str(run_dir)
        found[name] = {
            "pretrained": pretrained,
            "run_dir": str(run_dir),
            "exact": is_exact,
            "method": methods.get(name, name),
        }
        log.info(
            "main job's %s run: %s%s",
            name,
            run_dir,
            "" if is_exact else " (not the current config's: the latest finished)",
        )
    return found


def with_main_runs(
    cfg: DictConfig, models: dict[str, Any], hyperbolic: bool = False, adversarial: bool = False
) -> dict[str, Any]:
    """``models`` plus, with ``main_runs=true``, the main job's finished runs (with
    ``hyperbolic``, HySAC too, in both its modes; with ``adversarial``, the adversarially trained
    ``<name>_adv`` runs where they exist). When it finds none, one line naming where it
    looked: an error when ``runs_dir`` was given or nothing but the reference would be left,
    else a warning (the models named on the command line go on alone)."""
    if not cfg.get("main_runs", False):
        return models
    runs_dir = cfg.get("runs_dir")
    found = find_main_runs(runs_dir, hyperbolic=hyperbolic, adversarial=adversarial)
    if not found:
        where = main_runs_folder(runs_dir)
        missing = "" if where.is_dir() else " (no such folder)"
        message = f"main_runs=true: no finished saferclip-main run in {where}{missing}"
        if runs_dir or not [m for m in models if m != cfg.get("reference", "original")]:
            raise ConfigError(
                f"{message}; run saferclip-main first, point runs_dir=<folder> at its runs, "
                "or name models yourself: main_runs=false +models.<name>.pretrained=<run folder or export>"
            )
        log.warning("%s; going on with %s only", message, ", ".join(models))
    out = dict(models)
    for name, run in found.items():
        entries = (
            evaluated_models(name, {"pretrained": run["pretrained"]}, run["method"])
            if hyperbolic
            else {name: {"pretrained": run["pretrained"]}}
        )
        for entry, spec in entries.items():
            out.setdefault(entry, spec)
    return out


def main_runs_folder(runs_dir: str | Path | None = None) -> Path:
    """Where :func:`find_main_runs` looks: ``runs_dir``, else the main job's (conf/main.yaml)."""
    if runs_dir:
        return Path(str(runs_dir)).expanduser().absolute()
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    tree = (
        nullcontext()
        if GlobalHydra().is_initialized()
        else initialize_config_dir(config_dir=CONF_DIR, version_base="1.3")
    )
    with tree:
        return Path(str(compose("main", []).runs_dir)).expanduser().absolute()
