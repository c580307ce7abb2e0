"""Zero-shot classification (docs/METHOD.md, "Metrics"), CLIP_benchmark conventions.

Per class, the classifier is the mean of the L2-normalised embeddings of every prompt
template filled with the class name, renormalised; logits are ``100 · image · classifier``.
acc@1, acc@5 (acc@min(5, C)) and mean per-class recall (balanced accuracy) follow
:func:`saferclip.evaluation.metrics.zero_shot_scores`; ties count against the model (see there).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from ..data.records import ZeroShotTask
from ..data.zeroshot import ZeroShotImages
from ..model.build import ClipBundle, eval_mode
from ..model.similarity import CosineSimilarity, chunk_scorer
from .encode import EvaluationError, encode_image_dataset, encode_texts
from .intervals import PER_QUERY, encode_outcomes
from .metrics import build_zero_shot_classifier, zero_shot_scores

LOGIT_SCALE = 100.0


def check_task(name: str, classnames: Sequence[str], templates: Sequence[str], labels: Sequence[int] | None) -> None:
    """Raise EvaluationError naming the task on what would make its scores meaningless."""
    if not classnames:
        raise EvaluationError(f"zero-shot task {name!r}: no class names")
    if isinstance(templates, str) or not templates:
        raise EvaluationError(
            f"zero-shot task {name!r}: templates must be a non-empty list of strings containing '{{c}}'"
        )
    for i, template in enumerate(templates):
        if not isinstance(template, str) or "{c}" not in template:
            raise EvaluationError(
                f"zero-shot task {name!r}: template {i} ({template!r}) has no '{{c}}' placeholder for the class name"
            )
    if labels is None:
        return
    if not labels:
        raise EvaluationError(f"zero-shot task {name!r}: no images")
    counts = Counter(int(y) for y in labels)
    outside = sorted(y for y in counts if not 0 <= y < len(classnames))
    if outside:
        raise EvaluationError(f"zero-shot task {name!r}: labels {outside[:5]} are outside [0, {len(classnames)})")
    empty = [c for i, c in enumerate(classnames) if counts[i] == 0]
    if empty:
        # mean per-class recall would silently average over fewer classes than the task has
        raise EvaluationError(
            f"zero-shot task {name!r}: {len(empty)} of {len(classnames)} classes have no images "
            f"(e.g. {empty[0]!r}); every class needs at least one"
        )


def evaluate_zeroshot(
    bundle: ClipBundle,
    task: ZeroShotTask | Dataset,
    classnames: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool | None = None,
    name: str | None = None,
) -> dict[str, float | int]:
    """Zero-shot accuracy of ``bundle`` on one task.

    Args:
        task: a :class:`ZeroShotTask` (class names and templates included), or a Dataset of
            ``(preprocessed image [3, H, W], label)`` with ``classnames`` and ``templates``.
        classnames, templates: override the task's (required with a bare Dataset).

    Returns:
        ``{"acc1", "acc5", "mean_per_class_recall"}`` as fractions, ``"num_images"``,
        ``"num_classes"``.
    """
    if isinstance(task, ZeroShotTask):
        name = name or task.name
        classnames = list(classnames if classnames is not None else task.classnames)
        templates = list(templates if templates is not None else task.templates)
        labels = [int(y) for _, y in task.samples]
        check_task(name, classnames, templates, labels)
        dataset: Dataset = ZeroShotImages(task, bundle.preprocess)
    else:
        name = name or getattr(task, "name", None) or type(task).__name__
        if classnames is None or templates is None:
            raise ValueError(f"zero-shot task {name!r}: a bare Dataset needs classnames and templates")
        classnames, templates, labels = list(classnames), list(templates), None
        check_task(name, classnames, templates, None)
        dataset = task
    with eval_mode(bundle.model):
        sim = bundle.similarity
        classifier = build_zero_shot_classifier(
            lambda texts: encode_texts(bundle, texts, batch_size, progress=False),
            classnames,
            templates,
            prototypes=None if isinstance(sim, CosineSimilarity) else sim.prototypes,
        )
    features, seen = encode_image_dataset(
        bundle, dataset, batch_size, num_workers, progress, desc=f"zero-shot {name}", return_labels=True
    )
    if labels is None:  # a bare Dataset: its labels are known only now
        labels = seen.tolist()
        check_task(name, classnames, templates, labels)
    scores = zero_shot_scores(
        features,
        classifier,
        torch.tensor(labels),
        logit_scale=LOGIT_SCALE,
        score=chunk_scorer(sim, "image"),
        per_image=True,
    )
    correct = scores.pop("correct@1")
    # each image's top-1 outcome, what the intervals are computed from (saferclip.evaluation.intervals)
    return {
        **scores,
        "num_images": len(labels),
        "num_classes": len(classnames),
        PER_QUERY: {"acc1": encode_outcomes(correct)},
    }
