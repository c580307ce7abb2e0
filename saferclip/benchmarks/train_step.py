"""The training step measured: saferclip's Lightning step against a bare PyTorch loop on the
same encoders, batches and optimizer (``scripts/bench_train_step.py`` prints it,
``scripts/gpu_check.py`` times it on a GPU).

Variants, all on the same batches (real items of the small toy world, collated once and kept
in memory), the same trainable encoders, the same optimizer (AdamW) and thread count:

  lightning      ``Trainer.fit`` over the batches with the run's own set-up: the
                 LightningModule's ``training_step`` (one forward per tower, the loss, a log
                 entry per term), backward, optimizer step, CSV logger, LR monitor, progress
                 bar. Timed from one batch start to the next (everything Lightning does per
                 step is inside).
  bare           the same forward per tower (text trimmed to the batch's longest caption, as
                 the module does: ``saferclip.model.build.encode_tokens``), the same loss terms
                 written out by hand (in float32 with autocast off, as ``SaferClipLoss``),
                 backward, step, zero_grad: no framework at all.
  bare+frozen    bare, plus what the public Safe-CLIP reference does: run the frozen encoders
                 every step (no grad) for the frozen inputs the loss needs, instead of reading
                 them from the embedding cache.

The batches are what the training DataLoader yields (``RedirectionDataset.__getitems__`` +
``collate_items``). The hand-written loss is checked against ``SaferClipLoss`` on the first
batch (:func:`check_same_loss`), so both compute the same thing. Variants run interleaved step
by step (contention on a shared machine hits them alike).

It builds the module and datamodule as ``saferclip-train`` does (:mod:`saferclip.app.engine.fit`)
and composes the ``train`` config with Hydra: like the app, it imports Lightning and Hydra.
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from ..app.hydra_utils import CONF_DIR, to_container
from ..model.build import encode_tokens
from ..training.losses import LossConfig

# model name -> the train config's overrides (random init for the ViTs: nothing downloaded)
MODELS = {
    "micro": ("model=micro",),
    "toy": ("model=toy",),
    "vit-b-32": ("model=vit_b32_random",),
    "vit-l-14": ("model=vit_b32_random", "model.arch=ViT-L-14"),
}
DEFAULT_STEPS = {"micro": 20, "toy": 20, "vit-b-32": 5, "vit-l-14": 3}
PRECISIONS = ("32-true", "bf16-mixed")
TOWER_INPUTS = {
    "text": (("safe_text", "safe_text"), ("unsafe_text", "unsafe_text"), ("target_text", "target_text")),
    "image": (("safe_image", "safe_image"), ("unsafe_image", "unsafe_image"), ("target_image", "target_image")),
}
# frozen input -> (tower, batch key) the reference would encode every step
FROZEN_SOURCES = {
    "frozen_safe_text": ("text", "safe_text"),
    "frozen_unsafe_text": ("text", "unsafe_text"),
    "frozen_safe_image": ("image", "safe_image"),
    "frozen_unsafe_image": ("image", "unsafe_image"),
}


# ---------------------------------------------------------------- set-up


def compose(model: str, method: str, toy_dir: Path, cache_dir: Path, batch_size: int, extra: tuple[str, ...] = ()):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    overrides = [
        *MODELS[model],
        f"method={method}",
        "method.curriculum=false",
        f"paths.toy_dir={toy_dir}",
        "data.toy_size=small",
        f"data.batch_size={batch_size}",
        "data.num_workers=0",
        f"paths.cache_dir={cache_dir}",
        f"paths.run_dir={cache_dir / 'run'}",
        *extra,
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def prepare(cfg, n_batches: int):
    """The module as train() builds it and ``n_batches`` batches in memory, fetched the way
    the training DataLoader fetches them (``__getitems__`` + ``collate_items``)."""
    from saferclip.app.engine.fit import build_datamodule, build_module
    from saferclip.training.datasets import collate_items
    from saferclip.training.method import method_config

    method = method_config(to_container(cfg.method))  # checked once, as train() does
    module, datamodule = build_module(cfg, method), build_datamodule(cfg, method)
    datamodule.prepare_data()
    datamodule.setup("fit")
    bs = int(cfg.data.batch_size)
    if n_batches * bs > len(datamodule.train_set):
        raise ValueError(
            f"{n_batches} batches of {bs} need {n_batches * bs} items; the training set has {len(datamodule.train_set)}"
        )
    fetch = datamodule.train_set.__getitems__
    batches = [collate_items(fetch(list(range(b * bs, (b + 1) * bs)))) for b in range(n_batches)]
    return module, batches


def wanted_inputs(module, batch) -> set[str]:
    from saferclip.app.engine.module import available_inputs

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
        encode = _text_encoder(model) if tower == "text" else model.encode_image
        parts = [batch[k] for _, k in names]
        feats = encode(torch.cat(parts), normalize=True)
        out.update(zip([n for n, _ in names], feats.split([len(p) for p in parts])))
    return out


def _text_encoder(model):
    """Text encoding as the module does it: the batch's trailing padding dropped."""
    return lambda tokens, normalize=True: encode_tokens(model, tokens, normalize=normalize)


