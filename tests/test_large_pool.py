"""The large embedded safe pool: clip-retrieval's layout read from memory maps, IVF-PQ with
exact re-ranking against brute force, its saved index, clear errors on bad shards, and the
training split's neighbours from an embedded pool equal to those from the same captions as a
caption file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_embedding_cache import toy_set

from saferclip.data.records import DataFormatError
from saferclip.errors import ConfigError
from saferclip.model.build import build_clip, encode_text
from saferclip.redirection.cache import build_or_load_cache
from saferclip.redirection.large_pool import (
    BUILD_STAGES,
    BuildStages,
    PoolIndex,
    PoolIndexConfig,
    attach_large_pool,
    build_pool_index,
    index_bytes,
    load_or_build_pool_index,
    write_index,
)
from saferclip.redirection.neighbour_config import NeighbourConfig
from saferclip.redirection.neighbours import find_safe_neighbours, pool_text
from saferclip.redirection.pool_shards import open_pool

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """FAISS on one thread too: on a shared machine a two-thread OpenMP region waits at every
    barrier for a descheduled thread (this module once took 250 s instead of 15)."""
    from saferclip.redirection.large_pool import faiss_threads

    with faiss_threads(1):
        yield


def clustered(n: int, d: int, centres: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = np.random.default_rng(1234).standard_normal((centres, d)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = c[rng.integers(centres, size=n)] + 0.5 * rng.standard_normal((n, d)).astype(np.float32) / np.sqrt(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_pool(
    folder: Path, vectors: np.ndarray, shard_rows: int, captions: list[str] | None = None, dtype=np.float16
) -> Path:
    (folder / "text_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    for i, start in enumerate(range(0, len(vectors), shard_rows)):
        np.save(folder / "text_emb" / f"text_emb_{i}.npy", vectors[start : start + shard_rows].astype(dtype))
        if captions is not None:
            pd.DataFrame({"caption": captions[start : start + shard_rows]}).to_parquet(
                folder / "metadata" / f"metadata_{i}.parquet"
            )
    return folder


def test_shards_read_in_order_with_captions(tmp_path):
    vectors = clustered(2500, 32, 10, 0)
    captions = [f"caption {i}" for i in range(2500)]
    # 11 shards: text_emb_10 must come after text_emb_9, not after text_emb_1
    shards = open_pool(write_pool(tmp_path / "pool", vectors, 240, captions))
    assert len(shards) == 2500 and shards.dim == 32 and shards.files[-1].name == "text_emb_10.npy"
    ids = np.array([2499, 0, 241, 1200, 239])
    np.testing.assert_allclose(shards.rows(ids), vectors[ids].astype(np.float16).astype(np.float32))
    assert shards.captions(ids) == [f"caption {i}" for i in ids]
    assert sum(len(c) for _, c in shards.chunks(1000)) == 2500


def test_ivfpq_with_reranking_matches_brute_force(tmp_path):
    pool = clustered(8000, 64, 40, 0)
    queries = clustered(300, 64, 40, 1)
    shards = open_pool(write_pool(tmp_path / "pool", pool, 3000, dtype=np.float32))
    config = PoolIndexConfig(m=32, nbits=4, nprobe=16, candidates=64, chunk_rows=3000)  # 16 bytes of code
    index = PoolIndex(build_pool_index(shards, config), shards, config)
    ids, sims = index.search(queries, k=3)
    exact = queries @ pool.T
    truth = np.argsort(-exact, axis=1)[:, :3]
    assert np.mean(ids[:, 0] == truth[:, 0]) >= 0.95
    assert np.mean([len(set(a) & set(b)) / 3 for a, b in zip(ids.tolist(), truth.tolist())]) >= 0.9
    # re-ranked similarities are the exact inner products of the returned rows, best first
    np.testing.assert_allclose(sims, np.take_along_axis(exact, ids, axis=1), atol=1e-5)
    assert np.all(np.diff(sims, axis=1) <= 1e-6)
    # 16 bytes of PQ code + an 8-byte id per vector; the centroids, the PQ code words and the
    # fast-scan layout's padding (codes in blocks of 32 per list) amortised; no float vector
    # (256 bytes each here) is kept in the index
    nlist, d, code = config.lists(8000), 64, 16
    fixed = nlist * d * 4 + d * 16 * 4 + nlist * 32 * code
    assert index.bytes_per_vector() <= code + 8 + fixed / 8000 + 2
    # without re-ranking many candidates, PQ alone is worse: the re-ranking does the work
    one = PoolIndex(index.index, shards, PoolIndexConfig(m=32, nprobe=16, candidates=1))
    assert np.mean(one.search(queries, k=1)[0][:, 0] == truth[:, 0]) < np.mean(ids[:, 0] == truth[:, 0])


def test_chunked_build_equals_one_chunk(tmp_path):
    """Adding chunk by chunk changes nothing: each vector's list and code depend on it alone."""
    import faiss

    shards = open_pool(write_pool(tmp_path / "pool", clustered(6000, 32, 20, 0), 2500))
    config = PoolIndexConfig(m=8, nprobe=8, candidates=16)
    stages = BuildStages()
    small = build_pool_index(shards, PoolIndexConfig(m=8, nprobe=8, candidates=16, chunk_rows=700), stages=stages)
    whole = build_pool_index(shards, PoolIndexConfig(m=8, nprobe=8, candidates=16, chunk_rows=10_000))
    assert small.ntotal == whole.ntotal == 6000
    assert bytes(faiss.serialize_index(small)) == bytes(faiss.serialize_index(whole))
    assert index_bytes(small) == len(faiss.serialize_index(small))
    assert set(stages) == set(BUILD_STAGES) and all(v >= 0 for v in stages.values())
    # every row is in exactly one list, under its own id
    invlists = small.invlists
    ids = np.concatenate(
        [faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy() for i in range(small.nlist)]
    )
    np.testing.assert_array_equal(np.sort(ids), np.arange(6000))
    q = clustered(50, 32, 20, 3)
    np.testing.assert_array_equal(
        PoolIndex(small, shards, config).search(q, 3)[0], PoolIndex(whole, shards, config).search(q, 3)[0]
    )


