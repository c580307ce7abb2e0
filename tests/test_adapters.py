"""What trains: LoRA (parametrizations), the last N blocks, or everything, per encoder.
Gradients must reach exactly the trainable parameters, and nothing else may change."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from saferclip.model.adapters import (
    TrainableConfig,
    add_lora,
    configure_trainable,
    find_adapters,
    merge_adapters,
    tower_modules,
    tower_parameters,
)
from saferclip.model.build import build_clip

pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread (tests/conftest.py)


@pytest.fixture(scope="module")
def toy_random():
    """saferclip-toy, random init: 4 image and 3 text blocks (micro has one of each)."""
    return build_clip("saferclip-toy", None)


def fresh(bundle) -> nn.Module:
    return copy.deepcopy(bundle.model).train()


def inputs(bundle, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = bundle.tokenizer(["a red circle on white", "a blue square", "a cup", "a green ring next to a book"][:n])
    images = torch.randn(n, 3, 32, 32, generator=g)
    return tokens, images


def backward_both_towers(model: nn.Module, bundle) -> None:
    tokens, images = inputs(bundle)
    t = model.encode_text(tokens, normalize=True)
    i = model.encode_image(images, normalize=True)
    # a loss that depends on every output dimension of both towers
    (t @ torch.arange(t.shape[1], dtype=t.dtype) + i @ torch.arange(i.shape[1], dtype=i.dtype)).sum().backward()


def names_with(model: nn.Module, grad: bool) -> set[str]:
    return {n for n, p in model.named_parameters() if (p.grad is not None) == grad}


def trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def tower_of(name: str) -> str:
    return "image" if name.startswith("visual.") else "text"


CASES = [
    ("lora", ("text", "image")),
    ("lora", ("text",)),
    ("lora", ("image",)),
    ("full", ("text", "image")),
    ("full", ("text",)),
    ("last_n", ("text", "image")),
    ("last_n", ("image",)),
]


@pytest.mark.parametrize("mode,towers", CASES, ids=[f"{m}-{'+'.join(t)}" for m, t in CASES])
def test_gradients_reach_only_trainable_parameters(toy_random, mode, towers):
    model = fresh(toy_random)
    counts = configure_trainable(model, TrainableConfig(mode=mode, towers=towers, lora_r=4, last_n_blocks=2))
    trainable = trainable_names(model)
    assert trainable and counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts["trainable"] < counts["total"]
    backward_both_towers(model, toy_random)
    assert names_with(model, grad=True) == trainable
    assert {tower_of(n) for n in trainable} == set(towers)
    if mode == "lora":
        assert all("lora_" in n for n in trainable)
        # B starts at 0 so A gets a zero gradient, but B's gradient is not zero
        assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("lora_B"))
    if mode == "last_n":
        # the first blocks stay frozen; the last two and the heads train
        assert not any(".resblocks.0." in n for n in trainable)
        assert any(".resblocks.3." in n for n in trainable) == ("image" in towers)
        assert ("visual.proj" in trainable) == ("image" in towers)
    if mode == "full":
        assert ("token_embedding.weight" in trainable) == ("text" in towers)
        assert "logit_scale" not in trainable


def test_lora_starts_as_the_original_and_merges_exactly(toy_random):
    tokens, images = inputs(toy_random)
    reference = fresh(toy_random)
    model = fresh(toy_random)
    configure_trainable(model, TrainableConfig(mode="lora", lora_r=4))
    with torch.no_grad():
        # B = 0: the same function (not bit for bit: the BLAS kernel may sum in another order
        # for a freshly computed weight tensor)
        torch.testing.assert_close(model.encode_text(tokens), reference.encode_text(tokens), rtol=0, atol=1e-5)
        torch.testing.assert_close(model.encode_image(images), reference.encode_image(images), rtol=0, atol=1e-5)
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(std=0.05)  # as if trained
        trained_t, trained_i = model.encode_text(tokens), model.encode_image(images)
    assert not torch.allclose(trained_t, reference.encode_text(tokens).detach())
    merged = merge_adapters(model, inplace=True)
    assert merged is model and find_adapters(merged) == []
    assert set(merged.state_dict()) == set(reference.state_dict())  # open_clip's own keys again
    with torch.no_grad():
        torch.testing.assert_close(merged.encode_text(tokens), trained_t, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(merged.encode_image(images), trained_i, rtol=1e-5, atol=1e-6)


def test_merging_a_copy_leaves_the_original_model_working(toy_random):
    """torch shares a parametrized module's generated class with its deepcopy: folding the
    copy's LoRA must not remove the original's weights (exporting an in-memory model, then
    using it again, as saferclip-rehearse does)."""
    tokens, images = inputs(toy_random)
    model = fresh(toy_random)
    configure_trainable(model, TrainableConfig(mode="lora", lora_r=4))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(std=0.05)
        before_t, before_i = model.encode_text(tokens), model.encode_image(images)
        merged = merge_adapters(model)
        assert merged is not model and find_adapters(merged) == [] and find_adapters(model) != []
        torch.testing.assert_close(model.encode_text(tokens), before_t, rtol=0, atol=0)
        torch.testing.assert_close(model.encode_image(images), before_i, rtol=0, atol=0)
        torch.testing.assert_close(merged.encode_text(tokens), before_t, rtol=1e-5, atol=1e-6)
        assert find_adapters(merge_adapters(model)) == []  # and it merges again


def test_lora_on_packed_qkv_leaves_the_query_rows_alone(toy_random):
    model = fresh(toy_random)
    attn = tower_modules(model)["text"].resblocks[0].attn
    original = attn.in_proj_weight.detach().clone()
    add_lora(tower_modules(model)["text"].resblocks, r=4, alpha=4, targets=("attn.kv",))
    with torch.no_grad():
        attn.parametrizations.in_proj_weight[0].lora_B.normal_()
    d = original.shape[1]
    adapted = attn.in_proj_weight.detach()
    torch.testing.assert_close(adapted[:d], original[:d], rtol=0, atol=0)  # q untouched
    assert not torch.allclose(adapted[d:], original[d:])  # k and v adapted


def test_lora_state_dict_round_trip(toy_random):
    tokens, _ = inputs(toy_random)
    a, b = fresh(toy_random), fresh(toy_random)
    for m in (a, b):
        configure_trainable(m, TrainableConfig(mode="lora", lora_r=4))
    with torch.no_grad():
        for n, p in a.named_parameters():
            if "lora_" in n:
                p.normal_(std=0.05)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(b.encode_text(tokens), a.encode_text(tokens), rtol=0, atol=0)


def test_tower_parameters_split_the_model(toy_random):
    model = fresh(toy_random)
    text = {id(p) for p in tower_parameters(model, "text")}
    image = {id(p) for p in tower_parameters(model, "image")}
    everything = {id(p) for p in model.parameters()}
    assert not text & image
    assert everything - text - image == {id(model.logit_scale)}


@pytest.mark.parametrize(
    "cfg,match",
    [
        (TrainableConfig(mode="adapters"), "unknown trainable mode"),
        (TrainableConfig(towers=()), "non-empty subset"),
        (TrainableConfig(towers=("audio",)), "non-empty subset"),
        (TrainableConfig(mode="last_n", last_n_blocks=0), "last_n_blocks"),
        (TrainableConfig(lora_targets=("attn.q",)), "unknown LoRA targets"),
    ],
)
def test_bad_trainable_config_is_refused(toy_random, cfg, match):
    with pytest.raises(ValueError, match=match):
        configure_trainable(fresh(toy_random), cfg)
