"""Exact and bootstrap intervals, paired tests and seed intervals (saferclip.evaluation.intervals),
each against an independent reference: binomial tails summed by hand, coverage over repeated
seeded draws, the delta method, the exact binomial test on the discordant pairs."""

import math

import numpy as np
import pytest
import torch

from saferclip.evaluation.intervals import (
    Outcomes,
    bootstrap_interval,
    bootstrap_p_value,
    clopper_pearson,
    decode_outcomes,
    differences_table,
    encode_outcomes,
    format_p,
    mcnemar_mid_p,
    metric_interval,
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
    two = paired_difference(
        [Outcomes({"q": better}), Outcomes({"q": base})], [Outcomes({"q": base}), Outcomes({"q": base})]
    )
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
        "zeroshot": {
            "shape": {"acc1": 0.5, "per_query": {"acc1": "10"}},
            "shape_unsafe": {"acc1": 1.0, "per_query": {"acc1": "11"}},
        },
    }
    assert metric_outcomes(results, "unsafe_rate_a").value() == 0.5
    assert metric_outcomes(results, "zeroshot_safe_acc1", unsafe_tasks=["shape_unsafe"]).value() == 0.5
    assert metric_outcomes(results, "zeroshot_unsafe_images_acc1", unsafe_tasks=["shape_unsafe"]).value() == 1.0
    assert metric_outcomes(results, "zeroshot_retention", results, ["shape_unsafe"]).value() == pytest.approx(1.0)
    assert metric_outcomes(results, "U2V_R@1") is None  # not kept: no interval rather than a wrong one


# ---------------------------------------------------------------- exact intervals and tests, against independent references
def binomial_tail_at_least(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed from the binomial coefficients."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


@pytest.mark.parametrize("k, n", [(0, 500), (3, 500), (250, 500), (499, 500), (500, 500), (1, 7), (4, 20)])
def test_clopper_pearson_solves_the_binomial_tail_equations(k, n):
    """The exact interval's ends are where the observed count becomes a 2.5% tail: P(X >= k | low)
    = 0.025 and P(X <= k | high) = 0.025, with 0 and 1 at the ends of the range."""
    low, high = clopper_pearson(k, n)
    if k == 0:
        assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / n), rel=1e-9)
    else:
        assert binomial_tail_at_least(k, n, low) == pytest.approx(0.025, rel=1e-6)
    if k == n:
        assert high == 1.0 and low == pytest.approx(0.025 ** (1 / n), rel=1e-9)
    else:
        assert 1 - binomial_tail_at_least(k + 1, n, high) == pytest.approx(0.025, rel=1e-6)
    with pytest.raises(ValueError, match="successes"):
        clopper_pearson(n + 1, n)


def test_no_share_gets_a_zero_width_interval_at_0_or_n_of_n():
    none = Outcomes({"q": np.zeros(500)})
    low, high = metric_interval(none)
    assert (low, high) == (0.0, pytest.approx(1 - 0.025 ** (1 / 500)))  # [0, 0.74%], not [0, 0]
    assert high == pytest.approx(0.00735, abs=1e-5)
    low, high = metric_interval(Outcomes({"q": np.ones(500)}))
    assert high == 1.0 and low == pytest.approx(0.025 ** (1 / 500))
    # 3 of 500: the exact upper end (1.7%) lies above the percentile bootstrap's (about 1.4%)
    three = np.zeros(500)
    three[:3] = 1
    assert metric_interval(Outcomes({"q": three}))[1] == pytest.approx(0.0174, abs=2e-4)
    assert bootstrap_interval(Outcomes({"q": three}))[1] < 0.016


def exact_coverage(n: int, p: float) -> float:
    """The probability that the Clopper–Pearson interval of Binomial(n, p) holds p: a sum over
    every count k of P(k) (no simulation)."""
    return sum(
        math.comb(n, k) * p**k * (1 - p) ** (n - k)
        for k in range(n + 1)
        if clopper_pearson(k, n)[0] <= p <= clopper_pearson(k, n)[1]
    )


@pytest.mark.parametrize("p", [0.0, 0.005, 0.3])
def test_clopper_pearson_covers_at_least_95_percent(p):
    """Repeated Bernoulli(p) draws of 500 queries (seeded): the interval holds p in at least 95%
    of them, as the exact coverage (summed over every count) says it must."""
    n, repeats = 500, 4000
    counts = np.random.default_rng(11).binomial(n, p, size=repeats)
    intervals = {k: clopper_pearson(int(k), n) for k in np.unique(counts)}
    covered = float(np.mean([intervals[k][0] <= p <= intervals[k][1] for k in counts]))
    exact = exact_coverage(n, p) if p > 0 else 1.0
    assert exact >= 0.95
    assert covered >= 0.95 - 3 * math.sqrt(0.05 * 0.95 / repeats)  # at least 95%, up to the simulation's noise
    assert covered == pytest.approx(exact, abs=3 * math.sqrt(exact * (1 - exact) / repeats) + 1e-9)


