"""The method's core: each unsafe item's safe target, found once from the frozen model.

* :mod:`.cache` — the frozen-embedding cache (``T0(S)``, ``T0(U)``, ``I0(V)``, ``I0(G)``):
  its key (:mod:`.cache_key`), its folder (:mod:`.cache_format`), its build across the ranks
  of a process group (:mod:`.cache_ddp`);
* :mod:`.neighbours` — each unsafe item's safe neighbours (modes, top-k, the quality guard;
  its settings: :mod:`.neighbour_config`),
  :mod:`.faiss_search` — the FAISS search under them, :mod:`.sparse_pools` — realistic, sparse pools;
* :mod:`.large_pool` — an embedded safe pool of millions (IVF-PQ with exact re-ranking);
  :mod:`.scale_summary` — its and the IVF benchmark's figures in docs/GPU.md (generated regions);
* :mod:`.targets` — the targets of both methods (paired or neighbours) and the curriculum;
* :mod:`.report` — what ``saferclip-index`` prints.
"""

from .cache import build_or_load_cache
from .cache_format import EmbeddingCache
from .neighbour_config import NeighbourConfig
from .neighbours import SafeNeighbours, find_safe_neighbours, load_or_find_safe_neighbours
from .targets import RedirectionTargets, SafePool

__all__ = [
    "EmbeddingCache",
    "NeighbourConfig",
    "RedirectionTargets",
    "SafeNeighbours",
    "SafePool",
    "build_or_load_cache",
    "find_safe_neighbours",
    "load_or_find_safe_neighbours",
]
