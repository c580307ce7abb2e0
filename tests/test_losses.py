"""Loss terms on hand-checkable tensors, InfoNCE against references, distributed equivalence."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from saferclip.training.contrastive import gather_with_grad, infonce
from saferclip.training.losses import (
    INPUT_NAMES,
    TERM_INPUTS,
    TERM_NAMES,
    LossConfig,
    LossInputs,
    LossWeights,
    SaferClipLoss,
    cosine_distance,
    relative_redirection,
)

LN2 = math.log(2.0)


def unit(*idx: int, dim: int = 4) -> torch.Tensor:
    """Rows of standard basis vectors: unit(0, 1) -> [[1,0,0,0],[0,1,0,0]]."""
    return torch.eye(dim)[list(idx)]


def rand_unit(*shape: int, seed: int = 0, requires_grad: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(*shape, generator=g), dim=-1)
    return x.requires_grad_(requires_grad)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# --- cosine_distance -------------------------------------------------------------------------


def test_cosine_distance_on_orthogonal_and_equal_vectors():
    a = unit(0, 1, 2)
    assert cosine_distance(a, unit(0, 1, 2)).item() == 0.0
    assert cosine_distance(a, unit(1, 2, 3)).item() == 1.0  # orthogonal: 1 - 0
    assert cosine_distance(a, -unit(0, 1, 2)).item() == 2.0
    # mixed batch: distances 0, 1, 2 -> mean 1
    b = torch.stack([unit(0)[0], unit(3)[0], -unit(2)[0]])
    assert cosine_distance(a, b).item() == pytest.approx(1.0)


def test_cosine_distance_sample_weights_give_weighted_mean():
    a = unit(0, 1, 2)
    b = torch.stack([unit(0)[0], unit(3)[0], -unit(2)[0]])  # distances 0, 1, 2
    w = torch.tensor([1.0, 3.0, 0.0])
    assert cosine_distance(a, b, weights=w).item() == pytest.approx(3 / 4)
    # all-zero weights: the batch contributes 0, not NaN
    assert cosine_distance(a, b, weights=torch.zeros(3)).item() == 0.0


def test_cosine_distance_topk_targets_weighted_sum_of_distances():
    a = unit(0, 1)
    targets = torch.stack([unit(0, 1), unit(3, 3), -unit(0, 1)], dim=1)  # [B=2, k=3, D]; dists 0, 1, 2
    w = torch.tensor([[0.5, 0.25, 0.25], [0.0, 0.0, 1.0]])
    # row 0: 0.5*0 + 0.25*1 + 0.25*2 = 0.75; row 1: 2 -> mean 1.375
    assert cosine_distance(a, targets, target_weights=w).item() == pytest.approx(1.375)
    # no target weights: uniform over k -> each row (0+1+2)/3 = 1
    assert cosine_distance(a, targets).item() == pytest.approx(1.0)
    # k = 1 is the plain target
    assert cosine_distance(a, targets[:, :1]).item() == cosine_distance(a, targets[:, 0]).item()


def test_cosine_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="does not match"):
        cosine_distance(unit(0, 1), unit(0, 1, 2))
    with pytest.raises(ValueError, match="target_weights"):
        cosine_distance(unit(0, 1), torch.stack([unit(0, 1)] * 3, 1), target_weights=torch.ones(2, 2))


# --- relative_redirection --------------------------------------------------------------------


def test_relative_redirection_known_values():
    anchor = unit(0, 0, 0)
    positive = torch.stack([unit(0)[0], unit(1)[0], unit(1)[0]])  # cos 1, 0, 0
    negative = torch.stack([unit(1)[0], unit(0)[0], unit(2)[0]])  # cos 0, 1, 0
    # margins (neg - pos): -1, +1, 0
    for tau in (1.0, 10.0):
        expected = (softplus(-tau) + softplus(tau) + LN2) / 3
        assert relative_redirection(anchor, positive, negative, tau=tau).item() == pytest.approx(expected, rel=1e-6)
    w = torch.tensor([1.0, 0.0, 1.0])
    assert relative_redirection(anchor, positive, negative, tau=10.0, weights=w).item() == pytest.approx(
        (softplus(-10) + LN2) / 2, rel=1e-6
    )


def test_relative_redirection_topk_positive_uses_weighted_cosine():
    anchor = unit(0)
    positive = torch.stack([unit(0), unit(1)], dim=1)  # cos 1 and 0
    negative = unit(2)  # cos 0
    w = torch.tensor([[0.25, 0.75]])
    # margin = 0 - (0.25*1 + 0.75*0)
    assert relative_redirection(anchor, positive, negative, 2.0, target_weights=w).item() == pytest.approx(
        softplus(-0.5), rel=1e-6
    )


# --- infonce ---------------------------------------------------------------------------------


def reference_infonce(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain symmetric CLIP loss written with explicit log-softmax rows and columns."""
    logits = scale * a @ b.T
    n = len(a)
    diag = torch.arange(n)
    rows = -(logits.log_softmax(dim=1)[diag, diag]).mean()
    cols = -(logits.log_softmax(dim=0)[diag, diag]).mean()
    return (rows + cols) / 2


