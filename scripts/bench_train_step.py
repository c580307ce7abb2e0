"""Benchmark one training step: saferclip's Lightning step against a bare PyTorch loop.

Variants, all on the same batches (real items of the small toy world, collated once and kept
in memory), the same trainable encoders, the same optimizer (AdamW) and thread count:

  lightning      ``Trainer.fit`` over the batches with the run's own set-up: the
                 LightningModule's ``training_step`` (one forward per tower, the loss, a log
                 entry per term), backward, optimizer step, CSV logger, LR monitor, progress
                 bar. Timed from one batch start to the next (everything Lightning does per
                 step is inside).
  bare           the same forward per tower, the same loss terms written out by hand, backward,
                 step, zero_grad: no framework at all. Target: lightning / bare <= 1.05.
  bare+frozen    bare, plus what the public Safe-CLIP reference does: run the frozen encoders
                 every step (no grad) for the frozen inputs the loss needs, instead of reading
                 them from the embedding cache. saferclip (lightning) must be faster.

The hand-written loss is checked against ``SaferClipLoss`` on the first batch, so both
compute the same thing. Variants run interleaved step by step (contention on a shared machine
hits them alike); each figure is the median over the timed steps after warm-up.

    python scripts/bench_train_step.py                              # toy + ViT-B-32 (random init)
    python scripts/bench_train_step.py --models toy --steps 20      # quicker, more steps
    python scripts/bench_train_step.py --method safeclip            # the baseline's terms
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from saferclip.app.hydra_utils import CONF_DIR, to_container  # noqa: E402
from saferclip.training.losses import LossConfig  # noqa: E402

MODELS = {"toy": "model=toy", "vit-b-32": "model=vit_b32_random"}
DEFAULT_STEPS = {"toy": 20, "vit-b-32": 5}
TOWER_INPUTS = {
    "text": (("t_safe", "s_tokens"), ("t_unsafe", "u_tokens"), ("t_target_live", "target_tokens")),
    "image": (("i_safe", "v_image"), ("i_unsafe", "g_image"), ("i_target_live", "target_image")),
}
# frozen input -> (tower, batch key) the reference would encode every step
FROZEN_SOURCES = {
    "t0_safe": ("text", "s_tokens"),
    "t0_unsafe": ("text", "u_tokens"),
    "i0_safe": ("image", "v_image"),
    "i0_unsafe": ("image", "g_image"),
}


# ---------------------------------------------------------------- set-up


def compose(model: str, method: str, toy_dir: Path, cache_dir: Path, batch_size: int):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    overrides = [
        MODELS[model],
        f"method={method}",
        "method.curriculum=false",
        f"paths.toy_dir={toy_dir}",
        "data.toy_size=small",
        f"data.batch_size={batch_size}",
        "data.num_workers=0",
        f"paths.cache_dir={cache_dir}",
        f"paths.run_dir={cache_dir / 'run'}",
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def prepare(cfg, n_batches: int):
    """The module as train() builds it and ``n_batches`` collated batches in memory."""
    from torch.utils.data import default_collate

    from saferclip.app.train import build_datamodule, build_module

    method = to_container(cfg.method)
    module, datamodule = build_module(cfg, method), build_datamodule(cfg, method)
    datamodule.prepare_data()
    datamodule.setup("fit")
    bs = int(cfg.data.batch_size)
    batches = [default_collate([datamodule.train_set[i] for i in range(b * bs, (b + 1) * bs)]) for b in range(n_batches)]
    return module, batches


def wanted_inputs(module, batch) -> set[str]:
    from saferclip.app.module import available_inputs

    return module.loss.required_inputs(available_inputs(batch))


# ---------------------------------------------------------------- the bare step


def encode_towers(model, batch, wanted: set[str]) -> dict[str, torch.Tensor]:
    """One forward per tower on the concatenated inputs, each LoRA weight computed once per
    call: the same model code as the module's, so only the framework differs."""
    with parametrize.cached():
        return _encode_towers(model, batch, wanted)


def _encode_towers(model, batch, wanted: set[str]) -> dict[str, torch.Tensor]:
    out = {}
    for tower, pairs in TOWER_INPUTS.items():
        names = [(n, k) for n, k in pairs if n in wanted and k in batch]
        if not names:
            continue
        encode = model.encode_text if tower == "text" else model.encode_image
        parts = [batch[k] for _, k in names]
        feats = encode(torch.cat(parts), normalize=True)
        out.update(zip([n for n, _ in names], feats.split([len(p) for p in parts])))
    return out


