"""saferclip-index: build the frozen-embedding cache and the safe-neighbour index, print a summary.

    saferclip-index                                   # the toy world, SafeR-CLIP's defaults
    saferclip-index method.neighbours.k=5 method.neighbours.mode=joint
    saferclip-index experiment=visu_vitl14 paths.visu=/data/visu paths.coco=/data/coco

Same config tree as `saferclip-train` (conf/train.yaml): training finds and reuses what this
command builds, under `paths.cache_dir`.
"""

from __future__ import annotations

import json
import logging
import time

from omegaconf import DictConfig

from ..cli import hydra_command
from ..hydra_utils import ConfigError, check_train_config, to_container

log = logging.getLogger("saferclip.index")


def build_index(cfg: DictConfig) -> dict:
    """Load the training split, build (or reuse) its cache and neighbour index; return the summary."""
    from ...redirection.report import summarize
    from ...toyworld.generate import ensure_toy_world
    from ...training.prepare import prepare

    method = check_train_config(cfg)  # the typed method config, checked once
    if method.targets != "neighbours" or method.neighbours is None:
        raise ConfigError(f"method {method.name!r} has no neighbours section (its targets: {method.targets})")
    start = time.time()
    data = to_container(cfg.data)
    ensure_toy_world(data)
    prepared = prepare(data, to_container(cfg.model), method, cfg.paths.cache_dir, progress=True)
    summary = summarize(prepared.cache, prepared.neighbours, prepared.train)
    summary["total_seconds"] = round(time.time() - start, 2)
    summary["cache_path"] = str(prepared.cache.path)
    summary["cache_reused"] = prepared.cache.was_reused
    return summary


def _task(cfg: DictConfig) -> None:
    from ...files import write_json_atomic
    from ...redirection.report import format_summary

    summary = build_index(cfg)
    print(format_summary(summary))
    print(
        f"cache: {summary['cache_path']} ({'reused' if summary['cache_reused'] else 'built'}); total {summary['total_seconds']:.1f} s"
    )
    write_json_atomic(f"{cfg.paths.run_dir}/index_summary.json", json.loads(json.dumps(summary, default=str)))


OPTIONS = {
    "method.neighbours.k=N": "safe neighbours per unsafe item",
    "method.neighbours.mode=MODE": "text, image or joint: which embeddings the search compares",
    "experiment=NAME": "a whole recipe, e.g. visu_vitl14 (with paths.visu=... paths.coco=...)",
    "paths.cache_dir=DIR": "where the cache and the index go (training reuses them from there)",
}
main = hydra_command("saferclip-index", "train", _task, __doc__, OPTIONS)


if __name__ == "__main__":
    main()
