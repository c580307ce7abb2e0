"""Every metric against a plain, obviously-correct reference on small seeded tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from saferclip.evaluation.metrics import (
    build_zero_shot_classifier,
    recall_at_k,
    retention,
    unsafe_rate,
    zero_shot_scores,
)


def int_embeddings(n: int, dim: int, seed: int) -> torch.Tensor:
    """Vectors with entries in {-1, 0, 1}: dot products are exact small integers, so ties are
    frequent and identical however the matmul is chunked."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, (n, dim), generator=g).float()


def float_embeddings(n: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=g), dim=-1)


# --- references ------------------------------------------------------------------------------


def reference_recall(queries, gallery, positive_sets, ks):
    """Sort the gallery by descending score with ties placing non-positives first (the
    pessimistic convention); the query is a hit at k when a positive is among the first k."""
    scores = (queries @ gallery.T).tolist()
    hits = {k: 0 for k in ks}
    evaluated = 0
    for q, pos in enumerate(positive_sets):
        if not pos:
            continue
        evaluated += 1
        order = sorted(range(len(gallery)), key=lambda g: (-scores[q][g], g in pos))
        first = next(i for i, g in enumerate(order) if g in pos)
        for k in ks:
            hits[k] += first < k
    return {f"R@{k}": (hits[k] / evaluated if evaluated else math.nan) for k in ks}, evaluated


def reference_unsafe_rate(queries, gallery, is_unsafe, k):
    """Top-k by a full sort, ties placing unsafe items first (pessimistic)."""
    scores = (queries @ gallery.T).tolist()
    flagged = 0
    for row in scores:
        order = sorted(range(len(gallery)), key=lambda g: (-row[g], not bool(is_unsafe[g])))
        flagged += any(bool(is_unsafe[g]) for g in order[:k])
    return flagged / len(scores)


def assert_recall_equal(result, expected, evaluated):
    for key, value in expected.items():
        if math.isnan(value):
            assert math.isnan(result[key]), key
        else:
            assert result[key] == pytest.approx(value), key
    assert result["num_evaluated"] == evaluated


# --- recall_at_k -----------------------------------------------------------------------------


def test_recall_hand_case_with_ties_is_pessimistic():
    q = torch.tensor([[1.0, 0.0]])
    gallery = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # items 0 and 1 tie
    # positive = item 1, tied with negative item 0: rank 1 -> miss at 1, hit at 2
    result = recall_at_k(q, gallery, torch.tensor([1]), ks=(1, 2))
    assert result["R@1"] == 0.0 and result["R@2"] == 1.0
    # a tie between two positives does not hurt
    result = recall_at_k(q, gallery, [[0, 1]], ks=(1,))
    assert result["R@1"] == 1.0


def test_collapsed_embeddings_do_not_look_good():
    same = torch.ones(5, 4) / 2
    result = recall_at_k(same, same, torch.arange(5), ks=(1, 4, 5))
    assert result["R@1"] == 0.0 and result["R@4"] == 0.0 and result["R@5"] == 1.0
    assert unsafe_rate(same, same, torch.tensor([True, False, False, False, False])) == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_one_positive_per_query_matches_reference(seed):
    queries, gallery = int_embeddings(13, 6, seed), int_embeddings(9, 6, seed + 100)
    g = torch.Generator().manual_seed(seed)
    positives = torch.randint(0, 9, (13,), generator=g)
    positives[[2, 7]] = -1  # no positive
    ks = (1, 2, 5, 20)
    expected, evaluated = reference_recall(queries, gallery, [{int(p)} if p >= 0 else set() for p in positives], ks)
    for chunk in (1, 3, 5, 13, 100):  # 3 and 5 do not divide 13
        result = recall_at_k(queries, gallery, positives, ks=ks, chunk_size=chunk)
        assert_recall_equal(result, expected, evaluated)
        assert result["num_queries"] == 13 and result["num_without_positive"] == 2
    assert result["R@20"] == 1.0  # k larger than the gallery: every query with a positive


def test_recall_float_embeddings_match_full_matrix_argsort():
    queries, gallery = float_embeddings(37, 16, 3), float_embeddings(50, 16, 4)
    positives = torch.randperm(50, generator=torch.Generator().manual_seed(5))[:37]
    scores = queries @ gallery.T
    order = scores.argsort(dim=1, descending=True)
    position = (order == positives[:, None]).float().argmax(1)  # no ties among random floats
    for chunk in (8, 37):
        result = recall_at_k(queries, gallery, positives, ks=(1, 5, 10), chunk_size=chunk)
        for k in (1, 5, 10):
            assert result[f"R@{k}"] == pytest.approx((position < k).float().mean().item())


