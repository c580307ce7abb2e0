"""How sure a figure is: bootstrap intervals over test queries, paired differences between
models, intervals over seeds.

Every headline metric is a mean of per-query outcomes (a hit at 1, an unsafe top-1, a correct
zero-shot label), which the evaluation keeps (``per_query``: a string of ``0``/``1``, one
character per query, in the split's order). From them:

* :func:`metric_intervals`: a 95% percentile-bootstrap interval of each headline metric of
  each model, resampling the test queries (zero-shot: the images of each task, tasks kept;
  retention: the same resampled images for the model and the reference, a ratio of means);
* :func:`paired_differences`: for two models evaluated on the same queries, the difference
  of a metric with a paired-bootstrap interval and two-sided p-value (the same resampled
  queries for both models); significant when the interval excludes 0;
* :func:`seed_interval`: the Student-t interval of a metric's mean over seeds (worlds);
* :func:`clopper_pearson`: the exact interval of a plain share (k of n), e.g. an attack's
  success rate.

Resampling is seeded: the same results give the same intervals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from typing import Any, Mapping, Sequence

import numpy as np

PER_QUERY = "per_query"
LEVEL = 0.95
RESAMPLES = 2000

# the headline metrics with per-query outcomes (HEADLINE's keys -> how they are computed)
VISU_KEYS = {
    "unsafe_rate_a": ("visu", "U2VG_unsafe@1"),
    "unsafe_rate_b": ("visu", "U2VG_ref_unsafe@1"),
    "unsafe_rate_a_realistic": ("visu", "U2VDG_unsafe@1"),
    "unsafe_rate_b_realistic": ("visu", "U2VDG_ref_unsafe@1"),
    "U2V_R@1": ("visu", "U2V_R@1"),
    "S2V_R@1": ("visu", "S2V_R@1"),
    "U2G_R@1": ("visu", "U2G_R@1"),
    "nsfw_caps_U2V_R@1": ("nsfw_caps", "U2V_R@1"),
    "nsfw_caps_unsafe_rate_a": ("nsfw_caps", "U2VG_unsafe@1"),
    "nsfw_caps_S2V_R@1": ("nsfw_caps", "S2V_R@1"),
}
# zero-shot: (safe tasks or unsafe-image tasks, a retention against the reference?)
ZEROSHOT_KEYS = {
    "zeroshot_safe_acc1": (False, False),
    "zeroshot_retention": (False, True),
    "zeroshot_unsafe_images_acc1": (True, False),
}
# what the pairwise comparison of methods tests
DIFFERENCE_KEYS = ("unsafe_rate_a", "U2V_R@1", "zeroshot_retention")


def encode_outcomes(outcomes: Any) -> str:
    """``[Q]`` booleans (tensor, array or list) as a string of ``0`` / ``1``."""
    values = outcomes.tolist() if hasattr(outcomes, "tolist") else list(outcomes)
    return "".join("1" if v else "0" for v in values)


def decode_outcomes(text: str) -> np.ndarray:
    """:func:`encode_outcomes` back to a float array of 0 / 1."""
    if not isinstance(text, str) or set(text) - {"0", "1"}:
        raise ValueError("per-query outcomes must be a string of 0 and 1")
    return np.frombuffer(text.encode(), dtype=np.uint8).astype(np.float64) - ord("0")


@dataclass(frozen=True)
class Outcomes:
    """What one metric of one model is computed from: strata of per-query outcomes (the value
    is the mean over strata of each stratum's mean: one stratum for retrieval, one per task for
    zero-shot) and, for a retention, the reference model's outcomes of the same strata."""

    strata: Mapping[str, np.ndarray]
    reference: Mapping[str, np.ndarray] | None = None

    def sizes(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.strata.items()}

    def value(self, indices: Mapping[str, np.ndarray] | None = None) -> np.ndarray | float:
        """The metric on resampled queries (``indices``: stratum -> ``[B, n]``; None: as measured)."""

        def mean_of(strata: Mapping[str, np.ndarray]):
            means = [(x if indices is None else x[indices[k]]).mean(-1) for k, x in strata.items()]
            return sum(means) / len(means)

        value = mean_of(self.strata)
        if self.reference is None:
            return value
        reference = mean_of(self.reference)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(reference > 0, value / np.where(reference > 0, reference, 1), np.nan)


