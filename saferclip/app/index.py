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
import sys
import time

import hydra
from omegaconf import DictConfig

from .hydra_utils import CONF_DIR, ConfigError, setup_logging, to_container

log = logging.getLogger("saferclip.index")


def build_index(cfg: DictConfig) -> dict:
    """Load the training split, build (or reuse) its cache and neighbour index; return the summary."""
    from ..embedding_cache import build_or_load_cache, load_safe_corpus
    from ..models import build_clip
    from ..neighbour_report import summarize
    from ..neighbours import NeighbourConfig, config_groups, load_or_find_safe_neighbours, pool_text
    from .datamodule import ensure_toy_world, load_split

    method = to_container(cfg.method)
    neigh = dict(method.get("neighbours") or {})
    if not neigh:
        raise ConfigError(f"method {method['name']!r} has no neighbours section (it uses paired targets)")
    extra_pool = neigh.pop("extra_pool", None)
    start = time.time()
    data = to_container(cfg.data)
    ensure_toy_world(data)
    train = load_split(data, "train")
    bundle = build_clip(cfg.model.arch, cfg.model.pretrained)
    cache = build_or_load_cache(
        bundle,
        train,
        cfg.paths.cache_dir,
        batch_size=int(data.get("eval_batch_size", 256)),
        num_workers=int(data.get("num_workers", 0)),
        extra_safe_captions=load_safe_corpus(extra_pool) if extra_pool else None,
    )
    config = NeighbourConfig(**neigh)
    groups = config_groups(train, config, len(pool_text(cache, config.use_extra_pool)))
    neighbours = load_or_find_safe_neighbours(cache, config, groups)
    summary = summarize(cache, neighbours, train)
    summary["total_seconds"] = round(time.time() - start, 2)
    summary["cache_path"] = str(cache.path)
    summary["cache_reused"] = cache.was_reused
    return summary


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    from ..neighbour_report import format_summary

    setup_logging()
    try:
        summary = build_index(cfg)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"saferclip-index: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_summary(summary))
    print(f"cache: {summary['cache_path']} ({'reused' if summary['cache_reused'] else 'built'}); "
          f"total {summary['total_seconds']:.1f} s")
    from ..checkpoints import write_json_atomic

    out = f"{cfg.paths.run_dir}/index_summary.json"
    write_json_atomic(out, json.loads(json.dumps(summary, default=str)))


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
