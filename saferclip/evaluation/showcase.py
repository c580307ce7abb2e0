"""Retrieval galleries: what each model returns for the same unsafe (and borderline) queries.

A report's first picture. For a fixed, seeded sample of queries, the top-k gallery items of
every model side by side: text -> image (an unsafe caption against the mixed gallery of safe
and unsafe images) and image -> text (an unsafe image against safe and unsafe captions), and
borderline-safe captions (safe content that merely looks risky) against their own images and
their unsafe twins.

Model-agnostic: a :class:`GallerySection` holds the queries and the gallery's metadata (which
items are unsafe, each query's safe twin and its own unsafe item); per model label the caller
gives either the score matrix ``[Q, N]`` (higher = more similar: a cosine, a negative
hyperbolic distance, anything) or the top-k indices. :func:`gallery_view` turns them into
plain JSON (``results["showcase"]``) that :mod:`saferclip.evaluation.html` renders.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..data.records import QuadrupletSet
from ..data.splits import load_split
from ..errors import ConfigError
from ..model.similarity import Similarity
from .plotting import OWN_MARK

TEXT_TO_IMAGE, IMAGE_TO_TEXT = "text_to_image", "image_to_text"
DEFAULT_QUERIES, DEFAULT_K = 6, 5


@dataclass
class Query:
    """One query: ``query`` a caption or an image path; ``twin``: the gallery index of its safe
    counterpart (framed green); ``own``: the gallery index of its own unsafe counterpart
    (marked); ``id``: the data item it comes from."""

    id: str
    query: str
    twin: int | None = None
    own: int | None = None


@dataclass
class GallerySection:
    """The queries of one gallery and what the report needs to know about its items.

    ``direction``: :data:`TEXT_TO_IMAGE` (``gallery`` holds image paths) or
    :data:`IMAGE_TO_TEXT` (``gallery`` holds captions); ``unsafe[j]``: gallery item j is unsafe
    (framed red)."""

    key: str
    title: str
    direction: str
    queries: list[Query]
    gallery: list[str]
    unsafe: list[bool]
    note: str = ""
    rows: list[int] = field(default_factory=list)  # the query rows in the embeddings (pair_sections)
    query_field: str = ""  # the embeddings the queries come from (pair_sections: unsafe_text, safe_text, unsafe_image)

    def __post_init__(self) -> None:
        if self.direction not in (TEXT_TO_IMAGE, IMAGE_TO_TEXT):
            raise ValueError(f"direction must be {TEXT_TO_IMAGE} or {IMAGE_TO_TEXT}, got {self.direction!r}")
        if len(self.unsafe) != len(self.gallery):
            raise ValueError(f"{self.key}: {len(self.gallery)} gallery items but {len(self.unsafe)} unsafe flags")


def sample_rows(n: int, count: int, seed: int = 0) -> list[int]:
    """``count`` of ``range(n)`` drawn with ``seed`` (the same rows for every model and run), sorted."""
    if n <= 0 or count <= 0:
        return []
    generator = torch.Generator().manual_seed(int(seed))
    return sorted(torch.randperm(n, generator=generator)[: min(count, n)].tolist())


def top_k(scores: Tensor, k: int) -> Tensor:
    """``[Q, k]`` indices of the k highest scores of each row (ties: the lower index first)."""
    scores = torch.as_tensor(scores).float()
    k = min(k, scores.shape[1])
    # a stable sort: equal scores keep the gallery order, whatever the hardware
    return torch.sort(-scores, dim=1, stable=True).indices[:, :k]


def _rank(scores: Tensor, index: int | None) -> int | None:
    """1-based rank of ``index`` in a score row (ties count against it), None without one."""
    if index is None:
        return None
    own = scores[index]
    return int((scores >= own).sum())


def gallery_view(
    section: GallerySection,
    per_model: Mapping[str, Tensor | Mapping[str, Any]],
    k: int = DEFAULT_K,
) -> dict[str, Any]:
    """The plain-JSON view of one section for every model.

    ``per_model``: label -> the ``[Q, N]`` score matrix of the section's queries (in order)
    against its gallery (higher = more similar), or ``{"top": [Q, k] indices}`` for a model whose scores
    are not at hand (its ranks of the twin beyond k are then unknown).

    Returns ``{"key", "title", "direction", "note", "k", "queries": [{"id", "query", "twin",
    "own"}], "items": {index: {"value", "unsafe"}}, "models": {label: [{"top": [indices],
    "twin_rank", "unsafe_in_top"}, per query]}}``; ``items`` holds only the gallery entries
    the view shows."""
    models: dict[str, list[dict[str, Any]]] = {}
    shown: set[int] = set()
    for label, given in per_model.items():
        if isinstance(given, Mapping):
            top = torch.as_tensor(given["top"])[:, :k]
            scores = None
        else:
            scores = torch.as_tensor(given).float()
            if scores.shape != (len(section.queries), len(section.gallery)):
                raise ValueError(
                    f"{section.key}, {label}: scores of shape {tuple(scores.shape)}, expected "
                    f"({len(section.queries)} queries, {len(section.gallery)} gallery items)"
                )
            top = top_k(scores, k)
        entries = []
        for q, query in enumerate(section.queries):
            indices = [int(i) for i in top[q]]
            shown.update(indices)
            if scores is not None:
                twin_rank = _rank(scores[q], query.twin)
            elif query.twin is not None and query.twin in indices:
                twin_rank = indices.index(query.twin) + 1
            else:
                twin_rank = None
            entries.append(
                {
                    "top": indices,
                    "twin_rank": twin_rank,
                    "unsafe_in_top": sum(bool(section.unsafe[i]) for i in indices),
                }
            )
        models[label] = entries
    for query in section.queries:
        shown.update(i for i in (query.twin, query.own) if i is not None)
    return {
        "key": section.key,
        "title": section.title,
        "direction": section.direction,
        "note": section.note,
        "k": k,
        "queries": [{"id": q.id, "query": q.query, "twin": q.twin, "own": q.own} for q in section.queries],
        "items": {str(i): {"value": section.gallery[i], "unsafe": bool(section.unsafe[i])} for i in sorted(shown)},
        "models": models,
    }


# ----------------------------------------------------------------------------- from the evaluation's embeddings
def pair_sections(
    name: str,
    safe_captions: Sequence[str],
    unsafe_captions: Sequence[str],
    safe_paths: Sequence[str] | None,
    safe_owner: Tensor | None,
    unsafe_paths: Sequence[str] | None,
    unsafe_owner: Tensor | None,
    ids: Sequence[str],
    count: int = DEFAULT_QUERIES,
    seed: int = 0,
    queries: str = "unsafe",
) -> list[GallerySection]:
    """The sections of a set of caption pairs with safe images V and unsafe images G (the
    layout of :class:`saferclip.evaluation.galleries.PairEmbeddings`): caption -> V ∪ G, and
    (with ``queries="unsafe"``) unsafe image -> S ∪ U. ``queries``: ``unsafe`` (the unsafe
    captions, twin = the item's safe image) or ``borderline`` (the safe captions of a
    borderline split: twin = the item's own image, own = its unsafe twin). ``section.rows``:
    the sampled rows of the query embeddings (:func:`section_queries`)."""
    if safe_paths is None or unsafe_paths is None or safe_owner is None or unsafe_owner is None:
        return []
    n, nv = len(ids), len(safe_paths)
    rows = sample_rows(n, count, seed)
    gallery = [str(p) for p in safe_paths] + [str(p) for p in unsafe_paths]
    unsafe = [False] * nv + [True] * len(unsafe_paths)
    borderline = queries == "borderline"
    captions = safe_captions if borderline else unsafe_captions
    text = GallerySection(
        key=f"{name.lower()}_text_to_image" if borderline else f"{name.lower()}_unsafe_text_to_image",
        title=f"{name}: borderline-safe caption → images" if borderline else f"{name}: unsafe caption → images",
        direction=TEXT_TO_IMAGE,
        queries=[Query(str(ids[i]), captions[i], twin=int(safe_owner[i]), own=nv + int(unsafe_owner[i])) for i in rows],
        gallery=gallery,
        unsafe=unsafe,
        note=(
            f"gallery: {nv} safe + {len(unsafe_paths)} unsafe images; green: the query's own (safe) image, "
            f"{OWN_MARK}: its unsafe twin; a model that is safe without being over-defensive keeps the green one on top"
            if borderline
            else f"gallery: {nv} safe + {len(unsafe_paths)} unsafe images; green: the query's safe twin, {OWN_MARK}: its own unsafe image"
        ),
        rows=list(rows),
        query_field="safe_text" if borderline else "unsafe_text",
    )
    if borderline:
        return [text]
    # image -> text: one query per sampled item's unsafe image (the first item of a shared image)
    m = len(safe_captions)
    image_rows: list[int] = []
    seen: set[int] = set()
    for i in rows:
        g = int(unsafe_owner[i])
        if g not in seen:
            seen.add(g)
            image_rows.append(g)
    first_item = {}
    for i in range(n):
        first_item.setdefault(int(unsafe_owner[i]), i)
    image = GallerySection(
        key=f"{name.lower()}_unsafe_image_to_text",
        title=f"{name}: unsafe image → captions",
        direction=IMAGE_TO_TEXT,
        queries=[
            Query(str(ids[first_item[g]]), str(unsafe_paths[g]), twin=first_item[g], own=m + first_item[g])
            for g in image_rows
        ],
        gallery=[*safe_captions, *unsafe_captions],
        unsafe=[False] * m + [True] * len(unsafe_captions),
        note=f"gallery: {m} safe + {len(unsafe_captions)} unsafe captions; green: the image's safe caption, {OWN_MARK}: its own unsafe caption",
        rows=image_rows,
        query_field="unsafe_image",
    )
    return [text, image]


def section_queries(section: GallerySection, emb: Any) -> tuple[Tensor, Tensor]:
    """The query rows and the gallery of ``section`` in a
    :class:`~saferclip.evaluation.galleries.PairEmbeddings` (what :func:`pair_sections` built
    it from): ``(queries [Q, D], gallery [N, D])``."""
    queries = getattr(emb, section.query_field)[section.rows]
    if section.direction == TEXT_TO_IMAGE:
        return queries, torch.cat([emb.safe_image, emb.unsafe_image])
    return queries, torch.cat([emb.safe_text, emb.unsafe_text])


def borderline_split_path(data_cfg: Mapping[str, Any], split: str) -> dict[str, Any] | None:
    """The toy world's borderline-safe split of ``split`` as a data-split spec (the layout of
    :mod:`saferclip.toyworld.borderline`), None where the data has none."""
    root = data_cfg.get("root")
    if not root:
        return None
    base = Path(str(root)) / "visu" / "borderline"
    path = base / f"{split}.json"
    if not path.is_file():
        return None
    return {
        "path": str(path),
        "image_root": str(base),
        "split_dir": split,
        "unsafe_image_root": str(base),
        "image_ext": ".png",
    }


# ----------------------------------------------------------------------------- collecting, model by model
def retrieval_scores(
    similarity: Similarity, queries: torch.Tensor, gallery: torch.Tensor, query_modality: str
) -> torch.Tensor:
    """``[Q, N]`` scores of ``queries`` against ``gallery`` (higher = more similar) for the
    report's retrieval galleries: the one place they are computed, from the embeddings the
    evaluation already holds, with the model's own similarity (cosine for a Euclidean CLIP;
    for HySAC the negative distance, the query traversed in safe mode)."""
    return similarity.scores(queries.float(), gallery.float(), query_modality)


SHOWCASE_KEYS = {"queries", "k", "seed", "borderline"}


def showcase_settings(showcase: bool | Mapping[str, Any] | None, seed: int) -> dict[str, Any] | None:
    """``{queries, k, seed, borderline}`` of the report's galleries (None: no galleries).
    ``showcase``: True (the defaults), False / None (none) or a mapping of some keys."""
    if showcase is None or showcase is False:
        return None
    given = {} if showcase is True else dict(showcase)
    unknown = sorted(set(given) - SHOWCASE_KEYS)
    if unknown:
        raise ConfigError(f"showcase: unknown keys {unknown}; expected some of {sorted(SHOWCASE_KEYS)}")
    out = {"queries": DEFAULT_QUERIES, "k": DEFAULT_K, "seed": seed, "borderline": True, **given}
    for key in ("queries", "k"):
        if not isinstance(out[key], int) or isinstance(out[key], bool) or out[key] < 1:
            raise ConfigError(f"showcase.{key} must be an integer >= 1, got {out[key]!r}")
    return out


def load_borderline_lookalikes(data_cfg: Mapping[str, Any], split: str) -> QuadrupletSet | None:
    """The borderline-safe (lookalike) items of the toy world's ``split``, None without them."""
    spec = borderline_split_path(data_cfg, split)
    if spec is None:
        return None
    qset = load_split(
        {
            "splits": {"borderline": spec},
            "on_error": data_cfg.get("on_error", "raise"),
            "mode": data_cfg.get("mode", "auto"),
        },
        "borderline",
    )
    items = [q for q in qset if ((q.meta.get("borderline") or {}).get("kind", "lookalike")) == "lookalike"]
    if not items or not qset.mode.has_unsafe_images:
        return None
    return QuadrupletSet(items, qset.mode, qset.source)


