"""Evaluation (docs/METHOD.md, "Metrics"): one module per task, each with an ``evaluate_…`` function.

* :mod:`.encode` — batched, normalised encoding (DataLoader workers, progress bars);
* :mod:`.zeroshot` — :func:`evaluate_zeroshot` (CLIP_benchmark conventions);
* :mod:`.retrieval` — :func:`evaluate_visu` (four galleries both ways, unsafe rates, two
  gallery settings);
* :mod:`.nsfw_caps` — :func:`evaluate_nsfw_caps`;
* :mod:`.cost` — :func:`cost_of_safety` (retention vs the original model);
* :mod:`.report` — :func:`write_report` (JSON, Markdown, PNG);
* :mod:`.suites` — what the suites read, loaded from a data config before any model;
* :mod:`.runner` — :func:`evaluate_models`, several models (:mod:`saferclip.model.catalogue`)
  on the configured suites.

No Lightning or Hydra here: ``saferclip-eval`` (:mod:`saferclip.app.evaluate`) is the shell.
"""

from .cost import cost_of_safety, is_unsafe_task
from .encode import (
    EvaluationError,
    encode_image_dataset,
    encode_image_files,
    encode_texts,
)
from .galleries import PairEmbeddings
from .nsfw_caps import embed_nsfw_caps, evaluate_nsfw_caps, nsfw_caps_metrics
from .report import metric_records, results_table, write_report
from .retrieval import embed_visu, evaluate_visu, visu_metrics
from .runner import evaluate_models
from .suites import SUITES, check_suites, load_eval_data, load_zeroshot_task
from .zeroshot import evaluate_zeroshot

__all__ = [
    "SUITES",
    "EvaluationError",
    "PairEmbeddings",
    "check_suites",
    "cost_of_safety",
    "embed_nsfw_caps",
    "embed_visu",
    "encode_image_dataset",
    "encode_image_files",
    "encode_texts",
    "evaluate_models",
    "evaluate_nsfw_caps",
    "evaluate_visu",
    "evaluate_zeroshot",
    "is_unsafe_task",
    "load_eval_data",
    "load_zeroshot_task",
    "metric_records",
    "nsfw_caps_metrics",
    "results_table",
    "visu_metrics",
    "write_report",
]
