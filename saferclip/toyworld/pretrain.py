"""Contrastive pretraining of the toy world's tiny base CLIP (plain PyTorch, no Lightning).

The base model is trained on safe *and* unsafe scenes, so it knows the unsafe concepts the
way a web-trained CLIP does; fine-tuning then has something to make safe. Every batch is
rendered fresh in memory, which is what made a 1M-parameter CLIP reach 90%+ zero-shot in
a feasibility probe: many distinct pairs, attribute dropout, prompt words.

Run ``saferclip-pretrain-toy`` to reproduce the shipped ``saferclip/assets/toy_base.safetensors``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..model.build import build_clip
from ..model.checkpoints import compact_token_embedding, save_state_dict
from .captions import pretrain_caption
from .pretrain_config import PretrainConfig
from .scene import COLOURS, OBJECTS, SAFE_OBJECTS, SHAPES, Scene, random_scene, render

log = logging.getLogger("saferclip.toyworld.pretrain")  # not __name__: it is "__main__" under -m

OPENAI_MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
OPENAI_STD = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)


def to_model_input(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> normalised float ``[N, 3, H, W]``, exactly what open_clip's
    eval preprocessing makes of the same pixels saved as PNG (the toy images need no resize)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - OPENAI_MEAN) / OPENAI_STD


def sample_batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[str]]:
    # a third without an object, a third with a safe object, a third with an unsafe one
    choices: tuple[str | None, ...] = (None,) * 8 + SAFE_OBJECTS + tuple(OBJECTS[len(SAFE_OBJECTS) :])
    scenes = [random_scene(rng, choices) for _ in range(n)]
    images = np.stack([render(s, rng) for s in scenes])
    return images, [pretrain_caption(s, rng) for s in scenes]


class CachedTokenizer:
    """open_clip's BPE tokenizer is slow in Python; the toy grammar repeats captions a lot."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            for t, row in zip(missing, self.tokenizer(missing)):
                self.cache[t] = row
        return torch.stack([self.cache[t] for t in texts])


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    logits = logit_scale * image_features @ text_features.T
    labels = torch.arange(len(logits))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


@torch.no_grad()
def quick_zero_shot(model, tokenizer, rng: np.random.Generator, per_class: int = 30) -> dict[str, float]:
    """Zero-shot shape / colour / 36-way accuracy on freshly rendered scenes (a training-time check)."""
    model.eval()
    templates = ["a photo of a {}.", "a {}."]
    tasks = {
        "shape": [
            (s, lambda sc, s=s: Scene(s, sc.colour, sc.size, sc.background, sc.obj, sc.quadrant)) for s in SHAPES
        ],
        "colour": [
            (f"{c} shape", lambda sc, c=c: Scene(sc.shape, c, sc.size, sc.background, sc.obj, sc.quadrant))
            for c in COLOURS
        ],
        "scene": [
            (f"{c} {s}", lambda sc, c=c, s=s: Scene(s, c, sc.size, sc.background, sc.obj, sc.quadrant))
            for c in COLOURS
            for s in SHAPES
        ],
    }
    out = {}
    for task, classes in tasks.items():
        weights = []
        for name, _ in classes:
            emb = model.encode_text(tokenizer([t.format(name) for t in templates]), normalize=True).mean(0)
            weights.append(F.normalize(emb, dim=-1))
        weights = torch.stack(weights, 1)
        correct = total = 0
        for label, (_, make) in enumerate(classes):
            scenes = [make(random_scene(rng, (None,) + SAFE_OBJECTS)) for _ in range(per_class)]
            x = to_model_input(np.stack([render(s, rng) for s in scenes]))
            pred = (model.encode_image(x, normalize=True) @ weights).argmax(1)
            correct += int((pred == label).sum())
            total += len(scenes)
        out[task] = correct / total
    model.train()
    return out


def pretrain(cfg: PretrainConfig, out_path: Path) -> dict:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    bundle = build_clip(cfg.arch)
    model = bundle.model.train()
    tokenizer = CachedTokenizer(bundle.tokenizer)
    steps_per_epoch = cfg.pairs_per_epoch // cfg.batch_size
    total_steps = cfg.epochs * steps_per_epoch
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * progress))

    used_ids: set[int] = {0}
    start = time.time()
    step = 0
    for epoch in range(cfg.epochs):
        running = 0.0
        for _ in range(steps_per_epoch):
            images, captions = sample_batch(rng, cfg.batch_size)
            tokens = tokenizer(captions)
            used_ids.update(tokens.unique().tolist())
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            out = model(to_model_input(images), tokens)
            loss = clip_loss(out["image_features"], out["text_features"], out["logit_scale"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            running += loss.item()
            step += 1
        log.info(
            "epoch %d/%d loss %.4f (%.0f s)", epoch + 1, cfg.epochs, running / steps_per_epoch, time.time() - start
        )
    model.eval()
    seconds = time.time() - start
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    state = compact_token_embedding(state, torch.tensor(sorted(used_ids)))
    metadata = {
        "arch": cfg.arch,
        "format": "saferclip compact checkpoint: token embedding rows stored for used ids only",
        "pretrain_config": json.dumps(asdict(cfg)),
        "train_seconds": f"{seconds:.0f}",
    }
    save_state_dict(state, out_path, metadata=metadata)
    # check what was written, after the fp16 round trip
    reloaded = build_clip(None, out_path)
    scores = quick_zero_shot(reloaded.model, CachedTokenizer(reloaded.tokenizer), np.random.default_rng(cfg.seed + 1))
    return {"seconds": seconds, "zero_shot": scores, "path": str(out_path)}
