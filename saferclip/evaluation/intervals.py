"""How sure a figure is: exact intervals for shares, bootstrap intervals for composite
figures, paired tests between models, intervals over seeds.

Every headline metric is a mean of per-query outcomes (a hit at 1, an unsafe top-1, a correct
zero-shot label), which the evaluation keeps (``per_query``: a string of ``0``/``1``, one
character per query, in the split's order). From them (95%, docs/METHOD.md, "Every figure has
an interval"):

* :func:`metric_interval`: a **share** of independent binary outcomes (an unsafe rate, a
  recall @1, one zero-shot task's accuracy: one stratum, no reference) gets the exact
  **Clopper–Pearson** interval (:func:`clopper_pearson`: never ``[0, 0]``; 0 of 500 gives
  [0, 0.74%]); a **composite** figure (zero-shot accuracy averaged over tasks, the retention
  ratio against the reference) gets a percentile **bootstrap** over the test queries
  (:func:`bootstrap_interval`; zero-shot: the images of each task resampled, tasks kept;
  retention: the same resampled images for the model and the reference, a ratio of means);
* :func:`paired_difference`: for two models evaluated on the same queries, the difference of
  a metric with a paired-bootstrap interval (the same resampled queries for both models) and a
  two-sided p-value: the **exact McNemar mid-p** test on the discordant queries for a share
  (:func:`mcnemar_mid_p`), the bootstrap p ``(k + 1) / (B + 1)`` for a composite figure
  (:func:`bootstrap_p_value`; never 0); significant when p < 0.05;
* :func:`seed_interval`: the Student-t interval of a metric's mean over seeds (worlds);
* :func:`format_p`: a p-value as printed (``p < 0.001`` below 0.001: never ``p = 0``).

Resampling is seeded: the same results give the same intervals.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np
from scipy import stats

PER_QUERY = "per_query"
LEVEL = 0.95
RESAMPLES = 2000
# how a paired difference's p-value was computed (its "test" in results.json)
MCNEMAR_MID_P = "mcnemar-mid-p"
BOOTSTRAP_P = "bootstrap"
INTERVALS_NOTE = (
    f"{int(100 * LEVEL)}% intervals: exact (Clopper–Pearson) for a share of test queries (unsafe rates, recalls @1, "
    "the origin detector's detections); "
    f"percentile bootstrap over the test queries ({RESAMPLES} resamples, seeded) for zero-shot accuracy averaged over "
    "tasks and for the retention ratio"
)
DIFFERENCES_NOTE = (
    "In points (first model minus second), with a 95% paired-bootstrap interval (the same resampled queries for both); "
    "p: two-sided, the exact McNemar mid-p test on the queries where the two models differ for a share (unsafe rate, "
    "U→V R@1), the paired bootstrap's (k + 1) / (B + 1) for zero-shot retention; `*`: p < 0.05."
)

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
    # a hyperbolic model's distance-from-origin detector: detected among the unsafe items
    "origin_detector_text": ("visu", "origin_detector_text_detected@5fpr"),
    "origin_detector_image": ("visu", "origin_detector_image_detected@5fpr"),
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


def _zeroshot_strata(
    zeroshot: Mapping[str, Any], unsafe_tasks: bool, unsafe_names: frozenset[str]
) -> dict[str, np.ndarray]:
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


def intervals_note(results: Mapping[str, Any]) -> str:
    """What the intervals of an evaluation are, as its ``meta`` records it (an evaluation from
    before exact intervals says "percentile bootstrap")."""
    return str((results.get("meta") or {}).get("intervals") or INTERVALS_NOTE)


def is_share(outcomes: Outcomes) -> bool:
    """Whether the metric is a plain share of independent binary outcomes (one stratum, no
    reference): the exact interval and test apply."""
    return outcomes.reference is None and len(outcomes.strata) == 1


def clopper_pearson(successes: int, trials: int, level: float = LEVEL) -> tuple[float, float]:
    """The exact (Clopper–Pearson) interval of a binomial share ``successes / trials``: the
    beta quantiles ``Beta(α/2; k, n − k + 1)`` and ``Beta(1 − α/2; k + 1, n − k)``, with 0 and 1
    at the ends (0 of n: ``[0, 1 − (α/2)^(1/n)]``). Covers the share at least ``level`` of the
    time, whatever it is."""
    k, n = int(successes), int(trials)
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"clopper_pearson needs 0 <= successes <= trials and trials > 0, got {k} of {n}")
    tail = (1 - level) / 2
    low = 0.0 if k == 0 else float(stats.beta.ppf(tail, k, n - k + 1))
    high = 1.0 if k == n else float(stats.beta.ppf(1 - tail, k + 1, n - k))
    return low, high


def metric_interval(
    outcomes: Outcomes, seed: int = 0, resamples: int = RESAMPLES, level: float = LEVEL
) -> tuple[float, float]:
    """The interval of a metric: exact for a share, the bootstrap for a composite figure."""
    if is_share(outcomes):
        (values,) = outcomes.strata.values()
        return clopper_pearson(int(values.sum()), len(values), level)
    return bootstrap_interval(outcomes, seed, resamples, level)


def mcnemar_mid_p(first_only: int, second_only: int) -> float:
    """The two-sided exact McNemar **mid-p** value from the discordant pairs: ``first_only``
    queries where only the first model's outcome is 1, ``second_only`` where only the second's
    is. Under no difference each discordant query goes either way with probability 1/2, so the
    smaller count b of n = b + c is Binomial(n, 1/2): the exact p is ``2 P(X <= b)`` and the
    mid-p subtracts ``P(X = b)`` (half the probability of what was observed on each side),
    capped at 1; 1 when no query is discordant."""
    b, c = int(first_only), int(second_only)
    n = b + c
    if n == 0:
        return 1.0
    low = min(b, c)
    return float(min(1.0, 2 * stats.binom.cdf(low, n, 0.5) - stats.binom.pmf(low, n, 0.5)))


def bootstrap_p_value(differences: np.ndarray) -> float:
    """The two-sided p-value of a bootstrap distribution of differences against 0:
    ``2 (k + 1) / (B + 1)`` with k the resamples on the far side of 0 (the smaller of ``<= 0``
    and ``>= 0``), capped at 1; never 0 (the smallest is ``2 / (B + 1)``)."""
    finite = differences[np.isfinite(differences)]
    if not len(finite):
        return math.nan
    k = min(int((finite <= 0).sum()), int((finite >= 0).sum()))
    return min(1.0, 2 * (k + 1) / (len(finite) + 1))


def format_p(p: float) -> str:
    """``p = 0.032``, ``p = 0.25``; below 0.001 ``p < 0.001`` (never ``p = 0``)."""
    if p is None or math.isnan(float(p)):
        return "p n/a"
    p = float(p)
    if p < 0.001:
        return "p < 0.001"
    return f"p = {p:.3f}" if p < 0.01 else f"p = {p:.2f}"


def resample_indices(
    sizes: Mapping[str, int], rng: np.random.Generator, resamples: int = RESAMPLES
) -> dict[str, np.ndarray]:
    """Bootstrap indices ``[resamples, n]`` per stratum (queries drawn with replacement)."""
    return {k: rng.integers(0, n, size=(resamples, n)) for k, n in sizes.items()}


def percentile_interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    samples = samples[np.isfinite(samples)]
    if not len(samples):
        return (math.nan, math.nan)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_interval(
    outcomes: Outcomes, seed: int = 0, resamples: int = RESAMPLES, level: float = LEVEL
) -> tuple[float, float]:
    """A percentile-bootstrap interval of the metric, resampling queries within each stratum."""
    rng = np.random.default_rng(seed)
    return percentile_interval(np.asarray(outcomes.value(resample_indices(outcomes.sizes(), rng, resamples))), level)


def paired_difference(
    first: Sequence[Outcomes],
    second: Sequence[Outcomes],
    seed: int = 0,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
) -> dict[str, Any]:
    """``first - second`` for two models on the same queries, averaged over runs (one entry per
    seed / world, each pair evaluated on the same queries): the point difference, a paired
    bootstrap interval (the same resampled queries for both models), a two-sided p-value and
    ``significant`` (p < 1 - level).

    For a share the p-value is the exact McNemar mid-p on the discordant queries pooled over the
    runs (``test``: ``mcnemar-mid-p``; ``discordant``: ``[first only, second only]``); for a
    composite figure it is the paired bootstrap's (``test``: ``bootstrap``)."""
    if len(first) != len(second) or not first:
        raise ValueError("paired_difference needs the same number (>= 1) of runs for both models")
    rng = np.random.default_rng(seed)
    diffs, point = np.zeros(resamples), 0.0
    exact = all(is_share(a) and is_share(b) for a, b in zip(first, second))
    first_only = second_only = 0
    for a, b in zip(first, second):
        if a.sizes() != b.sizes():
            raise ValueError(f"paired outcomes must cover the same queries, got {a.sizes()} and {b.sizes()}")
        indices = resample_indices(a.sizes(), rng, resamples)
        diffs += np.asarray(a.value(indices)) - np.asarray(b.value(indices))
        point += float(a.value()) - float(b.value())
        if exact:
            (x,), (y,) = a.strata.values(), b.strata.values()
            first_only += int(((x == 1) & (y == 0)).sum())
            second_only += int(((x == 0) & (y == 1)).sum())
    diffs, point = diffs / len(first), point / len(first)
    low, high = percentile_interval(diffs, level)
    out: dict[str, Any] = {"difference": point, "low": low, "high": high}
    if exact:
        out.update(
            p_value=mcnemar_mid_p(first_only, second_only), test=MCNEMAR_MID_P, discordant=[first_only, second_only]
        )
    else:
        out.update(p_value=bootstrap_p_value(diffs), test=BOOTSTRAP_P)
    out["significant"] = bool(out["p_value"] < 1 - level)
    return out


