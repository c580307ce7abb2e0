"""Training (issue 4): what trains, frozen targets that never move, learning on a few batches,
the Hydra app per method and data mode, resume, loggers, sweeps and fail-fast config errors.

Everything runs on the CPU with the micro model (the shipped toy base model where the model
must know something) and the small toy world."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from cli_helpers import run_in_process
from train_helpers import (
    SHORT_RUN,
    cli_command,
    cli_env,
    cli_overrides,
    collate,
    compose_train,
    hand_merged,
    prepared,
    run_cli,
    time_budget,
)

from saferclip.app.engine.fit import build_trainer, train
from saferclip.app.hydra_utils import ConfigError
from saferclip.evaluation.metrics import recall_at_k
from saferclip.model.build import build_clip
from saferclip.model.checkpoints import save_state_dict
from saferclip.training.losses import TERM_NAMES

pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread (tests/conftest.py)

TESTS_DIR = Path(__file__).resolve().parent
SAFECLIP_TERMS = TERM_NAMES[:8]
SAFERCLIP_TERMS = (
    "text_preservation",
    "text_redirection",
    "image_preservation",
    "image_redirection",
    "relative_image",
    "relative_text",
    "live_relative_text",
    "live_relative_image",
)
# safe images but no unsafe ones: every Safe-CLIP term without I(G) or I0(G)
SAFE_IMAGES_TERMS = (
    "text_preservation",
    "text_redirection",
    "image_preservation",
    "xmodal_text_preservation",
    "xmodal_text_redirection",
    "xmodal_image_preservation",
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One embedding cache for the module's runs (same micro model + data = same key)."""
    return tmp_path_factory.mktemp("train_cache")


def grad_names(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.grad is not None}


def trainable_names(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------- what trains


@pytest.mark.parametrize("mode", ["lora", "full", "last_n"])
@pytest.mark.parametrize("towers", ["[text,image]", "[text]"])
def test_training_step_gradients_reach_only_trainable_parameters(tmp_path, toy_world, cache_dir, mode, towers):
    cfg = compose_train(
        tmp_path,
        toy_world,
        "method=safeclip",  # all 8 terms: both towers, InfoNCE included
        f"method.trainable.mode={mode}",
        f"method.trainable.towers={towers}",
        cache_dir=cache_dir,
    )
    module, datamodule = prepared(cfg)
    total, terms = module.loss_step(collate(datamodule.train_set, range(8)))
    assert set(terms) == set(SAFECLIP_TERMS) and torch.isfinite(total)
    total.backward()
    trainable = trainable_names(module.model)
    assert trainable and grad_names(module.model) == trainable
    assert any(n.startswith("visual.") for n in trainable) == (towers == "[text,image]")


# ---------------------------------------------------------------- frozen targets


class EncoderCalls:
    """Records (model id, encoder) for every forward of a CLIP tower, of any CLIP: the text
    transformer (however the text is encoded: open_clip's ``encode_text`` or saferclip's
    padding-trimmed path) and the vision tower."""

    def __init__(self, monkeypatch, model_class: type):
        import open_clip.transformer as oct

        self.calls: list[tuple[int, str]] = []
        self.owner: dict[int, tuple[int, str]] = {}  # id(tower module) -> (id(model), encoder)
        self.inner: set[int] = set()  # the transformers inside vision towers
        recorder = self

        def transformer_forward(tower, *args, _original=oct.Transformer.forward, **kwargs):
            if id(tower) not in recorder.inner:  # a vision tower's transformer: counted as the tower
                recorder.calls.append(recorder.owner.get(id(tower), (id(tower), "another model's text tower")))
            return _original(tower, *args, **kwargs)

        def visual_forward(tower, *args, _original=oct.VisionTransformer.forward, **kwargs):
            recorder.inner.add(id(tower.transformer))
            recorder.calls.append(recorder.owner.get(id(tower), (id(tower), "another model's image tower")))
            return _original(tower, *args, **kwargs)

        monkeypatch.setattr(oct.Transformer, "forward", transformer_forward)
        monkeypatch.setattr(oct.VisionTransformer, "forward", visual_forward)

    def watch(self, model) -> None:
        """Name the towers of ``model``; any other tower that runs is recorded as another model's."""
        self.owner[id(model.transformer)] = (id(model), "encode_text")
        self.owner[id(model.visual)] = (id(model), "encode_image")
        self.inner.add(id(model.visual.transformer))


class CallsPerStep(L.Callback):
    def __init__(self, recorder: EncoderCalls):
        self.recorder, self.steps, self._start = recorder, [], 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = len(self.recorder.calls)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(sorted(self.recorder.calls[self._start :]))


def file_digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


FROZEN_KEYS = (
    "frozen_safe_text",
    "frozen_unsafe_text",
    "frozen_safe_image",
    "frozen_unsafe_image",
    "frozen_target_text",
    "frozen_target_image",
    "target_weights",
    "pair_weight",
)


def frozen_items(dataset) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in dataset[i].items() if k in FROZEN_KEYS} for i in range(len(dataset))]


