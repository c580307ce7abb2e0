"""HySAC: the Lorentz geometry against closed forms, the loss against an independent
re-derivation (values and gradients), the safety traversal, hyperbolic retrieval against a
brute-force ranking, the export round trip, and bad settings as one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from train_helpers import compose_train

from saferclip.errors import ConfigError
from saferclip.evaluation.hyperbolic import origin_detector_metrics
from saferclip.evaluation.metrics import recall_at_k, unsafe_rate
from saferclip.model import lorentz
from saferclip.model.checkpoints import CheckpointError
from saferclip.model.hyperbolic import HEAD_JSON, HEAD_TENSORS, HyperbolicConfig, HyperbolicHead, load_head, save_head
from saferclip.model.safe_radii import RADII_FORMAT, SAFE_RADII_FILE, read_radii_records
from saferclip.model.similarity import COSINE, LorentzSimilarity, chunk_scorer
from saferclip.training.hysac import HYSAC_TERMS, HysacLoss, HysacLossConfig
from saferclip.training.method import method_config

pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread (tests/conftest.py)

CURVATURES = (0.3, 1.0, 2.5)


def rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


# ---------------------------------------------------------------- geometry: closed forms
@pytest.mark.parametrize("c", CURVATURES)
def test_log_of_exp_is_the_identity(c):
    v = rand(64, 16, scale=0.7)
    torch.testing.assert_close(lorentz.logmap0(lorentz.expmap0(v, c), c), v, rtol=1e-6, atol=1e-7)


def test_distance_from_the_origin_of_exp_v_is_the_norm_of_v():
    v = rand(32, 8, seed=1, scale=2.0)
    x = lorentz.expmap0(v, 1.0)
    torch.testing.assert_close(lorentz.distance_from_origin(x, 1.0), v.norm(dim=-1), rtol=1e-6, atol=1e-7)
    # and the pairwise distance to the origin (x = 0) says the same
    origin = torch.zeros(1, 8, dtype=torch.float64)
    torch.testing.assert_close(lorentz.pairwise_distance(x, origin, 1.0)[:, 0], v.norm(dim=-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("c", CURVATURES)
def test_pairwise_distance_is_symmetric_and_matches_the_hyperboloid_formula(c):
    x, y = rand(10, 6, seed=2), rand(7, 6, seed=3)
    d = lorentz.pairwise_distance(x, y, c)
    torch.testing.assert_close(d, lorentz.pairwise_distance(y, x, c).T)
    # independently: full Lorentz vectors (time first) and the Minkowski inner product
    X = torch.cat([torch.sqrt(1 / c + (x * x).sum(-1, keepdim=True)), x], -1)
    Y = torch.cat([torch.sqrt(1 / c + (y * y).sum(-1, keepdim=True)), y], -1)
    minkowski = -X[:, None, 0] * Y[None, :, 0] + (X[:, None, 1:] * Y[None, :, 1:]).sum(-1)
    torch.testing.assert_close(d, torch.acosh(-c * minkowski) / math.sqrt(c), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lorentz.distance(x[:7], y, c), d[:7].diagonal(), rtol=1e-9, atol=1e-9)


def test_half_aperture_lies_in_zero_to_half_pi():
    x = torch.cat([rand(100, 5, seed=4, scale=s) for s in (1e-4, 0.1, 1.0, 50.0)])
    aperture = lorentz.half_aperture(x, 1.0)
    assert bool((aperture > 0).all()) and bool((aperture < math.pi / 2).all())


@pytest.mark.parametrize("c", CURVATURES)
def test_exterior_angle_is_zero_on_the_geodesic_from_the_origin_through_x(c):
    v = rand(20, 6, seed=5)
    x = lorentz.expmap0(v, c)
    beyond = lorentz.expmap0(v * 1.8, c)  # farther along the same geodesic
    assert float(lorentz.exterior_angle(x, beyond, c).max()) < 2e-3
    back = lorentz.expmap0(-v, c)  # the other way through the origin: the widest angle
    assert float(lorentz.exterior_angle(x, back, c).min()) > math.pi - 2e-2
    # and the entailment loss is zero for points inside the cone, positive outside
    assert float(lorentz.entailment_loss(x, beyond, c)) == 0.0
    assert float(lorentz.entailment_loss(x, back, c)) > 1.0


# ---------------------------------------------------------------- traversal
def test_traversal_is_the_identity_inside_the_radius_and_lands_on_it_outside():
    c, radius = 1.3, 1.0
    v = rand(200, 8, seed=6)
    v = v / v.norm(dim=-1, keepdim=True) * torch.linspace(0.05, 3.0, 200, dtype=torch.float64)[:, None]
    x = lorentz.expmap0(v, c)
    moved = lorentz.traverse(x, radius, c)
    inside = lorentz.distance_from_origin(x, c) <= radius
    assert 0 < int(inside.sum()) < len(x)
    torch.testing.assert_close(moved[inside], x[inside], rtol=0, atol=0)
    d = lorentz.distance_from_origin(moved[~inside], c)
    torch.testing.assert_close(d, torch.full_like(d, radius), rtol=1e-6, atol=1e-6)
    # along its own geodesic: the direction from the origin is kept
    torch.testing.assert_close(F.normalize(moved[~inside], dim=-1), F.normalize(x[~inside], dim=-1))


def test_the_safe_mode_traverses_the_query_only():
    sim = LorentzSimilarity(1.0, 1.0, 1.0, radius_text=0.5, radius_image=2.0, traversal=True)
    q, g = rand(5, 4, seed=7, scale=2.0), rand(9, 4, seed=8, scale=2.0)
    expected = -lorentz.pairwise_distance(lorentz.traverse(q, 0.5, 1.0), g, 1.0)
    torch.testing.assert_close(sim.scores(q, g, "text"), expected)
    moderation = sim.with_mode("moderation")
    torch.testing.assert_close(moderation.scores(q, g, "text"), -lorentz.pairwise_distance(q, g, 1.0))


# ---------------------------------------------------------------- the loss, re-derived
def reference_hysac_loss(points, curvature, logit_scale, k, weights):
    """HySAC's total written out from the formulas (docs/METHOD.md), full Lorentz vectors."""
    c = curvature

    def full(x):
        return torch.cat([torch.sqrt(1 / c + (x * x).sum(-1, keepdim=True)), x], -1)

    def minkowski(X, Y):  # [N, M]
        return -X[:, None, 0] * Y[None, :, 0] + (X[:, None, 1:] * Y[None, :, 1:]).sum(-1)

    def contrastive(a, b):
        d = torch.acosh((-c * minkowski(full(a), full(b))).clamp_min(1 + 1e-6)) / c**0.5
        logits = -d * logit_scale
        y = torch.arange(len(a))
        return (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y)) / 2

    def entail(x, y):
        X, Y = full(x), full(y)
        inner = -X[:, 0] * Y[:, 0] + (X[:, 1:] * Y[:, 1:]).sum(-1)
        num = Y[:, 0] + c * inner * X[:, 0]
        den = x.norm(dim=-1) * torch.sqrt((c * inner) ** 2 - 1)
        angle = torch.acos((num / den).clamp(-1 + 1e-6, 1 - 1e-6))
        aperture = torch.asin((2 * k / (c**0.5 * x.norm(dim=-1))).clamp(-1 + 1e-6, 1 - 1e-6))
        return (angle - aperture).clamp_min(0).mean()

    S, U, V, G = points["safe_text"], points["unsafe_text"], points["safe_image"], points["unsafe_image"]
    terms = {
        "contrastive_safe": contrastive(S, V),
        "contrastive_unsafe": contrastive(U, G),
        "contrastive_safe_text_unsafe_image": contrastive(S, G),
        "contrastive_unsafe_text_safe_image": contrastive(U, V),
        "entailment_safe": entail(S, V),
        "entailment_unsafe": entail(U, G),
        "entailment_safe_image_unsafe_text": entail(V, U),
        "entailment_safe_text_unsafe_text": entail(S, U),
        "entailment_safe_image_unsafe_image": entail(V, G),
    }
    active = {t: v for t, v in terms.items() if weights[t] > 0}
    return sum(weights[t] * v for t, v in active.items()) / len(active), active


