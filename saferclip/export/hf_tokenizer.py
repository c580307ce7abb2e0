"""open_clip's CLIP tokenizer as the files of a Hugging Face ``CLIPTokenizer``.

open_clip's :class:`~open_clip.tokenizer.SimpleTokenizer` and transformers' ``CLIPTokenizer``
are the same byte-level BPE over the same 49,408-token vocabulary (OpenAI's
``bpe_simple_vocab_16e6``), so the conversion is a renaming:

* ``vocab.json`` is open_clip's ``encoder`` with the two special tokens renamed
  (``<start_of_text>`` -> ``<|startoftext|>`` = 49406, ``<end_of_text>`` -> ``<|endoftext|>``
  = 49407, the names transformers' CLIP tokenizer expects); the ids do not change;
* ``merges.txt`` is its ``bpe_ranks`` in rank order;
* ``tokenizer_config.json`` / ``special_tokens_map.json`` name the special tokens and the
  context length (``model_max_length``).

What is the same, and what is not (measured in ``tests/test_hf_export.py``):

* **Ids up to and including the end-of-text token are identical** for text that open_clip's
  cleaning leaves as it is: any script, accents (composed or not: both normalise to NFC),
  emoji, ASCII punctuation, digits, contractions, runs of whitespace, and over-long text (both
  truncate to ``context_length`` with ``<|endoftext|>`` last).
* **Cleaning.** open_clip runs ``ftfy.fix_text`` and ``html.unescape`` (twice) before the BPE;
  transformers' ``CLIPTokenizer`` (5.x) does not. Text that cleaning changes tokenizes
  differently: curly quotes, ligatures (``ﬁ``), full-width forms, HTML entities (``&amp;``),
  mojibake (``cafÃ©``), control characters. :func:`clean_caption` (``ftfy`` + ``html``, no
  saferclip needed: see its code) applied first makes the ids identical again. Literal
  special-token strings in a caption (``<end_of_text>``, ``<|endoftext|>``) are special to one
  tokenizer and plain text to the other.
* **Padding.** open_clip pads with id 0; the exported tokenizer pads with ``<|endoftext|>``
  (49407), the convention of OpenAI's CLIP on the Hub and of the Stable Diffusion 1.x
  tokenizer, whose UNet was trained on it. The CLIP text tower is causal and pools at the
  first end-of-text token, so the padding changes neither the pooled embedding nor any
  hidden state up to that token; only the hidden states *after* it differ (which a diffusion
  UNet cross-attends to). Padding with id 0 is not offered: id 0 is the token ``!``, and a
  special token is matched in the input text, so every ``!`` of a caption would become padding
  (the quirk of Stable Diffusion 2's tokenizer).
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

from ..files import write_json_atomic, write_text_atomic

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
OPEN_CLIP_SPECIALS = {"<start_of_text>": BOS, "<end_of_text>": EOS}
CLIP_VOCAB_SIZE = 49408
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


class UnsupportedArchitecture(ValueError):
    """A model (or its tokenizer / preprocessing) that transformers' CLIP classes cannot express."""


def clean_caption(text: str) -> str:
    """open_clip's text cleaning without the lowercasing (``CLIPTokenizer`` lowercases itself).

    Run a caption through this before transformers' ``CLIPTokenizer`` to get exactly the ids
    open_clip's tokenizer gives. Without saferclip it is::

        import html, ftfy
        text = " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split())
    """
    import ftfy  # an open_clip dependency

    return " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split())