def test_index_written_with_the_digest_of_its_bytes(tmp_path):
    from saferclip.integrity import digest_file

    shards = open_pool(write_pool(tmp_path / "pool", clustered(3000, 32, 10, 0), 3000))
    index = build_pool_index(shards, PoolIndexConfig(m=4, nprobe=4, candidates=8))
    digest, size = write_index(index, tmp_path / "x.faiss")
    assert digest == digest_file(tmp_path / "x.faiss") and size == (tmp_path / "x.faiss").stat().st_size == index_bytes(
        index
    )


@pytest.mark.parametrize("damage", ["nan", "scaled"])
def test_a_bad_vector_anywhere_is_named_by_file_and_row(tmp_path, damage):
    """Past the first 1024 rows open_pool looks at, past the first chunk: the build refuses it."""
    vectors = clustered(6000, 32, 10, 0)
    if damage == "nan":
        vectors[4000 + 1500, 7] = np.nan
    else:
        vectors[4000 + 1500] *= 1.5
    shards = open_pool(write_pool(tmp_path / "pool", vectors, 2000))  # the first 1024 rows of each shard are fine
    expected = r"text_emb_2\.npy, row 1500: " + (
        "non-finite values" if damage == "nan" else "vectors must be L2-normalised, this one has norm 1.5"
    )
    with pytest.raises(DataFormatError, match=expected) as err:
        build_pool_index(shards, PoolIndexConfig(m=4, nprobe=4, candidates=8))  # caught in the training sample
    assert "\n" not in str(err.value)
    # a training sample without that row (as _sample_rows draws it): found while adding
    assert 5500 not in np.random.default_rng(3).choice(6000, size=1000, replace=False)
    with pytest.raises(DataFormatError, match=expected):
        build_pool_index(shards, PoolIndexConfig(m=4, nprobe=4, candidates=8, train_size=1000, seed=3))
    with pytest.raises(DataFormatError, match=expected):  # and while adding, in the chunk that holds it
        for start, _ in shards.chunks(700):
            assert start < 5500