def cos(a, b):
    return (a * b).sum(-1)


def nce(a, b, scale):
    labels = torch.arange(len(a))
    return (F.cross_entropy(scale * a @ b.T, labels) + F.cross_entropy(scale * b @ a.T, labels)) / 2


def bare_loss(x: dict[str, torch.Tensor], weights: dict[str, float], tau: float, scale: float) -> torch.Tensor:
    """The loss terms written out for top-1 targets (``[B, 1, D]``), pair weights all 1."""
    t0t, i0t = x["t0_target"][:, 0], x.get("i0_target", x["t0_target"])[:, 0]
    terms = {
        "text_preservation": lambda: (1 - cos(x["t_safe"], x["t0_safe"])).mean(),
        "text_redirection": lambda: (1 - cos(x["t_unsafe"], t0t)).mean(),
        "image_preservation": lambda: (1 - cos(x["i_safe"], x["i0_safe"])).mean(),
        "image_redirection": lambda: (1 - cos(x["i_unsafe"], i0t)).mean(),
        "xmodal_text_preservation": lambda: nce(x["t_safe"], x["i0_safe"], scale),
        "xmodal_text_redirection": lambda: nce(x["t_unsafe"], i0t, scale),
        "xmodal_image_preservation": lambda: nce(x["t0_safe"], x["i_safe"], scale),
        "xmodal_image_redirection": lambda: nce(t0t, x["i_unsafe"], scale),
        "relative_image": lambda: F.softplus(tau * (cos(x["i_unsafe"], x["t0_unsafe"]) - cos(x["i_unsafe"], t0t))).mean(),
        "relative_text": lambda: F.softplus(tau * (cos(x["t_unsafe"], x["i0_unsafe"]) - cos(x["t_unsafe"], i0t))).mean(),
        "live_relative_text": lambda: F.softplus(
            tau * (cos(x["t_unsafe"], x["i_unsafe"]) - cos(x["t_unsafe"], x["i_target_live"]))
        ).mean(),
        "live_relative_image": lambda: F.softplus(
            tau * (cos(x["i_unsafe"], x["t_unsafe"]) - cos(x["i_unsafe"], x["t_target_live"]))
        ).mean(),
    }
    return sum(w * terms[name]() for name, w in weights.items())


@torch.no_grad()
def frozen_forward(frozen_model, batch, wanted: set[str]) -> dict[str, torch.Tensor]:
    """The frozen inputs encoded now (what the reference does every step), one forward per
    tower; the targets too (their tokens / images are in the batch with the live terms on)."""
    sources = dict(FROZEN_SOURCES)
    if "target_tokens" in batch:
        sources["t0_target"] = ("text", "target_tokens")
    if "target_image" in batch:
        sources["i0_target"] = ("image", "target_image")
    out = {}
    for tower in ("text", "image"):
        names = [(n, k) for n, (t, k) in sources.items() if t == tower and n in wanted and k in batch]
        if not names:
            continue
        encode = frozen_model.encode_text if tower == "text" else frozen_model.encode_image
        parts = [batch[k] for _, k in names]
        feats = encode(torch.cat(parts), normalize=True)
        out.update(zip([n for n, _ in names], feats.split([len(p) for p in parts])))
    for name in ("t0_target", "i0_target"):
        if name in out:
            out[name] = out[name].unsqueeze(1)
    return out


def bare_stepper(module, frozen_model=None):
    """A function running one bare step on a batch (its own AdamW on the same parameters)."""
    model = module.model
    config: LossConfig = module.loss.config
    weights = module.loss.term_weights
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step(batch) -> None:
        wanted = wanted_inputs(module, batch)
        x = dict(batch)
        if frozen_model is not None:
            x.update(frozen_forward(frozen_model, batch, wanted))
        x.update(encode_towers(model, batch, wanted))
        loss = bare_loss(x, weights, config.tau, config.logit_scale)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def check_same_loss(module, batch) -> float:
    """The hand-written loss equals SaferClipLoss on ``batch`` (else the comparison is void)."""
    with torch.no_grad():
        ours, _ = module.loss_step(batch)
        x = {**batch, **encode_towers(module.model, batch, wanted_inputs(module, batch))}
        bare = bare_loss(x, module.loss.term_weights, module.loss.config.tau, module.loss.config.logit_scale)
    if not torch.allclose(ours, bare, rtol=1e-5, atol=1e-6):
        raise SystemExit(f"the bare loss {bare.item()} differs from SaferClipLoss {ours.item()}")
    return float(ours)


