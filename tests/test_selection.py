"""Model selection: the validation score that sees safety, and the epoch that gets exported."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import compose_train, hand_merged

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


# epoch 0: safe, with a *lower* recall sum; epoch 1: retrieval at its best but unsafe. The kept
# epoch is not the last one, so an export of last.ckpt (or of the newest weights) is caught.
SCRIPTED = [
    {"U2VG_unsafe@1": 0.05, "U2V_R@1": 0.80, "S2V_R@1": 0.85, "U2V_R@5": 0.95, "S2V_R@5": 0.95},
    {"U2VG_unsafe@1": 0.95, "U2V_R@1": 0.90, "S2V_R@1": 0.90, "U2V_R@5": 1.0, "S2V_R@5": 1.0},
]


def test_the_safer_checkpoint_is_exported_though_its_recall_sum_is_lower(tmp_path, toy_world, monkeypatch):
    """Two epochs, validation figures scripted: the safer epoch 0 has the lower recall sum,
    and it is the one kept, recorded, exported and named in the card, though epoch 1 trained
    on and is what last.ckpt holds."""
    import saferclip.app.module as module_mod
    from saferclip.app.train import train

    epochs = iter(SCRIPTED)

    def scripted_metrics(features):
        out = dict(next(epochs))
        out["selection_score"] = selection_score(out)
        return out

    monkeypatch.setattr(module_mod, "validation_metrics", scripted_metrics)
    recall_sum = [sum(v for k, v in m.items() if "_R@" in k) for m in SCRIPTED]
    assert recall_sum[0] < recall_sum[1]

    cfg = compose_train(tmp_path, toy_world, "trainer.max_epochs=2", "trainer.limit_train_batches=2", "export=true")
    result = train(cfg)
    run = tmp_path / "run"

    record = json.loads((run / "selection.json").read_text())
    assert record["monitor"] == "val/selection_score"
    assert [h["epoch"] for h in record["history"]] == [0, 1]
    assert record["selected"]["epoch"] == 0
    assert record["selected"]["metrics"]["U2VG_unsafe@1"] == pytest.approx(0.05)
    assert result["selection"]["epoch"] == 0
    assert result["best_checkpoint"].endswith("epoch00.ckpt")

    # the exported weights are epoch 0's merged by hand, and not epoch 1's (last.ckpt)
    best = torch.load(result["best_checkpoint"], map_location="cpu", weights_only=True)
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert (best["epoch"], last["epoch"]) == (0, 1)
    kept, newer = hand_merged(best), hand_merged(last)
    export = run / "export"
    exported = load_file(export / "open_clip_model.safetensors")
    assert set(exported) == set(kept)
    for key, value in kept.items():
        torch.testing.assert_close(exported[key].float(), value.float(), rtol=0, atol=1e-6, msg=key)
    # epoch 1 trained on: its weights differ from epoch 0's, by far more than the tolerance above
    moved = [k for k in kept if (kept[k].float() - newer[k].float()).abs().max() > 1e-4]
    assert any(".mlp.c_fc." in k for k in moved) and any("in_proj_weight" in k for k in moved), moved
    for key in moved:
        assert not torch.allclose(exported[key].float(), newer[key].float(), rtol=0, atol=1e-4), key
    info = json.loads((export / "open_clip_config.json").read_text())["saferclip"]
    assert info["epoch"] == 0 and info["selection"]["epoch"] == 0
    assert info["selection"]["metrics"]["U2VG_unsafe@1"] == pytest.approx(0.05)
    card = (export / "README.md").read_text()
    assert "Exported: epoch 0" in card and "val/selection_score" in card
