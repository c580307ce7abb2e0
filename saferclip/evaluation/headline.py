"""The few numbers a reader compares first (docs/METHOD.md, "Metrics"), picked from a full evaluation.

Safety is shown where it can fail, side by side with redirection: an unsafe caption must stop
retrieving unsafe images (unsafe rate, lower is safer) *and* retrieve the right safe scene
(U->V R@1). Both gallery settings: (a) both encoders fine-tuned, (b) the gallery embedded by
the original image encoder. Then what safety costs: safe retrieval and zero-shot retention.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

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
}


def headline(model_results: Mapping[str, Any]) -> dict[str, float]:
    """``{key: value}`` of :data:`HEADLINE` for one model's results (missing ones left out)."""
    out = {}
    for key, (_, (suite, metric), _) in HEADLINE.items():
        value = (model_results.get(suite) or {}).get(metric)
        if isinstance(value, (int, float)) and not math.isnan(float(value)):
            out[key] = float(value)
    return out


def headline_table(results: Mapping[str, Any]) -> str:
    """Markdown: one row per headline metric, one column per model, in %."""
    per_model = {name: headline(r) for name, r in results["results"].items()}
    models = list(per_model)
    lines = ["| metric | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    for key, (label, _, _) in HEADLINE.items():
        if not any(key in h for h in per_model.values()):
            continue
        cells = [f"{100 * per_model[m][key]:.1f}" if key in per_model[m] else "–" for m in models]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