def test_saved_index_is_reused_and_a_damaged_one_rebuilt(tmp_path, caplog):
    shards = open_pool(write_pool(tmp_path / "pool", clustered(3000, 32, 10, 0), 1000))
    config = PoolIndexConfig(m=4, nprobe=8, candidates=16)
    first = load_or_build_pool_index(shards, tmp_path / "idx", config)
    (folder,) = [p for p in (tmp_path / "idx").iterdir() if p.is_dir()]
    stamp = (folder / "ivfpq.faiss").stat().st_mtime_ns
    again = load_or_build_pool_index(shards, tmp_path / "idx", config)
    assert (folder / "ivfpq.faiss").stat().st_mtime_ns == stamp and again.index.ntotal == 3000
    q = clustered(20, 32, 10, 5)
    np.testing.assert_array_equal(first.search(q, 2)[0], again.search(q, 2)[0])
    data = bytearray((folder / "ivfpq.faiss").read_bytes())
    data[-100] ^= 0xFF
    (folder / "ivfpq.faiss").write_bytes(bytes(data))
    from saferclip.integrity import forget

    forget()
    rebuilt = load_or_build_pool_index(shards, tmp_path / "idx", config)
    assert "ivfpq.faiss" in caplog.text and rebuilt.index.ntotal == 3000


def test_bad_shards_are_named(tmp_path):
    good = clustered(100, 16, 4, 0)
    with pytest.raises(DataFormatError, match="no embedding shards"):
        open_pool(tmp_path)
    a = write_pool(tmp_path / "a", good, 50)
    np.save(a / "text_emb" / "text_emb_1.npy", clustered(50, 8, 4, 0))
    with pytest.raises(DataFormatError, match=r"text_emb_1\.npy.*8-d vectors"):
        open_pool(a)
    b = write_pool(tmp_path / "b", good * 3, 100)
    with pytest.raises(
        DataFormatError, match=r"text_emb_0\.npy, row 0: vectors must be L2-normalised, this one has norm 3"
    ):
        open_pool(b)
    c = write_pool(tmp_path / "c", good, 50, [f"c{i}" for i in range(100)])
    pd.DataFrame({"caption": ["x"] * 7}).to_parquet(c / "metadata" / "metadata_1.parquet")
    with pytest.raises(DataFormatError, match=r"metadata_1\.parquet.*7 rows, but text_emb_1\.npy holds 50"):
        open_pool(c)
    d = write_pool(tmp_path / "d", good, 50, [f"c{i}" for i in range(100)])
    pd.DataFrame({"text": ["x"] * 50}).to_parquet(d / "metadata" / "metadata_0.parquet")
    with pytest.raises(DataFormatError, match=r"metadata_0\.parquet.*no column 'caption'"):
        open_pool(d)


def test_every_row_is_checked_before_the_index_is_built(tmp_path):
    """open_pool looks at each shard's first 1,024 rows; a NaN or an unnormalised row past them
    is refused by name before FAISS's k-means meets it (it would stop with its own error), and
    check_pool_vectors (the dry run's) finds it whatever its chunk size."""
    from saferclip.redirection.pool_shards import check_pool_vectors

    vectors = clustered(1500, 16, 4, 0)
    vectors[1300] = np.nan
    vectors[1400] *= 2
    shards = open_pool(write_pool(tmp_path / "nan", vectors, 1500, dtype=np.float32))  # the quick look passes
    with pytest.raises(DataFormatError, match=r"text_emb_0\.npy, row 1300: non-finite values"):
        build_pool_index(shards, PoolIndexConfig(m=4))
    with pytest.raises(DataFormatError, match=r"row 1300"):
        check_pool_vectors(shards, rows=256)  # whatever the chunk size
    vectors[1300] = vectors[0]
    second = open_pool(write_pool(tmp_path / "long", vectors, 1500, dtype=np.float32))
    with pytest.raises(
        DataFormatError, match=r"text_emb_0\.npy, row 1400: vectors must be L2-normalised, this one has norm 2"
    ):
        check_pool_vectors(second, rows=1000)