def bootstrap_coverage(
    p_of: dict[str, float], sizes: dict[str, int], truth: float, repeats: int, seed: int, reference=None
) -> float:
    rng = np.random.default_rng(seed)
    hits = 0
    for r in range(repeats):
        strata = {k: (rng.random(sizes[k]) < p).astype(np.float64) for k, p in p_of.items()}
        ref = None if reference is None else reference(strata, rng)
        outcomes = Outcomes(strata) if ref is None else Outcomes(ref[0], reference=ref[1])
        low, high = bootstrap_interval(outcomes, seed=r, resamples=400)
        hits += low <= truth <= high
    return hits / repeats


@pytest.mark.parametrize(
    "p, sizes, expected",
    [
        (0.0, 500, (1.0, 1.0)),  # every draw all 0: the interval [0, 0] holds 0
        (0.99, 500, (0.90, 0.99)),  # zero-shot accuracy near 1 (15 misses expected over three tasks)
        (0.6, 200, (0.91, 0.99)),  # mid-range
    ],
)
def test_the_bootstrap_of_an_accuracy_averaged_over_tasks_covers_about_95_percent(p, sizes, expected):
    tasks = {"shape": p, "colour": p, "scene": p}
    covered = bootstrap_coverage(tasks, dict.fromkeys(tasks, sizes), p, repeats=200, seed=12)
    assert expected[0] <= covered <= expected[1]


def test_the_bootstrap_undercovers_a_share_with_few_events_where_the_exact_interval_does_not():
    """Why a share gets the exact interval: at 0.5% of 200 queries (one event expected) the
    percentile bootstrap holds the share in about 60% of draws (an all-0 draw gives [0, 0])."""
    p, n, repeats = 0.005, 200, 300
    covered = bootstrap_coverage({"q": p}, {"q": n}, p, repeats=repeats, seed=13)
    assert covered < 0.75
    counts = np.random.default_rng(13).binomial(n, p, size=repeats)
    assert np.mean([clopper_pearson(int(k), n)[0] <= p <= clopper_pearson(int(k), n)[1] for k in counts]) >= 0.95


def test_the_retention_ratio_interval_covers_the_true_ratio_and_matches_the_delta_method():
    """Retention = the model's accuracy / the reference's on the same images. The model keeps
    each image the reference gets right with probability 0.97 and gets a wrong one right with
    probability 0.1, so its accuracy is 0.8 * 0.97 + 0.2 * 0.1 and the true ratio 0.995."""
    p_ref, keep, gain, n = 0.8, 0.97, 0.1, 400
    truth = (p_ref * keep + (1 - p_ref) * gain) / p_ref

    def paired(strata, rng):
        reference = strata["images"]
        model = np.where(reference == 1, rng.random(n) < keep, rng.random(n) < gain).astype(np.float64)
        return {"images": model}, {"images": reference}

    covered = bootstrap_coverage({"images": p_ref}, {"images": n}, truth, repeats=200, seed=14, reference=paired)
    assert 0.91 <= covered <= 0.99
    # one draw: the interval's width against the delta method's 2 * 1.96 * se of a ratio of paired means
    rng = np.random.default_rng(15)
    model, reference = paired({"images": (rng.random(n) < p_ref).astype(np.float64)}, rng)
    x, y = model["images"], reference["images"]
    ratio = x.mean() / y.mean()
    se = math.sqrt(np.var(x - ratio * y, ddof=1) / n) / y.mean()
    low, high = metric_interval(Outcomes(model, reference=reference))
    assert low < ratio < high
    assert high - low == pytest.approx(2 * 1.96 * se, rel=0.15)


def test_the_seed_interval_covers_about_95_percent():
    rng = np.random.default_rng(16)
    for p, expected in ((0.0, (1.0, 1.0)), (0.005, (0.92, 0.97)), (0.3, (0.93, 0.97))):
        per_seed = (rng.random((2000, 3, 500)) < p).mean(-1)  # 2000 studies of 3 seeds
        held = []
        for values in per_seed:
            low, high = seed_interval(list(values))
            held.append(low <= p <= high)
        assert expected[0] <= np.mean(held) <= expected[1], p


def mid_p_by_hand(b: int, c: int) -> float:
    """Two-sided McNemar mid-p from the binomial coefficients: 2 P(X < m) + P(X = m), m = min(b, c)."""
    n, m = b + c, min(b, c)
    if n == 0:
        return 1.0
    below = sum(math.comb(n, i) for i in range(m)) / 2**n
    return min(1.0, 2 * below + math.comb(n, m) / 2**n)


