"""The same command twice on one machine gives the same digits: each method's micro run, trained
twice from scratch (its own cache and neighbour index each time), exports the same bytes and
evaluates to the same numbers, bit for bit (docs/DEVELOPING.md, "Determinism", says what may
differ across machines and thread counts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_helpers import compose_train

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = ("trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1")


def train_and_evaluate(tmp: Path, toy_world: Path, method: str) -> tuple[Path, dict, dict]:
    from saferclip.app.engine.fit import train
    from saferclip.app.hydra_utils import to_container
    from saferclip.evaluation.runner import evaluate_models

    cfg = compose_train(tmp, toy_world, f"method={method}", *RUN)
    result = train(cfg)
    export = Path(result["export"])
    models = {"original": {"arch": "saferclip-micro", "pretrained": None}}
    if method == "hysac":
        models.update(
            {
                "safe": {"pretrained": str(export), "mode": "safe"},
                "moderation": {"pretrained": str(export), "mode": "moderation"},
            }
        )
    else:
        models["trained"] = {"pretrained": str(export)}
    evaluation = evaluate_models(
        models, to_container(cfg.data), suites=["visu", "nsfw_caps", "zeroshot"], batch_size=64, showcase=False
    )
    selection = json.loads((tmp / "run" / "selection.json").read_text())
    return export, evaluation, selection


def without_where_and_when(evaluation: dict) -> dict:
    """The evaluation less what names the folder or the clock (paths, timestamps, seconds)."""
    out = dict(evaluation)
    out["meta"] = {k: v for k, v in out["meta"].items() if k != "created"}
    out["models"] = {
        name: {k: v for k, v in info.items() if k not in ("seconds", "source", "pretrained")}
        for name, info in out["models"].items()
    }
    out.pop("data", None)
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("method", ["saferclip", "safeclip", "hysac"])
def test_a_micro_run_twice_gives_the_same_bits(method, toy_world, tmp_path):
    torch.set_num_threads(1)
    first = train_and_evaluate(tmp_path / "first", toy_world, method)
    second = train_and_evaluate(tmp_path / "second", toy_world, method)
    (export_a, eval_a, selection_a), (export_b, eval_b, selection_b) = first, second
    # the exports: every file byte for byte (weights, configs, tokenizer, card, HySAC's head)
    files_a = sorted(p.relative_to(export_a) for p in export_a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(export_b) for p in export_b.rglob("*") if p.is_file())
    assert any(p.suffix == ".safetensors" for p in files_a)
    for name in files_a:
        assert (export_a / name).read_bytes() == (export_b / name).read_bytes(), name
    # the training record and every number of the evaluation, floats compared exactly
    assert [h["metrics"] for h in selection_a["history"]] == [h["metrics"] for h in selection_b["history"]]
    assert json.dumps(without_where_and_when(eval_a), sort_keys=True) == json.dumps(
        without_where_and_when(eval_b), sort_keys=True
    )
    assert eval_a["intervals"] and eval_a["differences"] == eval_b["differences"]