def _zeroshot_strata(zeroshot: Mapping[str, Any], unsafe_tasks: bool, unsafe_names: frozenset[str]) -> dict[str, np.ndarray]:
    out = {}
    for task, result in (zeroshot or {}).items():
        if (task in unsafe_names) != unsafe_tasks:
            continue
        bits = (result.get(PER_QUERY) or {}).get("acc1") if isinstance(result, Mapping) else None
        if bits is None:
            return {}
        out[task] = decode_outcomes(bits)
    return out


def metric_outcomes(
    model_results: Mapping[str, Any],
    key: str,
    reference_results: Mapping[str, Any] | None = None,
    unsafe_tasks: Sequence[str] = (),
) -> Outcomes | None:
    """The outcomes behind headline metric ``key`` of one model (None: not kept, or no such metric)."""
    if key in VISU_KEYS:
        suite, metric = VISU_KEYS[key]
        bits = ((model_results.get(suite) or {}).get(PER_QUERY) or {}).get(metric)
        return None if not bits else Outcomes({metric: decode_outcomes(bits)})
    if key in ZEROSHOT_KEYS:
        unsafe, is_retention = ZEROSHOT_KEYS[key]
        names = frozenset(unsafe_tasks)
        strata = _zeroshot_strata(model_results.get("zeroshot") or {}, unsafe, names)
        if not strata:
            return None
        if not is_retention:
            return Outcomes(strata)
        reference = _zeroshot_strata((reference_results or {}).get("zeroshot") or {}, unsafe, names)
        if set(reference) != set(strata) or any(len(reference[k]) != len(strata[k]) for k in strata):
            return None
        return Outcomes(strata, reference)
    return None


def resample_indices(sizes: Mapping[str, int], rng: np.random.Generator, resamples: int = RESAMPLES) -> dict[str, np.ndarray]:
    """Bootstrap indices ``[resamples, n]`` per stratum (queries drawn with replacement)."""
    return {k: rng.integers(0, n, size=(resamples, n)) for k, n in sizes.items()}


def percentile_interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    samples = samples[np.isfinite(samples)]
    if not len(samples):
        return (math.nan, math.nan)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def clopper_pearson(successes: int, trials: int, level: float = LEVEL) -> tuple[float, float]:
    """The exact (Clopper–Pearson) interval of a binomial share ``successes / trials``: the
    beta quantiles ``Beta(α/2; k, n − k + 1)`` and ``Beta(1 − α/2; k + 1, n − k)``, with 0 and 1
    at the ends (0 of n: ``[0, 1 − (α/2)^(1/n)]``). Covers the share at least ``level`` of the
    time, whatever it is."""
    from scipy import stats

    k, n = int(successes), int(trials)
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"clopper_pearson needs 0 <= successes <= trials and trials > 0, got {k} of {n}")
    tail = (1 - level) / 2
    low = 0.0 if k == 0 else float(stats.beta.ppf(tail, k, n - k + 1))
    high = 1.0 if k == n else float(stats.beta.ppf(1 - tail, k + 1, n - k))
    return low, high


def bootstrap_interval(outcomes: Outcomes, seed: int = 0, resamples: int = RESAMPLES, level: float = LEVEL) -> tuple[float, float]:
    """A percentile-bootstrap interval of the metric, resampling queries within each stratum."""
    rng = np.random.default_rng(seed)
    return percentile_interval(np.asarray(outcomes.value(resample_indices(outcomes.sizes(), rng, resamples))), level)