# ---------------------------------------------------------------- the Lightning step


def run_interleaved(module, frozen_model, batches, steps, warmup, log_dir: Path, progress_bar: bool):
    """Times of each variant, step by step interleaved: before each Lightning step a
    callback (the first one, so every other hook counts as Lightning's) runs one bare and
    one bare+frozen step on the same batch. A Lightning step is timed from that point to the
    same point of the next step: hooks, training_step, backward, optimizer step, logging,
    progress bar and fetching the next batch, everything Lightning does once per step."""
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader

    steppers = {"bare": bare_stepper(module), "bare+frozen": bare_stepper(module, frozen_model)}
    times: dict[str, list[float]] = {"lightning": [], "bare": [], "bare+frozen": []}
    mark: list[float] = []

    class Interleave(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            now = time.perf_counter()
            if mark and batch_idx > warmup:
                times["lightning"].append(now - mark[-1])
            for name, step in steppers.items():
                start = time.perf_counter()
                step(batch)
                if batch_idx >= warmup:
                    times[name].append(time.perf_counter() - start)
            mark.append(time.perf_counter())

    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=warmup + steps + 1,  # the last step only closes the one before
        limit_val_batches=0,
        logger=CSVLogger(log_dir, name="bench"),
        callbacks=[Interleave(), LearningRateMonitor(logging_interval="step")],
        enable_checkpointing=False,
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    cycled = [batches[i % len(batches)] for i in range(warmup + steps + 1)]
    # batch_size=None: the prepared batches pass through as they are
    trainer.fit(module, train_dataloaders=DataLoader(cycled, batch_size=None, shuffle=False))
    times["bare"], times["bare+frozen"] = times["bare"][:steps], times["bare+frozen"][:steps]
    return times


# ---------------------------------------------------------------- main


def bench_model(name: str, args, toy_dir: Path, work: Path) -> tuple[list[tuple], dict]:
    cfg = compose(name, args.method, toy_dir, work / "cache", args.batch_size)
    module, batches = prepare(cfg, args.batches)
    frozen_model = copy.deepcopy(module.model).eval().requires_grad_(False)  # LoRA B = 0: the original
    check_same_loss(module, batches[0])
    steps = args.steps or DEFAULT_STEPS[name]
    results = run_interleaved(module, frozen_model, batches, steps, args.warmup, work / "logs", args.progress_bar)
    med = {k: statistics.median(v) for k, v in results.items()}
    low = {k: min(v) for k, v in results.items()}
    rows = []
    for variant, label in (("lightning", "lightning (saferclip)"), ("bare", "bare"), ("bare+frozen", "bare+frozen (reference)")):
        rows.append((name, label, med[variant], low[variant], med[variant] / med["bare"], low[variant] / low["bare"]))
    return rows, {"steps": steps, "frozen_speedup": med["bare+frozen"] / med["lightning"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="toy,vit-b-32", help=f"comma-separated, of {list(MODELS)}")
    parser.add_argument("--method", default="saferclip", choices=["saferclip", "safeclip"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=4, help="distinct batches, cycled")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per variant (default: 20 toy, 5 ViT-B-32)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-progress-bar", dest="progress_bar", action="store_false")
    parser.add_argument("--toy-dir", type=Path, default=None, help="a small toy world (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger().setLevel(logging.ERROR)
    for name in ("lightning.pytorch", "lightning.fabric", "saferclip"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    rows, notes = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_train_step_") as tmp:
        work = Path(tmp)
        toy_dir = args.toy_dir or work / "toy"
        for name in args.models.split(","):
            model_rows, notes[name.strip()] = bench_model(name.strip(), args, toy_dir, work / name)
            rows += model_rows
    print(
        f"\ntraining step, method={args.method}, batch {args.batch_size}, {args.threads} thread(s), "
        f"{args.warmup} warm-up steps, variants interleaved step by step"
    )
    print(f"{'model':<9} {'variant':<25} {'median ms':>10} {'min ms':>8} {'/bare (median)':>15} {'/bare (min)':>12}")
    for model, variant, median, low, ratio, ratio_low in rows:
        print(f"{model:<9} {variant:<25} {median * 1000:>10.1f} {low * 1000:>8.1f} {ratio:>15.3f} {ratio_low:>12.3f}")
    for model, note in notes.items():
        print(
            f"{model}: {note['steps']} timed steps per variant; the reference-style step (frozen encoders run "
            f"every step) takes {note['frozen_speedup']:.2f}x the time of saferclip's Lightning step"
        )

if __name__ == "__main__":
    main()
