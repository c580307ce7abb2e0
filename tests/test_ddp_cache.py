"""The frozen-embedding cache built on every rank: two gloo processes each embed half of
every field into the same memory-mapped files, and the result is the one-process cache (same
key, same rows, same checksums); a second call reuses it on every rank; a bad image on one
rank stops both ranks with an error instead of a hang, and leaves no cache behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_ddp import free_port
from test_embedding_cache import toy_set

from saferclip.data.records import Mode
from saferclip.model.build import build_clip
from saferclip.redirection.cache import build_or_load_cache
from saferclip.redirection.cache_ddp import shard_rows
from saferclip.redirection.cache_format import load_cache

pytestmark = pytest.mark.usefixtures("one_thread")

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
N_ITEMS = 23  # odd: the two shards differ in size
EXTRA = [f"a safe extra caption number {i}" for i in range(5)]

WORKER = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp

    def worker(rank, world, toy_world, cache_dir, out_dir, scenario):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["TEST_PORT"])
        dist.init_process_group("gloo", rank=rank, world_size=world)
        torch.set_num_threads(1)
        import saferclip.redirection.cache as ec
        from saferclip.data.records import Mode
        from saferclip.model.build import build_clip
        from test_ddp_cache import EXTRA, N_ITEMS
        from test_embedding_cache import toy_set
        torch.manual_seed(0)
        bundle = build_clip("saferclip-micro")
        qset = toy_set(Path(toy_world), Mode.FULL, limit=N_ITEMS)
        if scenario == "bad_image":  # the last item, in rank 1's shard, has a broken file
            import dataclasses
            last = dataclasses.replace(qset.items[-1], unsafe_image=Path(out_dir) / "broken.png")
            qset = dataclasses.replace(qset, items=[*qset.items[:-1], last])
        counted = {}
        check = ec._check_finite
        def counting(emb, start, what, ids):  # rows this rank embedded, per field
            counted.setdefault(what, []).extend(range(start, start + len(emb)))
            return check(emb, start, what, ids)
        ec._check_finite = counting
        report = {"rank": rank}
        try:
            cache = ec.build_or_load_cache(bundle, qset, cache_dir, batch_size=4, progress=False, extra_safe_captions=EXTRA)
            report.update(key=cache.key, reused=cache.was_reused, rows=counted)
            again = ec.build_or_load_cache(bundle, qset, cache_dir, batch_size=4, progress=False, extra_safe_captions=EXTRA)
            report.update(again_reused=again.was_reused, again_key=again.key)
        except Exception as e:
            report.update(error=f"{type(e).__name__}: {e}")
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
        dist.destroy_process_group()

    if __name__ == "__main__":
        toy_world, cache_dir, out_dir, scenario = sys.argv[1:5]
        mp.spawn(worker, args=(2, toy_world, cache_dir, out_dir, scenario), nprocs=2, join=True)
    """
)


def run_two_ranks(tmp_path: Path, toy_world: Path, cache_dir: Path, scenario: str) -> list[dict]:
    script = tmp_path / "ddp_cache_worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS_DIR), str(REPO)]), TEST_PORT=str(free_port()))
    args = [str(toy_world), str(cache_dir), str(tmp_path), scenario]
    proc = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def test_shard_rows_cover_every_row_once():
    for n in (0, 1, 2, 23, 100):
        for world in (1, 2, 3, 8):
            rows = [r for rank in range(world) for r in range(*shard_rows(n, rank, world))]
            assert rows == list(range(n))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_ranks_build_the_one_process_cache(tmp_path, toy_world):
    ranks = run_two_ranks(tmp_path, toy_world, tmp_path / "ddp", "ok")
    assert [r.get("error") for r in ranks] == [None, None]
    assert ranks[0]["key"] == ranks[1]["key"] and not ranks[0]["reused"] and not ranks[1]["reused"]
    assert ranks[0]["again_reused"] and ranks[1]["again_reused"]
    # each rank embedded its own half of every field, and nothing else
    for field, n in [("safe text", N_ITEMS), ("unsafe image", N_ITEMS), ("extra safe text", len(EXTRA))]:
        for r in ranks:
            assert sorted(r["rows"][field]) == list(range(*shard_rows(n, r["rank"], 2))), (field, r["rank"])

    torch.manual_seed(0)
    single = build_or_load_cache(
        build_clip("saferclip-micro"),
        toy_set(toy_world, Mode.FULL, limit=N_ITEMS),
        tmp_path / "single",
        batch_size=4,
        progress=False,
        extra_safe_captions=EXTRA,
    )
    ddp = load_cache(tmp_path / "ddp" / ranks[0]["key"])
    assert ddp.key == single.key and ddp.meta["built_by_ranks"] == 2 and single.meta["built_by_ranks"] == 1
    for name in ("safe_text", "unsafe_text", "safe_image", "unsafe_image", "extra_safe_text"):
        torch.testing.assert_close(getattr(ddp, name), getattr(single, name), atol=1e-6, rtol=0, msg=name)
    assert ddp.extra_safe_captions == EXTRA
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir() if not p.name.endswith(".lock")) == [ddp.key]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_bad_image_on_one_rank_stops_both_and_leaves_no_cache(tmp_path, toy_world):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    ranks = run_two_ranks(tmp_path, toy_world, tmp_path / "ddp", "bad_image")
    assert "broken.png" in ranks[1]["error"]  # its own error, naming the file
    assert "rank 1" in ranks[0]["error"] and "broken.png" in ranks[0]["error"]
    assert all("\n" not in r["error"] for r in ranks)
    assert [p for p in (tmp_path / "ddp").iterdir() if not p.name.endswith(".lock")] == []
