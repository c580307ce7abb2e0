"""Bootstrap intervals, paired differences and seed intervals (saferclip.evaluation.intervals)."""

import math

import numpy as np
import pytest
import torch

from saferclip.evaluation.intervals import (
    Outcomes,
    bootstrap_interval,
    decode_outcomes,
    encode_outcomes,
    metric_outcomes,
    paired_difference,
    seed_interval,
)
from saferclip.evaluation.metrics import positive_ranks, recall_at_k, unsafe_flags, unsafe_rate


def bernoulli(n: int, p: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < p).astype(np.float64)


def test_outcomes_round_trip_and_bad_strings_are_refused():
    flags = torch.tensor([True, False, False, True])
    assert encode_outcomes(flags) == "1001"
    assert decode_outcomes("1001").tolist() == [1.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="string of 0 and 1"):
        decode_outcomes("10x1")


def test_per_query_outcomes_average_to_the_reported_metrics():
    g = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=1)
    gallery = torch.nn.functional.normalize(torch.randn(30, 8, generator=g), dim=1)
    positives = torch.randint(-1, 30, (50,), generator=g)
    rank = positive_ranks(queries, gallery, positives)
    assert ((rank == -1) == (positives == -1)).all()
    hits = rank[rank >= 0] < 1
    assert hits.float().mean().item() == pytest.approx(recall_at_k(queries, gallery, positives, ks=(1,))["R@1"])
    unsafe = torch.arange(30) >= 20
    flags = unsafe_flags(queries, gallery, unsafe, k=1)
    assert int(flags.sum()) / 50 == unsafe_rate(queries, gallery, unsafe, k=1)


def test_bootstrap_interval_holds_the_estimate_and_shrinks_with_more_queries():
    small = Outcomes({"q": bernoulli(100, 0.3, 1)})
    large = Outcomes({"q": bernoulli(10_000, 0.3, 2)})
    lo_s, hi_s = bootstrap_interval(small)
    lo_l, hi_l = bootstrap_interval(large)
    assert lo_s <= small.value() <= hi_s and lo_l <= large.value() <= hi_l
    # the binomial standard error: 1.96 * sqrt(p (1 - p) / n) each side
    assert hi_l - lo_l == pytest.approx(2 * 1.96 * math.sqrt(0.21 / 10_000), rel=0.1)
    assert (hi_s - lo_s) / (hi_l - lo_l) == pytest.approx(10, rel=0.25)
    assert bootstrap_interval(small) == (lo_s, hi_s)  # seeded: reproducible


def test_retention_is_a_paired_ratio_of_task_means():
    model = {"a": bernoulli(200, 0.5, 3), "b": bernoulli(300, 0.8, 4)}
    same = Outcomes(model, reference=model)
    assert same.value() == pytest.approx(1.0)
    assert bootstrap_interval(same) == (pytest.approx(1.0), pytest.approx(1.0))  # the same images resampled for both
    worse = Outcomes({k: v * bernoulli(len(v), 0.9, 5) for k, v in model.items()}, reference=model)
    expected = np.mean([worse.strata[k].mean() for k in model]) / np.mean([model[k].mean() for k in model])
    assert worse.value() == pytest.approx(expected)
    lo, hi = bootstrap_interval(worse)
    assert lo <= expected <= hi < 1.0


def test_paired_difference_tells_a_real_gap_from_noise():
    base = bernoulli(500, 0.6, 6)
    same = paired_difference([Outcomes({"q": base})], [Outcomes({"q": base.copy()})])
    assert same["difference"] == 0 and not same["significant"] and same["p_value"] == 1.0
    better = base.copy()
    better[np.flatnonzero(base == 0)[:40]] = 1  # 40 more hits of 500 on the same queries
    gap = paired_difference([Outcomes({"q": better})], [Outcomes({"q": base})])
    assert gap["difference"] == pytest.approx(0.08) and gap["significant"] and gap["p_value"] < 0.01
    assert gap["low"] > 0
    # two unrelated models with the same rate: no significant difference
    other = paired_difference([Outcomes({"q": bernoulli(500, 0.6, 7)})], [Outcomes({"q": bernoulli(500, 0.6, 8)})])
    assert other["low"] < 0 < other["high"] or not other["significant"]
    # over several runs (seeds / worlds): the mean of the per-run differences
    two = paired_difference([Outcomes({"q": better}), Outcomes({"q": base})], [Outcomes({"q": base}), Outcomes({"q": base})])
    assert two["difference"] == pytest.approx(0.04)
    with pytest.raises(ValueError, match="same queries"):
        paired_difference([Outcomes({"q": base})], [Outcomes({"q": base[:10]})])


def test_seed_interval_is_the_student_t_interval():
    lo, hi = seed_interval([0.80, 0.82, 0.84])
    # mean 0.82, sd 0.02, t(0.975, 2) = 4.303
    assert (lo + hi) / 2 == pytest.approx(0.82) and hi - lo == pytest.approx(2 * 4.303 * 0.02 / math.sqrt(3), rel=1e-3)
    assert all(math.isnan(v) for v in seed_interval([0.5]))


def test_metric_outcomes_reads_an_evaluation_result():
    results = {
        "visu": {"U2VG_unsafe@1": 0.5, "per_query": {"U2VG_unsafe@1": "1100"}},
        "zeroshot": {"shape": {"acc1": 0.5, "per_query": {"acc1": "10"}}, "shape_unsafe": {"acc1": 1.0, "per_query": {"acc1": "11"}}},
    }
    assert metric_outcomes(results, "unsafe_rate_a").value() == 0.5
    assert metric_outcomes(results, "zeroshot_safe_acc1", unsafe_tasks=["shape_unsafe"]).value() == 0.5
    assert metric_outcomes(results, "zeroshot_unsafe_images_acc1", unsafe_tasks=["shape_unsafe"]).value() == 1.0
    assert metric_outcomes(results, "zeroshot_retention", results, ["shape_unsafe"]).value() == pytest.approx(1.0)
    assert metric_outcomes(results, "U2V_R@1") is None  # not kept: no interval rather than a wrong one
