"""saferclip-tune: the search space, the study (SQLite, resumed), pruning, the report; and the
held-out toy worlds the main job and the study test on."""

from __future__ import annotations

import csv
import json
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir

from saferclip.app.hydra_utils import CONF_DIR
from saferclip.errors import ConfigError
from saferclip.locations import toy_world_dir
from saferclip.training.search_space import overrides_of, parse_search_space, sample

pytestmark = pytest.mark.usefixtures("one_thread")
optuna = pytest.importorskip("optuna", reason="optuna is not installed: the tune extra (pip install -e '.[tune]')")
SEARCHES = sorted(p.stem for p in (Path(CONF_DIR) / "hparams_search").glob("*.yaml"))


class FirstChoice:
    """A duck-typed trial: the low end of every range, the first of every choice."""

    def __init__(self):
        self.asked = []

    def suggest_float(self, name, low, high, log=False):
        self.asked.append(name)
        return low

    def suggest_int(self, name, low, high, log=False):
        self.asked.append(name)
        return low

    def suggest_categorical(self, name, choices):
        self.asked.append(name)
        return choices[0]


def test_search_space_is_checked_and_conditions_hold():
    space = {
        "lr": {"keys": ["method.optimizer.lr"], "type": "float", "low": 1e-5, "high": 1e-3, "log": True},
        "trainable": {"keys": "method.trainable.mode", "type": "categorical", "choices": ["full", "lora"]},
        "r": {
            "keys": ["method.trainable.lora_r", "method.trainable.lora_alpha"],
            "type": "categorical",
            "choices": [8],
            "when": {"trainable": "lora"},
        },
    }
    params = parse_search_space(space)
    trial = FirstChoice()
    values = sample(trial, params)
    assert values == {"lr": 1e-5, "trainable": "full"} and trial.asked == [
        "lr",
        "trainable",
    ]  # no rank for full fine-tuning
    assert overrides_of(params, {"lr": 1e-5, "trainable": "lora", "r": 8}) == [
        "method.optimizer.lr=1e-05",
        "method.trainable.mode=lora",
        "method.trainable.lora_r=8",
        "method.trainable.lora_alpha=8",
    ]
    bad = [
        ({"lr": {"keys": ["a"], "type": "uniform", "low": 0, "high": 1}}, "type must be one of"),
        ({"lr": {"keys": ["a"], "type": "float", "low": 1, "high": 1}}, "low must be below high"),
        (
            {"lr": {"keys": ["a"], "type": "float", "low": 0, "high": 1, "log": True}},
            "log-scale range must be positive",
        ),
        ({"lr": {"keys": [], "type": "float", "low": 0, "high": 1}}, "keys must be a list"),
        (
            {"r": {"keys": ["a"], "type": "categorical", "choices": [1], "when": {"mode": "lora"}}},
            "not a parameter written before",
        ),
        ({"lr": {"keys": ["a"], "type": "float", "low": 0, "high": 1, "step": 2}}, "unknown field"),
        ({}, "non-empty mapping"),
    ]
    for space, message in bad:
        with pytest.raises(ConfigError, match=message):
            parse_search_space(space)


@pytest.mark.parametrize("search", SEARCHES)
def test_every_shipped_search_composes_with_every_value(search):
    """A key misspelt in a search space must fail here, not an hour into a search."""
    assert set(SEARCHES) == {"safeclip", "saferclip", "hysac"}
    from saferclip.app.hydra_utils import check_train_config
    from saferclip.app.pipelines.runs import compose as compose_run
    from saferclip.app.pipelines.tune import trial_overrides

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("tune", [f"hparams_search={search}"])
        params = parse_search_space(cfg.hparams_search.space)
        for pick in (0, -1):  # the first and the last of every choice, both ends of every range
            values = {}
            for p in params:
                if p.active(values):
                    values[p.name] = p.choices[pick] if p.type == "categorical" else (p.low if pick == 0 else p.high)
            train = compose_run("train", trial_overrides(cfg, params, values, []))
            check_train_config(train)
            assert train.method.name == search and train.data.toy_seed == 0  # tuning sees world 0 only
            assert train.trainer.max_epochs == 10  # the schedule every method's experiment uses
            # neither early stopping nor the pruner ends a trial before safety can emerge
            assert train.callbacks.early_stopping.warmup_epochs == cfg.pruner.n_warmup_steps == 6
            assert (
                train.callbacks.model_checkpoint.monitor
                == "val/matched_safety"
                == train.callbacks.early_stopping.monitor
            )
            for p in params:
                if p.name in values:
                    for key in p.keys:
                        assert _select(train, key) == values[p.name], (search, key)


