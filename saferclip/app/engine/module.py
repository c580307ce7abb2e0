"""LightningModule: the trainable CLIP, the redirection loss, validation retrieval.

The module receives primitives (architecture, weights path, method dict), builds its own
open_clip model and makes the configured part trainable. Frozen targets arrive in the batch
from the embedding cache; this module never runs a frozen encoder.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.nn.utils import parametrize

from ...evaluation.galleries import PairEmbeddings
from ...evaluation.metrics import recall_at_k
from ...evaluation.retrieval import visu_metrics
from ...evaluation.selection import (
    DEFAULT_RANK_BY,
    DEFAULT_TAU,
    MATCHED_METRIC,
    SELECTION_METRIC,
    VALIDATION_PREFIX,
    matched_safety,
    selection_score,
)
from ...model.adapters import configure_trainable, tower_parameters
from ...model.build import build_clip, encode_tokens
from ...model.similarity import COSINE, Similarity, chunk_scorer
from ...training.adversarial import (
    AdversarialTraining,
    Encoders,
    PixelSpace,
    adversarial_terms,
    euclidean_objectives,
    token_scale,
)
from ...training.contrastive import Gather, gather_with_grad
from ...training.losses import FROZEN_INPUTS, TERM_NAMES, WEIGHT_INPUTS, SaferClipLoss
from ...training.method import MethodConfig, method_config

log = logging.getLogger("saferclip.train")

# the trainable encodings, by tower: a batch's tokens or pixels under one of these keys are
# encoded into the loss input of the same name (one vocabulary for batch, loss and cache)
TEXT_INPUTS = ("safe_text", "unsafe_text", "target_text")
IMAGE_INPUTS = ("safe_image", "unsafe_image", "target_image")


def available_inputs(batch: dict[str, torch.Tensor]) -> set[str]:
    """Names of the loss inputs a batch (or one dataset item) can provide."""
    have = {n for n in TEXT_INPUTS + IMAGE_INPUTS if n in batch}
    return have | {k for k in FROZEN_INPUTS + WEIGHT_INPUTS if k in batch}


class SaferClipModule(L.LightningModule):
    def __init__(
        self,
        arch: str,
        pretrained: str | None,
        method: MethodConfig,
        precision: str = "fp32",
        selection_tau: float = DEFAULT_TAU,
        selection_rank_by: str = DEFAULT_RANK_BY,
    ):
        """``method``: the checked config (:func:`saferclip.training.method.method_config`; the
        app checks it once, :func:`saferclip.app.hydra_utils.check_train_config`, and a
        checkpoint's recorded dict is checked by :meth:`from_checkpoint`). ``selection_tau``,
        ``selection_rank_by``: the unsafe rate τ of matched safety and what ranks the epochs that
        reach it (``val/matched_safety``, :mod:`saferclip.evaluation.selection`)."""
        super().__init__()
        if not isinstance(method, MethodConfig):
            raise TypeError(
                f"{type(self).__name__} takes the checked MethodConfig, got {type(method).__name__} "
                "(a checkpoint loads with from_checkpoint, which checks the method it records)"
            )
        config = method
        # the checkpoint records the config as written (plain types: weights_only loads it)
        self.save_hyperparameters(
            {
                "arch": arch,
                "pretrained": pretrained,
                "method": dict(config.source),
                "precision": precision,
                "selection_tau": float(selection_tau),
                "selection_rank_by": str(selection_rank_by),
            }
        )
        self.selection_tau = float(selection_tau)
        self.selection_rank_by = str(selection_rank_by)
        bundle = build_clip(arch, pretrained, precision=precision)
        # build_clip hands out an eval-mode model; the trainable copy trains (CLIP has no
        # dropout, so this only keeps Lightning's mode bookkeeping honest)
        self.model = bundle.model.train()
        self.embed_dim = int(bundle.model_cfg.get("embed_dim") or 0)
        self.method_config = config
        self.param_counts = configure_trainable(self.model, config.trainable)
        self.loss = self.build_loss(config)
        self.adversarial = self.build_adversarial(config, bundle)
        self.optimizer_config = config.optimizer
        # validation outputs by dataloader: 0 the validation split, 1 the NSFW-Caps-like set
        self._val_outputs: dict[int, list[dict[str, torch.Tensor]]] = {}
        self._step_started = self._attack_seconds = 0.0

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> SaferClipModule:
        """The module a training checkpoint holds, read safely
        (:func:`saferclip.model.trained.read_training_checkpoint`: ``weights_only``, checksum
        verified); the method dict it records is checked here, once, into the typed config."""
        from ...model.trained import read_training_checkpoint

        ckpt = read_training_checkpoint(path)
        hparams = dict(ckpt["hyper_parameters"])
        module = cls(method=method_config(hparams.pop("method")), **hparams)
        module.load_state_dict(ckpt["state_dict"])
        return module

    def build_loss(self, config):
        return SaferClipLoss(config.loss)

    @staticmethod
    def build_adversarial(config, bundle) -> AdversarialTraining | None:
        """``method.adversarial`` (None when off): the token unit comes from the base model's
        table, fixed for the run, so every rank and every resume attacks with the same radius."""
        if not config.adversarial.enabled:
            return None
        table = bundle.model.token_embedding.weight
        pixels = PixelSpace.of(bundle.preprocess) if getattr(bundle.model, "visual", None) is not None else None
        return AdversarialTraining(config.adversarial, pixels, int(table.shape[1]), token_scale(table))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Every checkpoint carries a checksum of its weights: a damaged one is refused when
        loaded (:func:`saferclip.model.checkpoints.load_torch_checkpoint`), not trained on."""
        from ...model.checkpoints import CHECKSUM_KEY, state_dict_checksum

        checkpoint[CHECKSUM_KEY] = state_dict_checksum(checkpoint["state_dict"])

    # ---------------------------------------------------------------- encoding
    def encode(
        self, batch: dict[str, torch.Tensor], wanted: set[str], normalize: bool = True
    ) -> dict[str, torch.Tensor]:
        """Run only the trainable encodings in ``wanted``, one forward per tower (the
        tower's inputs concatenated), ``[B, D]`` each (L2-normalised unless ``normalize=False``)."""
        out: dict[str, torch.Tensor] = {}
        # LoRA weights are parametrizations, recomputed on every access; attention reads its
        # weights more than once per forward: compute each adapted weight once per call
        with parametrize.cached():
            for inputs, encode in ((TEXT_INPUTS, self._encode_text), (IMAGE_INPUTS, self.model.encode_image)):
                names = [n for n in inputs if n in wanted and n in batch]
                if not names:
                    continue
                parts = [batch[n] for n in names]
                features = encode(torch.cat(parts) if len(parts) > 1 else parts[0], normalize=normalize)
                out.update(zip(names, features.split([len(p) for p in parts])))
        return out

    def _encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return encode_tokens(self.model, tokens, normalize=normalize)

    def loss_step(self, batch: dict[str, torch.Tensor], gather: Gather | None = None):
        """The loss of one batch: ``(total, {term: value})``. Encodes what the active terms
        need and takes every frozen target from the batch. ``gather`` (all ranks' rows, with
        gradients) makes the InfoNCE negatives global under DDP."""
        needed = self.loss.required_inputs(available_inputs(batch))
        features = self.encode(batch, needed)
        given = {k: batch[k] for k in FROZEN_INPUTS + WEIGHT_INPUTS if k in batch}
        total, terms = self.loss(**features, **given, gather=gather)
        if self.adversarial is None:
            return total, terms
        extra, adversarial = self.adversarial_step(batch, features, given, gather)
        return total + extra, {**terms, **adversarial}

    # ---------------------------------------------------------------- adversarial training
    # The attacks and terms are saferclip.training.adversarial's; this is only the hook-up.
    def attack_encoders(self) -> Encoders:
        """The trainable towers as the attacks call them (each call one forward, LoRA weights
        computed once per call)."""

        def image(x: torch.Tensor) -> torch.Tensor:
            with parametrize.cached():
                return self.model.encode_image(x, normalize=True)

        def text(tokens: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
            with parametrize.cached():
                return encode_tokens(self.model, tokens, normalize=True, embedding_offset=offset)

        return Encoders(image, text)

    def attacked_kinds(self, features: Mapping[str, torch.Tensor], objectives: Mapping[str, Any]) -> list[str]:
        """The items this step attacks: asked for, encoded by the clean step, with an objective."""
        return [k for k in self.adversarial.config.attacked(set(features)) if k in objectives]

    def adversarial_step(self, batch, features, given, gather: Gather | None):
        """``(weight × adversarial total, {adv_<term>: value})`` of one batch (Euclidean methods)."""
        objectives = euclidean_objectives(features, given, gather)
        kinds = self.attacked_kinds(features, objectives)
        start = time.perf_counter()
        attacked = self.adversarial.attack(self.attack_encoders(), batch, objectives, int(self.global_step), kinds)
        self._attack_seconds = time.perf_counter() - start
        return adversarial_terms(self.loss, {**features, **given}, attacked, self.adversarial.config.weight, gather)

    # ---------------------------------------------------------------- training
    def setup(self, stage: str) -> None:
        self._freeze_unused_towers()

    def _freeze_unused_towers(self) -> None:
        """A tower the data never feeds (the image tower on text-only data) gets no gradient:
        freeze it, so the optimizer skips it and DDP finds no unused parameters."""
        datamodule = getattr(self.trainer, "datamodule", None)
        item = datamodule.train_set[0] if getattr(datamodule, "train_set", None) is not None else None
        if item is None:
            return
        fed = self.encodings_needed(item)
        for tower, inputs in (("text", TEXT_INPUTS), ("image", IMAGE_INPUTS)):
            params = tower_parameters(self.model, tower)
            if not fed & set(inputs) and any(p.requires_grad for p in params):
                for p in params:
                    p.requires_grad_(False)
                self._info(f"the {tower} tower is frozen: no active loss term feeds it with this data")

    def encodings_needed(self, item: dict[str, torch.Tensor]) -> set[str]:
        return self.loss.required_inputs(available_inputs(item)) & set(TEXT_INPUTS + IMAGE_INPUTS)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        gather = gather_with_grad if self.trainer.world_size > 1 else None
        total, terms = self.loss_step(batch, gather)
        bs = len(batch["index"])
        self.log("train/loss", total, prog_bar=True, batch_size=bs)
        self._log_step = self._logger_writes_this_step()
        if self._log_step:
            for name, value in terms.items():
                self.log(f"train/{name}", value.detach(), batch_size=bs)
            if self.adversarial is not None:
                self.log("time/adv_attack_seconds", float(self._attack_seconds), batch_size=bs)
        return total

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """The whole step's wall time (forward, attacks, backward, optimizer): what adversarial
        training costs against a clean run's ``time/step_seconds``."""
        if getattr(self, "_log_step", False):
            self.log("time/step_seconds", time.perf_counter() - self._step_started, batch_size=len(batch["index"]))

    def _logger_writes_this_step(self) -> bool:
        """Whether the loggers write this step's values (every ``log_every_n_steps``). Each
        ``self.log`` costs ~0.4 ms of Lightning bookkeeping, several % of a small model's
        step, so the per-term values are only logged when they are kept."""
        trainer = self.trainer
        if trainer.fast_dev_run:
            return True
        every = trainer.log_every_n_steps
        return every > 0 and (self.global_step + 1) % every == 0

    def on_train_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if getattr(datamodule, "train_set", None) is not None:
            active, inactive = self.loss_terms(datamodule.train_set[0])
            mode = getattr(datamodule, "mode", None)
            self._info(f"data inputs: {getattr(mode, 'value', mode)}; active loss terms: {', '.join(active)}")
            if inactive:
                self._info(f"inactive loss terms (zero weight or inputs missing): {', '.join(inactive)}")
        val_set = getattr(datamodule, "val_set", None)
        if val_set is not None and not val_set.inner.use_unsafe_images:
            log.warning(
                "the validation split has no unsafe images: the selection score that picks the exported "
                "epoch cannot see safety (it uses the recalls only; docs/METHOD.md, 'Model selection')"
            )
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self._info(f"trainable parameters: {trainable:,} of {self.param_counts['total']:,}")
        if self.adversarial is not None:
            c = self.adversarial.config
            self._info(
                f"adversarial training: images at {c.epsilon_255:g}/255 ({c.steps} PGD steps), text attack {c.text_attack} "
                f"(radius {c.text_epsilon:g}), preserve_safe {c.preserve_safe}, weight {c.weight:g}: adv_<term> in the log"
            )

    def loss_terms(self, item: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        """The active and the inactive loss terms with the inputs a training item provides."""
        active = self.loss.active_terms(available_inputs(item))
        return active, [t for t in TERM_NAMES if t not in active]

    def _info(self, message: str) -> None:
        if self.trainer.is_global_zero:
            log.info(message)

    def no_decay_parameters(self) -> list[torch.nn.Parameter]:
        """Trainable parameters that get no weight decay (none here; HySAC's head)."""
        return []

    def configure_optimizers(self):
        cfg = self.optimizer_config
        exempt = {id(p) for p in self.no_decay_parameters()}
        params = [p for p in self.parameters() if p.requires_grad and id(p) not in exempt]
        groups = [{"params": params}]
        if exempt:
            groups.append({"params": [p for p in self.parameters() if id(p) in exempt], "weight_decay": 0.0})
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = cfg.warmup_steps
        if warmup <= 0:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---------------------------------------------------------------- validation
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        features = self.validation_features(batch)
        features["index"] = batch["index"]
        if "owner" in batch:
            features["owner"] = batch["owner"]
        self._val_outputs.setdefault(dataloader_idx, []).append({k: v.detach() for k, v in features.items()})

    def validation_features(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.encode(batch, {"safe_text", "unsafe_text", "safe_image", "unsafe_image"})

    def on_validation_epoch_end(self) -> None:
        groups, self._val_outputs = self._val_outputs, {}
        if not groups.get(0):
            return
        rows = {idx: unique_rows(self._gathered(outputs)) for idx, outputs in groups.items() if outputs}
        similarity = self.validation_similarity(rows[0])
        metrics = validation_metrics(rows[0], similarity=similarity)
        if 1 in rows:  # the NSFW-Caps-like validation set, with the same similarity
            nsfw_caps = validation_metrics(rows[1], similarity=similarity)
            metrics.update({f"nsfw_caps_{k}": nsfw_caps[k] for k in NSFW_CAPS_VALIDATION_KEYS if k in nsfw_caps})
        metrics.update(self.extra_validation_metrics())
        metrics[SELECTION_METRIC] = selection_score(metrics)
        metrics[MATCHED_METRIC] = matched_safety(metrics, self.selection_tau, self.selection_rank_by)
        # every rank computed the same numbers from the gathered set; averaging them over
        # ranks changes nothing and keeps every rank's callbacks (checkpoint, early stopping)
        # on exactly the same value
        self.log_dict({VALIDATION_PREFIX + k: v for k, v in metrics.items()}, sync_dist=True)

    def _gathered(self, outputs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        merged = {k: torch.cat([o[k] for o in outputs]) for k in outputs[0]}
        if self.trainer.world_size > 1:
            merged = {k: self.all_gather(v).flatten(0, 1) for k, v in merged.items()}
        return merged

    def validation_similarity(self, rows: dict[str, torch.Tensor]) -> Similarity:
        """How the model compares validation embeddings (``rows``: the validation split's):
        cosine; HySAC's safe mode with radii from these rows."""
        return COSINE

    def extra_validation_metrics(self) -> dict[str, float]:
        return {}


# the NSFW-Caps-like validation set's metrics kept (prefixed nsfw_caps_): its S->V is a part
# of the selection score; U->V and the unsafe rate are recorded beside it
NSFW_CAPS_VALIDATION_KEYS = ("S2V_R@1", "U2V_R@1", "U2VG_unsafe@1")


def unique_rows(merged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sort validation outputs by ``index`` and keep one row per index, as float32 (``index``
    and ``owner`` stay integers).

    Under DDP the DistributedSampler pads the split with repeated items so every rank has as
    many; gathered, those repeats would count twice and shift the retrieval labels."""
    index = merged["index"].long()
    order = torch.argsort(index, stable=True)
    ordered = index[order]
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    order = order[first]
    integer = ("index", "owner")
    return {k: (v[order].long() if k in integer else v[order].float()) for k, v in merged.items()}


VALIDATION_KS = (1, 5, 10)


def validation_metrics(f: dict[str, torch.Tensor], similarity: Similarity = COSINE) -> dict[str, float]:
    """A validation set's retrieval metrics, by the evaluation's own functions and keys
    (:func:`saferclip.evaluation.visu_metrics`: ``S2V_R@k``, ``U2V_R@k``, ``U2VG_unsafe@1``...,
    all in setting (a): every embedding from the model being trained). The module adds
    ``selection_score`` and the checkpoint monitor ``matched_safety``
    (:mod:`saferclip.evaluation.selection`) over the validation split's and the
    NSFW-Caps-like set's metrics.
    Text-only data adds ``U2S_R@k``: an unsafe caption finds its paired safe caption.
    ``similarity``: how the model compares the embeddings ``f`` holds (its own, e.g. HySAC's)."""
    index = f["index"]
    emb = PairEmbeddings(safe_text=f["safe_text"], unsafe_text=f["unsafe_text"], similarity=similarity)
    if "safe_image" in f:
        # the gallery holds each safe image once: items sharing one point at its first owner
        owner = f["owner"] if "owner" in f else index
        distinct = owner == index
        emb.safe_image = f["safe_image"][distinct]
        emb.safe_owner = torch.searchsorted(index[distinct], owner)
    if "unsafe_image" in f:
        emb.unsafe_image = f["unsafe_image"]
        emb.unsafe_owner = torch.arange(len(index))
    metrics = visu_metrics(emb, None, ks=VALIDATION_KS, unsafe_ks=(1,))
    out = {k: float(v) for k, v in metrics.items() if ("_R@" in k or "_unsafe@" in k) and isinstance(v, (int, float))}
    if "safe_image" not in f:
        u2s = recall_at_k(
            f["unsafe_text"],
            f["safe_text"],
            torch.arange(len(index)),
            ks=VALIDATION_KS,
            score=chunk_scorer(similarity, "text"),
        )
        out.update({f"U2S_R@{k}": float(u2s[f"R@{k}"]) for k in VALIDATION_KS})
    return out