@pytest.mark.parametrize(
    "weights",
    [
        None,
        {"contrastive_safe": 2.0, "entailment_unsafe": 0.5},
        {"entailment_safe_text_unsafe_text": 1.0, "entailment_safe_image_unsafe_image": 3.0},
    ],
)
def test_hysac_loss_matches_an_independent_derivation_values_and_gradients(weights):
    config = HysacLossConfig() if weights is None else HysacLossConfig(weights=weights)
    head = HyperbolicHead(8, HyperbolicConfig(curvature=1.7, aperture_k=0.2))
    raw = {
        name: rand(6, 8, seed=10 + i).float().requires_grad_(True)
        for i, name in enumerate(("safe_text", "unsafe_text", "safe_image", "unsafe_image"))
    }
    modality = {"safe_text": "text", "unsafe_text": "text", "safe_image": "image", "unsafe_image": "image"}
    total, terms = HysacLoss(config)(head, **{k: head.lift(v, modality[k]) for k, v in raw.items()})
    grads = torch.autograd.grad(total, list(raw.values()))

    raw2 = {k: v.detach().double().requires_grad_(True) for k, v in raw.items()}
    c = float(head.curvature().detach())
    points = {k: lorentz.expmap0(v * float(head.scale(modality[k]).detach()), c) for k, v in raw2.items()}
    expected, expected_terms = reference_hysac_loss(points, c, float(head.logit_scale().detach()), 0.2, config.weights)
    expected_grads = torch.autograd.grad(expected, list(raw2.values()))
    assert set(terms) == set(expected_terms)
    for name, value in expected_terms.items():
        torch.testing.assert_close(terms[name].double(), value, rtol=2e-4, atol=2e-5, msg=name)
    torch.testing.assert_close(total.double(), expected, rtol=2e-4, atol=2e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=2e-5)


def test_the_head_never_scales_up_and_keeps_the_curvature_in_range():
    head = HyperbolicHead(64, HyperbolicConfig(curvature=1.0, curvature_range=(0.5, 2.0)))
    assert float(head.scale("text").detach()) == pytest.approx(64**-0.5)
    with torch.no_grad():
        head.log_text_scale.fill_(3.0)
        head.log_curvature.fill_(10.0)
    assert float(head.scale("text").detach()) == 1.0
    assert float(head.curvature().detach()) == pytest.approx(2.0)


# ---------------------------------------------------------------- the head's parameters learn
HEAD_RANGE = HyperbolicConfig(curvature=1.0, curvature_range=(0.5, 2.0))
# (parameter, raw value) at its initial value, at and beyond its bounds; the value the head
# uses is the raw one clamped to the range
HEAD_POSITIONS = [
    ("log_logit_scale", None),  # float32(log(1/0.07)): just below the old float64 lower bound
    ("log_logit_scale", 0.0),  # at the lower bound, s = 1
    ("log_logit_scale", math.log(100.0)),  # at the upper bound
    ("log_logit_scale", math.log(130.0)),  # beyond it
    ("log_curvature", None),
    ("log_curvature", math.log(0.5)),
    ("log_curvature", math.log(2.0)),
    ("log_curvature", math.log(3.0)),
    ("log_text_scale", None),
    ("log_text_scale", 0.0),
    ("log_text_scale", 0.4),
    ("log_image_scale", 0.0),
    ("log_image_scale", 0.4),
]