@pytest.mark.parametrize("seed", [0, 1])
def test_recall_several_positives_via_owners_both_directions(seed):
    # 6 images, captions owned by images (several per image), one image without captions
    images = int_embeddings(6, 5, seed)
    caption_owner = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4, 7])  # owner 7 has no image
    captions = int_embeddings(len(caption_owner), 5, seed + 50)
    image_owner = torch.arange(6)
    ks = (1, 2, 3, 50)

    t2i_sets = [{g for g in range(6) if int(image_owner[g]) == int(o)} for o in caption_owner]
    expected, evaluated = reference_recall(captions, images, t2i_sets, ks)
    for chunk in (1, 4, 64):
        result = recall_at_k(
            captions, images, ks=ks, chunk_size=chunk, query_owner=caption_owner, gallery_owner=image_owner
        )
        assert_recall_equal(result, expected, evaluated)
    assert result["num_without_positive"] == 1

    i2t_sets = [{c for c in range(len(caption_owner)) if int(caption_owner[c]) == i} for i in range(6)]
    expected, evaluated = reference_recall(images, captions, i2t_sets, ks)
    result = recall_at_k(images, captions, ks=ks, chunk_size=4, query_owner=image_owner, gallery_owner=caption_owner)
    assert_recall_equal(result, expected, evaluated)
    assert result["num_without_positive"] == 1  # image 5 has no caption
    # the same positives as ragged lists
    ragged = recall_at_k(images, captions, [sorted(s) for s in i2t_sets], ks=ks, chunk_size=4)
    assert ragged == result


def test_recall_no_query_with_positive_is_nan_and_counted():
    result = recall_at_k(int_embeddings(3, 4, 0), int_embeddings(4, 4, 1), [[], [], []], ks=(1,))
    assert math.isnan(result["R@1"])
    assert result["num_without_positive"] == 3 and result["num_evaluated"] == 0


def test_recall_rejects_bad_positives():
    q, g = int_embeddings(3, 4, 0), int_embeddings(4, 4, 1)
    with pytest.raises(ValueError, match="outside the gallery"):
        recall_at_k(q, g, torch.tensor([0, 4, 1]))
    with pytest.raises(ValueError, match=r"\[Q=3\]"):
        recall_at_k(q, g, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="one entry per query"):
        recall_at_k(q, g, [[0], [1]])
    with pytest.raises(ValueError, match="go together"):
        recall_at_k(q, g, query_owner=torch.arange(3))
    with pytest.raises(ValueError, match="share D"):
        recall_at_k(q, int_embeddings(4, 5, 1), torch.arange(3))


# --- unsafe_rate -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unsafe_rate_matches_reference_with_ties(seed):
    queries, gallery = int_embeddings(11, 5, seed), int_embeddings(8, 5, seed + 10)
    is_unsafe = torch.tensor([True, False, False, True, False, False, False, False])
    for k in (1, 2, 3, 8, 20):
        expected = reference_unsafe_rate(queries, gallery, is_unsafe, k)
        for chunk in (1, 4, 11):
            assert unsafe_rate(queries, gallery, is_unsafe, k=k, chunk_size=chunk) == pytest.approx(expected)
    assert unsafe_rate(queries, gallery, is_unsafe, k=8) == 1.0  # k >= G


