"""Synthetic embeddings with neighbour structure, for the neighbour-search benchmarks and checks.

Uniform random vectors in 768-d are nearly orthogonal to each other with no neighbour
structure at all, which no real embedding looks like, and approximate indexes score
meaninglessly on them; :func:`mixture` draws *clustered* unit vectors instead.
"""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=4)
def mixture_centres(dim: int, topics: int, subtopics: int, centre_seed: int = 1234) -> np.ndarray:
    """The sub-topic centres ``[topics * subtopics, dim]`` (unit vectors, read-only) of
    :func:`mixture`, computed once per process: the benchmarks draw their pools in many chunks."""
    crng = np.random.default_rng(centre_seed)
    topic = crng.standard_normal((topics, dim), dtype=np.float32)
    topic /= np.linalg.norm(topic, axis=1, keepdims=True)
    sub = np.repeat(topic, subtopics, axis=0) + 0.9 * crng.standard_normal(
        (topics * subtopics, dim), dtype=np.float32
    ) / np.sqrt(dim)
    sub /= np.linalg.norm(sub, axis=1, keepdims=True)
    sub.setflags(write=False)
    return sub


def mixture(n: int, dim: int, topics: int, subtopics: int, seed: int, centre_seed: int = 1234) -> np.ndarray:
    """``[n, dim]`` unit vectors: topic centre + sub-topic offset + item noise, normalised.

    The sub-topic and item spreads give nearest-neighbour cosines around 0.75 and sub-topic
    neighbours around 0.55, roughly what CLIP text embeddings of related captions show.
    """
    sub = mixture_centres(dim, topics, subtopics, centre_seed)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):  # in chunks: the noise of 1M x 768 at once is another 3 GB
        m = min(100_000, n - start)
        x = sub[rng.integers(len(sub), size=m)] + 0.6 * rng.standard_normal((m, dim), dtype=np.float32) / np.sqrt(dim)
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out
