"""What the thread count changes: each method's run trained and evaluated once per thread count
(the same seed, data and config), then compared: the largest difference of a weight, how many
evaluation figures differ and by how much (docs/DEVELOPING.md, "Determinism").

    python scripts/determinism_threads.py                              # micro model, small toy world, 1 vs 2 threads
    python scripts/determinism_threads.py --model toy --epochs 1 --batches 8
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from saferclip.app.engine.fit import train
from saferclip.app.hydra_utils import CONF_DIR, to_container
from saferclip.evaluation.report import iter_metrics
from saferclip.evaluation.runner import evaluate_models
from saferclip.model.checkpoints import load_state_dict
from saferclip.toyworld.generate import SMALL_SIZES, make_toy_world


def run_once(
    tmp: Path, world: Path, method: str, model: str, epochs: int, batches: int, threads: int
) -> tuple[dict, dict, float]:
    torch.set_num_threads(threads)
    overrides = [
        f"model={model}",
        f"method={method}",
        f"paths.toy_dir={world}",
        "data.toy_size=small",
        "data.num_workers=0",
        f"paths.run_dir={tmp / 'run'}",
        f"paths.cache_dir={tmp / 'cache'}",
        f"paths.output_dir={tmp / 'out'}",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "logger=csv",
        f"trainer.max_epochs={epochs}",
        f"trainer.limit_train_batches={batches}",
        "trainer.limit_val_batches=1",
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    start = time.perf_counter()
    export = Path(train(cfg)["export"])
    modes = {"safe": "safe", "moderation": "moderation"} if method == "hysac" else {"trained": None}
    models = {name: {"pretrained": str(export), "mode": mode} for name, mode in modes.items()}
    evaluation = evaluate_models(
        models,
        to_container(cfg.data),
        suites=["visu", "nsfw_caps", "zeroshot"],
        reference=None,
        batch_size=64,
        showcase=False,
    )
    seconds = time.perf_counter() - start
    weights = load_state_dict(next(export.glob("*.safetensors")))
    figures = {
        f"{m}/{suite}/{task or ''}/{metric}": v
        for m, suites in evaluation["results"].items()
        for suite, r in suites.items()
        for task, metric, v in iter_metrics(r, suite)
    }
    return weights, figures, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["saferclip", "safeclip", "hysac"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--model", default="micro", help="conf/model: micro (default) or toy")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batches", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        world = make_toy_world(tmp / "world", seed=0, sizes=SMALL_SIZES)
        rows = []
        for method in args.methods:
            runs = {
                n: run_once(tmp / f"{method}-{n}", world, method, args.model, args.epochs, args.batches, n)
                for n in args.threads
            }
            (base_w, base_f, base_s), *_ = runs.values()
            for n, (weights, figures, seconds) in list(runs.items())[1:]:
                weight_diff = max(float((weights[k].double() - base_w[k].double()).abs().max()) for k in base_w)
                diffs = {
                    k: abs(figures[k] - base_f[k])
                    for k in base_f
                    if isinstance(base_f[k], (int, float)) and not math.isnan(base_f[k])
                }
                differing = {k: d for k, d in diffs.items() if d != 0}
                worst = max(differing, key=differing.get) if differing else None
                rows.append(
                    {
                        "method": method,
                        "threads": f"{args.threads[0]} vs {n}",
                        "max |Δ weight|": weight_diff,
                        "figures differing": f"{len(differing)} of {len(diffs)}",
                        "largest |Δ figure|": f"{differing[worst]:.3g} ({worst})" if worst else "0",
                        "seconds": f"{base_s:.0f} vs {seconds:.0f}",
                    }
                )
    for row in rows:
        print(json.dumps(row, ensure_ascii=False))


if __name__ == "__main__":
    main()