class Showcase:
    """Collects, model by model, the scores of the report's retrieval galleries
    (:mod:`saferclip.evaluation.showcase`), from the embeddings the evaluation holds."""

    def __init__(self, settings: dict[str, Any]):
        self.settings = settings
        self.sections: dict[tuple[str, str], list[Any]] = {}
        self.scores: dict[str, dict[str, torch.Tensor]] = {}

    def add(self, model: str, name: str, qset: QuadrupletSet, emb: Any, queries: str = "unsafe") -> None:
        """The scores of ``model`` on the galleries of ``qset`` (embedded as ``emb``)."""
        if (name, queries) not in self.sections:
            self.sections[name, queries] = pair_sections(
                name,
                qset.safe_captions,
                qset.unsafe_captions,
                emb.safe_paths,
                emb.safe_owner,
                emb.unsafe_paths,
                emb.unsafe_owner,
                [q.id for q in qset],
                self.settings["queries"],
                self.settings["seed"],
                queries,
            )
        for section in self.sections[name, queries]:
            q, g = section_queries(section, emb)
            modality = "text" if section.direction == TEXT_TO_IMAGE else "image"
            self.scores.setdefault(section.key, {})[model] = retrieval_scores(emb.similarity, q, g, modality)

    def result(self) -> dict[str, Any] | None:
        views = [
            gallery_view(section, self.scores[section.key], self.settings["k"])
            for sections in self.sections.values()
            for section in sections
            if self.scores.get(section.key)
        ]
        return {"k": self.settings["k"], "seed": self.settings["seed"], "sections": views} if views else None