def test_a_pool_of_another_width_is_named_by_training(toy_world, tmp_path):
    """The model embeds captions in D dimensions, the pool holds 2D: one line naming the pool
    and both widths (not the index's "queries must be [Q, 2D]")."""
    import yaml

    from saferclip.locations import CONF_DIR
    from saferclip.training.method import method_config
    from saferclip.training.prepare import prepare

    bundle = build_clip("saferclip-micro")
    extra = list(dict.fromkeys(q.safe_caption for q in toy_set(toy_world, split="validation")))
    vectors = encode_text(bundle, extra, 64).float().numpy()
    dim = vectors.shape[1]
    wide = write_pool(
        tmp_path / "wide", np.concatenate([vectors, vectors], axis=1) / np.sqrt(2), 50, extra, dtype=np.float32
    )
    method = yaml.safe_load((CONF_DIR / "method" / "saferclip.yaml").read_text())
    method["neighbours"].update(extra_pool=str(wide))
    data = yaml.safe_load((CONF_DIR / "data" / "toy.yaml").read_text())
    data["root"] = str(toy_world)
    for spec in data["splits"].values():
        for key, value in list(spec.items()):
            if isinstance(value, str):
                spec[key] = value.replace("${data.root}", str(toy_world))
    with pytest.raises(
        ConfigError,
        match=rf"method\.neighbours\.extra_pool: {wide} holds {2 * dim}-d vectors, but saferclip-micro embeds captions in {dim}-d",
    ):
        prepare(
            data,
            {"arch": "saferclip-micro", "pretrained": None},
            method_config(method),
            str(tmp_path / "cache"),
            progress=False,
        )