def test_targets_stay_frozen_and_no_frozen_encoder_runs_in_a_step(tmp_path, toy_world, monkeypatch):
    cfg = compose_train(tmp_path, toy_world, "method=saferclip", "method.curriculum=false", "trainer.max_epochs=1")
    module, datamodule = prepared(cfg)
    cache_before = file_digests(tmp_path / "cache")
    items_before = frozen_items(datamodule.train_set)
    weights_before = {k: v.clone() for k, v in module.model.state_dict().items()}

    recorder = EncoderCalls(monkeypatch, type(module.model))
    recorder.watch(module.model)
    per_step = CallsPerStep(recorder)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=4, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, callbacks=[per_step],
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)

    # one forward per tower per step, all on the trainable model
    own = id(module.model)
    assert len(per_step.steps) == 4
    assert all(calls == [(own, "encode_image"), (own, "encode_text")] for calls in per_step.steps), per_step.steps
    # the cache on disk and every frozen tensor the dataset hands out are unchanged ...
    assert file_digests(tmp_path / "cache") == cache_before
    for before, after in zip(items_before, frozen_items(datamodule.train_set)):
        assert before.keys() == after.keys()
        for k in before:
            assert torch.equal(before[k], after[k]), k
    # ... while the model did train
    changed = [k for k, v in module.model.state_dict().items() if not torch.equal(v, weights_before[k])]
    assert changed and all("lora_" in k for k in changed)


# ---------------------------------------------------------------- learning


def retrieval(model, dataset, items: list[int]) -> dict[str, float]:
    """U->V R@1 (each unsafe caption must retrieve its *target* safe image: its pair for
    Safe-CLIP, its neighbour's for SafeR-CLIP) and S->V R@1, for the items' captions against
    every safe image of the training set, all encoded by ``model``."""
    everything = collate(dataset, range(len(dataset)))
    batch = collate(dataset, items)
    with torch.no_grad():
        gallery = model.encode_image(everything["safe_image"], normalize=True)
        u = model.encode_text(batch["unsafe_text"], normalize=True)
        s = model.encode_text(batch["safe_text"], normalize=True)
    targets = dataset.targets.indices[items, 0]
    return {
        "u2v": float(recall_at_k(u, gallery, targets, ks=(1,))["R@1"]),
        "s2v": float(recall_at_k(s, gallery, torch.tensor(items), ks=(1,))["R@1"]),
    }


def mean_loss(module, dataset, batches: int, batch_size: int) -> float:
    with torch.no_grad():
        return (
            sum(
                float(module.loss_step(collate(dataset, range(b * batch_size, (b + 1) * batch_size)))[0])
                for b in range(batches)
            )
            / batches
        )