def paired_difference(
    first: Sequence[Outcomes], second: Sequence[Outcomes], seed: int = 0, resamples: int = RESAMPLES, level: float = LEVEL
) -> dict[str, float | bool]:
    """``first - second`` for two models on the same queries, averaged over runs (one entry per
    seed / world, each pair evaluated on the same queries): the point difference, a paired
    bootstrap interval (the same resampled queries for both models), a two-sided p-value
    (twice the smaller share of resampled differences on either side of 0) and whether the
    interval excludes 0."""
    if len(first) != len(second) or not first:
        raise ValueError("paired_difference needs the same number (>= 1) of runs for both models")
    rng = np.random.default_rng(seed)
    diffs, point = np.zeros(resamples), 0.0
    for a, b in zip(first, second):
        if a.sizes() != b.sizes():
            raise ValueError(f"paired outcomes must cover the same queries, got {a.sizes()} and {b.sizes()}")
        indices = resample_indices(a.sizes(), rng, resamples)
        diffs += np.asarray(a.value(indices)) - np.asarray(b.value(indices))
        point += float(a.value()) - float(b.value())
    diffs, point = diffs / len(first), point / len(first)
    low, high = percentile_interval(diffs, level)
    finite = diffs[np.isfinite(diffs)]
    p = min(1.0, 2 * min(float((finite <= 0).mean()), float((finite >= 0).mean()))) if len(finite) else math.nan
    return {"difference": point, "low": low, "high": high, "p_value": p, "significant": bool(low > 0 or high < 0)}


def seed_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float]:
    """The Student-t interval of the mean of ``values`` (one per seed / world); with one value
    there is no spread to measure: (nan, nan)."""
    from scipy import stats

    values = [float(v) for v in values if not math.isnan(float(v))]
    if len(values) < 2:
        return (math.nan, math.nan)
    mean, sem = float(np.mean(values)), float(np.std(values, ddof=1) / math.sqrt(len(values)))
    half = float(stats.t.ppf(0.5 + level / 2, len(values) - 1)) * sem
    return mean - half, mean + half


def metric_intervals(
    results: Mapping[str, Mapping[str, Any]], reference: str | None, unsafe_tasks: Sequence[str] = (), seed: int = 0
) -> dict[str, dict[str, list[float]]]:
    """``{model: {headline key: [low, high]}}`` for every metric whose outcomes were kept."""
    from .headline import HEADLINE

    ref = results.get(reference) if reference else None
    out: dict[str, dict[str, list[float]]] = {}
    for model, model_results in results.items():
        row = {}
        for key in HEADLINE:
            outcomes = metric_outcomes(model_results, key, ref, unsafe_tasks)
            if outcomes is not None:
                row[key] = list(bootstrap_interval(outcomes, seed))
        if row:
            out[model] = row
    return out


def paired_differences(
    runs: Sequence[Mapping[str, Mapping[str, Any]]],
    models: Sequence[str],
    reference: str | None,
    unsafe_tasks: Sequence[str] = (),
    keys: Sequence[str] = DIFFERENCE_KEYS,
    seed: int = 0,
) -> dict[str, dict[str, dict[str, float | bool]]]:
    """``{"a vs b": {key: paired_difference}}`` for every pair of ``models``, over ``runs`` (the
    ``results`` of one evaluation per seed / world; one run: the main job). A pair is left out of
    a key where either model lacks its outcomes in some run."""
    out: dict[str, dict[str, dict[str, float | bool]]] = {}
    for a, b in combinations(models, 2):
        row = {}
        for key in keys:
            firsts, seconds = [], []
            for results in runs:
                ref = results.get(reference) if reference else None
                first = metric_outcomes(results.get(a) or {}, key, ref, unsafe_tasks)
                second = metric_outcomes(results.get(b) or {}, key, ref, unsafe_tasks)
                if first is None or second is None or first.sizes() != second.sizes():
                    break
                firsts.append(first)
                seconds.append(second)
            else:
                if firsts:
                    row[key] = paired_difference(firsts, seconds, seed)
        if row:
            out[f"{a} vs {b}"] = row
    return out


def differences_table(differences: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """Markdown: one row per pair of models, one column per tested metric: the difference in
    points with its interval, ``*`` when significant (interval excludes 0)."""
    from .headline import HEADLINE

    keys = [k for k in DIFFERENCE_KEYS if any(k in row for row in differences.values())]
    if not keys:
        return ""
    lines = ["| models (first − second) | " + " | ".join(HEADLINE[k][0] for k in keys) + " |", "|---|" + "---:|" * len(keys)]
    for pair, row in differences.items():
        cells = []
        for key in keys:
            d = row.get(key)
            if d is None:
                cells.append("–")
                continue
            mark = " *" if d["significant"] else ""
            cells.append(f"{100 * d['difference']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]{mark}")
        lines.append(f"| {pair} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