def test_training_neighbours_from_an_embedded_pool_equal_the_caption_file_path(toy_world, tmp_path):
    torch.manual_seed(0)
    bundle = build_clip("saferclip-micro")
    qset = toy_set(toy_world, limit=60)
    extra = [q.safe_caption for q in toy_set(toy_world, split="validation")] + [
        q.safe_caption for q in toy_set(toy_world, split="test")
    ]
    extra = list(dict.fromkeys(extra))  # distinct captions: ties would make either answer right
    vectors = encode_text(bundle, extra, 64).float().numpy()
    pool_dir = write_pool(tmp_path / "pool", vectors, 97, extra, dtype=np.float32)
    config = NeighbourConfig(k=2)

    reference_cache = build_or_load_cache(bundle, qset, tmp_path / "a", progress=False, extra_safe_captions=extra)
    reference = find_safe_neighbours(reference_cache, config)
    ref_pool = [q.safe_caption for q in qset] + reference_cache.extra_safe_captions

    cache = build_or_load_cache(bundle, qset, tmp_path / "b", progress=False)
    shards = open_pool(pool_dir)
    # nprobe = every list: the candidate union then holds each query's exact top rows
    index_config = PoolIndexConfig(nlist=4, m=4, nprobe=4, candidates=len(extra))
    pool = load_or_build_pool_index(shards, tmp_path / "b" / "pools", index_config)

    def encode(captions):
        return encode_text(bundle, captions, 64).float().numpy()

    attached = attach_large_pool(cache, pool, per_query=8, encode_captions=encode)
    assert attached.path.parent == cache.path / "pools" and attached.key != cache.key
    # a union of candidates, not the pool: by brute force, the union of each unsafe caption's
    # 8 nearest pool captions (the test once checked only that the union was smaller than the
    # pool, which held for the loose world's captions and not for the ViSU-like one's)
    top = (cache.unsafe_text.float() @ torch.from_numpy(vectors).T).topk(8, dim=1).indices
    assert set(attached.extra_safe_captions) == {extra[j] for j in top.flatten().tolist()}
    found = find_safe_neighbours(attached, config)
    got_pool = [q.safe_caption for q in qset] + attached.extra_safe_captions
    for i in range(len(qset)):
        assert [got_pool[j] for j in found.indices[i]] == [ref_pool[j] for j in reference.indices[i]], i
    torch.testing.assert_close(found.similarities, reference.similarities, atol=1e-5, rtol=0)
    assert len(pool_text(attached)) == 60 + len(attached.extra_safe_captions)
    # reused from disk the second time, same candidates
    again = attach_large_pool(cache, pool, per_query=8)
    assert again.extra_safe_captions == attached.extra_safe_captions
    assert json.loads((attached.path / "pool.json").read_text())["count"] == len(attached.extra_safe_captions)

    # embeddings made by another model are refused, naming the pool
    other = build_clip("saferclip-micro")
    with torch.no_grad():  # another model: the same architecture, other weights
        for param in other.model.parameters():
            param.add_(0.5 * torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
    with pytest.raises(ConfigError, match="not made by this model"):
        attach_large_pool(cache, pool, per_query=9, encode_captions=lambda c: encode_text(other, c, 64).float().numpy())


def test_method_config_checks_the_pool_index_section():
    import yaml

    from saferclip.locations import CONF_DIR
    from saferclip.training.method import method_config

    preset = yaml.safe_load((CONF_DIR / "method" / "saferclip.yaml").read_text())
    preset["neighbours"]["pool_index"] = {"nprobe": 8, "candidates": 96}  # not the defaults
    assert method_config(preset).pool_index == PoolIndexConfig(nprobe=8, candidates=96) != PoolIndexConfig()
    preset["neighbours"]["pool_index"] = {"nprobes": 32}
    with pytest.raises(ConfigError, match=r"method\.neighbours\.pool_index: unknown keys \['nprobes'\]"):
        method_config(preset)
    preset["neighbours"]["pool_index"] = {"candidates": 0}
    with pytest.raises(ConfigError, match="candidates must be a positive integer"):
        method_config(preset)


def test_prepare_takes_the_training_targets_from_an_embedded_pool(toy_world, tmp_path):
    """The method config's extra_pool naming a folder: prepare() builds the pool's index under the
    cache folder, and the training split's neighbours come from the train set plus the pool."""
    import yaml

    from saferclip.locations import CONF_DIR
    from saferclip.training.method import method_config
    from saferclip.training.prepare import prepare

    torch.manual_seed(0)
    bundle = build_clip("saferclip-micro")
    extra = list(dict.fromkeys(q.safe_caption for q in toy_set(toy_world, split="validation")))
    write_pool(tmp_path / "pool", encode_text(bundle, extra, 64).float().numpy(), 50, extra, dtype=np.float32)
    method = yaml.safe_load((CONF_DIR / "method" / "saferclip.yaml").read_text())
    method["neighbours"].update(extra_pool=str(tmp_path / "pool"), pool_index={"m": 4, "nprobe": 8, "candidates": 64})
    data = yaml.safe_load((CONF_DIR / "data" / "toy.yaml").read_text())
    data["root"] = str(toy_world)
    for spec in data["splits"].values():
        for key, value in list(spec.items()):
            if isinstance(value, str):
                spec[key] = value.replace("${data.root}", str(toy_world))
    prepared = prepare(
        data,
        {"arch": "saferclip-micro", "pretrained": None},
        method_config(method),
        str(tmp_path / "cache"),
        progress=False,
    )
    n = len(prepared.train)
    assert prepared.cache.path.parent.name == "pools" and 0 < len(prepared.cache.extra_safe_captions) <= len(extra)
    assert prepared.neighbours.pool_size == n + len(prepared.cache.extra_safe_captions)
    assert list((tmp_path / "cache" / "pools").glob("*/ivfpq.faiss"))  # the pool's index, built once
    # some unsafe captions are redirected to a caption of the embedded pool
    assert bool((prepared.neighbours.indices[:, 0] >= n).any())
    chosen = prepared.neighbours.indices[:, 0]
    pool_captions = [q.safe_caption for q in prepared.train] + prepared.cache.extra_safe_captions
    assert all(pool_captions[int(j)] in extra for j in chosen[chosen >= n])