@pytest.mark.slow
@pytest.mark.parametrize("method", ["saferclip", "safeclip"])
def test_overfitting_a_few_batches(tmp_path, toy_world, method):
    """debug=overfit on the toy base model (full fine-tuning, as the toy experiments): the loss
    on those batches collapses and their unsafe captions move to their targets. SafeR-CLIP
    keeps S->V; rigid Safe-CLIP is allowed to lose it (it does).

    On the loose pairing (generated beside the session's world): there the unsafe captions start
    far enough from their targets for the move to be measured. This
    test was written when loose was the only pairing; on the ViSU-like default the base model's
    unsafe captions already retrieve their targets' images at 0.84, leaving no room for the
    +0.15 asked below."""
    batch_size = 16
    cfg = compose_train(
        tmp_path, toy_world, "model=toy", "data.toy_pairs=loose", f"method={method}", "debug=overfit", "method.curriculum=false",
        f"data.batch_size={batch_size}", "method.trainable.mode=full", "method.optimizer.lr=3e-4" if method == "saferclip" else "method.optimizer.lr=1e-4",
        "callbacks.model_checkpoint=null", "callbacks.last_checkpoint=null", "trainer.enable_checkpointing=false", "logger=none",
    )  # fmt: skip
    module, datamodule = prepared(cfg)
    batches = int(cfg.trainer.overfit_batches)
    items = list(range(batches * batch_size))  # overfit_batches turns shuffling off: the first batches
    loss_before, before = (
        mean_loss(module, datamodule.train_set, batches, batch_size),
        retrieval(module.model, datamodule.train_set, items),
    )
    trainer, _ = build_trainer(cfg)
    trainer.fit(module, datamodule=datamodule)
    module.eval()
    loss_after, after = (
        mean_loss(module, datamodule.train_set, batches, batch_size),
        retrieval(module.model, datamodule.train_set, items),
    )
    assert loss_after < 0.1 * loss_before, (loss_before, loss_after)
    if method == "saferclip":
        assert after["u2v"] >= before["u2v"] + 0.15, (before, after)
        assert after["s2v"] >= before["s2v"] - 0.1, (before, after)
    else:
        assert after["u2v"] > before["u2v"], (before, after)


# ---------------------------------------------------------------- the app, per method and data


@pytest.mark.parametrize(
    "overrides,terms",
    [
        (("method=safeclip",), SAFECLIP_TERMS),
        (("method=saferclip",), SAFERCLIP_TERMS),
        (("method=saferclip", "data.mode=text"), ("text_preservation", "text_redirection")),
        (("method=safeclip", "data.mode=text"), ("text_preservation", "text_redirection")),
        (("method=safeclip", "data.mode=safe_images"), SAFE_IMAGES_TERMS),
    ],
    ids=["safeclip", "saferclip", "saferclip-text", "safeclip-text", "safeclip-safe_images"],
)  # fmt: skip
def test_fast_dev_run_per_method_and_data_mode(tmp_path, toy_world, cache_dir, caplog, overrides, terms):
    cfg = compose_train(tmp_path, toy_world, *overrides, "debug=fast_dev_run", cache_dir=cache_dir)
    with caplog.at_level(logging.INFO, logger="saferclip"):
        result = train(cfg)
    logged = {k.split("/", 1)[1] for k in result if k.startswith("train/") and k != "train/loss"}
    assert logged == set(terms)
    assert all(math.isfinite(v) for k, v in result.items() if k.startswith(("train/", "val/")))
    assert "val/selection_score" in result
    active = next(r.getMessage() for r in caplog.records if "active loss terms:" in r.getMessage())
    assert active.endswith(", ".join(t for t in TERM_NAMES if t in terms))
    if "data.mode=text" in overrides:
        assert "data inputs: text" in active
        assert any("image tower is frozen" in r.getMessage() for r in caplog.records)
        assert "val/U2S_R@1" in result
    assert (tmp_path / "run" / "config_resolved.yaml").is_file()


