"""LightningModule: the trainable CLIP, the redirection loss, validation retrieval.

The module receives primitives (architecture, weights path, method dict), builds its own
open_clip model and makes the configured part trainable. Frozen targets arrive in the batch
from the embedding cache; this module never runs a frozen encoder.
"""

from __future__ import annotations

import logging

import lightning as L
import torch

from ..adapters import TrainableConfig, configure_trainable
from ..losses import TERM_NAMES, LossConfig, SaferClipLoss, gather_with_grad
from ..metrics import recall_at_k, unsafe_rate
from ..models import build_clip

log = logging.getLogger("saferclip.train")

# which trainable encodings each batch key feeds
_TEXT_INPUTS = {"t_safe": "s_tokens", "t_unsafe": "u_tokens", "t_target_live": "target_tokens"}
_IMAGE_INPUTS = {"i_safe": "v_image", "i_unsafe": "g_image", "i_target_live": "target_image"}
_FROZEN_INPUTS = ("t0_safe", "t0_unsafe", "i0_safe", "i0_unsafe", "t0_target", "i0_target")


class SaferClipModule(L.LightningModule):
    def __init__(self, arch: str, pretrained: str | None, method: dict, precision: str = "fp32"):
        super().__init__()
        self.save_hyperparameters()
        bundle = build_clip(arch, pretrained, precision=precision)
        self.model = bundle.model
        trainable = dict(method.get("trainable") or {})
        trainable["towers"] = tuple(trainable.get("towers", ("text", "image")))
        self.param_counts = configure_trainable(self.model, TrainableConfig(**trainable))
        loss = method["loss"]
        self.loss = SaferClipLoss(
            LossConfig(
                weights=dict(loss["weights"]),
                tau=float(loss.get("tau", 1.0)),
                logit_scale=float(loss.get("logit_scale", 100.0)),
                normalize_weights=bool(loss.get("normalize_weights", False)),
            )
        )
        self.optim_cfg = dict(method.get("optimizer") or {})
        self._val_outputs: list[dict[str, torch.Tensor]] = []

    # ---------------------------------------------------------------- encoding
    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        return gather_with_grad(x)

    def encode(self, batch: dict[str, torch.Tensor], wanted: set[str]) -> dict[str, torch.Tensor]:
        """Run only the trainable encodings the active terms need, one forward per tower."""
        out: dict[str, torch.Tensor] = {}
        for inputs, encode in ((_TEXT_INPUTS, self.model.encode_text), (_IMAGE_INPUTS, self.model.encode_image)):
            names = [n for n, key in inputs.items() if n in wanted and key in batch]
            if not names:
                continue
            stacked = torch.cat([batch[inputs[n]] for n in names])
            features = encode(stacked, normalize=True)
            for n, chunk in zip(names, features.split([len(batch[inputs[n]]) for n in names])):
                out[n] = chunk
        return out

    def available_inputs(self, batch: dict[str, torch.Tensor]) -> set[str]:
        have = {n for n, key in {**_TEXT_INPUTS, **_IMAGE_INPUTS}.items() if key in batch}
        return have | {k for k in _FROZEN_INPUTS if k in batch}

    # ---------------------------------------------------------------- training
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        available = self.available_inputs(batch)
        needed = self.loss.required_inputs(available)
        features = self.encode(batch, needed)
        frozen = {k: batch[k].float() for k in _FROZEN_INPUTS if k in batch}
        total, terms = self.loss(
            **features,
            **frozen,
            target_weights=batch["target_weights"],
            pair_weight=batch["pair_weight"],
            gather=self._gather if self.trainer.world_size > 1 else None,
        )
        bs = len(batch["index"])
        self.log("train/loss", total, prog_bar=True, batch_size=bs)
        for name, value in terms.items():
            self.log(f"train/{name}", value, batch_size=bs)
        return total

    def on_train_start(self) -> None:
        loader = self.trainer.datamodule.train_dataloader() if self.trainer.datamodule else None
        if loader is not None:
            batch = next(iter(loader))
            active = self.loss.active_terms(self.available_inputs(batch))
            inactive = [t for t in TERM_NAMES if t not in active]
            log.info("active loss terms: %s", ", ".join(active))
            if inactive:
                log.info("inactive (zero weight or inputs missing): %s", ", ".join(inactive))
        log.info(
            "trainable parameters: %s of %s", f"{self.param_counts['trainable']:,}", f"{self.param_counts['total']:,}"
        )

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(
            params, lr=float(self.optim_cfg.get("lr", 1e-4)), weight_decay=float(self.optim_cfg.get("weight_decay", 0.0))
        )
        warmup = int(self.optim_cfg.get("warmup_steps", 0))
        if warmup <= 0:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---------------------------------------------------------------- validation
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        wanted = {"t_safe", "t_unsafe", "i_safe", "i_unsafe"}
        features = self.encode(batch, wanted)
        features["index"] = batch["index"]
        self._val_outputs.append({k: v.detach() for k, v in features.items()})

    def on_validation_epoch_end(self) -> None:
        outputs, self._val_outputs = self._val_outputs, []
        if not outputs:
            return
        merged = {k: torch.cat([o[k] for o in outputs]) for k in outputs[0]}
        if self.trainer.world_size > 1:
            merged = {k: self.all_gather(v).flatten(0, 1) for k, v in merged.items()}
        order = torch.argsort(merged.pop("index"))
        merged = {k: v[order].float() for k, v in merged.items()}
        metrics = validation_metrics(merged)
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, sync_dist=False, rank_zero_only=False)


def validation_metrics(f: dict[str, torch.Tensor]) -> dict[str, float]:
    """Retrieval on the validation split: U->V and S->V (the redirection and the utility),
    the unsafe rate of unsafe captions over a mixed V+G gallery, and their recall sum."""
    out: dict[str, float] = {}
    n = len(f["t_safe"])
    idx = torch.arange(n)
    ks = (1, 5, 10)
    if "i_safe" in f:
        s2v = recall_at_k(f["t_safe"], f["i_safe"], idx, ks=ks)
        u2v = recall_at_k(f["t_unsafe"], f["i_safe"], idx, ks=ks)
        for k in ks:
            out[f"s2v_r{k}"] = float(s2v[f"R@{k}"])
            out[f"u2v_r{k}"] = float(u2v[f"R@{k}"])
        out["recall_sum"] = sum(out[f"s2v_r{k}"] + out[f"u2v_r{k}"] for k in ks)
        if "i_unsafe" in f:
            gallery = torch.cat([f["i_safe"], f["i_unsafe"]])
            is_unsafe = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)])
            out["unsafe_rate"] = float(unsafe_rate(f["t_unsafe"], gallery, is_unsafe, k=1))
    else:
        # text only: U should land near safe text, S should stay retrievable by itself
        u2s = recall_at_k(f["t_unsafe"], f["t_safe"], idx, ks=ks)
        for k in ks:
            out[f"u2s_r{k}"] = float(u2s[f"R@{k}"])
        out["recall_sum"] = sum(out[f"u2s_r{k}"] for k in ks)
    return out