def _clamped(value, low, high):
    return min(max(value, low if low is not None else -math.inf), high if high is not None else math.inf)


@pytest.mark.parametrize("name, raw", HEAD_POSITIONS)
def test_every_head_parameter_gets_its_gradient_at_its_start_and_at_its_bounds(name, raw):
    """The head's gradient w.r.t. each log parameter equals d loss / d log p of the loss
    re-derived from the formulas with p a plain leaf at the clamped value (chain rule through
    exp), and is not zero: a parameter at or beyond a bound still learns."""
    head = HyperbolicHead(8, HEAD_RANGE)
    if raw is not None:
        with torch.no_grad():
            getattr(head, name).fill_(raw)
    names = ("safe_text", "unsafe_text", "safe_image", "unsafe_image")
    raw_points = {k: rand(6, 8, seed=30 + i, scale=4.0).float() for i, k in enumerate(names)}
    modality = {"safe_text": "text", "unsafe_text": "text", "safe_image": "image", "unsafe_image": "image"}
    config = HysacLossConfig(
        weights={
            "contrastive_safe": 1.0,
            "entailment_safe": 1.0,
            "contrastive_unsafe": 1.0,
            "entailment_safe_text_unsafe_text": 1.0,
        }
    )
    total, _ = HysacLoss(config)(head, **{k: head.lift(v, modality[k]) for k, v in raw_points.items()})
    (got,) = torch.autograd.grad(total, [getattr(head, name)])

    # the reference: every parameter a float64 leaf at its clamped value, the loss from the formulas
    lo_c, hi_c = HEAD_RANGE.curvature_range
    bounds = {
        "log_curvature": (math.log(lo_c), math.log(hi_c)),
        "log_text_scale": (None, 0.0),
        "log_image_scale": (None, 0.0),
        "log_logit_scale": (0.0, math.log(100.0)),
    }
    logs = {
        n: torch.tensor(_clamped(float(getattr(head, n).detach()), *bounds[n]), dtype=torch.float64, requires_grad=True)
        for n in bounds
    }
    c = logs["log_curvature"].exp()
    alpha = {"text": logs["log_text_scale"].exp(), "image": logs["log_image_scale"].exp()}
    points = {k: lorentz.expmap0(v.double() * alpha[modality[k]], c) for k, v in raw_points.items()}
    expected, _ = reference_hysac_loss(points, c, logs["log_logit_scale"].exp(), HEAD_RANGE.aperture_k, config.weights)
    (want,) = torch.autograd.grad(expected, [logs[name]])
    assert abs(float(want)) > 1e-4  # the check below is not a comparison of zeros
    assert float(got) == pytest.approx(float(want), rel=2e-3, abs=1e-6)


def test_an_optimizer_step_past_a_bound_is_projected_back_and_the_parameter_can_leave_it():
    head = HyperbolicHead(8, HEAD_RANGE)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.25)
    upper = math.log(HEAD_RANGE.curvature_range[1])
    with torch.no_grad():
        head.log_curvature.fill_(upper - 0.1)
    (-head.curvature()).backward()  # the loss wants a larger curvature: a step of +0.25 c in log c
    optimizer.step()
    assert float(head.log_curvature.detach()) > upper  # the raw step went past the bound...
    assert float(head.curvature().detach()) == pytest.approx(2.0)  # ...the value used never does
    head.clamp_parameters_()
    assert float(head.log_curvature.detach()) == pytest.approx(upper)  # projected back, as after every step in training
    optimizer.zero_grad()
    head.curvature().backward()  # now it wants a smaller one: it leaves the bound at once
    assert float(head.log_curvature.grad) == pytest.approx(2.0)
    optimizer.step()
    head.clamp_parameters_()
    assert float(head.curvature().detach()) == pytest.approx(2.0 * math.exp(-0.5))
    # the other bounds, the same way
    with torch.no_grad():
        head.log_text_scale.fill_(0.7)
        head.log_logit_scale.fill_(-1.0)
    head.clamp_parameters_()
    assert float(head.log_text_scale.detach()) == 0.0 and float(head.log_logit_scale.detach()) == 0.0


def test_the_head_gets_no_weight_decay_and_is_clamped_after_each_step():
    import yaml

    from saferclip.app.engine.hysac_module import HysacModule
    from saferclip.app.hydra_utils import CONF_DIR

    preset = yaml.safe_load((Path(CONF_DIR) / "method" / "hysac.yaml").read_text())
    preset["optimizer"]["weight_decay"] = 0.2
    module = HysacModule("saferclip-micro", None, method_config(preset))
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    head = {id(p) for p in module.head.parameters()}
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert {decay_of[i] for i in head} == {0.0}
    assert all(
        decay_of[id(p)] == module.optimizer_config.weight_decay > 0
        for p in module.model.parameters()
        if p.requires_grad
    )
    assert set(decay_of) == {id(p) for p in module.parameters() if p.requires_grad}


