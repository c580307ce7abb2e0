"""The toy base model's pre-training settings (:mod:`saferclip.toyworld.pretrain` trains with them),
a leaf module: ``saferclip-pretrain-toy`` builds its options from it without importing torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PretrainConfig:
    arch: str = "saferclip-toy"
    epochs: int = 7
    pairs_per_epoch: int = 40_000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    seed: int = 0
    threads: int = 2
