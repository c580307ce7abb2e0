"""The analysis library: per-head activations (checked against the modules' own outputs), head
scoring on a model with one head separable by construction, threshold calibration on held-out
data, the null-space measure on a synthetic low-rank change, the detector file's round trip,
and the guard."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from saferclip.analysis import (
    LinearDetector,
    SafetyGuard,
    calibrate_head_detector,
    calibrate_linear,
    head_contributions,
    load_detectors,
    save_detectors,
    score_heads,
    text_activations,
)
from saferclip.analysis.detector import calibrate_knn, fit_direction, stratified_folds
from saferclip.analysis.geometry import (
    mlp_null_space,
    null_space_share,
    top_directions,
    weight_change,
)
from saferclip.analysis.guard import score_inputs
from saferclip.analysis.heads import (
    image_tensor_activations,
    recording,
    tower_blocks,
    tower_shape,
)
from saferclip.analysis.stats import (
    calibrate_threshold,
    probe_accuracy,
    roc_auc,
    silhouette,
)
from saferclip.model.build import build_clip, encode_tokens
from saferclip.model.checkpoints import CheckpointError, save_state_dict
from saferclip.toyworld.captions import TRAIN_FRAMES, TRAIN_OBJ, caption
from saferclip.toyworld.scene import SAFE_OBJECTS, UNSAFE_OBJECTS, random_scene

pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread (tests/conftest.py)


@pytest.fixture(scope="module")
def micro():
    return build_clip("saferclip-micro", init_seed=0)


def captions(objects, n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [caption(random_scene(rng, tuple(objects)), rng, TRAIN_FRAMES, TRAIN_OBJ) for _ in range(n)]


# ----------------------------------------------------------------------------- heads
def _attention_outputs(model, tower: str, run):
    """The real attention output of every block (forward hooks on block.attn), from ``run()``."""
    outs = {}
    hooks = [
        b.attn.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o[0]))
        for i, b in enumerate(tower_blocks(model, tower))
    ]
    try:
        result = run()
    finally:
        for h in hooks:
            h.remove()
    return outs, result


@pytest.mark.parametrize("trimmed", [True, False])
def test_per_head_outputs_sum_to_the_text_attention_output(micro, trimmed):
    model = micro.model
    texts = ["a red circle on a black background with a gun", "a ball.", "there is a blue ring on white next to a cup"]
    tokens = micro.tokenizer(texts)
    encode = (lambda: encode_tokens(model, tokens)) if trimmed else (lambda: model.encode_text(tokens, normalize=True))
    with torch.no_grad(), recording(model, "text", ("heads", "resid")) as rec:
        outs, final = _attention_outputs(model, "text", encode)
        acts = rec.take(final)
    eot = tokens.argmax(-1)
    rows = torch.arange(len(texts))
    blocks = tower_blocks(model, "text")
    assert acts.heads.shape == (3, len(blocks), tower_shape(model, "text").heads, tower_shape(model, "text").head_dim)
    for i, block in enumerate(blocks):
        real = outs[i][rows, eot]
        rebuilt = head_contributions(block.attn, acts.heads[:, i]).sum(1) + block.attn.out_proj.bias
        torch.testing.assert_close(rebuilt, real, atol=1e-5, rtol=1e-4)
    # the hooks do not change what the model computes, trimmed or not
    torch.testing.assert_close(acts.final, model.encode_text(tokens, normalize=True).detach(), atol=1e-5, rtol=1e-4)


def test_per_head_outputs_sum_to_the_image_attention_output(micro):
    model = micro.model
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), recording(model, "image", ("heads",)) as rec:
        outs, final = _attention_outputs(model, "image", lambda: model.encode_image(images, normalize=True))
        acts = rec.take(final)
    for i, block in enumerate(tower_blocks(model, "image")):
        rebuilt = head_contributions(block.attn, acts.heads[:, i]).sum(1) + block.attn.out_proj.bias
        torch.testing.assert_close(rebuilt, outs[i][:, 0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(image_tensor_activations(micro, images).heads, acts.heads)


# ----------------------------------------------------------------------------- head scoring
def _one_token_ids(tokenizer, words) -> set[int]:
    ids = set()
    for w in words:
        row = tokenizer([w])[0]
        inner = row[1 : int(row.argmax())]  # between the start and end-of-text tokens
        ids.update(inner.tolist())
    return ids


@pytest.fixture(scope="module")
def planted():
    """A micro CLIP whose text head 1 reads one residual dimension that only unsafe words write:
    made separable by construction. Head 0 cannot see that dimension."""
    bundle = build_clip("saferclip-micro", init_seed=3)
    model = bundle.model
    safe_ids = _one_token_ids(bundle.tokenizer, captions(SAFE_OBJECTS + (None,), 200, 0))
    unsafe_ids = _one_token_ids(bundle.tokenizer, list(UNSAFE_OBJECTS)) - safe_ids
    attn = model.transformer.resblocks[0].attn
    d, dh = attn.embed_dim, attn.head_dim
    with torch.no_grad():
        model.token_embedding.weight[:, 0] = 0.0
        model.token_embedding.weight[sorted(unsafe_ids), 0] = 6.0
        model.positional_embedding[:, 0] = 0.0
        w_v = attn.in_proj_weight[2 * d :]
        w_v[:, 0] = 0.0
        w_v[dh : 2 * dh, :] = 0.0
        w_v[dh : 2 * dh, 0] = 1.0  # head 1's values: the planted dimension only
        attn.in_proj_weight[dh : 2 * dh] = 0.0  # head 1's queries: none, so it averages every token
        attn.in_proj_bias[dh : 2 * dh] = 0.0
        attn.in_proj_bias[2 * d + dh : 2 * d + 2 * dh] = 0.0
    return bundle


def test_head_scoring_finds_the_head_made_separable_by_construction(planted):
    safe = captions(SAFE_OBJECTS + (None,), 60, 1)
    unsafe = captions(tuple(UNSAFE_OBJECTS), 60, 2)
    acts = text_activations(planted, safe + unsafe)
    y = torch.cat([torch.zeros(60, dtype=torch.bool), torch.ones(60, dtype=torch.bool)])
    scores = score_heads(acts.heads, y, "logistic", folds=4)
    assert scores.best() == (0, 1)
    assert scores.auc[0, 1] == pytest.approx(1.0)
    assert scores.auc[0, 0] < scores.auc[0, 1]
    det, _ = calibrate_head_detector(acts.heads, y, "text", target_fpr=0.1, folds=4)
    assert (det.layer, det.head) == (0, 1)
    # new captions, never seen in calibration: separated as well
    new_safe, new_unsafe = captions(SAFE_OBJECTS, 200, 7), captions(tuple(UNSAFE_OBJECTS), 40, 8)
    s_safe, f_safe = score_inputs(planted, det, new_safe)
    s_unsafe, f_unsafe = score_inputs(planted, det, new_unsafe)
    assert f_unsafe.all()
    assert abs(float(f_safe.float().mean()) - 0.1) < 0.07  # the target false-positive rate, within sampling noise
    assert roc_auc(torch.cat([s_safe, s_unsafe]), torch.cat([torch.zeros(200), torch.ones(40)]).bool()) == 1.0


def test_score_heads_on_synthetic_features_and_directions():
    g = torch.Generator().manual_seed(0)
    n = 300
    y = torch.arange(n) % 2 == 0
    heads = torch.randn(n, 3, 4, 8, generator=g)
    heads[y, 2, 1, 5] += 3.0  # only layer 2, head 1 carries the label
    for method in ("logistic", "fisher", "mean_diff"):
        assert score_heads(heads, y, method, folds=3).best() == (2, 1), method
        w = fit_direction(heads[:, 2, 1], y, method)
        assert w.norm() == pytest.approx(1.0, abs=1e-5) and w.abs().argmax() == 5 and w[5] > 0
    folds = stratified_folds(y, 5, seed=0)
    for k in range(5):
        assert int((y & (folds == k)).sum()) == n // 10  # each class spread evenly


# ----------------------------------------------------------------------------- calibration
def test_threshold_calibration_meets_the_target_on_held_out_data():
    g = torch.Generator().manual_seed(1)
    # the conformal quantile on 1000 safe scores: ~5% of 200k new safe scores above it
    t = calibrate_threshold(torch.randn(1000, generator=g), 0.05)
    fpr = float((torch.randn(200_000, generator=g) > t).float().mean())
    assert abs(fpr - 0.05) < 0.015
    # a fitted direction: the threshold comes from out-of-fold scores, so new data agrees
    d, n = 16, 400
    shift = torch.zeros(d)
    shift[:4] = 1.0
    X = torch.randn(2 * n, d, generator=g)
    y = torch.arange(2 * n) >= n
    X[y] += shift
    for method in ("logistic", "fisher"):
        det = calibrate_linear(X, y, "text", target_fpr=0.05, method=method, folds=5)
        new_safe = torch.randn(100_000, d, generator=g)
        measured = float(det.flags(final=new_safe).float().mean())
        assert abs(measured - 0.05) < 0.025, (method, measured)
    # the k-NN baseline: the same calibration on safe scores
    knn = calibrate_knn(torch.nn.functional.normalize(X, dim=-1), y, "image", k=5, target_fpr=0.1)
    measured = float(
        knn.flags(torch.nn.functional.normalize(torch.randn(20_000, d, generator=g), dim=-1)).float().mean()
    )
    assert abs(measured - 0.1) < 0.04
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        calibrate_threshold(torch.zeros(5), 0.0)


def test_stats_against_brute_force():
    g = torch.Generator().manual_seed(2)
    scores = torch.randint(0, 5, (60,), generator=g).float()  # many ties
    labels = torch.rand(60, generator=g) > 0.5
    pos, neg = scores[labels], scores[~labels]
    brute = ((pos[:, None] > neg[None]).float() + 0.5 * (pos[:, None] == neg[None]).float()).mean()
    assert roc_auc(scores, labels) == pytest.approx(float(brute))
    X = torch.randn(80, 6, generator=g)
    y = torch.arange(80) < 40
    X[y, 0] += 8
    assert probe_accuracy(X, y) == 1.0
    assert silhouette(X, y) > 0.3 > silhouette(torch.randn(80, 6, generator=g), y)


# ----------------------------------------------------------------------------- geometry
def test_null_space_share_on_a_synthetic_low_rank_change():
    g = torch.Generator().manual_seed(3)
    d_in, d_out = 32, 24
    W = torch.randn(d_out, d_in, generator=g)
    basis = torch.linalg.qr(torch.randn(d_in, d_in, generator=g)).Q.T  # orthonormal rows
    changed, untouched = basis[:3], basis[3:]
    delta = torch.randn(d_out, 3, generator=g) @ changed  # rank 3, acting on `changed` only
    vh, r, _ = top_directions(delta, energy=0.999)
    assert r == 3
    unsafe = torch.randn(50, 3, generator=g) @ changed  # inside the change's row space
    safe = torch.randn(50, d_in - 3, generator=g) @ untouched  # in its null space
    out = null_space_share(W, delta, safe, unsafe, energy=0.999)
    assert out["rank"] == 3 and out["chance"] == pytest.approx(3 / d_in)
    assert out["share_unsafe"] == pytest.approx(1.0, abs=1e-4)
    assert out["share_safe"] == pytest.approx(0.0, abs=1e-4)
    assert out["output_change_safe"] == pytest.approx(0.0, abs=1e-4) and out["output_change_unsafe"] > 0.1
    mixed = 0.5 * unsafe + 0.5 * safe[:, :]  # half the energy-ish in each
    assert 0.0 < null_space_share(W, delta, mixed, unsafe, 0.999)["share_safe"] < 1.0
    # no change at all: nothing shares it
    assert null_space_share(W, torch.zeros_like(W), safe, unsafe)["rank"] == 0


def test_weight_change_and_mlp_null_space_on_models(micro):
    original = {k: v.clone() for k, v in micro.model.state_dict().items()}
    tuned = {k: v.clone() for k, v in original.items()}
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    tuned[key] = tuned[key] * 1.1  # a 10% change of one MLP matrix
    change = weight_change(original, tuned)
    c_fc, c_proj = original[key], original["visual.transformer.resblocks.0.mlp.c_proj.weight"]
    expected = 0.1 * c_fc.norm() / torch.sqrt(c_fc.norm() ** 2 + c_proj.norm() ** 2)
    assert change["image"][0]["mlp"] == pytest.approx(float(expected), rel=1e-4)
    assert (
        change["image"][0]["attn"] == 0.0
        and change["text"][0]["mlp"] == 0.0
        and change["other"]["relative_change"] == 0.0
    )
    width = c_fc.shape[1]
    acts = {"mlp_in": torch.randn(10, 1, width), "mlp_hidden": torch.randn(10, 1, 4 * width)}
    rows = mlp_null_space(original, tuned, "image", acts, acts)
    assert [r["matrix"] for r in rows] == ["mlp.c_fc", "mlp.c_proj"]
    assert rows[0]["output_change_safe"] == pytest.approx(0.1, rel=1e-3) and rows[1]["rank"] == 0
    with pytest.raises(ValueError, match="different parameters"):
        weight_change(original, {k: v for k, v in tuned.items() if k != key})


# ----------------------------------------------------------------------------- files and the guard
def _detector(tower: str = "text", dim: int = 16) -> LinearDetector:
    direction = torch.nn.functional.normalize(torch.arange(dim, dtype=torch.float32) - 3, dim=0)
    return LinearDetector(
        tower,
        direction,
        0.25,
        0.05,
        "logistic",
        layer=0,
        head=1,
        calibration={"fingerprint": "abc", "num_safe": 10},
        model={"arch": "saferclip-micro"},
    )


def test_detector_file_round_trip_and_refusals(tmp_path):
    path = tmp_path / "det.safetensors"
    dets = {"text": _detector("text"), "image": _detector("image", 8)}
    save_detectors(path, dets, info={"model_name": "m"})
    back = load_detectors(path)
    assert set(back) == {"text", "image"}
    for tower, det in dets.items():
        got = back[tower]
        assert torch.equal(got.direction, det.direction)
        assert (got.threshold, got.target_fpr, got.layer, got.head, got.method, got.tower) == (
            det.threshold,
            det.target_fpr,
            det.layer,
            det.head,
            det.method,
            tower,
        )
        assert got.calibration == det.calibration and got.model == det.model
    with pytest.raises(FileExistsError, match="force"):
        save_detectors(path, dets)
    save_detectors(path, {"text": _detector()}, force=True)
    assert set(load_detectors(path)) == {"text"}
    # not a detector: plain weights, a truncated file, a pickle, a missing file
    weights = tmp_path / "weights.safetensors"
    save_state_dict({"w": torch.zeros(2)}, weights)
    with pytest.raises(CheckpointError, match="not a saferclip detector"):
        load_detectors(weights)
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="not a saferclip detector"):
        load_detectors(truncated)
    pickled = tmp_path / "evil.safetensors"
    torch.save({"text.direction": torch.zeros(3)}, pickled)
    with pytest.raises(
        CheckpointError, match=r"evil\.safetensors: not a saferclip detector file \(not readable as safetensors"
    ):
        load_detectors(pickled)
    with pytest.raises(FileNotFoundError, match=r"detector file not found: .*none\.safetensors"):
        load_detectors(tmp_path / "none.safetensors")


@pytest.mark.parametrize("damage", ["direction bytes", "threshold digit", "nan direction"])
def test_damaged_detector_file_is_refused_naming_the_file(tmp_path, damage, caplog):
    from saferclip.integrity import DamagedArtefact

    path = tmp_path / "det.safetensors"
    det = _detector("text", 8)
    save_detectors(path, {"text": det})
    data = bytearray(path.read_bytes())
    if damage == "direction bytes":  # the tensor data is the end of the file
        for i in range(len(data) - 16, len(data)):
            data[i] ^= 0xFF
    elif damage == "threshold digit":  # a plausible edit in the JSON header: still valid JSON
        text = repr(det.threshold)
        at = data.index(text.encode())
        data[at + len(text) - 1] = ord("7") if data[at + len(text) - 1] != ord("7") else ord("3")
    else:
        data[-4:] = np.array([np.nan], dtype=np.float32).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(DamagedArtefact, match="det.safetensors") as e:
        load_detectors(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    # a detector file written before checksums: loads, with a one-line warning that it cannot be checked
    from safetensors.torch import safe_open, save_file

    save_detectors(path, {"text": det}, force=True)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    del meta["saferclip_checksum"]
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=meta)
    with caplog.at_level("WARNING"):
        assert torch.equal(load_detectors(old)["text"].direction, det.direction)
    assert any("without a checksum" in r.getMessage() and str(old) in r.getMessage() for r in caplog.records)


def test_guard_returns_features_and_flags(planted, tmp_path):
    safe, unsafe = captions(SAFE_OBJECTS, 30, 11), captions(tuple(UNSAFE_OBJECTS), 30, 12)
    acts = text_activations(planted, safe + unsafe)
    y = torch.cat([torch.zeros(30, dtype=torch.bool), torch.ones(30, dtype=torch.bool)])
    det, _ = calibrate_head_detector(acts.heads, y, "text", folds=3)
    from saferclip.model.build import weights_fingerprint

    det.model = {"arch": planted.arch, "weights_fingerprint": weights_fingerprint(planted.model)}
    path = save_detectors(tmp_path / "d.safetensors", {"text": det})
    guard = SafetyGuard(planted, path)
    tokens = planted.tokenizer(["a red circle with a gun", "a red circle with a cup"])
    out = guard.encode_text(tokens, normalize=True)
    torch.testing.assert_close(out.features, planted.model.encode_text(tokens, normalize=True))
    assert out.flagged.tolist() == [True, False]
    assert guard.encode_text(["a red circle with a gun"]).flagged.tolist() == [True]  # captions too
    with pytest.raises(ValueError, match="no image detector"):
        guard.encode_image(torch.zeros(1, 3, 32, 32))
    other = build_clip("saferclip-micro", init_seed=9)
    with pytest.raises(CheckpointError, match="other weights"):
        SafetyGuard(other, path)
    assert SafetyGuard(other, path, check_weights=False).encode_text(tokens).features.shape == (2, 32)


def test_final_embedding_detector_and_knn_shapes():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(100, 8, generator=g)
    y = torch.arange(100) >= 50
    X[y, 1] += 4
    det = calibrate_linear(X, y, "image", method="mean_diff", folds=5)
    assert det.kind == "final_embedding" and det.flags(final=X[y]).float().mean() > 0.9
    assert math.isfinite(det.calibration["out_of_fold_auc"])