def check_tokenizer(tokenizer: Any) -> None:
    """Raise :class:`UnsupportedArchitecture` unless ``tokenizer`` is open_clip's plain CLIP BPE."""
    from open_clip.tokenizer import SimpleTokenizer, _clean_lower

    if not isinstance(tokenizer, SimpleTokenizer):
        raise UnsupportedArchitecture(
            f"tokenizer: {type(tokenizer).__name__} is not open_clip's CLIP BPE tokenizer "
            f"(SimpleTokenizer), the only one converted to transformers' CLIPTokenizer"
        )
    if getattr(tokenizer, "clean_fn", _clean_lower) is not _clean_lower:
        raise UnsupportedArchitecture(
            "tokenizer: open_clip cleans text other than by lowercasing (clean='canonicalize' or "
            "'whitespace'); transformers' CLIPTokenizer always lowercases and keeps punctuation"
        )
    if getattr(tokenizer, "reduction_fn", None) is not None:
        raise UnsupportedArchitecture(
            "tokenizer: open_clip shortens long text by a reduction mask (random / shuffle / syntax); "
            "transformers' CLIPTokenizer only truncates"
        )
    if len(tokenizer.encoder) != CLIP_VOCAB_SIZE or set(OPEN_CLIP_SPECIALS) - set(tokenizer.encoder):
        raise UnsupportedArchitecture(
            f"tokenizer: a vocabulary of {len(tokenizer.encoder)} tokens; the conversion covers "
            f"open_clip's {CLIP_VOCAB_SIZE}-token CLIP BPE without additional special tokens"
        )


def hf_vocab(tokenizer: Any) -> dict[str, int]:
    """``vocab.json``: token -> id, open_clip's ids, the special tokens renamed."""
    return {OPEN_CLIP_SPECIALS.get(token, token): int(i) for token, i in tokenizer.encoder.items()}


def hf_merges(tokenizer: Any) -> list[tuple[str, str]]:
    """The BPE merges in rank order (``merges.txt`` without its header)."""
    return sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)


def _special(content: str) -> dict[str, Any]:
    # transformers 4.x reads added_tokens_decoder entries of this shape; 5.x accepts them too
    return {
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def tokenizer_configs(vocab: dict[str, int], context_length: int) -> tuple[dict, dict]:
    """``tokenizer_config.json`` and ``special_tokens_map.json`` contents."""
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    added = {str(vocab[t]): _special(t) for t in (BOS, EOS)}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": int(context_length),
        **specials,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added,
    }
    return config, dict(specials)


def save_hf_tokenizer(tokenizer: Any, folder: str | os.PathLike, context_length: int) -> list[Path]:
    """Write ``tokenizer`` (open_clip's CLIP BPE) into ``folder`` as transformers' CLIPTokenizer:
    the four files of :data:`TOKENIZER_FILES` plus ``tokenizer.json`` (the ``tokenizers``
    serialisation transformers reads fastest). Each file is written atomically.

    ``context_length`` is the model's (77 for OpenAI's CLIP; the tokenizer truncates to it).
    It pads with ``<|endoftext|>`` (module doc). Returns the files written.
    """
    check_tokenizer(tokenizer)
    folder = Path(folder)
    vocab, merges = hf_vocab(tokenizer), hf_merges(tokenizer)
    config, special_map = tokenizer_configs(vocab, context_length)
    written = []
    write_text_atomic(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    # "#version" header: the format the original CLIP release and transformers' slow tokenizer read
    write_text_atomic(folder / "merges.txt", "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    write_json_atomic(folder / "tokenizer_config.json", config)
    write_json_atomic(folder / "special_tokens_map.json", special_map)
    written += [folder / name for name in TOKENIZER_FILES]
    backend = build_hf_tokenizer(vocab, merges, context_length)
    write_text_atomic(folder / "tokenizer.json", backend.backend_tokenizer.to_str())
    written.append(folder / "tokenizer.json")
    return written


def build_hf_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], context_length: int):
    """transformers' ``CLIPTokenizer`` over ``vocab`` / ``merges``, in memory."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
        model_max_length=int(context_length),
    )


__all__ = [
    "TOKENIZER_FILES",
    "UnsupportedArchitecture",
    "build_hf_tokenizer",
    "check_tokenizer",
    "clean_caption",
    "hf_merges",
    "hf_vocab",
    "save_hf_tokenizer",
    "tokenizer_configs",
]