# ---------------------------------------------------------------- retrieval with the model's own similarity
def test_hyperbolic_retrieval_equals_a_brute_force_ranking_by_distance():
    sim = LorentzSimilarity(0.8, 1.0, 1.0, radius_text=0.9, radius_image=0.9, traversal=True)
    q = lorentz.expmap0(rand(40, 6, seed=20), 0.8).float()
    g = lorentz.expmap0(rand(60, 6, seed=21), 0.8).float()
    positives = torch.randint(0, 60, (40,), generator=torch.Generator().manual_seed(0))
    got = recall_at_k(q, g, positives, ks=(1, 5), score=chunk_scorer(sim, "text"), chunk_size=7)
    tq = lorentz.traverse(q, 0.9, 0.8)
    hits1 = hits5 = 0
    for i in range(len(q)):
        d = [float(lorentz.distance(tq[i : i + 1], g[j : j + 1], 0.8)) for j in range(len(g))]
        rank = sum(dj <= d[int(positives[i])] for j, dj in enumerate(d) if j != int(positives[i]))
        hits1, hits5 = hits1 + (rank < 1), hits5 + (rank < 5)
    assert got["R@1"] == pytest.approx(hits1 / len(q))
    assert got["R@5"] == pytest.approx(hits5 / len(q))
    # the unsafe rate too: the top-1 of each query by distance
    unsafe = torch.zeros(60, dtype=torch.bool)
    unsafe[::3] = True
    nearest = lorentz.pairwise_distance(tq, g, 0.8).argmin(1)
    assert unsafe_rate(q, g, unsafe, k=1, score=chunk_scorer(sim, "text")) == pytest.approx(
        float(unsafe[nearest].float().mean())
    )


def test_cosine_scoring_is_the_dot_product_unchanged():
    q, g = F.normalize(rand(8, 5, seed=30).float(), dim=-1), F.normalize(rand(12, 5, seed=31).float(), dim=-1)
    assert chunk_scorer(COSINE, "text") is None  # the metrics keep their own dot product
    torch.testing.assert_close(COSINE.scores(q, g), q @ g.T)


def test_origin_detector_auc_and_detection_rate():
    from saferclip.evaluation.galleries import PairEmbeddings

    sim = LorentzSimilarity(1.0, 1.0, 1.0)
    safe = lorentz.expmap0(F.normalize(rand(100, 4, seed=40), dim=-1) * 0.5, 1.0).float()
    unsafe = lorentz.expmap0(F.normalize(rand(100, 4, seed=41), dim=-1) * 2.0, 1.0).float()
    emb = PairEmbeddings(safe_text=safe, unsafe_text=unsafe, similarity=sim)
    out = origin_detector_metrics(emb)
    assert out["origin_detector_text_auc"] == pytest.approx(1.0)
    assert out["origin_detector_text_detected@5fpr"] == 1.0
    # each unsafe caption's outcome is kept: 100 of 100 detected, whose exact interval is [96.4%, 100%]
    from saferclip.evaluation.intervals import metric_interval, metric_outcomes

    assert out["per_query"]["origin_detector_text_detected@5fpr"] == "1" * 100
    detections = metric_outcomes({"visu": out}, "origin_detector_text")
    assert metric_interval(detections) == (pytest.approx(0.025 ** (1 / 100)), 1.0)
    assert origin_detector_metrics(PairEmbeddings(safe_text=safe, unsafe_text=unsafe)) == {}  # Euclidean: none
    from saferclip.evaluation.metrics import roc_auc

    assert roc_auc(torch.tensor([1.0, 2.0, 1.5, 3.0]), torch.tensor([False, False, True, True])) == pytest.approx(0.75)


def test_origin_detector_on_overlapping_data_against_brute_force():
    """Safe and unsafe distances from the origin that overlap, with exact ties across the two
    sets: the AUC is the share of (safe, unsafe) pairs ordered right, ties counting one half,
    counted pair by pair; the detection rate and false positives at the 95th percentile of the
    safe distances, counted item by item."""
    from saferclip.evaluation.galleries import PairEmbeddings

    c = 1.0
    sim = LorentzSimilarity(c, 1.0, 1.0)
    generator = torch.Generator().manual_seed(3)
    safe_norm = torch.rand(60, generator=generator, dtype=torch.float64) * 1.5 + 0.5  # distances in [0.5, 2.0]
    unsafe_norm = torch.rand(50, generator=generator, dtype=torch.float64) * 1.5 + 1.0  # [1.0, 2.5]
    safe_dir, unsafe_dir = F.normalize(rand(60, 4, seed=42), dim=-1), F.normalize(rand(50, 4, seed=43), dim=-1)
    # a point at distance d from the origin in direction u: space part u sinh(sqrt(c) d) / sqrt(c)
    safe = (safe_dir * torch.sinh(safe_norm[:, None])).float()
    unsafe = (unsafe_dir * torch.sinh(unsafe_norm[:, None])).float()
    unsafe[:6] = safe[10:16]  # six exact ties across the two sets: the same points
    d_safe, d_unsafe = sim.distance_from_origin(safe).double(), sim.distance_from_origin(unsafe).double()
    torch.testing.assert_close(d_safe, safe_norm, rtol=0, atol=1e-5)
    assert torch.equal(d_unsafe[:6], d_safe[10:16])
    pairs = [(s, u) for s in d_safe.tolist() for u in d_unsafe.tolist()]
    brute_auc = sum(1.0 if u > s else 0.5 if u == s else 0.0 for s, u in pairs) / len(pairs)
    assert 0.6 < brute_auc < 0.95  # overlapping: neither chance nor perfect
    # the 95th percentile of the 60 safe distances, interpolated between the two order statistics around it
    ordered = sorted(d_safe.tolist())
    position = 0.95 * (len(ordered) - 1)
    low = int(position)
    threshold = ordered[low] + (position - low) * (ordered[low + 1] - ordered[low])

    emb = PairEmbeddings(safe_text=safe, unsafe_text=unsafe, safe_image=safe, unsafe_image=unsafe, similarity=sim)
    out = origin_detector_metrics(emb)
    for modality in ("text", "image"):
        assert out[f"origin_detector_{modality}_auc"] == pytest.approx(brute_auc, abs=1e-12)
        assert out[f"origin_detector_{modality}_detected@5fpr"] == pytest.approx(
            sum(u > threshold for u in d_unsafe.tolist()) / 50
        )
        assert out[f"origin_detector_{modality}_false_positives"] == pytest.approx(
            sum(s > threshold for s in d_safe.tolist()) / 60
        )