def test_infonce_matches_plain_reference_and_open_clip():
    a, b = rand_unit(6, 8, seed=1), rand_unit(6, 8, seed=2)
    for scale in (1.0, 100.0):
        ours = infonce(a, b, logit_scale=scale)
        torch.testing.assert_close(ours, reference_infonce(a, b, scale))
        torch.testing.assert_close(ours, ClipLoss()(a, b, torch.tensor(scale)))


def test_infonce_perfectly_aligned_pairs_give_near_zero_loss():
    a = unit(0, 1, 2, 3)
    assert infonce(a, a, logit_scale=100.0).item() < 1e-30
    # scale 1 on orthonormal pairs: each row is log-softmax of (1, 0, 0, 0)
    expected = -math.log(math.e / (math.e + 3))
    assert infonce(a, a, logit_scale=1.0).item() == pytest.approx(expected, rel=1e-6)


def simulated_gather(owner: dict[int, torch.Tensor], rank: int, world: int, stacked: bool = False):
    """What gather_with_grad returns on ``rank``: the global tensor in rank order, with this
    rank's slot being the local tensor itself and the others connected to their owner (as
    sync_grads routes their gradients back)."""

    def gather(x: torch.Tensor) -> torch.Tensor:
        parts = list(owner[id(x)].chunk(world))
        parts[rank] = x
        return torch.stack(parts) if stacked else torch.cat(parts)

    return gather


@pytest.mark.parametrize("stacked", [False, True], ids=["concat", "lightning-stacked"])
def test_infonce_two_simulated_ranks_average_to_the_global_loss_and_gradient(stacked):
    world, local = 2, 5
    a_global = rand_unit(world * local, 8, seed=3, requires_grad=True)
    b_global = rand_unit(world * local, 8, seed=4, requires_grad=True)

    reference = infonce(a_global, b_global)
    ref_grads = torch.autograd.grad(reference, (a_global, b_global))

    rank_losses = []
    for rank in range(world):
        a_local = a_global[rank * local : (rank + 1) * local]
        b_local = b_global[rank * local : (rank + 1) * local]
        gather = simulated_gather({id(a_local): a_global, id(b_local): b_global}, rank, world, stacked)
        rank_losses.append(infonce(a_local, b_local, gather=gather, rank=rank))
    # DDP averages gradients over ranks: the effective objective is the mean of the rank losses.
    averaged = torch.stack(rank_losses).mean()
    grads = torch.autograd.grad(averaged, (a_global, b_global))

    torch.testing.assert_close(averaged, reference)
    torch.testing.assert_close(grads[0], ref_grads[0])
    torch.testing.assert_close(grads[1], ref_grads[1])
    # and the labels really are offset: rank 1 evaluated alone as rank 0 gives another loss
    a1, b1 = a_global[local:], b_global[local:]
    wrong = infonce(a1, b1, gather=simulated_gather({id(a1): a_global, id(b1): b_global}, 1, world), rank=0)
    assert not torch.allclose(wrong, rank_losses[1])


