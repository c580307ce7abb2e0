"""The GPU paths give the right results: the pass / fail half of ``scripts/gpu_check.py`` (its
timings stay in the script). ``python -m pytest -m gpu`` runs them on a CUDA GPU; where torch
sees none they are skipped, with that reason (``tests/conftest.py``).

The reduced CPU form of each path is tested elsewhere (the cache builder against the plain
loop in ``test_embedding_cache.py``, the torch search against FAISS in ``test_gpu_check.py``,
``trainer=ddp_cpu`` in ``test_ddp.py``, bf16 autocast in ``test_training.py``) or here, in the
slow tier (bf16-mixed against fp32), so a change that breaks a GPU path's code breaks a test on
a machine without a GPU too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import cli_env, cli_overrides, compose_train, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

# bf16-mixed against fp32 after the same short run: every validation metric is a fraction of
# the 24 validation items of the small toy world (one item = 0.042), so 0.1 lets two items flip
# on a near tie; the last training loss may differ by 5% (bf16 keeps 8 bits of mantissa in the
# encoders, the loss terms run in float32)
METRIC_TOLERANCE = 0.1
LOSS_TOLERANCE = 0.05


def need_bf16(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_bf16_supported():
        pytest.skip(f"{torch.cuda.get_device_name(0)} has no bf16; the GPU presets train in bf16-mixed")


@pytest.mark.gpu
def test_the_cache_builder_on_the_gpu_matches_the_plain_loop(toy_world, tmp_path):
    """ViT-B-32 (random init, 224 px) on the GPU, image DataLoader workers, pinned memory:
    every cached field equals what the plain batched open_clip loop gives on the same GPU."""
    from saferclip.benchmarks.embedding_cache import toy_quadruplets
    from saferclip.data.records import Mode
    from saferclip.model.build import build_clip
    from saferclip.redirection.cache import build_or_load_cache, embed_plain

    torch.manual_seed(0)
    bundle = build_clip("ViT-B-32", None, device="cuda")
    qset = toy_quadruplets(toy_world, Mode.FULL, 64)
    expected = embed_plain(bundle, qset, batch_size=32)
    cache = build_or_load_cache(bundle, qset, tmp_path, batch_size=32, num_workers=2, progress=False)
    assert set(expected) == {"safe_text", "unsafe_text", "safe_image", "unsafe_image"}
    for name, reference in expected.items():
        assert getattr(cache, name).shape == reference.shape
        assert (getattr(cache, name).float() - reference.cpu()).abs().max().item() < 1e-3, name


@pytest.mark.gpu
def test_the_exact_search_on_the_gpu_matches_faiss_cpu():
    """FAISS's GPU build when it loads, else torch matmul + topk on the GPU, against faiss-cpu's
    flat index on clustered vectors. Two exact searches may order (near) ties differently,
    their float32 sums taken in another order, so they agree when their sorted similarities
    do, and the top-1 ids then agree but for such ties."""
    from saferclip.benchmarks.vectors import mixture
    from saferclip.redirection.faiss_search import build_neighbour_index, exact_neighbours_torch, faiss_gpu_status

    pool = mixture(200_000, 768, 200, 50, seed=0)
    queries = mixture(2_000, 768, 200, 50, seed=1)
    reference = build_neighbour_index(queries, pool, k=5, index="exact", device="cpu")
    if faiss_gpu_status()["usable"]:
        result = build_neighbour_index(queries, pool, k=5, index="exact", device="cuda")
    else:
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")  # exact float32, no TF32
        try:
            result = exact_neighbours_torch(queries, pool, k=5, chunk=1024, device="cuda")
        finally:
            torch.set_float32_matmul_precision(before)
    assert result.indices.shape == reference.indices.shape == (2_000, 5)
    assert (reference.similarities - result.similarities).abs().max().item() <= 1e-4
    assert (reference.indices[:, 0] == result.indices[:, 0]).float().mean().item() >= 0.99


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["gpu", "ddp"])
def test_saferclip_train_fast_dev_run_on_the_gpu(trainer, toy_world, tmp_path):
    """``saferclip-train trainer=gpu`` (bf16-mixed, one GPU) and ``trainer=ddp`` (every
    visible GPU) finish a fast_dev_run in their own process, each process reporting a result."""
    world = torch.cuda.device_count() if trainer == "ddp" else 1
    if trainer == "gpu":
        need_bf16("cuda")
    args = [
        *cli_overrides(tmp_path, toy_world),
        f"trainer={trainer}",
        *([f"trainer.devices={world}"] if trainer == "ddp" else []),
        "trainer.accelerator=gpu",
        "debug=fast_dev_run",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc, _ = run_cli(args, cwd=tmp_path, timeout=420, env=cli_env())
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    results = [line for line in out.splitlines() if "saferclip.train][INFO] - result:" in line]
    assert len(results) == world, out[-4000:]


def short_run(tmp_path: Path, toy_world: Path, device: str, precision: str, cache_dir: Path):
    return compose_train(
        tmp_path / precision,
        toy_world,
        "model=toy",
        f"trainer={'gpu' if device == 'cuda' else 'cpu'}",
        f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}",
        f"trainer.precision={precision}",
        "trainer.devices=1",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=3",
        "callbacks.early_stopping=null",
        "method.curriculum=false",
        "data.batch_size=16",
        "logger=none",
        "export=false",
        "seed=0",
        cache_dir=cache_dir,
    )


def loss_dtypes(cfg, device: str) -> dict:
    """Under bf16 autocast: the dtype the encoders' projections return (before the L2
    normalisation, which autocast runs in float32 on CUDA but not on the CPU) and the dtype
    of each loss term and of their sum."""
    from saferclip.benchmarks.train_step import prepare, to_device
    from saferclip.model.build import encode_tokens

    module, batches = prepare(cfg, 1)
    module.to(device)
    batch = to_device(batches[0], torch.device(device))
    with torch.no_grad(), torch.autocast(device_type=device, dtype=torch.bfloat16):
        features = [
            module.model.encode_image(batch["safe_image"], normalize=False),
            encode_tokens(module.model, batch["safe_text"], normalize=False),
        ]
        total, terms = module.loss_step(batch)
    return {
        "features": {v.dtype for v in features},
        "total": total.dtype,
        "terms": {k: v.dtype for k, v in terms.items()},
    }


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_bf16_mixed_ends_where_fp32_ends_and_keeps_the_loss_in_float32(device, toy_world, tmp_path):
    """The same short toy run in bf16-mixed and in fp32 ends at the same validation metrics
    (within the tolerance above), and under bf16 autocast the encoders run in bf16 while every
    loss term is computed in float32."""
    from saferclip.app.train import train

    need_bf16(device)
    cache_dir = tmp_path / "cache"
    results = {}
    for precision in ("32-true", "bf16-mixed"):
        cfg = short_run(tmp_path, toy_world, device, precision, cache_dir)
        results[precision] = {k: v for k, v in train(cfg).items() if isinstance(v, float)}
    fp32, bf16 = results["32-true"], results["bf16-mixed"]
    compared = sorted(k for k in fp32.keys() & bf16.keys() if k.startswith("val/"))
    assert compared and "train/loss" in fp32.keys() & bf16.keys(), sorted(fp32)
    deltas = {k: abs(bf16[k] - fp32[k]) for k in compared}
    assert max(deltas.values()) <= METRIC_TOLERANCE, deltas
    assert np.isclose(bf16["train/loss"], fp32["train/loss"], rtol=LOSS_TOLERANCE, atol=0), (bf16, fp32)

    dtypes = loss_dtypes(short_run(tmp_path, toy_world, device, "bf16-mixed", cache_dir), device)
    assert dtypes["features"] == {torch.bfloat16}
    assert dtypes["total"] == torch.float32 and set(dtypes["terms"].values()) == {torch.float32}, dtypes