# ---------------------------------------------------------------- the head file
def test_head_file_round_trips_and_refuses_damage(tmp_path):
    sim = LorentzSimilarity(1.2, 0.1, 0.2, radius_text=0.7, radius_image=0.9)
    save_head(tmp_path, sim, {"traversal_percentile": 95})
    loaded, info = load_head(tmp_path)
    assert loaded.traversal and loaded.mode == "safe" and info["traversal_percentile"] == 95
    assert loaded.to_dict() == pytest.approx(sim.to_dict())
    assert load_head(tmp_path, mode="moderation")[0].traversal is False
    data = bytearray((tmp_path / HEAD_TENSORS).read_bytes())
    data[-3] ^= 0xFF
    (tmp_path / HEAD_TENSORS).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_head(tmp_path)
    (tmp_path / HEAD_JSON).unlink()
    with pytest.raises(CheckpointError, match=HEAD_JSON):
        load_head(tmp_path)


# ---------------------------------------------------------------- bad settings
@pytest.mark.parametrize(
    "section, message",
    [
        ({"curvature_range": [-1.0, 2.0]}, "curvature_range"),
        ({"curvature_range": [2.0, 1.0]}, "curvature_range"),
        ({"traversal_percentile": 0}, "traversal_percentile"),
        ({"traversal_percentile": 150}, "traversal_percentile"),
        ({"aperture_k": 2}, "aperture_k"),
        ({"radius": 3}, "unknown keys"),
    ],
)
def test_bad_hyperbolic_settings_are_one_line_errors(section, message):
    import yaml

    from saferclip.app.hydra_utils import CONF_DIR

    method = yaml.safe_load(Path(CONF_DIR, "method", "hysac.yaml").read_text())
    method["hyperbolic"].update(section)
    with pytest.raises(ConfigError, match=message) as error:
        method_config(method)
    assert "\n" not in str(error.value)


def test_method_mix_ups_are_refused():
    import yaml

    from saferclip.app.hydra_utils import CONF_DIR

    hysac = yaml.safe_load(Path(CONF_DIR, "method", "hysac.yaml").read_text())
    with pytest.raises(ConfigError, match="targets must be none"):
        method_config({**hysac, "targets": "paired"})
    with pytest.raises(ConfigError, match="unknown HySAC loss term"):
        method_config({**hysac, "loss": {"weights": {"text_redirection": 1.0}}})
    saferclip = yaml.safe_load(Path(CONF_DIR, "method", "saferclip.yaml").read_text())
    with pytest.raises(ConfigError, match="only method hysac"):
        method_config({**saferclip, "hyperbolic": {"curvature": 1.0}})
    assert set(HYSAC_TERMS) == set(hysac["loss"]["weights"])


def test_a_traversal_asked_of_a_euclidean_model_is_a_one_line_error():
    from saferclip.model.trained import load_model

    with pytest.raises(ConfigError, match="Euclidean") as error:
        load_model("saferclip-micro", None, mode="safe")
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------- train -> export -> load
def lorentz_distances(x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    """``[N, M]`` geodesic distances of points given by their space parts, from the hyperboloid
    <p, p>_L = -1/c: time part sqrt(1/c + |x|^2), d = acosh(-c <x, y>_L) / sqrt(c)."""
    tx, ty = (1 / c + (x * x).sum(-1)).sqrt(), (1 / c + (y * y).sum(-1)).sqrt()
    inner = x @ y.T - tx[:, None] * ty[None, :]
    return torch.acosh((-c * inner).clamp_min(1.0)) / c**0.5


def traversed(x: torch.Tensor, radius: float, c: float) -> torch.Tensor:
    """The safe mode's query: a point farther than ``radius`` from the origin moved along its ray
    to that distance (the space part of a point at distance r in direction u is u sinh(sqrt(c) r) / sqrt(c))."""
    norm = x.norm(dim=-1, keepdim=True)
    far = torch.asinh(c**0.5 * norm) / c**0.5 > radius
    return torch.where(far, x / norm * math.sinh(c**0.5 * radius) / c**0.5, x)


@pytest.fixture(scope="module")
def hysac_run(tmp_path_factory, toy_world):
    from saferclip.app.engine.fit import train

    tmp = tmp_path_factory.mktemp("hysac")
    torch.set_num_threads(1)
    cfg = compose_train(
        tmp,
        toy_world,
        "method=hysac",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=1",
    )
    result = train(cfg)
    return tmp / "run", result


@pytest.mark.slow
def test_training_builds_no_cache_and_exports_a_loadable_hyperbolic_model(hysac_run, toy_world):
    import open_clip

    import saferclip
    from saferclip.data.splits import load_split
    from saferclip.evaluation.retrieval import embed_visu, visu_metrics
    from saferclip.model.trained import load_trained_model

    run, result = hysac_run
    assert not (run.parent / "cache").exists()  # HySAC builds no frozen cache, no neighbours
    (radii,) = read_radii_records(run)  # measured on the kept checkpoint, named with it
    assert radii["percentile"] == 95 and radii["text"] > 0 and radii["image"] > 0
    assert radii["checkpoint"] == "checkpoints/epoch00.ckpt" and radii["epoch"] == 0 and radii["global_step"] == 3
    export = Path(result["export"])
    safe = saferclip.load_model(export)
    assert safe.mode == "safe"
    from_checkpoint = load_trained_model(run)
    # the towers load in bare open_clip and embed exactly as the trained checkpoint's towers
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{export}")
    model.eval()
    tokens = open_clip.get_tokenizer(f"local-dir:{export}")(["a red circle", "a blue square on grass"])
    assert torch.equal(tokens, from_checkpoint.tokenizer(["a red circle", "a blue square on grass"]))
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        bare_text, bare_image = model.encode_text(tokens), model.encode_image(pixels)
        torch.testing.assert_close(bare_text, from_checkpoint.model.encode_text(tokens), rtol=0, atol=1e-5)
        torch.testing.assert_close(bare_image, from_checkpoint.model.encode_image(pixels), rtol=0, atol=1e-5)
        # lifted by the exported head, the bare towers' outputs are the safe model's embeddings
        torch.testing.assert_close(
            safe.geometry.embed(bare_text, "text"),
            safe.encode_text(["a red circle", "a blue square on grass"]),
            rtol=0,
            atol=1e-5,
        )
    assert from_checkpoint.similarity.to_dict() == pytest.approx(safe.geometry.to_dict())
    captions = ["a red circle", "a blue square on grass"]
    torch.testing.assert_close(
        safe.encode_text(captions),
        safe.geometry.embed(from_checkpoint.model.encode_text(from_checkpoint.tokenizer(captions)), "text"),
    )
    x = safe.encode_text(captions)
    torch.testing.assert_close(safe.traverse(x, "text"), from_checkpoint.similarity.traverse(x, "text"))

    # the same metrics from the export and from the checkpoint
    from saferclip.app.hydra_utils import to_container

    data = to_container(compose_train(run.parent, toy_world).data)
    test = load_split(data, "test")
    a = visu_metrics(embed_visu(safe.bundle, test, batch_size=64))
    b = visu_metrics(embed_visu(from_checkpoint, test, batch_size=64))
    for key in ("U2V_R@1", "S2V_R@1", "U2VG_unsafe@1", "U2G_R@1"):
        assert a[key] == pytest.approx(b[key], abs=1e-6), key
    moderation = saferclip.load_model(export, mode="moderation")
    assert moderation.mode == "moderation"


# ---------------------------------------------------------------- safe radii belong to a checkpoint
@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory, toy_world):
    """A HySAC run of 2 epochs whose kept ("best") checkpoint is epoch 0 (the checkpoint
    callback told to keep the lowest epoch), so last.ckpt (epoch 1) holds other weights."""
    from saferclip.app.engine.fit import train

    tmp = tmp_path_factory.mktemp("hysac2")
    torch.set_num_threads(1)
    cfg = compose_train(
        tmp,
        toy_world,
        "method=hysac",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "callbacks.model_checkpoint.monitor=epoch",
        "callbacks.model_checkpoint.mode=min",
    )
    result = train(cfg)
    return tmp / "run", result, cfg


