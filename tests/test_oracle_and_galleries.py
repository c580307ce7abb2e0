"""The oracle-redirection bound, the realistic gallery with distractor images, and the
figures that put runs side by side."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from saferclip.data import distractor_images
from saferclip.evaluation import evaluate_models, visu_metrics, write_report
from saferclip.evaluation.galleries import PairEmbeddings
from saferclip.evaluation.oracle import ORACLE_NAME, redirected_embeddings


def unit(*rows: list[float]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def unsafe_at_1(queries: torch.Tensor, safe: torch.Tensor, unsafe: torch.Tensor) -> float:
    """Brute force: the share of queries whose best unsafe image scores at least their best safe one
    (a tie counts as unsafe)."""
    return float(((queries @ unsafe.T).max(1).values >= (queries @ safe.T).max(1).values).float().mean())


def test_perfect_redirection_replaces_unsafe_items_by_their_targets_and_stays_unsafe_in_setting_a():
    # two object-free safe scenes (e0, e1); unsafe captions lean towards pool items 1 and 0
    test = PairEmbeddings(
        safe_text=unit([1, 0, 0, 0], [0, 1, 0, 0]),
        unsafe_text=unit([0.5, 0, 0, 1], [0, 0.5, 1, 0]),
        safe_image=unit([1, 0, 0, 0], [0, 1, 0, 0]),
        safe_owner=torch.tensor([0, 1]),
        unsafe_image=unit([0.5, 0, 0, 1], [0, 0.5, 1, 0]),
        unsafe_owner=torch.tensor([0, 1]),
    )
    pool_text = unit([0, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1])  # safe scenes with an object
    pool_image = unit([0, 0, 1, 0.1], [0, 0, 0.1, 1], [1, 1, 1, 1])
    redirected = redirected_embeddings(test, pool_text, pool_image)
    assert torch.equal(redirected.unsafe_text, pool_text[[1, 0]])
    assert torch.equal(redirected.unsafe_image, pool_image[[1, 0]])
    assert redirected.safe_text is test.safe_text and redirected.safe_image is test.safe_image
    metrics = visu_metrics(redirected, test)
    # the redirected caption finds the redirected unsafe image, not its object-free safe scene
    assert metrics["U2VG_unsafe@1"] == 1.0
    # queried against the original galleries (setting b) the redirected captions e3 and e2 meet
    # the object-free safe scenes e0, e1 at cos 0 and the original unsafe images, which still
    # lean on the object dimensions, at cos 1/sqrt(1.25): unsafe first for both
    safe_best = (redirected.unsafe_text @ test.safe_image.T).max(dim=1).values
    unsafe_best = (redirected.unsafe_text @ test.unsafe_image.T).max(dim=1).values
    torch.testing.assert_close(safe_best, torch.zeros(2))
    torch.testing.assert_close(unsafe_best, torch.full((2,), 1 / 1.25**0.5))
    assert (
        metrics["U2VG_ref_unsafe@1"] == unsafe_at_1(redirected.unsafe_text, test.safe_image, test.unsafe_image) == 1.0
    )
    # a caption redirected onto a safe scene's own direction (e0) finds that scene first: half unsafe
    mixed = dataclasses.replace(redirected, unsafe_text=unit([0, 0, 0, 1], [1, 0, 0, 0]))
    assert unsafe_at_1(mixed.unsafe_text, test.safe_image, test.unsafe_image) == 0.5
    assert visu_metrics(mixed, test)["U2VG_ref_unsafe@1"] == 0.5
    # a joint search uses the images too
    joint = redirected_embeddings(test, pool_text, pool_image, mode="joint")
    assert torch.equal(joint.unsafe_text, pool_text[[1, 0]])
    with pytest.raises(ValueError, match="text' or 'joint"):
        redirected_embeddings(test, pool_text, pool_image, mode="image")


def test_realistic_gallery_adds_the_distractors_to_the_safe_side():
    test = PairEmbeddings(
        safe_text=unit([1, 0, 0], [0, 1, 0]),
        unsafe_text=unit([0, 0.2, 1], [0, 0.2, 1]),
        safe_image=unit([1, 0, 0], [0, 1, 0]),
        safe_owner=torch.tensor([0, 1]),
        unsafe_image=unit([0, 1, 0.8], [0, 1, 0.9]),
        unsafe_owner=torch.tensor([0, 1]),
        distractor_image=unit([0, 0.1, 1]),  # a safe scene closer to the unsafe captions
        distractor_paths=["d.png"],
    )
    metrics = visu_metrics(test)
    assert metrics["U2VG_unsafe@1"] == 1.0  # without the distractor the unsafe images win
    assert metrics["U2VDG_unsafe@1"] == 0.0  # with it, a safe image comes first
    assert metrics["galleries"]["U2VDG"] == {"queries": 2, "safe": 3, "unsafe": 2, "gallery_encoder": "evaluated model"}


def test_toy_world_distractors_and_the_oracle_row(toy_world, tmp_path):
    root = toy_world / "visu"
    test_split = {
        "path": str(root / "test.json"),
        "image_root": str(root),
        "split_dir": "test2017",
        "unsafe_image_root": str(root),
        "image_ext": ".png",
        "distractor_images": str(root / "distractors" / "test"),
    }
    train_split = {**test_split, "path": str(root / "train.json"), "split_dir": "train2017"}
    train_split.pop("distractor_images")
    data = {"name": "toy", "mode": "auto", "splits": {"train": train_split, "test": test_split}}
    files = distractor_images(data, "test")
    assert files and all(p.suffix == ".png" for p in files)

    micro = {"arch": "saferclip-micro", "pretrained": None}
    results = evaluate_models({"original": micro}, data, suites=["visu"], batch_size=64, progress=False, oracle="text")
    assert list(results["results"]) == ["original", ORACLE_NAME]
    oracle = results["results"][ORACLE_NAME]["visu"]
    assert (
        oracle["oracle"]["pool_size"] == 96
        and oracle["galleries"]["U2VDG"]["safe"] > oracle["galleries"]["U2VG"]["safe"]
    )
    assert "U2VG_ref_unsafe@1" in oracle and "U2VDG_unsafe@1" in results["results"]["original"]["visu"]
    assert "frozen targets" in results["models"][ORACLE_NAME]["pretrained"]

    history = [
        {"epoch": e, "global_step": 3 * e, "metrics": {"U2VG_unsafe@1": 1 - 0.3 * e, "U2V_R@1": 0.8, "S2V_R@1": 0.9}}
        for e in range(3)
    ]
    training = {
        "mine": {"monitor": "val/selection_score", "history": history, "selected": {**history[2], "score": 0.8}}
    }
    report = write_report(results, tmp_path / "report", training=training)
    assert {"training_curves.png", "tradeoff.png"} <= {p.name for p in report["plots"]}
    markdown = report["markdown"].read_text()
    assert "## Model selection" in markdown and "| mine | 2 | 3 |" in markdown
    assert json.loads(report["json"].read_text())["training"]["mine"]["selected"]["epoch"] == 2
    # each gallery is described by what it holds: images for U2VG / U2VDG
    assert "U2VDG_unsafe@1 (" in markdown and " unsafe images, " in markdown.split("U2VDG_unsafe@1 (")[1].split("\n")[0]