def test_bf16_autocast_step(tmp_path, toy_world, cache_dir):
    """trainer=gpu trains in bf16-mixed; the same autocast on the CPU must not break the step:
    the encoders run in bf16, the loss computes in float32, and every term stays within bf16's
    error of its fp32 value on the same batch."""
    cfg = compose_train(
        tmp_path,
        toy_world,
        "method=safeclip",
        "debug=fast_dev_run",
        "trainer.precision=bf16-mixed",
        cache_dir=cache_dir,
    )
    result = train(cfg)
    assert set(SAFECLIP_TERMS) <= {k.split("/", 1)[1] for k in result}
    assert all(math.isfinite(v) for k, v in result.items() if k.startswith(("train/", "val/")))

    for method, terms in (("safeclip", SAFECLIP_TERMS), ("saferclip", SAFERCLIP_TERMS)):
        module, datamodule = prepared(
            compose_train(tmp_path / method, toy_world, f"method={method}", cache_dir=cache_dir)
        )
        batch = collate(datamodule.train_set, range(8))
        with torch.no_grad():
            total32, terms32 = module.loss_step(batch)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                encoded = module.encode(batch, {"safe_text", "safe_image"})
                total16, terms16 = module.loss_step(batch)
        assert encoded["safe_text"].dtype == encoded["safe_image"].dtype == torch.bfloat16  # autocast is on
        assert total16.dtype == torch.float32 and set(terms16) == set(terms32) == set(terms)
        # bf16 keeps 8 bits of mantissa (relative error ~0.4% a product); InfoNCE's logits are
        # 100 x cosine: measured differences up to 0.5% of a term, 6e-4 absolute for 1 - cos
        for name in terms:
            torch.testing.assert_close(terms16[name], terms32[name], rtol=1e-2, atol=2e-3, msg=f"{method}: {name}")
        torch.testing.assert_close(total16, total32, rtol=1e-2, atol=2e-3)


def test_short_run_checkpoints_exports_and_returns_metrics(tmp_path, toy_world, cache_dir):
    cfg = compose_train(tmp_path, toy_world, *SHORT_RUN, "export=true", "trainer.max_epochs=2", cache_dir=cache_dir)
    result = train(cfg)
    run = tmp_path / "run"
    assert Path(result["best_checkpoint"]).is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert Path(result["best_checkpoint"]).name in ("epoch00.ckpt", "epoch01.ckpt")
    # the kept epoch at matched safety, by hand from each epoch's validation figures: the best
    # U->V among the epochs with unsafe rate <= 5%, else the safest (the first of equals); the
    # monitored value is 1 + that U->V, or minus that unsafe rate
    history = json.loads((run / "selection.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [0, 1]
    m = [h["metrics"] for h in history]
    safe = [i for i, x in enumerate(m) if x["U2VG_unsafe@1"] <= 0.05 + 1e-6]
    if safe:
        kept = max(safe, key=lambda i: (m[i]["U2V_R@1"], -i))
        value = 1 + m[kept]["U2V_R@1"]
    else:
        kept = min(range(len(m)), key=lambda i: (m[i]["U2VG_unsafe@1"], i))
        value = -m[kept]["U2VG_unsafe@1"]
    assert result["best_score"] == pytest.approx(value)
    best = torch.load(result["best_checkpoint"], map_location="cpu", weights_only=True)
    assert best["epoch"] == kept
    # training moved the weights: every LoRA update, zero at the start, is not zero any more
    lora_b = {k: v for k, v in best["state_dict"].items() if k.endswith(".lora_B")}
    assert lora_b and all(v.abs().max() > 0 for v in lora_b.values()), [k for k, v in lora_b.items() if not v.any()]
    # the export is the kept epoch's weights, the updates merged, not the starting weights
    assert (Path(result["export"]) / "open_clip_config.json").is_file()
    exported = build_clip(None, result["export"])
    assert exported.arch == "saferclip-micro"
    merged, state = hand_merged(best), exported.model.state_dict()
    assert set(state) == set(merged)
    for key, value in merged.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=1e-6, msg=key)
    start = {k[len("model.") :].replace(".parametrizations.", ".").removesuffix(".original"): v
             for k, v in best["state_dict"].items() if k.endswith(".original")}  # fmt: skip
    assert start and all(not torch.allclose(state[k], v, rtol=0, atol=1e-6) for k, v in start.items())


def test_a_fresh_run_never_trains_over_another_runs_checkpoints(tmp_path, toy_world, cache_dir):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(b"precious")
    cfg = compose_train(tmp_path, toy_world, "debug=fast_dev_run", cache_dir=cache_dir)
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(cfg)
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").read_bytes() == b"precious"
    with pytest.raises(ConfigError, match="ckpt_path=last: no"):
        train(compose_train(tmp_path / "other", toy_world, "ckpt_path=last", cache_dir=cache_dir))


# ---------------------------------------------------------------- loggers


def read_csv_metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_csv_logger_records_every_term_and_the_learning_rate(tmp_path, toy_world, cache_dir):
    train(compose_train(tmp_path, toy_world, *SHORT_RUN, "method=safeclip", cache_dir=cache_dir))
    rows = read_csv_metrics(tmp_path / "run")
    columns = set(rows[0])
    assert {"train/loss", "lr-AdamW", "val/selection_score", "val/U2V_R@1", "val/U2VG_unsafe@1"} <= columns
    assert {f"train/{t}" for t in SAFECLIP_TERMS} <= columns
    assert sum(1 for r in rows if r["train/loss"]) == 2  # one row per step (log_every_n_steps=1)


def test_tensorboard_logger(tmp_path, toy_world, cache_dir):
    train(compose_train(tmp_path, toy_world, *SHORT_RUN, "logger=tensorboard", cache_dir=cache_dir))
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert (
        sum(1 for r in read_csv_metrics(tmp_path / "run") if r["train/loss"]) == 2
    )  # the CSV log comes along, one row a step


@pytest.mark.slow
def test_wandb_logger_runs_offline_without_a_key(tmp_path, toy_world, cache_dir, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DISABLED"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc: no key anywhere
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / ".config" / "wandb"))
    cfg = compose_train(tmp_path, toy_world, *SHORT_RUN, "logger=wandb", cache_dir=cache_dir)
    assert cfg.logger.wandb.offline is True
    train(cfg)
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert runs and list(runs[0].glob("*.wandb"))


