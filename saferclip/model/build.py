"""Building open_clip models, their preprocessing and tokenizer from a small config.

One entry point, :func:`build_clip`, covers the three ways a user names weights:
an open_clip pretrained tag (``ViT-L-14`` + ``openai``; needs internet the first time),
a local file or folder (safetensors / safe torch file, or open_clip's hub layout), or none
(random initialisation). saferclip's tiny architectures ship as JSON beside this module and
are registered with open_clip on import.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..locations import BASE_CHECKPOINT, MODEL_CONFIG_DIR
from ._openclip import open_clip
from .checkpoints import (
    WEIGHT_SUFFIXES,
    CheckpointError,
    expand_token_embedding,
    load_state_dict,
    read_safetensors_metadata,
    sniff_format,
)
from .hyperbolic import HEAD_JSON, HEAD_TENSORS, has_head, load_head
from .similarity import COSINE, Similarity

log = logging.getLogger(__name__)

open_clip.add_model_config(MODEL_CONFIG_DIR)


def default_base_checkpoint() -> Path:
    """The shipped tiny base CLIP of the toy world (package data: ``assets/toy_base.safetensors``)."""
    return BASE_CHECKPOINT


@dataclass
class ClipBundle:
    """A CLIP model with what it needs to be used: preprocessing, tokenizer and identity."""

    model: nn.Module
    preprocess: Callable
    tokenizer: Callable
    arch: str
    source: str  # where the weights came from: "random", a tag, or a path
    # how the model compares embeddings (cosine for every Euclidean CLIP; a hyperbolic model
    # brings its own): evaluation asks for it instead of assuming cosine
    similarity: Similarity = field(default=COSINE)
    # where its parts came from, for what reads it later: a HySAC training checkpoint's
    # "safe_radii" (the record of its own safe radii, saferclip.model.safe_radii) or
    # "safe_radii_missing" (why it has none, in words)
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def model_cfg(self) -> dict[str, Any]:
        return open_clip.get_model_config(self.arch) or {}


def check_arch(arch: str) -> None:
    """Fail fast, with suggestions, on an architecture open_clip does not know."""
    if arch.startswith(("local-dir:", "hf-hub:")):
        return
    known = open_clip.list_models()
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown model architecture {arch!r}.{hint} Known: see open_clip.list_models().")


def is_path_like(pretrained: str) -> bool:
    """Whether ``pretrained`` names a file or folder (a path separator, or a weights file's
    suffix) rather than an open_clip tag."""
    return any(sep in pretrained for sep in ("/", "\\")) or Path(pretrained).suffix in WEIGHT_SUFFIXES


def build_clip(
    arch: str | None = "saferclip-toy",
    pretrained: str | Path | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    *,
    prefix: str | None = None,
    init_seed: int = 0,
) -> ClipBundle:
    """Build an open_clip model, its eval preprocessing and tokenizer.

    Args:
        arch: open_clip architecture name (``ViT-L-14``, ``saferclip-toy``). May be None when
            ``pretrained`` is a saferclip file or an open_clip hub folder that names it.
        pretrained: None for random init; an open_clip tag (``openai``); a weights file
            (``.safetensors`` or a torch file that loads with ``weights_only=True``); or a
            folder holding ``open_clip_config.json`` + weights (open_clip's hub layout).
        prefix: for a weights file holding more than the CLIP (a Lightning ``.ckpt``), the
            attribute whose weights to take, e.g. ``"model."`` (see ``load_state_dict``).
    """
    source = "random"
    state_dict = None
    if pretrained is not None and str(pretrained) != "":
        pretrained = str(pretrained)
        path = Path(pretrained).expanduser()
        if path.is_dir():
            return _build_from_folder(path, arch, device, precision)
        if path.is_file():
            state_dict = load_state_dict(path, prefix=prefix)  # first: its errors name the problem
            if arch is None and sniff_format(path) == "safetensors":
                arch = read_safetensors_metadata(path).get("arch")
            source = str(path)
        elif is_path_like(pretrained):
            raise FileNotFoundError(f"pretrained weights not found: {pretrained}")
        else:
            if arch is None:
                raise ConfigError(f"pretrained tag {pretrained!r} needs an architecture name")
            check_arch(arch)
            tags = open_clip.list_pretrained_tags_by_model(arch)
            if pretrained not in tags:
                raise ConfigError(
                    f"{pretrained!r} is neither an existing file nor an open_clip pretrained tag "
                    f"for {arch} (tags: {', '.join(tags) or 'none'})"
                )
            model, _, preprocess = open_clip.create_model_and_transforms(
                arch, pretrained=pretrained, device=device, precision=precision, output_dict=True
            )
            return ClipBundle(model.eval(), preprocess, open_clip.get_tokenizer(arch), arch, pretrained)
    if arch is None:
        raise ConfigError("no architecture given and none recorded in the weights file")
    check_arch(arch)
    # random init is seeded, so "the same random model" is the same in every process: the
    # embedding cache, the trainable copy and every DDP rank agree
    # a weights file is loaded right below: open_clip's "initialized randomly" would mislead
    quiet = _without_random_init_warning() if state_dict is not None else nullcontext()
    with torch.random.fork_rng(devices=[]), quiet:
        torch.manual_seed(init_seed)
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=None, precision="fp32", output_dict=True
        )
    if state_dict is not None:
        load_into(model, state_dict, source, arch)
    model = _finish(model, device, precision)
    return ClipBundle(model, preprocess, open_clip.get_tokenizer(arch), arch, source)


def _finish(model: nn.Module, device: str | torch.device, precision: str) -> nn.Module:
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision not in dtypes:
        raise ConfigError(f"precision must be one of {sorted(dtypes)}, got {precision!r}")
    return model.to(device=device, dtype=dtypes[precision]).eval()


# open_clip's own preference among the weights files of a hub-layout folder
# (open_clip.factory._find_checkpoint_in_dir), restricted to the names it prefers.
FOLDER_WEIGHTS_NAMES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
)


class _RandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextmanager
def _without_random_init_warning() -> Iterator[None]:
    """open_clip warns "Model initialized randomly" when asked not to load weights; a folder's
    weights are loaded right after through the safe loader, so the warning would mislead."""
    root, quiet = logging.getLogger(), _RandomInitWarning()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


CONFIG_FILE = "open_clip_config.json"  # open_clip's hub layout


def _build_from_folder(path: Path, arch: str | None, device, precision: str) -> ClipBundle:
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: a model folder needs open_clip_config.json (open_clip's hub layout)")
    try:
        cfg = json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_cfg"), dict):
        raise CheckpointError(
            f"{config_file}: expected a JSON object with a 'model_cfg' object (open_clip's hub layout)"
        )
    folder_arch = (cfg.get("saferclip") or {}).get("arch")
    if arch is not None and folder_arch is not None and arch != folder_arch:
        raise CheckpointError(f"{path}: holds a {folder_arch} model, but the config asks for {arch}")
    weights = next((path / n for n in FOLDER_WEIGHTS_NAMES if (path / n).is_file()), None)
    if weights is None:
        # open_clip would only warn and return a randomly initialised model here
        raise CheckpointError(
            f"{path}: no weights file in the folder (expected one of {', '.join(FOLDER_WEIGHTS_NAMES)})"
        )
    _verify_folder(path, cfg, weights)
    # Build the architecture from the folder's config, then load the weights through the safe
    # loader, so a bad file gets the same readable errors as a bare weights file.
    with _without_random_init_warning():  # the weights are loaded right below
        model, _, preprocess = open_clip.create_model_and_transforms(
            f"local-dir:{path}", load_weights=False, pretrained_text=False, precision="fp32", output_dict=True
        )
    load_into(model, load_state_dict(weights), str(weights), folder_arch or arch or "")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    model = _finish(model, device, precision)
    bundle = ClipBundle(model, preprocess, tokenizer, folder_arch or arch or f"local-dir:{path}", str(path))
    if has_head(path):  # an exported HySAC model: its hyperbolic geometry, checked
        bundle.similarity, _ = load_head(path)
    elif (cfg.get("saferclip") or {}).get("geometry") == "lorentz" or (cfg.get("saferclip") or {}).get(
        "method"
    ) == "hysac":
        # without its head a HySAC export would load as a cosine CLIP: other scores, no word
        raise CheckpointError(
            f"{path}: a HySAC export (its {CONFIG_FILE} says hyperbolic) without its hyperbolic head: "
            f"{HEAD_JSON} and {HEAD_TENSORS} are both missing; copy them back or export the run again (saferclip-export)"
        )
    return bundle


def _verify_folder(path: Path, cfg: dict, weights: Path) -> None:
    """A saferclip export is loaded only when its files hold what was exported: the checksums
    its config records (:mod:`saferclip.integrity`; a damaged one is refused in one line). An
    export from before checksums is checked against its SHA-256; a folder saferclip did not
    write (no ``"saferclip"`` section) has nothing to check against."""
    from ..integrity import DamagedArtefact, digest_parts, sha256_file, verify_all

    info = cfg.get("saferclip")
    if not isinstance(info, dict):
        return
    if "config_checksum" in info:
        sections = [json.dumps(cfg.get(k), sort_keys=True) for k in ("model_cfg", "preprocess_cfg")]
        if digest_parts(sections) != info["config_checksum"]:
            raise DamagedArtefact(
                path / "open_clip_config.json",
                "exported model: model_cfg / preprocess_cfg changed since it was exported",
            )
    if "checksums" in info:
        verify_all(path, info["checksums"], "exported model")
    elif isinstance(info.get("weights_sha256"), str) and weights.name == "open_clip_model.safetensors":
        if sha256_file(weights) != info["weights_sha256"]:
            raise DamagedArtefact(
                weights, "exported model: SHA-256 mismatch, its content changed since it was exported"
            )


def load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str, arch: str = "") -> None:
    """Load weights strictly, turning shape/key mismatches into one readable error."""
    reference = model.state_dict()
    state_dict = expand_token_embedding(state_dict, reference)
    missing = sorted(set(reference) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(reference))
    wrong = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(reference[k].shape)}"
        for k in reference
        if k in state_dict and state_dict[k].shape != reference[k].shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches (e.g. {wrong[0]})")
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise CheckpointError(
            f"{source}: weights do not fit architecture {arch or type(model).__name__}: " + "; ".join(parts)
        )
    model.load_state_dict({k: v.to(reference[k].dtype) for k, v in state_dict.items()})


def trimmed_length(tokens: torch.Tensor) -> int:
    """Columns of ``tokens [B, L]`` up to the last non-padding one (open_clip pads with 0)."""
    nonzero = (tokens != 0).any(dim=0)
    return int(nonzero.nonzero().max()) + 1 if bool(nonzero.any()) else 1


def encode_tokens(
    model: nn.Module, tokens: torch.Tensor, normalize: bool = True, embedding_offset: torch.Tensor | None = None
) -> torch.Tensor:
    """``model.encode_text(tokens)`` without the batch's trailing padding columns.

    A CLIP text tower is causal and pools at the end-of-text token, so the padding after the
    longest caption of a batch changes nothing but the cost: toy captions fill ~18 of 32
    positions, ViSU captions ~25 of 77, and attention and MLP time fall in proportion. The
    shorter sequence only needs the positional embedding and causal mask cut to its length,
    which open_clip's ``CLIP.encode_text`` does not do, so that one path is spelled out here
    (checked against the full-length result in the tests). Any other text tower, or a pooling
    that depends on the length (``last``), runs unchanged at full length.

    ``embedding_offset`` ``[B, L, W]`` (the tokens' shape and the token embedding's width) is
    added to the token embeddings before the positional ones: the token-embedding-space text
    attack of adversarial training (:mod:`saferclip.training.adversarial`). Only an open_clip
    ``CLIP`` text tower with end-of-text pooling takes one.
    """
    length = trimmed_length(tokens)
    spelled_out = (
        isinstance(model, open_clip.CLIP)
        and getattr(model, "attn_mask", None) is not None
        and getattr(model, "text_pool_type", "argmax") in ("argmax", "eos")
    )
    if embedding_offset is not None:
        if not spelled_out:
            raise ValueError(
                f"a token-embedding offset needs an open_clip CLIP text tower with end-of-text pooling, not {type(model).__name__}"
            )
        if embedding_offset.shape[:2] != tokens.shape:
            raise ValueError(
                f"embedding_offset {tuple(embedding_offset.shape)} does not match tokens {tuple(tokens.shape)}"
            )
    elif not (spelled_out and length < tokens.shape[1]):
        return model.encode_text(tokens, normalize=normalize)
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    if embedding_offset is not None:
        x = x + embedding_offset[:, :length].to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = open_clip.transformer.text_global_pool(
        x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None)
    )
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, nn.Linear) else x @ model.text_projection
    return F.normalize(x, dim=-1) if normalize else x


_TRUNCATION_WARNED: set[str] = set()


def count_truncated(tokenizer: Callable, texts: Sequence[str], tokens: torch.Tensor) -> int | None:
    """How many of ``texts`` the tokenizer cut at its context length (``tokens [N, L]`` is
    its output). Only rows that fill the context are candidates; they are re-encoded without
    the limit to tell a cut caption from one that fits exactly. None for a tokenizer that
    cannot say (no ``encode``)."""
    encode = getattr(tokenizer, "encode", None)
    if encode is None or tokens.numel() == 0:
        return None
    full = (tokens[:, -1] != 0).nonzero().flatten().tolist()
    limit = tokens.shape[1] - 2  # start and end of text take two positions
    return sum(len(encode(texts[i])) > limit for i in full)


def tokenize_checked(tokenizer: Callable, texts: Sequence[str], what: str) -> torch.Tensor:
    """``tokenizer(texts)``, with one warning per ``what`` (a dataset and field, e.g. the
    file and "unsafe captions") saying how many captions were cut at the context length."""
    tokens = tokenizer(list(texts))
    if what not in _TRUNCATION_WARNED and len(texts):
        cut = count_truncated(tokenizer, texts, tokens)
        if cut:
            _TRUNCATION_WARNED.add(what)
            log.warning(
                "%s: %d of %d captions are longer than the model's context (%d tokens) and were truncated",
                what, cut, len(texts), tokens.shape[1],
            )  # fmt: skip
    return tokens


@torch.no_grad()
def encode_text(bundle: ClipBundle, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text embeddings ``[N, D]`` (float32, on the CPU)."""
    device = next(bundle.model.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        tokens = bundle.tokenizer(texts[i : i + batch_size]).to(device)
        out.append(encode_tokens(bundle.model, tokens).float().cpu())
    dim = bundle.model_cfg.get("embed_dim", 0)
    return torch.cat(out) if out else torch.empty(0, dim)


@torch.no_grad()
def encode_images(bundle: ClipBundle, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised image embeddings ``[N, D]`` from preprocessed images ``[N, 3, H, W]``."""
    param = next(bundle.model.parameters())
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(device=param.device, dtype=param.dtype)
        out.append(bundle.model.encode_image(x, normalize=True).float().cpu())
    return torch.cat(out) if out else torch.empty(0, bundle.model_cfg.get("embed_dim", 0))


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 over parameter names, shapes, dtypes and bytes: changes when any weight does.

    Each tensor is flattened first (0-d tensors such as CLIP's ``logit_scale`` included) and
    hashed in a thread pool (hashlib releases the GIL on large buffers), then the digests combined,
    since the embedding cache runs it on every call, reuse included: ~0.9 s for ViT-B-32 on one core.
    """
    items = sorted(model.state_dict().items())

    def digest(tensor: torch.Tensor) -> bytes:
        t = tensor.detach().cpu().contiguous()
        return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy()).digest() if t.numel() else b""

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(digest, (t for _, t in items)))
    h = hashlib.sha256()
    for (name, t), d in zip(items, digests):
        h.update(name.encode())
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(d)
    return h.hexdigest()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off while encoding (frozen means deterministic); the caller's mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