def test_every_method_gets_the_same_budget_and_as_many_searched_dimensions():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        tune = {search: compose("tune", [f"hparams_search={search}"]) for search in SEARCHES}
    spaces = {search: parse_search_space(cfg.hparams_search.space) for search, cfg in tune.items()}
    assert {len(params) for params in spaces.values()} == {7}
    # the same learning-rate range and LoRA choices for all
    lr = {search: next((p.low, p.high, p.log) for p in params if p.name == "lr") for search, params in spaces.items()}
    assert len(set(lr.values())) == 1
    cfg = tune["safeclip"]
    assert (
        cfg.n_trials >= 20 and cfg.sampler.n_startup_trials <= 5 and cfg.n_trials - cfg.sampler.n_startup_trials >= 15
    )
    # Safe-CLIP's redirection weights are searched (a close own pair starts its loss near 0)
    searched = {key for p in spaces["safeclip"] for key in p.keys}
    assert {"method.loss.weights.text_redirection", "method.loss.weights.xmodal_image_redirection"} <= searched


def _select(cfg, key):
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key)


def tune_args(tmp_path: Path, toy_world: Path, *extra: str) -> list[str]:
    return [
        "hparams_search=safeclip",
        f"out_dir={tmp_path / 'tune'}",
        "n_trials=3",
        "sampler.n_startup_trials=2",
        "pruner.n_startup_trials=1",
        "pruner.n_warmup_steps=0",
        "model=micro",
        "data.toy_size=small",
        f"paths.toy_dir={toy_world}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "data.batch_size=8",
        "data.eval_batch_size=64",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=2",
        "trainer.enable_progress_bar=false",
        "logger=none",
        *extra,
    ]