def test_unsafe_rate_hand_case_and_errors():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    gallery = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    unsafe = torch.tensor([False, True, False])
    # query 0: safe item 0 ties with unsafe item 1 -> counted unsafe; query 1: safe item 2 on top
    assert unsafe_rate(q, gallery, unsafe, k=1) == 0.5
    with pytest.raises(ValueError, match="no unsafe item"):
        unsafe_rate(q, gallery, torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool tensor"):
        unsafe_rate(q, gallery, torch.tensor([0, 1, 0]))


# --- zero-shot -------------------------------------------------------------------------------


class FakeEncoder:
    """Deterministic random embedding per distinct string (unnormalised on purpose)."""

    def __init__(self, dim: int = 8):
        self.dim, self.table, self.calls = dim, {}, []

    def __call__(self, texts):
        self.calls.append(list(texts))
        for t in texts:
            if t not in self.table:
                g = torch.Generator().manual_seed(len(self.table))
                self.table[t] = torch.randn(self.dim, generator=g) * (1 + len(self.table))
        return torch.stack([self.table[t] for t in texts])


def test_zero_shot_classifier_matches_per_class_loop():
    classnames = ["circle", "square", "triangle", "star", "moon"]
    templates = ["a {c}.", "a photo of a {c}.", "{c} {in braces}"]
    encoder = FakeEncoder()
    weights = build_zero_shot_classifier(encoder, classnames, templates, classes_per_batch=2)
    assert weights.shape == (8, 5)
    for c, name in enumerate(classnames):
        emb = torch.stack([F.normalize(encoder([t.replace("{c}", name)])[0], dim=0) for t in templates])
        expected = F.normalize(emb.mean(0), dim=0)
        torch.testing.assert_close(weights[:, c], expected)
    assert "circle {in braces}" in encoder.table  # other braces are literal


def test_zero_shot_classifier_needs_class_placeholder():
    with pytest.raises(ValueError, match=r"template 1 .*\{c\}"):
        build_zero_shot_classifier(FakeEncoder(), ["a"], ["a {c}", "a photo of a {}."])
    with pytest.raises(ValueError, match="non-empty"):
        build_zero_shot_classifier(FakeEncoder(), ["a"], [])
    with pytest.raises(ValueError, match="classnames"):
        build_zero_shot_classifier(FakeEncoder(), [], ["{c}"])


def test_zero_shot_classifier_from_bundle_matches_open_clip():
    from open_clip.zero_shot_classifier import (
        build_zero_shot_classifier as open_clip_classifier,
    )

    from saferclip.model.build import build_clip

    torch.manual_seed(0)
    bundle = build_clip("saferclip-micro")
    classnames, templates = ["red", "green", "blue"], ["a {c} shape.", "a photo of {c}."]
    ours = build_zero_shot_classifier(bundle, classnames, templates)
    open_clip_templates = [t.replace("{c}", "{}") for t in templates]
    theirs = open_clip_classifier(bundle.model, bundle.tokenizer, classnames, open_clip_templates)
    torch.testing.assert_close(ours, theirs)


def reference_zero_shot(features, classifier, labels):
    logits = (features @ classifier).tolist()
    num_classes = classifier.shape[1]
    top1, top5, per_class = [], [], {}
    for row, y in zip(logits, labels.tolist()):
        ahead = sum(1 for c, v in enumerate(row) if c != y and v >= row[y])  # pessimistic ties
        top1.append(ahead < 1)
        top5.append(ahead < min(5, num_classes))
        per_class.setdefault(y, []).append(ahead < 1)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    per_class_mean = mean([mean(v) for v in per_class.values()])
    return {"acc1": mean(top1), "acc5": mean(top5), "mean_per_class_recall": per_class_mean}


@pytest.mark.parametrize("num_classes", [3, 7])
def test_zero_shot_scores_match_reference(num_classes):
    features = int_embeddings(40, 6, num_classes)  # integer logits: ties happen
    classifier = int_embeddings(num_classes, 6, num_classes + 1).T
    labels = torch.randint(0, num_classes, (40,), generator=torch.Generator().manual_seed(1))
    labels[labels == 1] = 0  # class 1 absent from the labels: excluded from the per-class mean
    expected = reference_zero_shot(features, classifier, labels)
    for chunk in (7, 4096):
        result = zero_shot_scores(features, classifier, labels, chunk_size=chunk)
        assert set(result) == {"acc1", "acc5", "mean_per_class_recall"}
        for key in expected:
            assert result[key] == pytest.approx(expected[key]), key
    if num_classes <= 5:
        assert result["acc5"] == 1.0  # acc@min(5, C)


def test_zero_shot_scores_float_agree_with_topk_convention():
    features, classifier = float_embeddings(60, 16, 0), float_embeddings(10, 16, 1).T
    labels = torch.randint(0, 10, (60,), generator=torch.Generator().manual_seed(2))
    logits = 100 * features @ classifier
    top5 = logits.topk(5, dim=1).indices  # CLIP_benchmark's definition (no ties in random floats)
    result = zero_shot_scores(features, classifier, labels)
    assert result["acc1"] == pytest.approx((top5[:, 0] == labels).float().mean().item())
    assert result["acc5"] == pytest.approx((top5 == labels[:, None]).any(1).float().mean().item())
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        zero_shot_scores(features, classifier, torch.full((60,), 10))


# --- retention -------------------------------------------------------------------------------


def test_retention():
    assert retention(0.45, 0.9) == pytest.approx(0.5)
    assert retention(0.9, 0.9) == 1.0
    assert math.isnan(retention(0.3, 0.0))
    with pytest.raises(ValueError, match="non-negative"):
        retention(0.3, -0.1)
