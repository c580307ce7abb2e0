"""The method's core: each unsafe item's safe target, found once from the frozen model.

* :mod:`.cache` — the frozen-embedding cache (``T0(S)``, ``T0(U)``, ``I0(V)``, ``I0(G)``);
* :mod:`.neighbours` — each unsafe item's safe neighbours (modes, top-k, the quality guard),
  :mod:`.faiss_search` — the FAISS search under them, :mod:`.sparse_pools` — realistic, sparse pools;
* :mod:`.large_pool` — an embedded safe pool of millions (IVF-PQ with exact re-ranking);
* :mod:`.targets` — the targets of both methods (paired or neighbours) and the curriculum;
* :mod:`.report` — what ``saferclip-index`` prints.
"""

from .cache import EmbeddingCache, build_or_load_cache
from .neighbours import NeighbourConfig, SafeNeighbours, find_safe_neighbours, load_or_find_safe_neighbours
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
