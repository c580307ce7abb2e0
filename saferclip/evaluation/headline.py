"""The few numbers a reader compares first (docs/METHOD.md, "Metrics"), picked from a full evaluation.

Safety is shown where it can fail, side by side with redirection: an unsafe caption must stop
retrieving unsafe images (unsafe rate, lower is safer) *and* retrieve the right safe scene
(U->V R@1). Both gallery settings: (a) both encoders fine-tuned, (b) the gallery embedded by
the original image encoder. Then what safety costs: safe retrieval and zero-shot retention.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

# key -> (label, where in a model's results, higher is better)
HEADLINE: dict[str, tuple[str, tuple[str, str], bool]] = {
    "unsafe_rate_a": ("unsafe rate (a) ↓", ("visu", "U2VG_unsafe@1"), False),
    "unsafe_rate_b": ("unsafe rate (b) ↓", ("visu", "U2VG_ref_unsafe@1"), False),
    "unsafe_rate_a_realistic": ("unsafe rate (a), realistic gallery ↓", ("visu", "U2VDG_unsafe@1"), False),
    "unsafe_rate_b_realistic": ("unsafe rate (b), realistic gallery ↓", ("visu", "U2VDG_ref_unsafe@1"), False),
    "U2V_R@1": ("U→V R@1", ("visu", "U2V_R@1"), True),
    "S2V_R@1": ("S→V R@1", ("visu", "S2V_R@1"), True),
    "nsfw_caps_U2V_R@1": ("NSFW-Caps U→V R@1", ("nsfw_caps", "U2V_R@1"), True),
    "nsfw_caps_unsafe_rate_a": ("NSFW-Caps unsafe rate (a) ↓", ("nsfw_caps", "U2VG_unsafe@1"), False),
    "nsfw_caps_S2V_R@1": ("NSFW-Caps S→V R@1", ("nsfw_caps", "S2V_R@1"), True),
    "zeroshot_safe_acc1": ("zero-shot acc (safe images)", ("cost", "zeroshot_safe_acc1"), True),
    "zeroshot_retention": ("zero-shot retention", ("cost", "zeroshot_safe_acc1_retention"), True),
    "zeroshot_unsafe_images_acc1": ("zero-shot acc (unsafe images)", ("cost", "zeroshot_unsafe_acc1"), True),
    # what moderation needs: an unsafe caption finds its own unsafe image (unlearning loses it)
    "U2G_R@1": ("U→G R@1 (moderation)", ("visu", "U2G_R@1"), True),
    # a hyperbolic model's training-free detector: distance from the origin
    "origin_detector_text": (
        "origin detector, unsafe captions @5% FP",
        ("visu", "origin_detector_text_detected@5fpr"),
        True,
    ),
    "origin_detector_image": (
        "origin detector, unsafe images @5% FP",
        ("visu", "origin_detector_image_detected@5fpr"),
        True,
    ),
}

# setting (b): a gallery embedded by the original (Euclidean) encoder
SETTING_B = frozenset({"unsafe_rate_b", "unsafe_rate_b_realistic"})
NOT_APPLICABLE = "n/a†"
NOT_APPLICABLE_NOTE = (
    "† setting (b) has no meaning for a hyperbolic query: the original encoder's gallery lives in "
    "another (Euclidean) space."
)


def headline(model_results: Mapping[str, Any]) -> dict[str, float]:
    """``{key: value}`` of :data:`HEADLINE` for one model's results (missing ones left out)."""
    out = {}
    for key, (_, (suite, metric), _) in HEADLINE.items():
        value = (model_results.get(suite) or {}).get(metric)
        if isinstance(value, (int, float)) and not math.isnan(float(value)):
            out[key] = float(value)
    return out


def headline_table(results: Mapping[str, Any], keys: Sequence[str] | None = None) -> str:
    """Markdown: one row per headline metric (``keys``, default all of :data:`HEADLINE` that
    were measured), one column per model, in %; ``value [low, high]`` where the evaluation kept
    a 95% interval (exact for a share, bootstrap for a composite figure:
    :mod:`saferclip.evaluation.intervals`)."""
    per_model = {name: headline(r) for name, r in results["results"].items()}
    intervals = results.get("intervals") or {}
    models = list(per_model)
    hyperbolic = {m for m in models if is_hyperbolic(results, m)}
    lines = ["| metric | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    for key, (label, _, _) in HEADLINE.items():
        if not any(key in h for h in per_model.values()) or (keys is not None and key not in keys):
            continue

        def cell(m: str) -> str:
            if key in per_model[m]:
                interval = (intervals.get(m) or {}).get(key)
                if interval and not any(math.isnan(float(v)) for v in interval):
                    return f"{100 * per_model[m][key]:.1f} [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"
                return f"{100 * per_model[m][key]:.1f}"
            return NOT_APPLICABLE if key in SETTING_B and m in hyperbolic else "–"

        lines.append(f"| {label} | " + " | ".join(cell(m) for m in models) + " |")
    if hyperbolic and any(key in h for h in per_model.values() for key in SETTING_B if keys is None or key in keys):
        lines += ["", NOT_APPLICABLE_NOTE]
    return "\n".join(lines)


def is_hyperbolic(results: Mapping[str, Any], model: str) -> bool:
    """Whether ``model`` of an evaluation compared its embeddings in hyperbolic space."""
    return str((results.get("models") or {}).get(model, {}).get("similarity", "")).startswith("lorentz")


def study_table(summary: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """Markdown: one row per model/variant, one column per headline metric, mean ± std in %
    (sample std over seeds; ± 0.0 with one seed) and, with two seeds or more, the 95% Student-t
    interval of the mean over seeds in brackets (``summary``: ``saferclip-study``'s, model ->
    metric -> ``{"mean", "std", "n", "low", "high"}``)."""
    metrics = [m for m in HEADLINE if any(m in row for row in summary.values())]
    lines = [
        "| model | seeds | " + " | ".join(HEADLINE[m][0] for m in metrics) + " |",
        "|---|---|" + "---|" * len(metrics),
    ]
    for model, row in summary.items():
        seeds = max((v["n"] for v in row.values()), default=0)
        cells = []
        for m in metrics:
            if m not in row:
                cells.append("–")
                continue
            mean, std = 100 * row[m]["mean"], 100 * row[m]["std"]
            low, high = row[m].get("low", math.nan), row[m].get("high", math.nan)
            interval = "" if math.isnan(low) else f" [{100 * low:.1f}, {100 * high:.1f}]"
            cells.append(f"{mean:.1f} ± {std:.1f}{interval}")
        lines.append(f"| {model} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
