"""Scorers for the ViSU generation tests, importable as ``--scorer visu_scorers:<factory>``."""

from __future__ import annotations

import hashlib
import time

from PIL import Image


def hash_scores(images: list[Image.Image]) -> list[float]:
    """A deterministic stand-in score in [0, 1) from the image's pixels: the tiny random
    pipelines make no recognisable content, so no real classifier has anything to see."""
    return [int(hashlib.sha256(im.convert("RGB").tobytes()).hexdigest(), 16) % 1000 / 1000 for im in images]


def make_hash_scorer():
    return hash_scores


def make_slow_hash_scorer():
    """The same scores, 0.3 s a call: a run long enough to be killed in the middle."""

    def scorer(images):
        time.sleep(0.3)
        return hash_scores(images)

    return scorer