def radius_by_hand(bundle, captions, log_scale, percentile):
    """The text safe radius from the closed form d(0, expmap0(v)) = |v|: the percentile of
    |alpha f(S)| over the safe training captions (f: the raw text tower, alpha <= 1 the scale)."""
    with torch.no_grad():
        features = bundle.model.encode_text(bundle.tokenizer(captions), normalize=False)
    return float(torch.quantile((features * min(math.exp(log_scale), 1.0)).norm(dim=-1), percentile / 100))


@pytest.mark.slow
def test_last_and_best_checkpoints_each_get_their_own_safe_radii(two_epochs, tmp_path, caplog):
    from saferclip.app.hydra_utils import to_container
    from saferclip.data.splits import load_split
    from saferclip.export.run import export_checkpoint
    from saferclip.model.checkpoints import CHECKSUM_KEY, load_torch_checkpoint
    from saferclip.model.trained import load_model

    run, result, cfg = two_epochs
    best, last = Path(result["best_checkpoint"]), run / "checkpoints" / "last.ckpt"
    ckpt_best, ckpt_last = load_torch_checkpoint(best), load_torch_checkpoint(last)
    assert best.name == "epoch00.ckpt" and ckpt_last["epoch"] == 1
    assert ckpt_best[CHECKSUM_KEY] != ckpt_last[CHECKSUM_KEY]
    # training recorded the kept checkpoint's radii, named by its file, epoch, step and weights
    (recorded,) = read_radii_records(run)
    assert (recorded["checkpoint"], recorded["epoch"], recorded["global_step"]) == ("checkpoints/epoch00.ckpt", 0, 2)
    assert recorded["checksum"] == ckpt_best[CHECKSUM_KEY]
    head, info = load_head(result["export"])
    assert info["safe_radii"]["epoch"] == 0 and info["safe_radii"]["checksum"] == ckpt_best[CHECKSUM_KEY]
    assert info["traversal_percentile"] == 95 and head.radius_text == pytest.approx(recorded["text"])

    # last.ckpt: its own radii, measured (one warning line naming the file) and recorded beside the best's
    with caplog.at_level("WARNING"):
        from_last = load_model(None, last)
    assert any("safe_radii.json" in r.getMessage() and "last.ckpt" in r.getMessage() for r in caplog.records)
    own = from_last.provenance["safe_radii"]
    assert (own["checkpoint"], own["epoch"], own["global_step"], own["checksum"]) == (
        "checkpoints/last.ckpt",
        1,
        4,
        ckpt_last[CHECKSUM_KEY],
    )
    captions = load_split(to_container(cfg.data), "train").safe_captions
    expected = radius_by_hand(from_last, captions, float(ckpt_last["state_dict"]["head.log_text_scale"]), 95)
    assert from_last.similarity.radius_text == pytest.approx(expected, rel=1e-4)
    assert from_last.similarity.radius_text != pytest.approx(recorded["text"], rel=1e-6)
    assert from_last.similarity.mode == "safe"
    assert {r["checkpoint"] for r in read_radii_records(run)} == {"checkpoints/epoch00.ckpt", "checkpoints/last.ckpt"}
    # the best checkpoint still reads its own, unchanged, and nothing is measured twice
    caplog.clear()
    with caplog.at_level("WARNING"):
        from_best = load_model(None, best, mode="safe")
        assert load_model(None, last).similarity == from_last.similarity
    assert not [r for r in caplog.records if r.name.startswith("saferclip")]
    assert from_best.similarity.radius_text == pytest.approx(recorded["text"])
    # an export of last.ckpt carries last.ckpt's radii and says which epoch they come from
    head_last, info_last = load_head(export_checkpoint(last, tmp_path / "last_export"))
    assert info_last["safe_radii"]["measured_on"] == "checkpoints/last.ckpt" and info_last["safe_radii"]["epoch"] == 1
    assert head_last.radius_text == pytest.approx(own["text"]) and head_last.curvature == pytest.approx(
        from_last.similarity.curvature
    )