def cos(a, b):
    return (a * b).sum(-1)


def nce(a, b, scale):
    labels = torch.arange(len(a))
    return (F.cross_entropy(scale * a @ b.T, labels) + F.cross_entropy(scale * b @ a.T, labels)) / 2


def bare_loss(x: dict[str, torch.Tensor], weights: dict[str, float], tau: float, scale: float) -> torch.Tensor:
    """The loss terms written out for top-1 targets (``[B, 1, D]``), pair weights all 1."""
    t0t, i0t = x["frozen_target_text"][:, 0], x.get("frozen_target_image", x["frozen_target_text"])[:, 0]
    terms = {
        "text_preservation": lambda: (1 - cos(x["safe_text"], x["frozen_safe_text"])).mean(),
        "text_redirection": lambda: (1 - cos(x["unsafe_text"], t0t)).mean(),
        "image_preservation": lambda: (1 - cos(x["safe_image"], x["frozen_safe_image"])).mean(),
        "image_redirection": lambda: (1 - cos(x["unsafe_image"], i0t)).mean(),
        "xmodal_text_preservation": lambda: nce(x["safe_text"], x["frozen_safe_image"], scale),
        "xmodal_text_redirection": lambda: nce(x["unsafe_text"], i0t, scale),
        "xmodal_image_preservation": lambda: nce(x["frozen_safe_text"], x["safe_image"], scale),
        "xmodal_image_redirection": lambda: nce(t0t, x["unsafe_image"], scale),
        "relative_image": lambda: F.softplus(
            tau * (cos(x["unsafe_image"], x["frozen_unsafe_text"]) - cos(x["unsafe_image"], t0t))
        ).mean(),
        "relative_text": lambda: F.softplus(
            tau * (cos(x["unsafe_text"], x["frozen_unsafe_image"]) - cos(x["unsafe_text"], i0t))
        ).mean(),
        "live_relative_text": lambda: F.softplus(
            tau * (cos(x["unsafe_text"], x["unsafe_image"]) - cos(x["unsafe_text"], x["target_image"]))
        ).mean(),
        "live_relative_image": lambda: F.softplus(
            tau * (cos(x["unsafe_image"], x["unsafe_text"]) - cos(x["unsafe_image"], x["target_text"]))
        ).mean(),
    }
    return sum(w * terms[name]() for name, w in weights.items())


@torch.no_grad()
def frozen_forward(frozen_model, batch, wanted: set[str]) -> dict[str, torch.Tensor]:
    """The frozen inputs encoded now (what the reference does every step), one forward per
    tower; the targets too (their tokens / images are in the batch with the live terms on)."""
    sources = dict(FROZEN_SOURCES)
    if "target_text" in batch:
        sources["frozen_target_text"] = ("text", "target_text")
    if "target_image" in batch:
        sources["frozen_target_image"] = ("image", "target_image")
    out = {}
    for tower in ("text", "image"):
        names = [(n, k) for n, (t, k) in sources.items() if t == tower and n in wanted and k in batch]
        if not names:
            continue
        encode = _text_encoder(frozen_model) if tower == "text" else frozen_model.encode_image
        parts = [batch[k] for _, k in names]
        feats = encode(torch.cat(parts), normalize=True)
        out.update(zip([n for n, _ in names], feats.split([len(p) for p in parts])))
    for name in ("frozen_target_text", "frozen_target_image"):
        if name in out:
            out[name] = out[name].unsqueeze(1)
    return out


