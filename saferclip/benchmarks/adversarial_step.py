"""What adversarial safety fine-tuning costs per step (``scripts/bench_adversarial_step.py``
prints it; target: an adversarial step ≤ 3× a clean one).

For each method, two copies of the module as ``saferclip-train`` builds it, with the same
weights and batches: ``method.adversarial.enabled=false`` and ``true`` (plus the overrides
given). One step = ``loss_step`` (clean forward and loss; for the second also the attacks and
the adversarial terms) + backward + an AdamW step; the two run interleaved step by step, so
contention on a shared machine hits both alike. Reported: the median seconds of each and
their ratio, and the share of the adversarial step spent inside the attacks.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from .train_step import compose, prepare


def _stepper(module):
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-6)

    def step(batch) -> float:
        start = time.perf_counter()
        total, _ = module.loss_step(batch)
        total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def measure(
    method: str,
    model: str,
    toy_dir: Path,
    work: Path,
    batch_size: int,
    steps: int,
    warmup: int = 2,
    batches: int = 1,
    extra: tuple[str, ...] = (),
) -> dict:
    """Median seconds of a clean and an adversarial training step (module docstring)."""
    clean_cfg = compose(
        model, method, toy_dir, work / "cache", batch_size, ("method.adversarial.enabled=false", *extra)
    )
    adv_cfg = compose(model, method, toy_dir, work / "cache", batch_size, ("method.adversarial.enabled=true", *extra))
    torch.manual_seed(0)
    clean, data = prepare(clean_cfg, batches)
    adversarial, _ = prepare(adv_cfg, batches)
    adversarial.load_state_dict(clean.state_dict())
    run = {"clean": _stepper(clean), "adversarial": _stepper(adversarial)}
    times: dict[str, list[float]] = {"clean": [], "adversarial": []}
    attack: list[float] = []
    for i in range(warmup + steps):
        for name, step in run.items():
            seconds = step(data[i % len(data)])
            if i >= warmup:
                times[name].append(seconds)
                if name == "adversarial":
                    attack.append(adversarial._attack_seconds)
    median = {k: statistics.median(v) for k, v in times.items()}
    return {
        "method": method,
        "model": model,
        "batch_size": batch_size,
        "steps": steps,
        "overrides": list(extra),
        "median_s": median,
        "ratio": median["adversarial"] / median["clean"],
        "attack_share": statistics.median(attack) / median["adversarial"],
        "config": dict(adversarial.adversarial.config.__dict__),
    }
