"""The rehearsal: the real-data recipe at real size on the rehearsal world, stage by stage, with
each stage's items/s and peak memory (``saferclip-rehearse``: :mod:`saferclip.app.commands.rehearse`).

The real open_clip architecture (random init: nothing downloaded; 224 px, 77-token context) with
the ``visu_vitl14`` experiment's method (SafeR-CLIP, LoRA r16 on both towers) runs on a
rehearsal world (toy scenes rendered at 224 px as JPEG in ViSU's real layout,
``saferclip.toyworld.rehearsal``): frozen-embedding cache -> neighbours -> ``steps``
training steps -> evaluation (validation U->V and S->V recall@1) -> open_clip and transformers
export. ``overrides`` are Hydra overrides of the ``train`` config. Peak memory is the
process's resident peak after the stage (it only grows) on a CPU, the stage's own peak
allocated GPU memory on a GPU.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def _peak_gb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _stage(rows: list[dict], name: str, unit: str, device: str, body: Callable[[], tuple[int, Any]]) -> Any:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    count, result = body()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    rows.append(
        {
            "stage": name,
            "items": count,
            "unit": unit,
            "seconds": round(seconds, 2),
            "items_per_s": round(count / seconds, 2) if seconds else None,
            "peak_gb": round(_peak_gb(device), 2),
        }
    )
    print(
        f"  {name:<11} {count:6d} {unit:<12} {seconds:8.1f} s {rows[-1]['items_per_s']:9.2f} /s  peak {rows[-1]['peak_gb']:.2f} GB",
        flush=True,
    )
    return result


def rehearse(
    out: Path, overrides: list[str], items: int, steps: int, device: str, batch_size: int, workers: int = 0
) -> list[dict]:
    """Run every stage; returns one row per stage (``stage, items, unit, seconds, items_per_s, peak_gb``)."""
    from hydra import compose, initialize_config_dir

    from ...data.splits import load_split
    from ...export.hf import export_hf
    from ...export.open_clip import export_open_clip
    from ...model.build import build_clip, encode_tokens
    from ...redirection.cache import build_or_load_cache
    from ...redirection.neighbours import load_or_find_safe_neighbours
    from ...redirection.sparse_pools import config_groups
    from ...toyworld.rehearsal import make_rehearsal_world
    from ...training.method import method_config
    from ..engine.fit import build_datamodule, build_module
    from ..hydra_utils import CONF_DIR, to_container

    rows: list[dict] = []
    n_val = max(8, items // 4)
    world = _stage(
        rows,
        "world",
        "quadruplets",
        device,
        lambda: (items + 2 * n_val, make_rehearsal_world(out / "world", items, n_val, n_val)),
    )
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "experiment=visu_vitl14",
                f"paths.visu={world}/visu",
                f"paths.coco={world}/coco",
                f"paths.visu_images={world}/visu_images",
                f"paths.cache_dir={out}/cache",
                f"paths.output_dir={out}",
                f"data.batch_size={batch_size}",
                f"data.eval_batch_size={batch_size}",
                f"data.num_workers={workers}",
                *overrides,
            ],
        )
    method = method_config(to_container(cfg.method))
    data = to_container(cfg.data)
    train = load_split(data, "train")
    print(
        f"rehearsal: {cfg.model.arch} (random init: {cfg.model.pretrained is None}), {len(train)} training quadruplets, "
        f"{device}, LoRA r{method.trainable.lora_r}; {torch.get_num_threads()} torch thread(s)",
        flush=True,
    )
    bundle = build_clip(cfg.model.arch, cfg.model.pretrained, device=device)
    cache = _stage(
        rows,
        "cache",
        "quadruplets",
        device,
        lambda: (
            len(train),
            build_or_load_cache(
                bundle, train, cfg.paths.cache_dir, batch_size=batch_size, num_workers=workers, progress=False
            ),
        ),
    )
    _stage(
        rows,
        "neighbours",
        "queries",
        device,
        lambda: (
            len(train),
            load_or_find_safe_neighbours(cache, method.neighbours, config_groups(train, method.neighbours, len(cache))),
        ),
    )
    bundle = None  # noqa: F841 - the frozen encoders are done: freed before the training model is built

    module = build_module(cfg, method)
    datamodule = build_datamodule(cfg, method)
    datamodule.setup("fit")  # reuses the cache and the neighbours
    module.to(device)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=method.optimizer.lr)

    def autocast() -> torch.autocast:  # bf16 on a GPU, as trainer=gpu trains
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))

    def train_steps() -> tuple[int, None]:
        n, loader = 0, datamodule.train_dataloader()  # the training loader, its workers
        while n < steps * batch_size:
            for batch in loader:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                optimizer.zero_grad(set_to_none=True)
                with autocast():
                    total, _ = module.loss_step(batch)
                total.backward()
                optimizer.step()
                n += len(batch["index"])
                if n >= steps * batch_size:
                    break
        return n, None

    module.train()
    _stage(rows, "train", "quadruplets", device, train_steps)
    module.eval()

    def evaluate() -> tuple[int, dict]:
        enc = {k: [] for k in ("s", "u", "v")}
        with torch.inference_mode(), autocast():
            for b in datamodule.val_dataloader():
                enc["s"].append(encode_tokens(module.model, b["safe_text"].to(device)).float().cpu())
                enc["u"].append(encode_tokens(module.model, b["unsafe_text"].to(device)).float().cpu())
                enc["v"].append(module.model.encode_image(b["safe_image"].to(device), normalize=True).float().cpu())
        s, u, v = (torch.cat(enc[k]) for k in ("s", "u", "v"))
        owner = datamodule.val_set.owner
        metrics = {
            name: float((owner[(q @ v.T).argmax(1)] == owner).float().mean())
            for name, q in (("U2V_R@1", u), ("S2V_R@1", s))
        }
        return len(owner), metrics

    metrics = _stage(rows, "evaluation", "quadruplets", device, evaluate)
    print(f"  (validation, random init: {metrics})")
    module.to("cpu")
    _stage(
        rows,
        "export",
        "formats",
        device,
        lambda: (
            2,
            (
                export_open_clip(module.model, cfg.model.arch, out / "export_open_clip", force=True),
                export_hf(module.model, cfg.model.arch, out / "export_hf", force=True),
            ),
        ),
    )
    return rows
