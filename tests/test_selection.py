"""Model selection: matched safety (the kept epoch), the validation score beside it, and the
epoch that gets exported."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import compose_train, hand_merged

from saferclip.evaluation.selection import (
    MATCHED_MONITOR,
    matched_choice,
    matched_objective,
    matched_safety,
    pareto_front,
    sees_safety,
    selection_parts,
    selection_score,
)
from saferclip.toyworld.generate import SMALL_SIZES

pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread (tests/conftest.py)


def test_score_is_the_mean_of_safety_and_the_recalls():
    metrics = {"U2VG_unsafe@1": 0.2, "U2V_R@1": 0.7, "S2V_R@1": 0.9, "U2V_R@5": 1.0}
    assert selection_score(metrics) == pytest.approx((0.8 + 0.7 + 0.9) / 3)
    assert sees_safety(metrics)
    # the NSFW-Caps-like validation set's S->V is a fourth part where it is measured
    assert selection_score({**metrics, "nsfw_caps_S2V_R@1": 0.2}) == pytest.approx((0.8 + 0.7 + 0.9 + 0.2) / 4)
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
    import saferclip.app.engine.module as module_mod
    from saferclip.app.engine.fit import train

    epochs = iter(SCRIPTED)

    def scripted_metrics(rows, similarity=None):
        if len(rows["index"]) == SMALL_SIZES.nsfw_caps_validation:  # the NSFW-Caps-like set
            return {"S2V_R@1": 0.5, "U2V_R@1": 0.4, "U2VG_unsafe@1": 0.3}
        return dict(next(epochs))

    monkeypatch.setattr(module_mod, "validation_metrics", scripted_metrics)
    recall_sum = [sum(v for k, v in m.items() if "_R@" in k) for m in SCRIPTED]
    assert recall_sum[0] < recall_sum[1]

    cfg = compose_train(tmp_path, toy_world, "trainer.max_epochs=2", "trainer.limit_train_batches=2", "export=true")
    result = train(cfg)
    run = tmp_path / "run"

    record = json.loads((run / "selection.json").read_text())
    assert record["monitor"] == "val/matched_safety" == MATCHED_MONITOR
    assert [h["epoch"] for h in record["history"]] == [0, 1]
    assert record["selected"]["epoch"] == 0
    assert record["selected"]["metrics"]["U2VG_unsafe@1"] == pytest.approx(0.05)
    # every epoch records the NSFW-Caps-like set's figures and the selection score with them
    epoch0 = record["history"][0]["metrics"]
    assert epoch0["nsfw_caps_S2V_R@1"] == pytest.approx(0.5) and epoch0["nsfw_caps_U2VG_unsafe@1"] == pytest.approx(0.3)
    assert epoch0["selection_score"] == pytest.approx((0.95 + 0.80 + 0.85 + 0.5) / 4)
    # 0.05 <= tau = 0.05 (logged as float32 0.0500000007): reached, scored 1 + the selection score
    assert epoch0["matched_safety"] == pytest.approx(1 + epoch0["selection_score"])
    assert record["history"][1]["metrics"]["matched_safety"] == pytest.approx(-0.95)
    assert record["matched_safety"]["reached"] is True and record["matched_safety"]["epoch"] == 0
    assert record["matched_safety"]["note"] == "reached τ = 5%: 5.0% unsafe at U→V 80.0 (epoch 0)"
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
    assert "Exported: epoch 0" in card and "val/matched_safety" in card
    assert "Matched safety: reached τ = 5%" in card


def _history(*rows):
    """A synthetic selection.json history: (unsafe rate, U->V, S->V) per epoch, from epoch 0."""
    out = []
    for epoch, (unsafe, u2v, s2v) in enumerate(rows):
        metrics = {"U2VG_unsafe@1": unsafe, "U2V_R@1": u2v, "S2V_R@1": s2v}
        metrics["selection_score"] = selection_score(metrics)
        out.append({"epoch": epoch, "global_step": 10 * (epoch + 1), "metrics": metrics})
    return out


def test_matched_safety_keeps_the_best_safe_enough_epoch_by_the_chosen_rank():
    # epochs 2 and 3 reach tau = 0.05; epoch 3 redirects better, epoch 2 is safer and keeps more
    # of S->V, and the unsafe epoch 0 redirects best of all
    history = _history((0.90, 0.95, 0.9), (0.20, 0.85, 0.9), (0.00, 0.60, 0.9), (0.05, 0.70, 0.8), (0.06, 0.90, 0.9))
    # ranked by U->V alone: epoch 3
    choice = matched_choice(history, tau=0.05, rank_by="U2V_R@1")
    assert choice["epoch"] == 3 and choice["reached"] is True and choice["rank_by"] == "U2V_R@1"
    assert choice["unsafe"] == 0.05 and choice["U2V"] == 0.70
    assert choice["note"] == "reached τ = 5%: 5.0% unsafe at U→V 70.0 (epoch 3)"
    # the objective is that epoch's selection score: mean(1 - 0.05, 0.70, 0.8)
    assert matched_objective(history, tau=0.05, rank_by="U2V_R@1") == pytest.approx((0.95 + 0.70 + 0.8) / 3)
    # the monitored scalar orders the epochs the same way: its argmax is the kept epoch
    values = [matched_safety(h["metrics"], 0.05, "U2V_R@1") for h in history]
    assert values == pytest.approx([-0.90, -0.20, 1.60, 1.70, -0.06])
    assert max(range(len(values)), key=lambda i: (values[i], -i)) == 3
    # ranked by the selection score (the default): epoch 2, mean(1, 0.6, 0.9) > mean(0.95, 0.7, 0.8)
    choice = matched_choice(history, tau=0.05)
    assert choice["epoch"] == 2 and choice["rank_by"] == "selection_score"
    assert matched_objective(history, tau=0.05) == pytest.approx((1.0 + 0.60 + 0.9) / 3)
    values = [matched_safety(h["metrics"], 0.05) for h in history]
    assert values[2] == pytest.approx(1 + 2.5 / 3) and values[0] == pytest.approx(-0.90)
    # a looser tau lets the better-redirecting epoch 4 in, by either rank
    assert matched_choice(history, tau=0.06)["epoch"] == 4
    assert matched_choice(history, tau=0.06, rank_by="U2V_R@1")["epoch"] == 4


def test_the_selection_score_rank_does_not_keep_a_safe_epoch_that_forgot():
    """The measured case behind the default (SafeR-CLIP, world 1, 2026-12-07, validation figures):
    epoch 0 is safe enough and redirects a hair better, but safe captions find their image for
    58.6% against 96.0% at epoch 7. U->V alone keeps epoch 0; the selection score keeps epoch 7."""
    history = _history((0.034, 0.222, 0.586), (0.004, 0.190, 0.848), (0.0, 0.214, 0.960))
    assert matched_choice(history, tau=0.05, rank_by="U2V_R@1")["epoch"] == 0
    assert matched_choice(history, tau=0.05)["epoch"] == 2


def test_an_unknown_rank_is_refused_by_name():
    from saferclip.errors import ConfigError
    from saferclip.evaluation.selection import check_rank_by

    assert check_rank_by("U2V_R@1") == "U2V_R@1"
    with pytest.raises(ConfigError, match=r"selection.rank_by must be one of selection_score, U2V_R@1.*'S2V_R@1'"):
        check_rank_by("S2V_R@1")


def test_never_reaching_tau_keeps_the_safest_epoch_and_says_so():
    history = _history((0.90, 0.95, 0.9), (0.124, 0.31, 0.7), (0.30, 0.80, 0.9))
    choice = matched_choice(history, tau=0.05)
    assert choice["epoch"] == 1 and choice["reached"] is False
    assert choice["note"] == "never reached τ = 5%; safest: 12.4% unsafe at U→V 31.0 (epoch 1)"
    # the objective is the safest epoch's selection score minus 1: below any run that reached tau
    expected = (1 - 0.124 + 0.31 + 0.7) / 3 - 1
    assert matched_objective(history, tau=0.05) == pytest.approx(expected)
    reached_badly = _history((0.05, 0.0, 0.0))  # safe by forgetting everything: score 0.95 / 3
    assert matched_objective(reached_badly, tau=0.05) > matched_objective(history, tau=0.05)


def test_ties_keep_the_earliest_epoch_and_nothing_measured_falls_back_on_the_score():
    tied_matched = _history((0.02, 0.70, 0.9), (0.01, 0.70, 0.5), (0.03, 0.70, 0.9))
    assert matched_choice(tied_matched, tau=0.05)["epoch"] == 0
    tied_safest = _history((0.50, 0.10, 0.9), (0.20, 0.30, 0.9), (0.20, 0.90, 0.9))
    choice = matched_choice(tied_safest, tau=0.05)
    assert choice["epoch"] == 1 and choice["reached"] is False  # as ModelCheckpoint: the first of equal bests
    # no unsafe rate measured (a validation split without unsafe images): the best selection score
    text_only = [
        {"epoch": e, "metrics": {"U2V_R@1": u, "S2V_R@1": s, "selection_score": (u + s) / 2}}
        for e, (u, s) in enumerate([(0.5, 0.5), (0.7, 0.6), (0.6, 0.6)])
    ]
    choice = matched_choice(text_only, tau=0.05)
    assert choice["epoch"] == 1 and choice["reached"] is None
    assert matched_objective(text_only, tau=0.05) == pytest.approx(0.65)  # no "- 1": safety was not measured
    assert matched_choice([], tau=0.05) is None and math.isnan(matched_objective([], tau=0.05))


def test_pareto_front_keeps_the_points_no_other_beats_on_both():
    points = [(0.90, 0.95), (0.20, 0.85), (0.00, 0.60), (0.05, 0.70), (0.30, 0.80), (0.00, 0.50), (0.20, 0.85)]
    # (0.30, 0.80) is beaten by (0.20, 0.85); (0.00, 0.50) by (0.00, 0.60); the equal pair stays
    assert pareto_front(points) == [0, 1, 2, 3, 6]


def test_early_stopping_waits_out_the_warm_up_then_watches_matched_safety(tmp_path, toy_world, monkeypatch):
    """Scripted unsafe rates 90, 95, 80, 85, 70, 60% (never <= tau): the worse epoch 1 is in the
    warm-up (2 epochs; plain EarlyStopping with patience 1 would stop there), epoch 2 improves,
    epoch 3 does not: the run ends after epoch 3, and the safest epoch (2) is kept."""
    import saferclip.app.engine.module as module_mod
    from saferclip.app.engine.fit import train

    unsafe = iter([0.90, 0.95, 0.80, 0.85, 0.70, 0.60])

    def scripted_metrics(rows, similarity=None):
        if len(rows["index"]) == SMALL_SIZES.nsfw_caps_validation:
            return {"S2V_R@1": 0.5}
        return {"U2VG_unsafe@1": next(unsafe), "U2V_R@1": 0.5, "S2V_R@1": 0.5}

    monkeypatch.setattr(module_mod, "validation_metrics", scripted_metrics)
    cfg = compose_train(
        tmp_path, toy_world, "trainer.max_epochs=6", "trainer.limit_train_batches=1", "export=false",
        "callbacks.early_stopping.patience=1", "callbacks.early_stopping.warmup_epochs=2",
    )  # fmt: skip
    train(cfg)
    record = json.loads((tmp_path / "run" / "selection.json").read_text())
    assert [h["epoch"] for h in record["history"]] == [0, 1, 2, 3]
    assert record["selected"]["epoch"] == 2 and record["matched_safety"]["epoch"] == 2
    assert record["matched_safety"]["note"] == "never reached τ = 5%; safest: 80.0% unsafe at U→V 50.0 (epoch 2)"