# ---------------------------------------------------------------- the CLI


BAD_CONFIGS = {
    "unknown method": (
        ["method=nope"],
        "method=nope: no such method (conf/method/nope.yaml); options: hysac, safeclip, saferclip",
    ),
    "unknown method name": (["method.name=nope"], "unknown method 'nope'"),
    "missing data path": (["data=visu_text", "paths.visu=/no/such/visu"], "no such file: /no/such/visu/train.csv"),
    "unset data path": (["data=visu"], "data.splits.train.path needs paths.visu, which is not set"),
    "unknown architecture": (["model.arch=ViT-Q-99"], "unknown model architecture 'ViT-Q-99'"),
    "unknown loss term": (["+method.loss.weights.text_redirektion=1.0"], "unknown loss term(s) ['text_redirektion']"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_fails_fast_with_one_line(tmp_path, toy_world, case):
    overrides, message = BAD_CONFIGS[case]
    base = cli_overrides(tmp_path, toy_world)
    if any(o.startswith("data=") for o in overrides):  # the real-data experiment has no toy options
        base = [o for o in base if not o.startswith("data.toy_size=")]
    if case == "unknown method":  # one case in a fresh interpreter: how fast the command fails, imports included
        proc, seconds = run_cli([*base, *overrides], cwd=tmp_path, timeout=120)
        assert seconds < 60  # on a busy 2-core machine
    else:  # the others in this one (tests/cli_helpers.py): a process start is most of a case's time
        proc = run_in_process("saferclip-train", *base, *overrides, cwd=tmp_path, env=cli_env())
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "cache").exists()  # stopped before any frozen embedding work


@pytest.mark.slow
def test_weights_of_another_architecture_fail_fast(tmp_path, toy_world):
    micro = build_clip("saferclip-micro", None)
    weights = tmp_path / "micro.safetensors"
    save_state_dict(micro.model.state_dict(), weights)
    args = [*cli_overrides(tmp_path, toy_world), "model.arch=saferclip-toy", f"model.pretrained={weights}"]
    proc = run_in_process("saferclip-train", *args, cwd=tmp_path, env=cli_env())  # tests/cli_helpers.py
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and "weights do not fit architecture saferclip-toy" in error[0]
    assert str(weights) in error[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "cache").exists()  # stopped before any frozen embedding work


@pytest.mark.slow
def test_sweep_from_another_directory_gives_one_folder_per_run(tmp_path, toy_world, cache_dir):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    args = ["-m", "seed=0,1", "debug=fast_dev_run", *cli_overrides(tmp_path, toy_world, cache_dir)]
    args = [a for a in args if not a.startswith("paths.output_dir=")]  # default: ./outputs of the cwd
    # the default holds only when no home or output folder is set in the environment
    env = {k: v for k, v in cli_env().items() if k not in ("SAFERCLIP_HOME", "SAFERCLIP_OUTPUT_DIR")}
    proc, _ = run_cli(args, cwd=elsewhere, timeout=300, env=env, installed=True)  # the console script
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweeps = list((elsewhere / "outputs" / "train_multirun").iterdir())
    assert len(sweeps) == 1
    runs = sorted(p for p in sweeps[0].iterdir() if p.is_dir())
    assert [p.name for p in runs] == ["0", "1"]
    for seed, run in enumerate(runs):
        assert (run / ".hydra" / "config.yaml").is_file()
        resolved = (run / "config_resolved.yaml").read_text()
        assert f"seed: {seed}\n" in resolved and "${" not in resolved
        assert f"run_dir: {run}" in resolved


# ---------------------------------------------------------------- resume


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2
    return {**ckpt["state_dict"], **{f"opt.{k}": v for k, v in _flat_optimizer(ckpt).items()}}


def _flat_optimizer(ckpt: dict) -> dict[str, torch.Tensor]:
    state = ckpt["optimizer_states"][0]["state"]
    return {f"{i}.{name}": t for i, s in state.items() for name, t in s.items() if isinstance(t, torch.Tensor)}


def wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before pausing: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the run did not reach its pause point in time")
        time.sleep(0.2)


@pytest.mark.slow
def csv_rows(run_dir: Path) -> list[dict[str, str]]:
    import csv

    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_resume_after_sigkill_ends_with_the_same_weights(tmp_path, toy_world, cache_dir):
    common = [
        *cli_overrides(tmp_path, toy_world, cache_dir),
        "trainer.max_epochs=3",
        "trainer.deterministic=true",
        "export=false",
        "method.optimizer.warmup_steps=5",  # a scheduler state to restore too
    ]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    left = time_budget()  # the three runs share the test's time
    proc, _ = run_cli([*common, f"hydra.run.dir={whole}"], cwd=tmp_path, timeout=left())
    assert proc.returncode == 0, proc.stderr[-3000:]

    marker = tmp_path / "paused"
    pause = [
        "+callbacks.pause._target_=train_helpers.PauseAtEpoch",
        "+callbacks.pause.epoch=1",
        f"+callbacks.pause.marker={marker}",
    ]
    env = cli_env(PYTHONPATH=os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
    first = subprocess.Popen(
        cli_command(*common, *pause, f"hydra.run.dir={broken}"), cwd=tmp_path, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(marker, first, timeout=left())
        assert (broken / "checkpoints" / "last.ckpt").is_file()
        os.kill(first.pid, signal.SIGKILL)
    finally:
        first.kill()
        first.wait()
    assert first.returncode == -signal.SIGKILL

    rows_before = csv_rows(broken)
    assert {r["epoch"] for r in rows_before if r.get("val/selection_score")} == {"0"}  # on disk before the kill
    proc, _ = run_cli([*common, f"hydra.run.dir={broken}", "ckpt_path=last"], cwd=tmp_path, timeout=left())
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the whole CSV history, every epoch's rows once, as in the run that was never killed
    logged = lambda rows, key: sorted((r["epoch"], r["step"]) for r in rows if r.get(key))  # noqa: E731
    for key in ("train/loss", "val/selection_score", "val/U2VG_unsafe@1"):
        assert logged(csv_rows(broken), key) == logged(csv_rows(whole), key), key
    assert [r["epoch"] for r in csv_rows(broken) if r.get("val/selection_score")] == ["0", "1", "2"]
    a, b = final_weights(whole), final_weights(broken)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