def test_infonce_rejects_bad_gather_and_rank():
    a = rand_unit(4, 8)
    with pytest.raises(ValueError, match="same local batch size"):
        infonce(a, a, gather=lambda x: torch.cat([x, x[:1]]))
    with pytest.raises(ValueError, match="outside the gathered world"):
        infonce(a, a, gather=lambda x: torch.cat([x, x]), rank=2)


def test_gather_with_grad_is_identity_without_distributed():
    x = rand_unit(3, 4)
    assert gather_with_grad(x) is x


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        a_global, b_global = rand_unit(world * 3, 8, seed=5), rand_unit(world * 3, 8, seed=6)
        a = a_global[rank * 3 : (rank + 1) * 3].clone().requires_grad_(True)
        b = b_global[rank * 3 : (rank + 1) * 3].clone().requires_grad_(True)
        ours = infonce(a, b, gather=gather_with_grad)
        grads = torch.autograd.grad(ours, (a, b))
        a2, b2 = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
        theirs = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)(a2, b2, 100.0)
        their_grads = torch.autograd.grad(theirs, (a2, b2))
        result = {"loss": ours, "grads": grads, "open_clip": theirs, "open_clip_grads": their_grads}
        torch.save(result, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_infonce_real_two_process_gloo_matches_single_process(tmp_path):
    """End to end through torch.distributed: per-rank grads, averaged as DDP does, equal the
    single-process gradient on the global batch (and open_clip's local-loss ClipLoss)."""
    import torch.multiprocessing as mp

    world = 2
    mp.spawn(_ddp_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(world)]

    a_global = rand_unit(world * 3, 8, seed=5, requires_grad=True)
    b_global = rand_unit(world * 3, 8, seed=6, requires_grad=True)
    reference = infonce(a_global, b_global)
    ref_a, ref_b = torch.autograd.grad(reference, (a_global, b_global))

    torch.testing.assert_close(torch.stack([r["loss"] for r in results]).mean(), reference)
    # DDP divides the all-reduced gradient by the world size
    torch.testing.assert_close(torch.cat([r["grads"][0] for r in results]) / world, ref_a)
    torch.testing.assert_close(torch.cat([r["grads"][1] for r in results]) / world, ref_b)
    for r in results:
        torch.testing.assert_close(r["loss"], r["open_clip"])
        torch.testing.assert_close(r["grads"][0], r["open_clip_grads"][0])


# --- SaferClipLoss ---------------------------------------------------------------------------


def all_ones_config(**options) -> LossConfig:
    return LossConfig(weights=LossWeights(**{t: 1.0 for t in TERM_NAMES}), **options)


def full_inputs(batch: int = 4, dim: int = 8, k: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    x = {}
    for i, name in enumerate(("safe_text", "unsafe_text", "safe_image", "unsafe_image", "target_text", "target_image")):
        x[name] = rand_unit(batch, dim, seed=seed + i, requires_grad=True)
    for i, name in enumerate(("frozen_safe_text", "frozen_unsafe_text", "frozen_safe_image", "frozen_unsafe_image")):
        x[name] = rand_unit(batch, dim, seed=seed + 10 + i)
    shape = (batch, dim) if k is None else (batch, k, dim)
    x["frozen_target_text"] = rand_unit(*shape, seed=seed + 20)
    x["frozen_target_image"] = rand_unit(*shape, seed=seed + 21)
    if k is not None:
        x["target_weights"] = torch.softmax(torch.randn(batch, k, generator=torch.Generator().manual_seed(seed)), -1)
    x["pair_weight"] = torch.rand(batch, generator=torch.Generator().manual_seed(seed + 1))
    return x


def test_term_table_is_complete_and_names_are_exact():
    assert TERM_NAMES[:8] == (
        "text_preservation",
        "text_redirection",
        "image_preservation",
        "image_redirection",
        "xmodal_text_preservation",
        "xmodal_text_redirection",
        "xmodal_image_preservation",
        "xmodal_image_redirection",
    )
    assert set(TERM_INPUTS) == set(TERM_NAMES) == {f for f in LossWeights().as_dict()}
    assert all(set(v) <= set(INPUT_NAMES) for v in TERM_INPUTS.values())
    assert set(LossInputs().__dataclass_fields__) == set(INPUT_NAMES)


# Independent references: every term written out sample by sample, in float64, from its
# formula (docs/METHOD.md, "The loss terms"), without the module's functions.
def ref_mean(per_sample: list[float], pair_weight: torch.Tensor | None) -> float:
    if pair_weight is None:
        return sum(per_sample) / len(per_sample)
    w = pair_weight.double().tolist()
    return sum(wi * d for wi, d in zip(w, per_sample)) / sum(w)


def ref_target_cosines(anchor: torch.Tensor, target: torch.Tensor, target_weights: torch.Tensor | None) -> list[float]:
    """cos(anchor_i, target_i), or for top-k targets sum_j w_ij cos(anchor_i, target_ij) (w = 1/k when none)."""
    a, t = anchor.detach().double(), target.detach().double()
    if t.dim() == 2:
        return [float(a[i] @ t[i]) for i in range(len(a))]
    k = t.shape[1]
    w = [[1.0 / k] * k for _ in range(len(a))] if target_weights is None else target_weights.double().tolist()
    return [sum(w[i][j] * float(a[i] @ t[i, j]) for j in range(k)) for i in range(len(a))]


def ref_distance(a, b, pair_weight=None, target_weights=None) -> float:
    """1 - cos(a_i, b_i), or sum_j w_ij (1 - cos(a_i, b_ij)) (the weights as given, not renormalised)."""
    if b.dim() == 2:
        per = [1.0 - c for c in ref_target_cosines(a, b, None)]
    else:
        k = b.shape[1]
        w = [[1.0 / k] * k for _ in range(len(a))] if target_weights is None else target_weights.double().tolist()
        cos = [[float(a.detach().double()[i] @ b.detach().double()[i, j]) for j in range(k)] for i in range(len(a))]
        per = [sum(w[i][j] * (1.0 - cos[i][j]) for j in range(k)) for i in range(len(a))]
    return ref_mean(per, pair_weight)


def ref_relative(anchor, positive, negative, tau, pair_weight=None, target_weights=None) -> float:
    """softplus(tau (cos(anchor, negative) - cos(anchor, positive))) per sample."""
    neg = ref_target_cosines(anchor, negative, None)
    pos = ref_target_cosines(anchor, positive, target_weights)
    return ref_mean([softplus(tau * (n - p)) for n, p in zip(neg, pos)], pair_weight)


def ref_centroid(target: torch.Tensor, target_weights: torch.Tensor | None) -> torch.Tensor:
    """A top-k target's InfoNCE partner: the weighted sum of its k rows, scaled to unit length."""
    if target.dim() == 2:
        return target.detach().double()
    rows = [
        sum(float(w) * t for w, t in zip(weights, targets))
        for weights, targets in zip(target_weights.double(), target.detach().double())
    ]
    return torch.stack([r / r.norm() for r in rows])


def ref_nce(a: torch.Tensor, b: torch.Tensor, scale: float = 100.0) -> float:
    return float(reference_infonce(a.detach().double(), b.detach().double(), scale))


def reference_terms(x: dict[str, torch.Tensor], tau: float) -> dict[str, float]:
    pw, tw = x["pair_weight"], x.get("target_weights")
    return {
        "text_preservation": ref_distance(x["safe_text"], x["frozen_safe_text"]),
        "text_redirection": ref_distance(x["unsafe_text"], x["frozen_target_text"], pw, tw),
        "image_preservation": ref_distance(x["safe_image"], x["frozen_safe_image"]),
        "image_redirection": ref_distance(x["unsafe_image"], x["frozen_target_image"], pw, tw),
        "xmodal_text_preservation": ref_nce(x["safe_text"], x["frozen_safe_image"]),
        "xmodal_text_redirection": ref_nce(x["unsafe_text"], ref_centroid(x["frozen_target_image"], tw)),
        "xmodal_image_preservation": ref_nce(x["frozen_safe_text"], x["safe_image"]),
        "xmodal_image_redirection": ref_nce(ref_centroid(x["frozen_target_text"], tw), x["unsafe_image"]),
        "relative_image": ref_relative(
            x["unsafe_image"], x["frozen_target_text"], x["frozen_unsafe_text"], tau, pw, tw
        ),
        "relative_text": ref_relative(
            x["unsafe_text"], x["frozen_target_image"], x["frozen_unsafe_image"], tau, pw, tw
        ),
        "live_relative_text": ref_relative(x["unsafe_text"], x["target_image"], x["unsafe_image"], tau, pw, tw),
        "live_relative_image": ref_relative(x["unsafe_image"], x["target_text"], x["unsafe_text"], tau, pw, tw),
    }


def test_each_term_equals_its_formula():
    x = full_inputs()
    loss = SaferClipLoss(all_ones_config(tau=10.0))
    total, terms = loss(**x)
    assert list(terms) == list(TERM_NAMES)
    expected = reference_terms(x, tau=10.0)
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert total.item() == pytest.approx(sum(expected.values()), rel=1e-5)


def test_relative_image_term_on_orthogonal_vectors():
    # I(G) = e0, T0(U) = e0 (cos 1), T0(S_n) = e1 (cos 0): softplus(tau * 1)
    cfg = LossConfig(weights=LossWeights(relative_image=1.0), tau=10.0)
    total, terms = SaferClipLoss(cfg)(unsafe_image=unit(0), frozen_unsafe_text=unit(0), frozen_target_text=unit(1))
    assert terms["relative_image"].item() == pytest.approx(softplus(10.0), rel=1e-6)
    # redirected: I(G) = e1 -> softplus(-tau)
    _, terms = SaferClipLoss(cfg)(unsafe_image=unit(1), frozen_unsafe_text=unit(0), frozen_target_text=unit(1))
    assert terms["relative_image"].item() == pytest.approx(softplus(-10.0), rel=1e-4)


def test_topk_targets_in_the_module():
    """Top-k targets [B, k, D] with their weights: the cosine terms take the weighted sum over
    the k targets, InfoNCE the renormalised weighted centroid, the relative and live terms the
    weighted positive cosine, every one against its reference."""
    x = full_inputs(k=3)
    x["target_text"] = rand_unit(4, 3, 8, seed=30, requires_grad=True)  # live top-k targets
    x["target_image"] = rand_unit(4, 3, 8, seed=31, requires_grad=True)
    for weights in ("softmax", "not summing to 1"):
        if weights == "not summing to 1":
            x["target_weights"] = torch.tensor([[2.0, 1.0, 0.5], [0.0, 0.5, 0.25], [1.0, 1.0, 1.0], [0.1, 0.0, 3.0]])
        _, terms = SaferClipLoss(all_ones_config(tau=10.0))(**x)
        expected = reference_terms(x, tau=10.0)
        for name, value in expected.items():
            assert terms[name].item() == pytest.approx(value, rel=1e-5, abs=1e-6), (weights, name)
    # the centroid is the weighted sum made unit, not the weighted sum: the two give other losses
    tw = x["target_weights"]
    raw_sum = torch.einsum("bk,bkd->bd", tw, x["frozen_target_image"]).double()
    assert raw_sum.norm(dim=1).sub(1).abs().max() > 0.1
    assert abs(ref_nce(x["unsafe_text"], raw_sum) - terms["xmodal_text_redirection"].item()) > 1e-3


def test_target_weights_that_do_not_sum_to_one_are_taken_as_given():
    a = unit(0, 1)
    # distances 0, 1, 2 to (+self, an orthogonal vector, -self) in each row
    targets = torch.stack([unit(0, 1), unit(3, 3), -unit(0, 1)], dim=1)
    w = torch.tensor([[2.0, 1.0, 0.5], [0.0, 0.5, 0.25]])
    # row 0: 2*0 + 1*1 + 0.5*2 = 2; row 1: 0*0 + 0.5*1 + 0.25*2 = 1
    assert cosine_distance(a, targets, target_weights=w).item() == pytest.approx(1.5)
    assert cosine_distance(a, targets, weights=torch.tensor([1.0, 3.0]), target_weights=w).item() == pytest.approx(
        (2 * 1 + 1 * 3) / 4
    )
    # the relative term: positive cosine 2*1 + 1*0 = 2 against a negative at cos 1: margin -1
    positive = torch.stack([unit(0), unit(1)], dim=1)
    assert relative_redirection(
        unit(0), positive, unit(0), 3.0, target_weights=torch.tensor([[2.0, 1.0]])
    ).item() == pytest.approx(softplus(-3.0), rel=1e-6)


def test_missing_inputs_drop_terms_cleanly():
    loss = SaferClipLoss(all_ones_config())
    text_only = {"safe_text", "unsafe_text", "frozen_safe_text", "frozen_unsafe_text", "frozen_target_text"}
    assert loss.active_terms(text_only) == ["text_preservation", "text_redirection"]
    safe_images = text_only | {"safe_image", "frozen_safe_image"}
    assert loss.active_terms(safe_images) == [
        "text_preservation",
        "text_redirection",
        "image_preservation",
        "xmodal_text_preservation",
        "xmodal_image_preservation",
    ]
    x = full_inputs()
    total, terms = loss(**{k: v for k, v in x.items() if k in text_only})
    assert list(terms) == ["text_preservation", "text_redirection"]
    torch.testing.assert_close(total, terms["text_preservation"] + terms["text_redirection"])
    # None is the same as absent
    _, terms_none = loss(**{k: (v if k in text_only else None) for k, v in x.items()})
    assert list(terms_none) == list(terms)
    with pytest.raises(ValueError, match="unknown loss input"):
        loss.active_terms({"safe_text", "t0_sfe"})
    # only what the active terms use needs encoding
    assert loss.required_inputs(text_only) == {"safe_text", "unsafe_text", "frozen_safe_text", "frozen_target_text"}
    saferclip = preset("saferclip")
    assert {"target_text", "target_image"} <= SaferClipLoss(LossConfig.from_method(saferclip)).required_inputs(
        set(INPUT_NAMES)
    )
    for term in ("live_relative_text", "live_relative_image"):
        saferclip["loss"]["weights"][term] = 0.0
    no_live = SaferClipLoss(LossConfig.from_method(saferclip))
    assert "target_text" not in no_live.required_inputs(set(INPUT_NAMES))


def test_zero_weight_terms_are_not_computed():
    cfg = LossConfig(weights=LossWeights(text_preservation=1.0, xmodal_text_preservation=0.0))
    loss = SaferClipLoss(cfg)
    x = full_inputs()
    _, terms = loss(**x)
    assert list(terms) == ["text_preservation"]
    assert loss.active_terms(set(x)) == ["text_preservation"]


def test_no_active_term_is_a_clear_error():
    loss = SaferClipLoss(LossConfig(weights=LossWeights(image_redirection=1.0)))
    with pytest.raises(ValueError, match="no loss term is active.*image_redirection"):
        loss(safe_text=rand_unit(2, 4), frozen_safe_text=rand_unit(2, 4))
    with pytest.raises(TypeError, match="unexpected keyword argument 't_sfe'"):
        loss(t_sfe=rand_unit(2, 4))


# Safe-CLIP's published weights of its 8 terms (Poppi et al., ECCV 2024)
SAFECLIP_WEIGHTS = (0.1, 0.1, 0.1, 0.2, 0.25, 0.25, 0.25, 0.5)


def preset(name: str) -> dict:
    """A method preset as the app hands it to the library: the YAML file as a dict."""
    import yaml

    from saferclip.locations import CONF_DIR

    return yaml.safe_load((CONF_DIR / "method" / f"{name}.yaml").read_text())


def test_safeclip_preset_normalises_weights_and_divides_by_eight():
    cfg = LossConfig.from_method(preset("safeclip"))
    assert [cfg.weights.as_dict()[t] for t in TERM_NAMES[:8]] == list(SAFECLIP_WEIGHTS)  # the published recipe
    assert cfg.normalize_weights
    eff = cfg.effective_weights()
    assert list(eff) == list(TERM_NAMES[:8])
    total_lambda = sum(SAFECLIP_WEIGHTS)
    for name, lam in zip(TERM_NAMES, SAFECLIP_WEIGHTS):
        assert eff[name] == pytest.approx(lam / total_lambda / 8)
    x = full_inputs()
    total, terms = SaferClipLoss(cfg)(**x)
    assert list(terms) == list(TERM_NAMES[:8])
    expected = sum(lam * terms[n] for n, lam in zip(TERM_NAMES, SAFECLIP_WEIGHTS)) / total_lambda / 8
    torch.testing.assert_close(total, expected)
    # dropping terms for lack of inputs keeps the others' factors (a fixed rescaling)
    text_only = {k: x[k] for k in ("safe_text", "unsafe_text", "frozen_safe_text", "frozen_target_text")}
    total, terms = SaferClipLoss(cfg)(**text_only)
    expected = sum(eff[n] * terms[n] for n in ("text_preservation", "text_redirection"))
    torch.testing.assert_close(total, expected)


def test_config_validation_and_mapping():
    cfg = LossConfig(weights={"relative_text": 0.5}, tau=10.0)
    assert cfg.effective_weights() == {"relative_text": 0.5}
    with pytest.raises(ValueError, match="unknown loss term.*relative_txt"):
        LossConfig(weights={"relative_txt": 0.5})
    with pytest.raises(ValueError, match=">= 0"):
        LossConfig(weights=LossWeights(text_preservation=-1.0))
    with pytest.raises(ValueError, match="tau"):
        LossConfig(tau=0.0)


def test_gradients_reach_only_trainable_inputs_and_are_finite():
    x = full_inputs(k=2)
    # a frozen target that (wrongly) carries a graph must still not be trained
    x["frozen_safe_text"] = x["frozen_safe_text"].clone().requires_grad_(True)
    total, _ = SaferClipLoss(all_ones_config(tau=10.0))(**x)
    total.backward()
    for name in ("safe_text", "unsafe_text", "safe_image", "unsafe_image", "target_text", "target_image"):
        assert x[name].grad is not None and torch.isfinite(x[name].grad).all() and x[name].grad.abs().sum() > 0, name
    assert x["frozen_safe_text"].grad is None


def test_low_precision_inputs_are_computed_in_float32():
    x = full_inputs()
    reference, ref_terms = SaferClipLoss(all_ones_config())(**x)
    half = {k: v.detach().to(torch.bfloat16) for k, v in x.items()}
    as_float = {k: v.float() for k, v in half.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, terms = SaferClipLoss(all_ones_config())(**half)
    assert total.dtype == torch.float32
    expected, _ = SaferClipLoss(all_ones_config())(**as_float)
    torch.testing.assert_close(total, expected)
    assert abs(total.item() - reference.item()) < 0.1  # bf16 rounding of the inputs only


def test_module_forwards_gather_to_infonce():
    world, local = 2, 3
    t_global = rand_unit(world * local, 8, seed=7, requires_grad=True)
    i0_global = rand_unit(world * local, 8, seed=8)
    cfg = LossConfig(weights=LossWeights(xmodal_text_preservation=1.0))
    reference, _ = SaferClipLoss(cfg)(safe_text=t_global, frozen_safe_image=i0_global)
    losses = []
    for rank in range(world):
        t, i0 = t_global[rank * local : (rank + 1) * local], i0_global[rank * local : (rank + 1) * local]
        # the module detaches/casts frozen inputs before gathering: look them up by value
        owners = {id(t): t_global}

        def gather(v, rank=rank, owners=owners):
            if id(v) in owners:
                parts = list(owners[id(v)].chunk(world))
                parts[rank] = v
                return torch.cat(parts)
            return i0_global

        total, _ = SaferClipLoss(cfg, gather=gather, rank=rank)(safe_text=t, frozen_safe_image=i0)
        # the same through a per-call gather
        per_call, _ = SaferClipLoss(cfg, rank=rank)(safe_text=t, frozen_safe_image=i0, gather=gather)
        torch.testing.assert_close(per_call, total)
        losses.append(total)
    torch.testing.assert_close(torch.stack(losses).mean(), reference)