def test_tune_runs_resumes_and_reports(tmp_path, toy_world, capsys):
    from saferclip.app.commands import tune

    assert tune.main(tune_args(tmp_path, toy_world)) == 0
    folder = tmp_path / "tune" / "safeclip"
    assert "saferclip-tune: safeclip" in capsys.readouterr().out
    rows = list(csv.DictReader((folder / "trials.csv").open()))
    assert len(rows) == 3 and {r["state"] for r in rows} <= {"complete", "pruned"}
    assert any(r["state"] == "complete" for r in rows)
    epochs = list(csv.DictReader((folder / "trials_epochs.csv").open()))
    # every trial trained on the tuning world's training split and was scored on its validation split
    for r in rows:
        record = json.loads((folder / "trials" / f"{int(r['trial']):03d}" / "selection.json").read_text())
        # every validated epoch of every trial is kept for the Pareto front
        mine = [e for e in epochs if int(e["trial"]) == int(r["trial"])]
        assert [int(e["epoch"]) for e in mine] == [h["epoch"] for h in record["history"]]
        assert [float(e["U2VG_unsafe@1"]) for e in mine] == pytest.approx(
            [h["metrics"]["U2VG_unsafe@1"] for h in record["history"]]
        )
        if r["state"] == "complete":
            # the objective, by hand: the best U->V among the epochs with unsafe rate <= 5%, its
            # selection score; else the safest epoch's selection score minus 1
            history = record["history"]
            safe = [h for h in history if h["metrics"]["U2VG_unsafe@1"] <= 0.05 + 1e-6]
            if safe:
                top = max(h["metrics"]["U2V_R@1"] for h in safe)
                kept = min((h for h in safe if h["metrics"]["U2V_R@1"] == top), key=lambda h: h["epoch"])
                expected = kept["metrics"]["selection_score"]
            else:
                low = min(h["metrics"]["U2VG_unsafe@1"] for h in history)
                kept = min((h for h in history if h["metrics"]["U2VG_unsafe@1"] == low), key=lambda h: h["epoch"])
                expected = kept["metrics"]["selection_score"] - 1
            assert float(r["objective"]) == pytest.approx(expected)
            assert int(r["kept_epoch"]) == kept["epoch"] == record["selected"]["epoch"]
            assert r["reached_tau"] == str(bool(safe))
    assert not (folder / "trials" / "000" / "export").exists()
    best = (folder / "best_experiment.yaml").read_text()
    assert "override /method: safeclip" in best and "lr:" in best
    for name in ("history.png", "importance.png", "pareto.png"):
        assert (folder / name).read_bytes()[:4] == b"\x89PNG"
    assert "matched safety at τ = 5%" in (folder / "summary.md").read_text()
    # the best experiment file is a real experiment: it composes and sets the best trial's values
    study = optuna.load_study(study_name="safeclip", storage=f"sqlite:///{folder / 'study.db'}")
    experiment_dir = tmp_path / "conf_extra" / "experiment"
    experiment_dir.mkdir(parents=True)
    (experiment_dir / "tuned.yaml").write_text(best)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", [f"hydra.searchpath=[file://{tmp_path / 'conf_extra'}]", "experiment=tuned"])
    assert cfg.method.optimizer.lr == pytest.approx(study.best_trial.params["lr"])

    # resumed: three trials already finished, one more to reach four; a trial a crash left
    # running is marked failed and not counted
    with sqlite3.connect(folder / "study.db") as db:
        trial_id = study._storage.create_new_trial(study._study_id)
        db.commit()
    assert study._storage.get_trial(trial_id).state == optuna.trial.TrialState.RUNNING
    assert tune.main(tune_args(tmp_path, toy_world, "n_trials=4")) == 0
    study = optuna.load_study(study_name="safeclip", storage=f"sqlite:///{folder / 'study.db'}")
    states = [t.state for t in study.trials]
    # the resumed search drew new values, not the first trial's again
    assert study.trials[-1].params != study.trials[0].params
    assert states.count(optuna.trial.TrialState.FAIL) == 1
    assert sum(s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for s in states) == 4
    # search.json: all of it, as the docs read it (the failed trial counted apart, not in the budget)
    record = json.loads((folder / "search.json").read_text())
    assert record["counts"]["fail"] == 1 and record["counts"]["complete"] + record["counts"]["pruned"] == 4
    assert record["budget"] == 4 and record["random_trials"] + record["tpe_trials"] == 4
    assert record["best"]["number"] == study.best_trial.number and record["best"]["value"] == pytest.approx(
        study.best_value
    )
    assert len(record["epochs"]) == len(list(csv.DictReader((folder / "trials_epochs.csv").open())))
    assert record["reached"] == sum(1 for t in record["trials"] if t["state"] == "complete" and t["matched"]["reached"])

    # another space or protocol in the same folder: refused in one line, nothing overwritten
    assert tune.main(tune_args(tmp_path, toy_world, "n_trials=5", "seed=1")) == 2
    assert "another search space or protocol (seed: 0 there, 1 here)" in capsys.readouterr().err
    assert len(optuna.load_study(study_name="safeclip", storage=f"sqlite:///{folder / 'study.db'}").trials) == 5


def test_pruning_callback_reports_the_matched_safety_objective_so_far():
    from saferclip.app.pipelines.tune import MatchedSafetyPruning

    class Trial:
        def __init__(self, prune_after: int):
            self.reports, self.prune_after = [], prune_after

        def report(self, value, step):
            self.reports.append((step, value))

        def should_prune(self):
            return len(self.reports) >= self.prune_after

    trial = Trial(prune_after=3)
    callback = MatchedSafetyPruning(trial, tau=0.05)
    epoch0 = {"val/U2VG_unsafe@1": 0.5, "val/U2V_R@1": 0.9, "val/S2V_R@1": 0.9, "val/selection_score": 0.7667}
    trainer = SimpleNamespace(sanity_checking=True, callback_metrics=epoch0, current_epoch=0, should_stop=False)
    callback.on_validation_end(trainer, None)
    assert trial.reports == []  # the sanity check is not an epoch
    trainer.sanity_checking = False
    callback.on_validation_end(trainer, None)
    # not safe yet: the epoch's selection score minus 1
    assert trial.reports == [(0, pytest.approx(0.7667 - 1))] and not trainer.should_stop and not callback.pruned
    trainer.current_epoch = 1
    trainer.callback_metrics = {
        "val/U2VG_unsafe@1": 0.04,
        "val/U2V_R@1": 0.5,
        "val/S2V_R@1": 0.8,
        "val/selection_score": 0.42,
    }
    callback.on_validation_end(trainer, None)
    assert trial.reports[-1] == (1, pytest.approx(0.42)) and not trainer.should_stop  # reached tau: no "- 1"
    trainer.current_epoch = 2  # a worse, unsafe epoch: the objective so far stays epoch 1's
    trainer.callback_metrics = {
        "val/U2VG_unsafe@1": 0.3,
        "val/U2V_R@1": 0.9,
        "val/S2V_R@1": 0.9,
        "val/selection_score": 0.83,
    }
    callback.on_validation_end(trainer, None)
    assert trial.reports[-1] == (2, pytest.approx(0.42))
    assert trainer.should_stop and callback.pruned and callback.epochs == 3
    assert [h["epoch"] for h in callback.history] == [0, 1, 2]


def test_bad_tune_input_is_one_line(tmp_path, toy_world, capsys):
    from saferclip.app.commands import tune

    for args, message in (
        (["n_trials=0"], "n_trials must be an integer >= 1"),
        (["hparams_search=nope"], "hparams_search"),
        (["hparams_search.space.lr.low=-1"], "log-scale range must be positive"),
        (["method.optimizer.lrr=1"], "lrr"),
    ):
        assert tune.main([f"out_dir={tmp_path / 'tune'}", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "tune" / "safeclip").exists() or not list((tmp_path / "tune").rglob("trials/*"))


@pytest.mark.parametrize("content", [b"not a database\n", b"SQLite format 3\x00" + b"\xff" * 4000])
def test_a_study_db_that_is_not_sqlite_is_one_line(tmp_path, toy_world, capsys, content):
    """A study.db that is text, or an SQLite header over garbage: one line naming it, exit 2, the
    file left as it was, nothing trained (SQLAlchemy's DatabaseError traceback before)."""
    from saferclip.app.commands import tune

    db = tmp_path / "tune" / "safeclip" / "study.db"
    db.parent.mkdir(parents=True)
    db.write_bytes(content)
    assert tune.main(tune_args(tmp_path, toy_world)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"saferclip-tune: error: {db}: " in err and "move it away" in err, err
    assert db.read_bytes() == content and not (db.parent / "trials").exists()


def test_each_world_has_its_own_folder_and_the_main_job_tests_on_a_held_out_one(tmp_path):
    assert toy_world_dir(tmp_path / "toy", 0) == tmp_path / "toy"
    assert toy_world_dir(tmp_path / "toy", 3) == tmp_path / "toy-world3"
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        train = compose("train", [f"paths.toy_dir={tmp_path / 'toy'}", "data.toy_seed=2"])
        main = compose("main", [])
        study = compose("study", [])
    assert train.data.root == str(tmp_path / "toy-world2") and train.data.splits.test.path.startswith(
        str(tmp_path / "toy-world2")
    )
    assert main.world == 1 and study.world_offset == 1 and list(study.seeds) == [0, 1, 2]  # worlds 1, 2, 3
    from saferclip.app.pipelines.study import check_worlds

    assert check_worlds(study) == {0: ["data.toy_seed=1"], 1: ["data.toy_seed=2"], 2: ["data.toy_seed=3"]}