def autocast_for(precision: str, device_type: str):
    """The autocast Lightning's ``precision`` puts around the forward (off for ``32-true``)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")


def fp32_loss(x: dict[str, torch.Tensor], weights, tau: float, scale: float) -> torch.Tensor:
    """``bare_loss`` as SaferClipLoss computes it: float32 inputs, autocast off."""
    device_type = next(v for v in x.values() if isinstance(v, torch.Tensor)).device.type
    with torch.autocast(device_type=device_type, enabled=False):
        return bare_loss({k: v.float() for k, v in x.items() if v.is_floating_point()}, weights, tau, scale)


def bare_stepper(module, frozen_model=None, precision: str = "32-true"):
    """A function running one bare step on a batch (its own AdamW on the same parameters),
    the forward in the autocast ``precision`` implies, the loss in float32."""
    model = module.model
    config: LossConfig = module.loss.config
    weights = module.loss.term_weights
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step(batch) -> None:
        wanted = wanted_inputs(module, batch)
        x = dict(batch)
        with autocast_for(precision, batch["safe_text"].device.type):
            if frozen_model is not None:
                x.update(frozen_forward(frozen_model, batch, wanted))
            x.update(encode_towers(model, batch, wanted))
        loss = fp32_loss(x, weights, config.tau, config.logit_scale)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


class LossMismatch(AssertionError):
    """The hand-written loss differs from SaferClipLoss: the comparison would be void."""


def check_same_loss(module, batch, rtol: float = 1e-5, atol: float = 1e-6) -> float:
    """The hand-written loss equals SaferClipLoss on ``batch`` (else the comparison is void).
    Runs in float32 wherever the module and the batch are."""
    with torch.no_grad():
        ours, _ = module.loss_step(batch)
        x = {**batch, **encode_towers(module.model, batch, wanted_inputs(module, batch))}
        bare = fp32_loss(x, module.loss.term_weights, module.loss.config.tau, module.loss.config.logit_scale)
    if not torch.allclose(ours, bare, rtol=rtol, atol=atol):
        raise LossMismatch(f"the bare loss {bare.item()} differs from SaferClipLoss {ours.item()}")
    return float(ours)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


# ---------------------------------------------------------------- the Lightning step


class _Clock:
    """Wall time that waits for the GPU's queued work first (CUDA runs asynchronously), and
    the peak GPU memory since the last ``reset`` (None on the CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int | None:
        return int(torch.cuda.max_memory_allocated(self.device)) if self.cuda else None


def run_interleaved(
    module,
    frozen_model,
    batches,
    steps,
    warmup,
    log_dir: Path,
    progress_bar: bool,
    accelerator: str = "cpu",
    precision: str = "32-true",
):
    """Times of each variant, step by step interleaved: before each Lightning step a
    callback (the first one, so every other hook counts as Lightning's) runs one bare and
    one bare+frozen step on the same batch. A Lightning step is timed from that point to the
    same point of the next step: hooks, training_step, backward, optimizer step, logging,
    progress bar and fetching the next batch, everything Lightning does once per step.
    Each bare step takes the same batch from host memory and copies it to the device inside
    its timed span, as Lightning's step does (a no-op on the CPU).
    ``frozen_model=None`` leaves out bare+frozen. Returns ``(times, peak_memory)``:
    seconds per timed step and, on a GPU, the highest peak allocation of each variant's
    steps in bytes (weights and optimizer states included; None on the CPU)."""
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader

    steppers = {"bare": bare_stepper(module, precision=precision)}
    if frozen_model is not None:
        steppers["bare+frozen"] = bare_stepper(module, frozen_model, precision=precision)
    times: dict[str, list[float]] = {"lightning": [], **{name: [] for name in steppers}}
    peaks: dict[str, int | None] = {name: None for name in times}
    mark: list[float] = []
    clock: list[_Clock] = []

    def note_peak(name: str) -> None:
        value = clock[0].peak()
        if value is not None:
            peaks[name] = max(peaks[name] or 0, value)

    class Interleave(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not clock:
                clock.append(_Clock(pl_module.device))
            now = clock[0].now()
            if mark and batch_idx > warmup:
                times["lightning"].append(now - mark[-1])
                note_peak("lightning")
            for name, step in steppers.items():
                clock[0].reset_peak()
                start = clock[0].now()
                step(to_device(cycled[batch_idx], pl_module.device))
                end = clock[0].now()
                if batch_idx >= warmup:
                    times[name].append(end - start)
                    note_peak(name)
            clock[0].reset_peak()
            mark.append(clock[0].now())

    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
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
    for name in steppers:
        times[name] = times[name][:steps]
    return times, peaks


VARIANT_LABELS = {"lightning": "lightning (saferclip)", "bare": "bare", "bare+frozen": "bare+frozen (reference)"}


def measure(
    cfg,
    work: Path,
    *,
    batches: int = 4,
    steps: int = 5,
    warmup: int = 2,
    accelerator: str = "cpu",
    precision: str = "32-true",
    frozen: bool = True,
    progress_bar: bool = False,
) -> dict:
    """Time the training step of a composed ``train`` config (see :func:`compose`).

    Returns ``{"steps", "loss", "median_s", "min_s", "ratio_median", "ratio_min",
    "peak_memory_bytes"}``, each per variant (``lightning``, ``bare``, ``bare+frozen``
    when ``frozen``); ratios are to ``bare``. Raises :class:`LossMismatch` when the two
    losses differ."""
    module, prepared = prepare(cfg, batches)
    device = torch.device("cuda" if accelerator in ("gpu", "cuda") else "cpu")
    module.to(device)
    # LoRA B = 0: the copy is the original model
    frozen_model = copy.deepcopy(module.model).eval().requires_grad_(False) if frozen else None
    # the check runs in float32 on the device; GPU kernels may sum in another order
    tolerance = {"rtol": 1e-4, "atol": 1e-5} if device.type == "cuda" else {}
    loss = check_same_loss(module, to_device(prepared[0], device), **tolerance)
    times, peaks = run_interleaved(
        module, frozen_model, prepared, steps, warmup, work / "logs", progress_bar, accelerator, precision
    )
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    return {
        "steps": steps,
        "loss": loss,
        "median_s": med,
        "min_s": low,
        "ratio_median": {k: v / med["bare"] for k, v in med.items()},
        "ratio_min": {k: v / low["bare"] for k, v in low.items()},
        "peak_memory_bytes": peaks,
    }