def discordant_pair(b: int, c: int, agree: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Two models' outcomes on the same queries: b where only the first scores 1, c where only the
    second does, and ``agree`` queries where they agree (half 1, half 0)."""
    first = np.r_[np.ones(b), np.zeros(c), np.ones(agree // 2), np.zeros(agree - agree // 2)]
    second = np.r_[np.zeros(b), np.ones(c), np.ones(agree // 2), np.zeros(agree - agree // 2)]
    return first, second


@pytest.mark.parametrize("b, c", [(3, 0), (0, 3), (5, 5), (12, 4), (40, 0), (0, 0), (1, 30)])
def test_the_paired_p_value_of_a_share_is_the_exact_mcnemar_mid_p(b, c):
    first, second = discordant_pair(b, c)
    d = paired_difference([Outcomes({"q": first})], [Outcomes({"q": second})])
    assert d["test"] == "mcnemar-mid-p" and d["discordant"] == [b, c]
    assert d["p_value"] == pytest.approx(mid_p_by_hand(b, c), rel=1e-9)
    assert d["difference"] == pytest.approx((b - c) / len(first))
    assert d["significant"] == (mid_p_by_hand(b, c) < 0.05)
    assert mcnemar_mid_p(b, c) == d["p_value"]


def test_mcnemar_mid_p_by_hand_values_and_pooling_over_runs():
    assert mcnemar_mid_p(3, 0) == pytest.approx(0.125)  # exact (not mid) p would be 0.25
    assert mcnemar_mid_p(0, 0) == 1.0 and mcnemar_mid_p(4, 4) == 1.0
    # two seeds: the discordant queries of both, one test
    (a1, b1), (a2, b2) = discordant_pair(3, 1), discordant_pair(4, 0)
    d = paired_difference([Outcomes({"q": a1}), Outcomes({"q": a2})], [Outcomes({"q": b1}), Outcomes({"q": b2})])
    assert d["discordant"] == [7, 1] and d["p_value"] == pytest.approx(mid_p_by_hand(7, 1))


def test_mcnemar_mid_p_rejects_about_5_percent_of_the_time_under_no_difference():
    """Two models whose outcomes differ only by chance (each query: the same coin for both, then
    each flipped with probability 0.05 independently): the mid-p test is significant in close to
    5% of 2000 draws (mid-p is not guaranteed below 5%, but stays near it)."""
    rng = np.random.default_rng(17)
    significant = []
    for _ in range(2000):
        base = rng.random(500) < 0.5
        first = base ^ (rng.random(500) < 0.05)
        second = base ^ (rng.random(500) < 0.05)
        b, c = int((first & ~second).sum()), int((~first & second).sum())
        significant.append(mcnemar_mid_p(b, c) < 0.05)
    assert 0.03 <= np.mean(significant) <= 0.065


def test_a_bootstrap_p_value_is_never_zero():
    diffs = np.full(1999, 0.3)  # every resample on one side
    assert bootstrap_p_value(diffs) == pytest.approx(2 / 2000)
    assert bootstrap_p_value(np.zeros(1999)) == 1.0
    model = {"a": bernoulli(300, 0.9, 18)}
    better = Outcomes(model, reference={"a": model["a"] * bernoulli(300, 0.5, 19)})
    same = Outcomes(model, reference=model)
    d = paired_difference([better], [same])
    assert d["test"] == "bootstrap" and d["p_value"] == pytest.approx(2 / (2000 + 1)) and d["significant"]


def test_p_values_never_print_as_zero():
    assert format_p(0.0) == "p < 0.001" and format_p(2 / 2001) == "p < 0.001"
    assert format_p(0.0012) == "p = 0.001" and format_p(0.125) == "p = 0.12" and format_p(0.25) == "p = 0.25"
    assert format_p(1.0) == "p = 1.00"
    cell = differences_table(
        {
            "a vs b": {
                "unsafe_rate_a": {
                    "difference": 0.006,
                    "low": 0.0,
                    "high": 0.014,
                    "p_value": 0.125,
                    "significant": False,
                }
            }
        }
    )
    assert "+0.6 [+0.0, +1.4] p = 0.12 |" in cell


def paired_bootstrap_coverage(cells: tuple[float, float, float, float], repeats: int, seed: int, n: int = 500) -> float:
    """How often the paired-bootstrap interval of first - second holds the true difference, for
    queries drawn with P(both 1), P(first only), P(second only), P(neither) = ``cells``."""
    rng = np.random.default_rng(seed)
    outcomes = np.array([[1, 1], [1, 0], [0, 1], [0, 0]], dtype=np.float64)
    truth = cells[1] - cells[2]
    held = 0
    for r in range(repeats):
        drawn = outcomes[rng.choice(4, size=n, p=cells)]
        d = paired_difference([Outcomes({"q": drawn[:, 0]})], [Outcomes({"q": drawn[:, 1]})], seed=r, resamples=400)
        held += d["low"] <= truth <= d["high"]
    return held / repeats


@pytest.mark.parametrize(
    "cells, expected",
    [
        ((0.0, 0.0, 0.0, 1.0), (1.0, 1.0)),  # both models always 0: the difference is 0, and so is its interval
        ((0.0, 0.005, 0.0, 0.995), (0.86, 0.97)),  # 0.5% against 0: few discordant queries (measured 92%)
        ((0.5, 0.15, 0.05, 0.3), (0.92, 0.99)),  # mid-range, a 10-point difference
    ],
)
def test_the_paired_difference_interval_covers_about_95_percent(cells, expected):
    covered = paired_bootstrap_coverage(cells, repeats=40 if cells[3] == 1.0 else 250, seed=20)
    assert expected[0] <= covered <= expected[1]
