"""What the benchmark scripts and the GPU timings measure, importable: each module one
comparison, its command line in ``scripts/``.

* :mod:`.train_step` — saferclip's Lightning training step against a bare PyTorch loop
  (``scripts/bench_train_step.py``, ``scripts/gpu_check.py`` part 1);
* :mod:`.embedding_cache` — the frozen-embedding cache builder against the plain batched loop
  (``scripts/bench_embedding_cache.py``, ``scripts/gpu_check.py`` part 2);
* :mod:`.vectors` — clustered synthetic embeddings for the neighbour search
  (``scripts/bench_neighbours.py``, ``scripts/bench_large_pool.py``, ``scripts/gpu_check.py``
  part 3).

A shell beside :mod:`saferclip.app`, not part of the library: :mod:`.train_step` builds the
training module as ``saferclip-train`` does, with Lightning and Hydra. Nothing in the library
imports this package.
"""
