"""What the README tables come from: the main job's and the study's runs (keys, reuse,
resume), the aggregation over seeds, the headline metrics, and the target selection."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hydra import initialize_config_dir

from saferclip.app.hydra_utils import CONF_DIR, to_container
from saferclip.app.pipelines import main_job, runs, study
from saferclip.evaluation.headline import HEADLINE, headline, headline_table
from saferclip.evaluation.searches import search_record
from saferclip.redirection.neighbour_config import NeighbourConfig
from saferclip.redirection.neighbours import find_safe_neighbours
from saferclip.redirection.sparse_pools import item_groups
from saferclip.training.method import method_config
from saferclip.training.prepare import prepare

pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread (tests/conftest.py)


def train_overrides(tmp_path, toy_world) -> list[str]:
    """A short micro run on the small toy world (what the tests can afford)."""
    return [
        "model=micro",
        f"paths.toy_dir={toy_world}",
        "data.toy_size=small",
        "data.batch_size=8",
        "data.eval_batch_size=64",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=2",
        "trainer.enable_progress_bar=false",
        "logger=csv",
    ]


@pytest.fixture
def hydra_tree():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        yield


# ---------------------------------------------------------------- run keys, reuse, resume
def test_run_key_follows_what_changes_the_result_not_where_it_is_written(tmp_path, toy_world, hydra_tree):
    base = train_overrides(tmp_path, toy_world)
    key = runs.run_key(runs.compose("train", base))
    assert key == runs.run_key(runs.compose("train", [*base, f"paths.output_dir={tmp_path / 'elsewhere'}"]))
    assert key == runs.run_key(runs.compose("train", [*base, f"paths.cache_dir={tmp_path / 'c2'}"]))
    assert key != runs.run_key(runs.compose("train", [*base, "seed=1"]))
    assert key != runs.run_key(runs.compose("train", [*base, "method.neighbours.k=2"]))


def test_a_finished_run_is_reused_and_an_interrupted_one_resumed(tmp_path, toy_world, hydra_tree, monkeypatch):
    import saferclip.app.engine.fit as train_module

    overrides = train_overrides(tmp_path, toy_world)
    first = runs.train_or_reuse("saferclip", overrides, tmp_path / "runs", force=False)
    run_dir = tmp_path / "runs" / f"saferclip-{runs.run_key(runs.compose('train', overrides))}"
    assert first["run_dir"] == str(run_dir) and (run_dir / runs.DONE_MARKER).is_file()
    assert first["selection"]["epoch"] in (0, 1) and first["export"] == str(run_dir / "export")

    calls = []

    def fake_train(cfg):
        calls.append(cfg)
        return {"export": None, "best_checkpoint": None}

    monkeypatch.setattr(train_module, "train", fake_train)
    # same config, finished: not trained again
    assert runs.train_or_reuse("saferclip", overrides, tmp_path / "runs", force=False) == first
    assert calls == []
    # interrupted (checkpoints, no finished marker): resumed from last.ckpt
    (run_dir / runs.DONE_MARKER).unlink()
    runs.train_or_reuse("saferclip", overrides, tmp_path / "runs", force=False)
    assert calls[-1].ckpt_path == str(run_dir / "checkpoints" / "last.ckpt") and not calls[-1].get("force")
    # force: retrained over it, from scratch
    runs.train_or_reuse("saferclip", overrides, tmp_path / "runs", force=True)
    assert calls[-1].force is True and calls[-1].ckpt_path is None


# ---------------------------------------------------------------- aggregation, tables
def test_seeds_aggregate_to_mean_and_sample_std():
    per_seed = {
        0: {"original": {"U2V_R@1": 0.8}, "saferclip": {"U2V_R@1": 0.7, "unsafe_rate_a": 0.1}},
        1: {"original": {"U2V_R@1": 0.8}, "saferclip": {"U2V_R@1": 0.9, "unsafe_rate_a": 0.3}},
        2: {"original": {"U2V_R@1": 0.8}, "saferclip": {"U2V_R@1": 0.8}},
    }
    summary = study.aggregate(per_seed)
    assert list(summary) == ["original", "saferclip"]
    u2v = summary["saferclip"]["U2V_R@1"]
    assert {k: u2v[k] for k in ("mean", "std", "n")} == pytest.approx({"mean": 0.8, "std": 0.1, "n": 3})
    # the Student-t interval of the mean over 3 seeds: 0.8 ± t(0.975, 2) 0.1 / sqrt(3)
    assert (u2v["low"], u2v["high"]) == pytest.approx((0.8 - 0.2484, 0.8 + 0.2484), abs=1e-3)
    assert summary["saferclip"]["unsafe_rate_a"]["n"] == 2 and summary["saferclip"]["unsafe_rate_a"][
        "mean"
    ] == pytest.approx(0.2)
    assert summary["original"]["U2V_R@1"]["std"] == 0.0
    table = study.study_table(summary)
    assert "| saferclip | 3 |" in table and "80.0 ± 10.0 [55.2, 104.8]" in table and "20.0 ± 14.1 [" in table


def test_headline_picks_its_metrics_and_leaves_out_what_is_missing():
    results = {
        "results": {
            "original": {
                "visu": {"U2VG_unsafe@1": 1.0, "U2V_R@1": 0.83},
                "cost": {"zeroshot_safe_acc1_retention": 1.0},
            },
            "mine": {"visu": {"U2VG_unsafe@1": 0.04, "U2V_R@1": 0.81, "U2VDG_unsafe@1": float("nan")}},
        }
    }
    assert headline(results["results"]["mine"]) == {"unsafe_rate_a": 0.04, "U2V_R@1": 0.81}
    table = headline_table(results)
    assert "| unsafe rate (a) ↓ | 100.0 | 4.0 |" in table and "| zero-shot retention | 100.0 | – |" in table
    assert all(label in HEADLINE for label in ("unsafe_rate_a", "unsafe_rate_a_realistic", "zeroshot_retention"))


# ---------------------------------------------------------------- target selection
def test_targets_paired_neighbours_curriculum_and_sparse_pools(tmp_path, toy_world, hydra_tree):
    cfg = runs.compose("train", train_overrides(tmp_path, toy_world))
    data, model, section = to_container(cfg.data), to_container(cfg.model), to_container(cfg.method)
    method = method_config(section)
    paired = prepare(data, model, method_config({**section, "targets": "paired"}), str(tmp_path / "cache"))
    n = len(paired.train)
    assert torch.equal(paired.targets.indices[:, 0], torch.arange(n)) and paired.neighbours is None

    near = prepare(data, model, method, str(tmp_path / "cache"))
    expected = find_safe_neighbours(
        near.cache, NeighbourConfig(**{k: v for k, v in section["neighbours"].items() if k != "extra_pool"})
    )
    assert torch.equal(near.targets.indices, expected.indices)
    assert near.targets.bucket is not None and len(near.targets.curriculum_subset(0)) in (n // 3, math.ceil(n / 3))
    assert len(near.targets.curriculum_subset(2)) == n
    torch.testing.assert_close(
        near.pool.text[near.targets.indices[:, 0]], near.cache.safe_text[expected.indices[:, 0]].float()
    )

    sparse = {
        **section,
        "neighbours": {**section["neighbours"], "sparse_share": 1.0, "sparse_attributes": ["shape", "colour"]},
    }
    far = prepare(data, model, method_config(sparse), str(tmp_path / "cache"))
    groups = item_groups(far.train, "scene", len(far.train), ("shape", "colour"))
    chosen = far.targets.indices[:, 0].numpy()
    assert (groups.pool[chosen] != groups.query).all()  # never a safe item of the same (shape, colour)


# ---------------------------------------------------------------- the main job end to end
@pytest.mark.slow
def test_main_job_trains_the_three_methods_evaluates_and_reports(tmp_path, toy_world, hydra_tree):
    overrides = train_overrides(tmp_path, toy_world)
    # a search record beside it: the report says how the settings were chosen
    search = search_record(
        "saferclip",
        [
            {
                "number": 0,
                "state": "complete",
                "value": 0.8,
                "matched": {"reached": True, "note": "reached τ = 5%: 1.0% unsafe at U→V 30.0 (epoch 7)"},
                "seconds": 100,
                "history": [{"epoch": 0, "U2VG_unsafe@1": 0.01, "U2V_R@1": 0.3}],
            }
        ],
        budget=1,
        random_trials=1,
        tau=0.05,
        world=0,
        seed=0,
        best={"number": 0, "value": 0.8, "overrides": ["method.optimizer.lr=1e-4"], "matched": {"note": "kept"}},
    )
    (tmp_path / "tune" / "saferclip").mkdir(parents=True)
    (tmp_path / "tune" / "saferclip" / "search.json").write_text(json.dumps(search))
    cfg = runs.compose(
        "main", [f"out_dir={tmp_path / 'main'}", f"runs_dir={tmp_path / 'runs'}", f"searches_dir={tmp_path / 'tune'}"]
    )
    out = main_job.run(cfg, overrides)
    results = out["results"]
    assert list(results["results"]) == [
        "original",
        "safeclip",
        "saferclip",
        "hysac_safe",
        "hysac_moderation",
        "oracle redirection",
    ]
    # HySAC: one trained model, two modes; no setting (b) for a hyperbolic query
    assert results["models"]["hysac_safe"]["similarity"] == "lorentz (safe mode)"
    assert results["models"]["hysac_moderation"]["similarity"] == "lorentz (moderation mode)"
    assert "U2VG_ref_unsafe@1" not in results["results"]["hysac_safe"]["visu"]
    assert "n/a†" in headline_table(results)
    report = tmp_path / "main" / "report"
    markdown = (report / "results.md").read_text()
    assert "## Model selection" in markdown and "| saferclip |" in markdown
    assert {"training_curves.png", "tradeoff.png", "search_pareto.png"} <= {
        p.name for p in (report / "plots").iterdir()
    }
    assert "## How the settings were chosen: the searches" in markdown and "| SafeR-CLIP | 1 / 0 / 0 (1) |" in markdown
    page = (report / "report.html").read_text()
    assert out["report"]["html"] == report / "report.html" and "ViSU: unsafe caption → images" in page
    assert "Borderline: borderline-safe caption → images" in page  # the toy world's borderline split
    payload = json.loads((report / "results.json").read_text())
    assert set(payload["training"]) == {"safeclip", "saferclip", "hysac"}
    assert set(out["timings"]) == {"safeclip", "saferclip", "hysac", "evaluation"}
    # a second run reuses both trainings, and records how long each took when it trained
    again = main_job.run(cfg, overrides)
    assert again["models"] == out["models"]
    recorded = {
        done.parent.name.rsplit("-", 1)[0]: json.loads(done.read_text())["train_seconds"]
        for done in (tmp_path / "runs").glob(f"*/{runs.DONE_MARKER}")
    }
    assert again["results"]["meta"]["train_seconds"] == recorded and set(recorded) == {"safeclip", "saferclip", "hysac"}
