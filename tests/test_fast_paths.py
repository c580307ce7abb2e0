"""The training step's fast paths give the same numbers as the plain ones."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import default_collate
from train_helpers import compose_train, prepared

from saferclip.model.build import build_clip, encode_tokens, trimmed_length

pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread (tests/conftest.py)

# shorter than every context length (micro: 16 tokens): the longest is 8 words, 10 tokens with
# start and end of text, so the trimmed encoding runs on 10 columns
CAPTIONS = [
    "a red circle on a black background",
    "cup",
    "a large blue triangle with a small tree",
    "",
]
# longer than the micro model's context: nothing to trim there, the result must not change
LONG_CAPTION = "a large blue triangle with a small tree, on white, seen from far away in the evening light"


def sequence_lengths(model: torch.nn.Module, encode) -> list[int]:
    """The token columns the text tower's embedding saw while ``encode()`` ran."""
    seen: list[int] = []
    hook = model.token_embedding.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    try:
        encode()
    finally:
        hook.remove()
    return seen


@pytest.mark.parametrize("arch", ["saferclip-micro", "saferclip-toy", pytest.param("ViT-B-32", marks=pytest.mark.slow)])
def test_trimmed_text_encoding_equals_the_full_length_one(arch):
    bundle = build_clip(arch, None)
    tokens = bundle.tokenizer(CAPTIONS)
    context = tokens.shape[1]
    longest = max(len(bundle.tokenizer.encode(c)) for c in CAPTIONS) + 2  # + start and end of text
    assert longest == 10 < context
    assert trimmed_length(tokens) == longest
    with torch.no_grad():
        assert sequence_lengths(bundle.model, lambda: bundle.model.encode_text(tokens, normalize=True)) == [context]
        full = bundle.model.encode_text(tokens, normalize=True)
        # the fast path really runs on the trimmed columns only
        assert sequence_lengths(bundle.model, lambda: encode_tokens(bundle.model, tokens)) == [longest]
        trimmed = encode_tokens(bundle.model, tokens)
    torch.testing.assert_close(trimmed, full, atol=1e-6, rtol=0)
    # and the gradients flow the same way
    a = bundle.model.encode_text(tokens[:2], normalize=True).sum()
    grads_full = torch.autograd.grad(a, bundle.model.token_embedding.weight)[0]
    b = encode_tokens(bundle.model, tokens[:2]).sum()
    grads_trim = torch.autograd.grad(b, bundle.model.token_embedding.weight)[0]
    assert grads_full.abs().sum() > 0
    torch.testing.assert_close(grads_trim, grads_full, atol=1e-4, rtol=1e-4)
    # a batch with a caption that fills the context: full length, the same embeddings
    tokens = bundle.tokenizer([*CAPTIONS, LONG_CAPTION])
    with torch.no_grad():
        torch.testing.assert_close(
            encode_tokens(bundle.model, tokens), bundle.model.encode_text(tokens, normalize=True), atol=1e-6, rtol=0
        )


def test_trimmed_length_is_the_last_nonpadding_column():
    tokens = torch.tensor([[5, 7, 9, 0, 0, 0], [5, 9, 0, 0, 0, 0]])
    assert trimmed_length(tokens) == 3
    assert trimmed_length(torch.zeros(2, 4, dtype=torch.long)) == 1


@pytest.mark.parametrize("method", ["saferclip", "safeclip"])
def test_a_batch_fetched_at_once_equals_the_collated_items(tmp_path, toy_world, method):
    cfg = compose_train(tmp_path, toy_world, f"method={method}", "method.loss.weights.live_relative_text=0.5")
    _, datamodule = prepared(cfg)
    for dataset in (datamodule.train_set, datamodule.val_set):
        rows = [5, 0, 3, 3, 11]
        batch = dataset.__getitems__(rows)
        singles = default_collate([dataset[i] for i in rows])
        assert batch.keys() == singles.keys()
        for key in batch:
            assert torch.equal(batch[key], singles[key]), key
