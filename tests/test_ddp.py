"""Distributed training on CPU processes (gloo): the same loss and gradients as one process
on the same global batch, equal per-rank batches, the same loss terms on every rank, and
the real app under ``trainer=ddp_cpu``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from torch.utils.data import DataLoader, Subset
from train_helpers import (
    REPO,
    SUBPROCESS_BUDGET,
    cli_overrides,
    collate,
    compose_train,
    prepared,
    run_cli,
)

from saferclip.app.engine.datamodule import EpochShuffle, drop_last_for
from saferclip.app.engine.module import unique_rows
from saferclip.training.datasets import collate_items

pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread (tests/conftest.py)

TESTS_DIR = Path(__file__).resolve().parent
METHODS = ("safeclip", "saferclip", "hysac")
# every method, clean and with adversarial training (its attacks aim at the gathered batch and
# draw their random starts per item, so the ranks together compute what one process does)
ADVERSARIAL = ("method.adversarial.enabled=true", "method.adversarial.preserve_safe=true")
CASES = {
    **{m: (f"method={m}",) for m in METHODS},
    **{f"{m}_adversarial": (f"method={m}", *ADVERSARIAL) for m in METHODS},
}
GLOBAL_BATCH = 16


def perturb_adapters(module) -> None:
    """Non-zero LoRA B (A's gradient is zero while B is), the same in every process."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sorted(module.model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)


def loss_and_grads(module, batch, gather=None) -> dict[str, torch.Tensor]:
    module.zero_grad(set_to_none=True)
    total, terms = module.loss_step(batch, gather)
    total.backward()
    out = {"loss": total.detach(), **{f"term.{k}": v.detach() for k, v in terms.items()}}
    # every trainable parameter: the CLIP's, and HySAC's hyperbolic head
    out.update({f"grad.{n}": p.grad.clone() for n, p in module.named_parameters() if p.requires_grad})
    return out


# Each rank: the module + loss as train() builds them, its half of the global batch, InfoNCE
# negatives gathered with gradients, gradients averaged over ranks (what DDP does).
WORKER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp

    def worker(rank, world, tmp, toy_world, cache_dir, out_dir):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["TEST_PORT"])
        dist.init_process_group("gloo", rank=rank, world_size=world)
        torch.set_num_threads(1)
        from test_ddp import CASES, GLOBAL_BATCH, loss_and_grads, perturb_adapters
        from train_helpers import collate, compose_train, prepared
        from saferclip.training.contrastive import gather_with_grad
        for method, overrides in CASES.items():
            cfg = compose_train(Path(tmp) / method, Path(toy_world), *overrides, cache_dir=Path(cache_dir))
            module, datamodule = prepared(cfg)
            perturb_adapters(module)
            local = GLOBAL_BATCH // world
            batch = collate(datamodule.train_set, range(rank * local, (rank + 1) * local))
            result = loss_and_grads(module, batch, gather_with_grad)
            for value in result.values():  # DDP averages gradients; the logged loss is the mean too
                dist.all_reduce(value)
                value /= world
            if rank == 0:
                torch.save(result, Path(out_dir) / f"{method}.pt")
            dist.barrier()
        dist.destroy_process_group()

    if __name__ == "__main__":
        tmp, toy_world, cache_dir, out_dir = sys.argv[1:5]
        mp.spawn(worker, args=(2, tmp, toy_world, cache_dir, out_dir), nprocs=2, join=True)
    """
)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_processes_give_the_single_process_loss_and_gradients(tmp_path, toy_world):
    cache_dir = tmp_path / "cache"
    reference = {}
    for method, overrides in CASES.items():  # single process, the whole global batch; also builds the caches
        module, datamodule = prepared(compose_train(tmp_path / method, toy_world, *overrides, cache_dir=cache_dir))
        perturb_adapters(module)
        reference[method] = loss_and_grads(module, collate(datamodule.train_set, range(GLOBAL_BATCH)))
    script = tmp_path / "ddp_worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS_DIR), str(REPO)]), TEST_PORT=str(free_port()))
    args = [str(tmp_path / "ranks"), str(toy_world), str(cache_dir), str(tmp_path)]
    # within the test's 600 s limit, after the single-process references above
    proc = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for method in CASES:
        ddp = torch.load(tmp_path / f"{method}.pt", weights_only=True)
        assert ddp.keys() == reference[method].keys()
        if method.endswith("_adversarial"):  # the attacked items' terms, InfoNCE over the gathered batch included
            assert (
                any(k.startswith("term.adv_") for k in ddp)
                and reference[method]["loss"] > reference[method.split("_")[0]]["loss"]
            )
        if method == "safeclip":
            assert any(k.startswith("term.xmodal") for k in ddp)  # InfoNCE over the gathered batch
        if method == "hysac":  # Lorentzian contrastive over the gathered batch; the head learns too
            assert "term.contrastive_safe" in ddp and "grad.head.log_curvature" in ddp
        for key, value in reference[method].items():
            torch.testing.assert_close(ddp[key], value, rtol=1e-4, atol=1e-6, msg=f"{method} {key}")
        assert sum(float(v.abs().sum()) for k, v in ddp.items() if k.startswith("grad.")) > 0


# ---------------------------------------------------------------- the data under DDP


def rank_loaders(datamodule, epoch: int, world: int) -> list[DataLoader]:
    """The train loader of ``epoch`` as Lightning hands it to each rank: our epoch-seeded
    order, sharded by a DistributedSamplerWrapper, batch size and drop_last kept."""
    subset = datamodule.targets.curriculum_subset(epoch)
    batch_size = int(datamodule.data_cfg["batch_size"])
    loaders = []
    for rank in range(world):
        sampler = DistributedSamplerWrapper(
            EpochShuffle(len(subset), 0, epoch), num_replicas=world, rank=rank, shuffle=False
        )
        loaders.append(
            DataLoader(
                Subset(datamodule.train_set, subset.tolist()),
                batch_size=batch_size,
                sampler=sampler,
                drop_last=drop_last_for(len(subset), batch_size, world),
                collate_fn=collate_items,
            )
        )
    return loaders


def test_ranks_get_equal_batches_of_the_curriculum_subset(tmp_path, toy_world):
    cfg = compose_train(tmp_path, toy_world, "method=saferclip", "data.batch_size=6")
    _, datamodule = prepared(cfg)
    bucket = datamodule.targets.bucket
    for epoch in range(3):
        per_rank = [[b for b in loader] for loader in rank_loaders(datamodule, epoch, world=2)]
        sizes = [[len(b["index"]) for b in batches] for batches in per_rank]
        assert sizes[0] == sizes[1] and all(s == 6 for s in sizes[0]), sizes  # equal, full batches
        seen = torch.cat([b["index"] for batches in per_rank for b in batches])
        assert len(set(seen.tolist())) == len(seen)  # no item twice in an epoch
        assert int(bucket[seen].max()) <= epoch  # the curriculum: easy first
        keys = {frozenset(b) for batches in per_rank for b in batches}
        assert len(keys) == 1  # every rank computes the same loss terms


def test_drop_last_keeps_equal_batches_when_a_rank_has_less_than_a_batch():
    assert drop_last_for(32, 8, 1) and drop_last_for(32, 8, 2)
    assert not drop_last_for(12, 8, 2)  # 6 items per rank: their only batch is kept
    assert not drop_last_for(8, 8, 1)


def test_epoch_shuffle_is_the_same_however_often_it_is_iterated():
    sampler = EpochShuffle(20, seed=3, epoch=1)
    assert list(sampler) == list(sampler) and sorted(sampler) == list(range(20))
    assert list(EpochShuffle(20, 3, 2)) != list(sampler)


def test_validation_rows_padded_by_the_sampler_count_once():
    # DistributedSampler pads 5 items to 6 (item 0 twice); gathered, rank-major
    index = torch.tensor([0, 2, 4, 1, 3, 0])
    features = torch.arange(6, dtype=torch.float32).unsqueeze(1)
    out = unique_rows({"index": index, "safe_text": features})
    assert out["safe_text"].squeeze(1).tolist() == [0.0, 3.0, 1.0, 4.0, 2.0]


def test_every_item_has_the_same_keys_with_an_extra_safe_pool(tmp_path, toy_world):
    """Live targets that land on an extra caption (no image) still give every item a
    target image, so batches collate and all ranks compute the same terms."""
    captions = (toy_world / "visu" / "train.json").read_text()
    import json

    data = json.loads(captions)
    records = data["data"] if "data" in data else data
    extra = tmp_path / "extra.txt"
    extra.write_text("\n".join(r["nsfw"] for r in records.values()))  # exact matches: the top neighbours
    cfg = compose_train(tmp_path, toy_world, "method=saferclip", f"method.neighbours.extra_pool={extra}")
    _, datamodule = prepared(cfg)
    dataset = datamodule.train_set
    assert (dataset.targets.indices[:, 0] >= len(dataset)).float().mean() > 0.5  # mostly extra captions
    keys = {frozenset(dataset[i]) for i in range(len(dataset))}
    assert len(keys) == 1 and "target_image" in next(iter(keys))
    collate(dataset, range(len(dataset)))


# ---------------------------------------------------------------- the app


@pytest.mark.slow
def test_app_fast_dev_run_under_ddp_cpu(tmp_path, toy_world):
    args = [*cli_overrides(tmp_path, toy_world), "trainer=ddp_cpu", "debug=fast_dev_run", "method=safeclip"]
    args += [f"hydra.run.dir={tmp_path / 'run'}"]
    proc, _ = run_cli(args, cwd=tmp_path, timeout=SUBPROCESS_BUDGET)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    # two processes trained, each on its own half of the batch
    results = [line for line in out.splitlines() if "saferclip.train][INFO] - result:" in line]
    assert len(results) == 2 and results[0] != results[1]
    assert (tmp_path / "run" / "train_ddp_process_1.log").is_file()  # Lightning's re-launched rank
    # one cache, built by both ranks together (each embedded its half, in setup)
    caches = list((tmp_path / "cache").iterdir())
    assert len(caches) == 1
    assert json.loads((caches[0] / "meta.json").read_text())["built_by_ranks"] == 2
    assert out.count("active loss terms: text_preservation") == 1  # said once, by rank 0
    assert "xmodal_text_preservation" in out.split("active loss terms:")[1].splitlines()[0]
    assert (tmp_path / "run" / "config_resolved.yaml").is_file()
    assert "sync_dist=True" not in out


def test_ddp_from_a_composing_script_is_refused_before_any_work(tmp_path, toy_world):
    """Lightning would re-run the calling script for rank 1: refused, with what to do."""
    from saferclip.app.engine.fit import train
    from saferclip.app.hydra_utils import ConfigError

    cfg = compose_train(tmp_path, toy_world, "trainer=ddp_cpu", "debug=fast_dev_run")
    with pytest.raises(ConfigError, match="torchrun"):
        train(cfg)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()