@pytest.mark.slow
def test_a_checkpoint_without_its_radii_outside_its_run_is_one_line(two_epochs, tmp_path, caplog):
    import shutil

    from saferclip.export.run import export_checkpoint
    from saferclip.model.trained import load_model

    run, _, _ = two_epochs
    alone = tmp_path / "alone.ckpt"
    shutil.copy(run / "checkpoints" / "last.ckpt", alone)
    # no mode asked: moderation, said in one warning line naming the file
    with caplog.at_level("WARNING"):
        assert load_model(None, alone).similarity.mode == "moderation"
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "saferclip.model.trained"]
    assert "alone.ckpt" in warning and "moderation" in warning and "\n" not in warning
    # safe mode asked: refused, naming the file, why, and what to do
    with pytest.raises(ConfigError) as error:
        load_model(None, alone, mode="safe")
    message = str(error.value)
    assert "\n" not in message and str(alone) in message and "not inside a run folder" in message
    assert "safe_radii.json" in message and "mode=moderation" in message
    assert load_model(None, alone, mode="moderation").similarity.mode == "moderation"
    with pytest.raises(ConfigError, match="safe radii of the weights it exports") as error:
        export_checkpoint(alone, tmp_path / "export")
    assert "\n" not in str(error.value) and "alone.ckpt" in str(error.value)


@pytest.mark.slow
def test_radii_recorded_before_they_named_a_checkpoint_are_measured_again(two_epochs, tmp_path, caplog):
    import shutil

    from saferclip.model.trained import load_model

    run, result, _ = two_epochs
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    # version 1: one pair of radii for the whole run folder, whichever checkpoint it belonged to
    (copy / SAFE_RADII_FILE).write_text(json.dumps({"text": 9.0, "image": 9.0, "percentile": 95.0, "split": "train"}))
    with caplog.at_level("WARNING"):
        bundle = load_model(None, copy / "checkpoints" / "epoch00.ckpt")
    assert any("before they were recorded per checkpoint" in r.getMessage() for r in caplog.records)
    assert bundle.similarity.radius_text != 9.0
    assert bundle.similarity.radius_text == pytest.approx(read_radii_records(run)[0]["text"])
    assert json.loads((copy / SAFE_RADII_FILE).read_text())["format"] == RADII_FORMAT
    # a record edited since it was written: dropped with a warning, measured again
    content = json.loads((copy / SAFE_RADII_FILE).read_text())
    content["records"][0]["text"] = 9.0
    (copy / SAFE_RADII_FILE).write_text(json.dumps(content))
    caplog.clear()
    with caplog.at_level("WARNING"):
        again = load_model(None, copy / "checkpoints" / "epoch00.ckpt")
    assert any("checksum mismatch" in r.getMessage() and "safe_radii.json" in r.getMessage() for r in caplog.records)
    assert again.similarity.radius_text == pytest.approx(read_radii_records(run)[0]["text"])


@pytest.mark.slow
def test_a_hysac_checkpoint_from_before_the_head_had_its_optimizer_group_is_not_resumed(hysac_run, toy_world, tmp_path):
    from saferclip.app.engine.fit import check_resume_checkpoint
    from saferclip.model.checkpoints import load_torch_checkpoint

    run, _ = hysac_run
    ckpt = load_torch_checkpoint(run / "checkpoints" / "last.ckpt")
    cfg = compose_train(tmp_path, toy_world, "method=hysac")
    assert check_resume_checkpoint(cfg, str(run / "checkpoints" / "last.ckpt")) == 3  # today's: two groups, resumable
    groups = ckpt["optimizer_states"][0]["param_groups"]
    merged = {**groups[0], "params": [p for g in groups for p in g["params"]]}
    ckpt["optimizer_states"][0]["param_groups"] = [merged]  # one group for all, as before
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    with pytest.raises(ConfigError, match="before HySAC's head got its own optimizer group") as error:
        check_resume_checkpoint(cfg, str(old))
    assert "\n" not in str(error.value) and "old.ckpt" in str(error.value)


@pytest.mark.slow
def test_every_head_parameter_moves_in_a_micro_run(hysac_run):
    from saferclip.model.checkpoints import load_torch_checkpoint

    run, _ = hysac_run
    ckpt = load_torch_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 3
    from saferclip.model.build import build_clip

    dim = int(build_clip("saferclip-micro", None).model_cfg["embed_dim"])
    start = HyperbolicHead(
        dim, HyperbolicConfig.from_mapping(ckpt["hyper_parameters"]["method"]["hyperbolic"])
    ).state_dict()
    for name in ("log_logit_scale", "log_curvature", "log_text_scale", "log_image_scale"):
        learnt = float(ckpt["state_dict"][f"head.{name}"])
        # AdamW's first steps move a parameter by about the learning rate (1e-4) each
        assert abs(learnt - float(start[name])) > 1e-4, name


