"""Model selection: the validation score that sees safety, and the epoch that gets exported."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import compose_train

from saferclip.evaluation.selection import sees_safety, selection_parts, selection_score

pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread (tests/conftest.py)


def test_score_is_the_mean_of_safety_and_both_recalls():
    metrics = {"U2VG_unsafe@1": 0.2, "U2V_R@1": 0.7, "S2V_R@1": 0.9, "U2V_R@5": 1.0}
    assert selection_score(metrics) == pytest.approx((0.8 + 0.7 + 0.9) / 3)
    assert sees_safety(metrics)
    # a collapsed model (one point for everything: ties count against it, so unsafe rate 1
    # and recall 0) scores 0; one that is safe by retrieving the wrong thing scores 1/3
    assert selection_score({"U2VG_unsafe@1": 1.0, "U2V_R@1": 0.0, "S2V_R@1": 0.0}) == 0.0
    assert selection_score({"U2VG_unsafe@1": 0.0, "U2V_R@1": 0.0, "S2V_R@1": 0.0}) == pytest.approx(1 / 3)


def test_score_without_unsafe_images_uses_what_exists():
    assert selection_score({"U2V_R@1": 0.6, "S2V_R@1": 0.8}) == pytest.approx(0.7)
    assert not sees_safety({"U2V_R@1": 0.6, "S2V_R@1": 0.8})
    assert selection_score({"U2S_R@1": 0.4}) == pytest.approx(0.4)
    assert math.isnan(selection_score({}))
    assert selection_parts({"U2VG_unsafe@1": float("nan"), "S2V_R@1": 0.5}) == {"S2V_R@1": 0.5}


# epoch 0: retrieval at its best but unsafe; epoch 1: safe, with a *lower* recall sum
SCRIPTED = [
    {"U2VG_unsafe@1": 0.95, "U2V_R@1": 0.90, "S2V_R@1": 0.90, "U2V_R@5": 1.0, "S2V_R@5": 1.0},
    {"U2VG_unsafe@1": 0.05, "U2V_R@1": 0.80, "S2V_R@1": 0.85, "U2V_R@5": 0.95, "S2V_R@5": 0.95},
]


def test_the_safer_checkpoint_is_exported_though_its_recall_sum_is_lower(tmp_path, toy_world, monkeypatch):
    """Two epochs, validation figures scripted: the safer epoch 1 has the lower recall sum,
    and it is the one kept, recorded, exported and named in the card."""
    import saferclip.app.module as module_mod
    from saferclip.app.train import train

    epochs = iter(SCRIPTED)

    def scripted_metrics(features):
        out = dict(next(epochs))
        out["selection_score"] = selection_score(out)
        return out

    monkeypatch.setattr(module_mod, "validation_metrics", scripted_metrics)
    recall_sum = [sum(v for k, v in m.items() if "_R@" in k) for m in SCRIPTED]
    assert recall_sum[1] < recall_sum[0]

    cfg = compose_train(tmp_path, toy_world, "trainer.max_epochs=2", "trainer.limit_train_batches=2", "export=true")
    result = train(cfg)
    run = tmp_path / "run"

    record = json.loads((run / "selection.json").read_text())
    assert record["monitor"] == "val/selection_score"
    assert [h["epoch"] for h in record["history"]] == [0, 1]
    assert record["selected"]["epoch"] == 1
    assert record["selected"]["metrics"]["U2VG_unsafe@1"] == pytest.approx(0.05)
    assert result["selection"]["epoch"] == 1
    assert result["best_checkpoint"].endswith("epoch01.ckpt")

    # the exported weights are epoch 1's, not epoch 0's (the epochs differ: training ran)
    best = torch.load(result["best_checkpoint"], map_location="cpu", weights_only=True)
    export = run / "export"
    exported = load_file(export / "open_clip_model.safetensors")
    trained = {k[len("model.") :]: v for k, v in best["state_dict"].items() if k.startswith("model.")}
    token = "positional_embedding"
    assert torch.equal(exported[token], trained[token].to(exported[token].dtype))
    info = json.loads((export / "open_clip_config.json").read_text())["saferclip"]
    assert info["epoch"] == 1 and info["selection"]["epoch"] == 1
    assert info["selection"]["metrics"]["U2VG_unsafe@1"] == pytest.approx(0.05)
    card = (export / "README.md").read_text()
    assert "Exported: epoch 1" in card and "val/selection_score" in card