def seed_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float]:
    """The Student-t interval of the mean of ``values`` (one per seed / world); with one value
    there is no spread to measure: (nan, nan)."""
    values = [float(v) for v in values if not math.isnan(float(v))]
    if len(values) < 2:
        return (math.nan, math.nan)
    mean, sem = float(np.mean(values)), float(np.std(values, ddof=1) / math.sqrt(len(values)))
    half = float(stats.t.ppf(0.5 + level / 2, len(values) - 1)) * sem
    return mean - half, mean + half


def metric_intervals(
    results: Mapping[str, Mapping[str, Any]], reference: str | None, unsafe_tasks: Sequence[str] = (), seed: int = 0
) -> dict[str, dict[str, list[float]]]:
    """``{model: {headline key: [low, high]}}`` for every metric whose outcomes were kept
    (:func:`metric_interval`: exact for a share, bootstrap for a composite figure)."""
    from .headline import HEADLINE

    ref = results.get(reference) if reference else None
    out: dict[str, dict[str, list[float]]] = {}
    for model, model_results in results.items():
        row = {}
        for key in HEADLINE:
            outcomes = metric_outcomes(model_results, key, ref, unsafe_tasks)
            if outcomes is not None:
                row[key] = list(metric_interval(outcomes, seed))
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
    points with its interval and p-value (:func:`format_p`), ``*`` when significant."""
    from .headline import HEADLINE

    keys = [k for k in DIFFERENCE_KEYS if any(k in row for row in differences.values())]
    if not keys:
        return ""
    lines = [
        "| models (first − second) | " + " | ".join(HEADLINE[k][0] for k in keys) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for pair, row in differences.items():
        cells = [difference_cell(row[key]) if key in row else "–" for key in keys]
        lines.append(f"| {pair} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def difference_cell(d: Mapping[str, Any]) -> str:
    """``+0.6 [+0.0, +1.4] p = 0.25``, with `` *`` when significant."""
    mark = " *" if d.get("significant") else ""
    p = f" {format_p(d['p_value'])}" if d.get("p_value") is not None else ""
    return f"{100 * d['difference']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]{p}{mark}"