@pytest.mark.slow
def test_evaluation_reports_both_modes_and_no_setting_b(hysac_run, toy_world, tmp_path):
    from saferclip.app.hydra_utils import to_container
    from saferclip.evaluation.headline import NOT_APPLICABLE, headline_table
    from saferclip.evaluation.runner import evaluate_models

    run, result = hysac_run
    data = to_container(compose_train(tmp_path, toy_world).data)
    models = {
        "original": {"arch": "saferclip-micro", "pretrained": None},
        "hysac_safe": {"pretrained": result["export"], "mode": "safe"},
        "hysac_moderation": {"pretrained": result["export"], "mode": "moderation"},
        # the radii measured anew at the preset's percentile on the same training split
        "hysac_p95": {"pretrained": result["export"], "mode": "safe", "traversal_percentile": 95},
        "hysac_p10": {"pretrained": result["export"], "mode": "safe", "traversal_percentile": 10},
    }
    out = evaluate_models(models, data, suites=["visu", "nsfw_caps"], batch_size=64)
    safe, moderation = out["results"]["hysac_safe"]["visu"], out["results"]["hysac_moderation"]["visu"]
    p95, p10 = out["results"]["hysac_p95"]["visu"], out["results"]["hysac_p10"]["visu"]
    for key in ("U2V_R@1", "U2VG_unsafe@1", "G2SU_unsafe@1"):
        assert p95[key] == pytest.approx(safe[key]), key
    # each mode's figures against a brute-force ranking of the same embeddings: moderation
    # without traversal, safe at the export's radii, p10 at the radii measured at the 10th percentile
    import saferclip
    from saferclip.data.splits import load_split
    from saferclip.evaluation.hyperbolic import safe_item_distances
    from saferclip.evaluation.retrieval import embed_visu
    from saferclip.model.hyperbolic import safe_radii

    model = saferclip.load_model(result["export"], mode="moderation")
    emb = embed_visu(model.bundle, load_split(data, "test"), batch_size=64)
    c = model.geometry.curvature
    (stored,) = read_radii_records(run)  # the kept checkpoint's radii, which the export carries
    r10 = safe_radii(safe_item_distances(model.bundle, load_split(data, "train"), batch_size=64), 10)
    assert r10["text"] < stored["text"] and r10["image"] < stored["image"]
    for figures, radius in ((moderation, None), (safe, stored["text"]), (p10, r10["text"])):
        queries = emb.unsafe_text.double() if radius is None else traversed(emb.unsafe_text.double(), radius, c)
        to_safe, to_unsafe = (
            -lorentz_distances(queries, emb.safe_image.double(), c),
            -lorentz_distances(queries, emb.unsafe_image.double(), c),
        )
        assert figures["U2VG_unsafe@1"] == pytest.approx(
            float((to_unsafe.max(1).values >= to_safe.max(1).values).double().mean())
        ), radius
        assert figures["U2V_R@1"] == pytest.approx(float((to_safe.argmax(1) == emb.safe_owner).double().mean())), radius
    moved = [
        int((lorentz.distance_from_origin(emb.unsafe_text.double(), c) > r).sum())
        for r in (r10["text"], stored["text"])
    ]
    assert moved[0] > moved[1]  # a smaller radius moves more queries
    assert "U2VG_ref_unsafe@1" not in safe and "has no meaning" in safe["skipped"]["_ref"]
    assert "origin_detector_text_auc" in safe and "U2G_R@1" in moderation
    table = headline_table(out)
    assert NOT_APPLICABLE in table
    with pytest.raises(ConfigError, match="Euclidean"):
        evaluate_models(
            {"original": {"arch": "saferclip-micro", "pretrained": None, "mode": "safe"}}, data, suites=["visu"]
        )


@pytest.mark.slow
def test_hf_export_carries_the_same_head_and_missing_radii_are_measured_again(hysac_run, tmp_path):
    pytest.importorskip(
        "transformers", reason="transformers is not installed: the downstream extra (pip install -e '.[downstream]')"
    )
    import shutil

    from saferclip.export.run import export_checkpoint

    run, result = hysac_run
    out = export_checkpoint(run, tmp_path / "hf", format="hf")
    hf_head, _ = load_head(out)
    open_clip_head, _ = load_head(result["export"])
    assert hf_head == open_clip_head
    # a run whose safe radii were deleted: the export measures them again, to the same numbers
    copy = tmp_path / "run_copy"
    shutil.copytree(run, copy)
    (copy / SAFE_RADII_FILE).unlink()
    again, info = load_head(export_checkpoint(copy, tmp_path / "remeasured"))
    assert again == open_clip_head
    assert info["safe_radii"]["measured_on"] == "checkpoints/epoch00.ckpt" and read_radii_records(copy)[0]["epoch"] == 0


def test_the_traversal_sweep_is_a_curve_in_percentile_order():
    from saferclip.evaluation.figures import sweep_curves

    points = [
        {"name": "hysac_p90", "unsafe_a": 0.2, "u2v": 0.6},
        {"name": "hysac_p50", "unsafe_a": 0.0, "u2v": 0.2},
        {"name": "hysac_p50", "unsafe_a": 0.1, "u2v": 0.4},  # a second seed: averaged
        {"name": "hysac_safe", "unsafe_a": 0.1, "u2v": 0.5},
        {"name": "saferclip", "unsafe_a": 0.03, "u2v": 0.8},
    ]
    curves = sweep_curves(points, "u2v")
    assert list(curves) == ["hysac"]
    assert curves["hysac"] == [pytest.approx((5.0, 30.0)), pytest.approx((20.0, 60.0))]
