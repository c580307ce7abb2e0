"""Regenerate ViSU's withheld unsafe images from its unsafe captions (``saferclip-generate-visu``).

The public ViSU release is text only (ViSU-Text): its unsafe images are withheld, so neither
method can train its image side on real data as published. The recipe of the release: for
each unsafe caption, generate with a Stable Diffusion pipeline at fixed seeds (the published
protocol uses several per prompt, e.g. 1234, 1999, 8185), and keep the first image an NSFW
classifier flags as unsafe. Here:

* **Per-caption determinism.** Each image comes from its own CPU ``torch.Generator`` seeded
  with the configured seed (the protocol: the same seeds for every caption) or, with
  ``seed_per_caption``, a hash of (caption id, seed). It depends on nothing else: not the
  order, the shard, or what ran before (a CPU generator also makes the noise the same on any
  GPU). The scorer must be deterministic too (a model in eval mode is).
* **Pluggable scorer.** ``scorer(images) -> scores`` in [0, 1]; an image is flagged when its
  score is >= ``threshold``. :class:`ClipNsfwScorer` is a zero-shot classifier from any
  open_clip model and two prompt lists; any callable fits (an NSFW detector of your own).
* **Resumable.** One JSON line per finished caption in ``records/shard-<i>-of-<n>.jsonl``,
  appended with a single write and fsync after the image is in place (itself written
  atomically). A killed run loses at most the caption it was on; a line cut short by the kill
  is ignored (and counted) and that caption is done again. Settings are fixed in
  ``generation.json`` at the first run; a run with other settings is refused.
* **Shardable.** Shard ``i`` of ``n`` takes the items at positions ``i, i + n, ...`` of the
  split (its load order); shards share the output folder and may run at once (one process
  per GPU, ``--shard auto`` reads torchrun / accelerate / SLURM's rank variables). The
  records of all shards are read back whatever ``n`` they ran with.
* **Nothing dropped silently.** A caption for which no seed gives a flagged image is recorded
  as ``unflagged`` with its scores, counted in the report and listed in the merged file's
  ``info.unflagged``; it has no ``nsfw_im_path``, so it is not in ``data``.

Output folder::

    generation.json             settings (seeds, threshold, steps, guidance, size, pipeline, scorer, input)
    records/shard-0-of-1.jsonl  one line per finished caption
    images/<id>.png             the kept image of each flagged caption
    <input stem>.json           merged ViSU JSON ({"info", "data"}), nsfw_im_path relative
                                to this folder: load_visu_json(it, image_root=<COCO>,
                                unsafe_image_root=<this folder>)
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..data.records import DataFormatError, Quadruplet, QuadrupletSet
from ..export.card import public_model_name
from ..files import atomic_path, write_json_atomic

log = logging.getLogger(__name__)

ImageGenerator = Callable[[str, int], Image.Image]  # (prompt, generator seed) -> image
Scorer = Callable[[list[Image.Image]], Sequence[float]]  # images -> NSFW scores in [0, 1]

SETTINGS_FILE = "generation.json"
RECORDS_DIR = "records"
IMAGES_DIR = "images"
PUBLISHED_SEEDS = (1234, 1999, 8185)
_SAFE_STEM = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}$")

# Zero-shot prompts for ViSU's NSFW categories (hate, harassment, violence, self-harm, sexual,
# shocking, illegal activity) against ordinary photos. A heuristic: for real data prefer a
# trained NSFW image classifier, plugged in as the scorer.
DEFAULT_UNSAFE_PROMPTS = (
    "an explicit image with nudity or sexual content",
    "a violent image with blood, gore or injury",
    "an image of self-harm or suicide",
    "a hateful or harassing image",
    "a shocking, disturbing or gruesome image",
    "an image of illegal activity, weapons or drugs",
)
DEFAULT_SAFE_PROMPTS = (
    "an ordinary, harmless photo",
    "a safe-for-work photo of everyday life",
    "a photo of people, animals or objects in a normal scene",
)


@dataclass(frozen=True)
class GenerationConfig:
    """What makes the images: the same config gives the same images per caption."""

    seeds: tuple[int, ...] = PUBLISHED_SEEDS
    threshold: float = 0.5
    steps: int = 50
    guidance_scale: float = 7.5
    height: int = 512
    width: int = 512
    negative_prompt: str | None = None
    seed_per_caption: bool = False  # False: the published protocol, the same seeds for every caption

    def __post_init__(self) -> None:
        seeds = tuple(int(s) for s in self.seeds)
        object.__setattr__(self, "seeds", seeds)
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds: expected distinct integers, got {list(self.seeds)}")
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"threshold: expected a score in [0, 1], got {self.threshold}")
        if any(s < 0 for s in seeds):
            raise ValueError(f"seeds: expected integers >= 0, got {list(seeds)}")
        if self.steps < 1:
            raise ValueError(f"steps: expected an integer >= 1, got {self.steps}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value < 8 or value % 8:  # the VAE downsamples by 8: the pipeline refuses anything else
                raise ValueError(f"{name}: expected a multiple of 8 (e.g. 512), got {value}")
        if not math.isfinite(float(self.guidance_scale)) or self.guidance_scale < 0:
            raise ValueError(f"guidance_scale: expected a finite number >= 0 (e.g. 7.5), got {self.guidance_scale}")

    def generator_seed(self, item_id: str, seed: int) -> int:
        """The torch seed of one image: ``seed``, or a hash of (item id, seed) — never the order."""
        if not self.seed_per_caption:
            return int(seed)
        digest = hashlib.sha256(f"{item_id}\x00{seed}".encode()).digest()
        return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


@dataclass
class GenerationReport:
    """What one call did, and where the whole split stands."""

    total: int  # items of the split
    shard: tuple[int, int]
    shard_items: int
    already_done: int  # of this shard, found in the records
    flagged: int = 0  # generated by this call
    unflagged: int = 0
    ignored_lines: int = 0  # record lines cut short by a kill (their captions are redone)
    remaining: int = 0  # items of the whole split without a record after this call
    merged: Path | None = None
    seconds: float = 0.0

    def summary(self) -> str:
        i, n = self.shard
        lines = [
            f"shard {i}/{n}: {self.shard_items} of {self.total} captions; {self.already_done} were done before, "
            f"{self.flagged + self.unflagged} done now ({self.flagged} flagged, {self.unflagged} with no flagged image) "
            f"in {self.seconds:.1f} s",
        ]
        if self.ignored_lines:
            lines.append(
                f"  {self.ignored_lines} incomplete record lines ignored (an interrupted run, or a shard writing "
                f"right now); captions without a complete record are done again"
            )
        if self.merged is not None:
            lines.append(f"all {self.total} captions done: wrote {self.merged}")
        else:
            lines.append(f"{self.remaining} captions of the split still have no record (other shards, or --limit)")
        return "\n".join(lines)


# ---------------------------------------------------------------- generators and scorers


class DiffusersImageGenerator:
    """A ``diffusers`` text-to-image pipeline as an :data:`ImageGenerator` (one image a call)."""

    def __init__(self, pipe: Any, config: GenerationConfig):
        self.pipe, self.config = pipe, config
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)

    def __call__(self, prompt: str, seed: int) -> Image.Image:
        import torch

        c = self.config
        # a CPU generator: diffusers draws the initial noise on the CPU then moves it, so the
        # image of a (caption, seed) does not depend on the GPU it ran on
        generator = torch.Generator("cpu").manual_seed(int(seed))
        kwargs: dict[str, Any] = {"num_inference_steps": c.steps, "guidance_scale": c.guidance_scale, "height": c.height, "width": c.width}
        if c.negative_prompt:
            kwargs["negative_prompt"] = c.negative_prompt
        out = self.pipe(prompt, generator=generator, output_type="pil", **kwargs)
        return out.images[0]


def load_diffusion_pipeline(name_or_path: str, *, device: str = "cpu", dtype: str = "fp32") -> Any:
    """A text-to-image pipeline from a hub id (``runwayml/stable-diffusion-v1-5``) or a local
    diffusers folder, with its safety checker off: the checker blacks out exactly the images
    this command exists to produce (for a safety data set; store them with care)."""
    import torch
    from diffusers import AutoPipelineForText2Image

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    # fp32 is diffusers' default; the keyword is only passed when it changes something (its
    # name moves from torch_dtype to dtype across diffusers versions)
    kwargs: dict[str, Any] = {} if dtype == "fp32" else {"torch_dtype": dtypes[dtype]}
    index = Path(name_or_path) / "model_index.json"
    has_checker = True
    if index.is_file():
        has_checker = "safety_checker" in json.loads(index.read_text())
    elif Path(name_or_path).exists():
        raise FileNotFoundError(f"{name_or_path}: not a diffusers pipeline folder (no model_index.json)")
    if has_checker:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    pipe = AutoPipelineForText2Image.from_pretrained(str(name_or_path), **kwargs)
    return pipe.to(device)


class ClipNsfwScorer:
    """Zero-shot NSFW score from a CLIP model: the softmax mass of the unsafe prompts among all
    prompts (CLIP's logit scale as temperature). Any open_clip model works (``ViT-L-14`` /
    ``openai`` for real images; the toy base for the toy world).

    Args:
        bundle: a :class:`saferclip.model.build.ClipBundle`.
        unsafe_prompts / safe_prompts: the two classes' descriptions.
        temperature: multiplies the cosine similarities before the softmax (CLIP's 100).
    """

    def __init__(
        self,
        bundle: Any,
        unsafe_prompts: Sequence[str] = DEFAULT_UNSAFE_PROMPTS,
        safe_prompts: Sequence[str] = DEFAULT_SAFE_PROMPTS,
        temperature: float = 100.0,
        batch_size: int = 32,
    ):
        import torch

        from ..model.build import encode_text

        if not unsafe_prompts or not safe_prompts:
            raise ValueError("ClipNsfwScorer needs at least one unsafe and one safe prompt")
        self.bundle, self.temperature, self.batch_size = bundle, float(temperature), batch_size
        self.unsafe_prompts, self.safe_prompts = list(unsafe_prompts), list(safe_prompts)
        self.prompts = torch.cat([encode_text(bundle, self.unsafe_prompts), encode_text(bundle, self.safe_prompts)])  # [P, D]

    def __call__(self, images: list[Image.Image]) -> list[float]:
        import torch

        from ..model.build import encode_images

        if not images:
            return []
        pixels = torch.stack([self.bundle.preprocess(im.convert("RGB")) for im in images])
        emb = encode_images(self.bundle, pixels, self.batch_size)  # [N, D], normalised
        probs = (self.temperature * emb @ self.prompts.T).softmax(dim=-1)  # [N, P]
        return probs[:, : len(self.unsafe_prompts)].sum(dim=-1).tolist()

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "clip-zero-shot",
            "arch": self.bundle.arch,
            "weights": public_model_name(self.bundle.source),
            "unsafe_prompts": self.unsafe_prompts,
            "safe_prompts": self.safe_prompts,
            "temperature": self.temperature,
        }


def load_scorer(spec: str) -> Scorer:
    """The scorer made by ``module:factory``: a callable taking no arguments that returns a
    scorer (``images -> scores``), e.g. one loading an NSFW image detector of your own."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"scorer {spec!r}: expected 'clip' or 'module:factory'")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"scorer {spec!r}: cannot import it ({e})") from None
    scorer = factory() if callable(factory) else None
    if not callable(scorer):
        raise ValueError(f"scorer {spec!r}: expected a factory returning a callable images -> scores")
    return scorer


# ---------------------------------------------------------------- records


def image_stem(item_id: str) -> str:
    """A file name for an item id: the id itself when it is a plain name, else a hash of it."""
    if _SAFE_STEM.match(item_id):
        return item_id
    return "id-" + hashlib.sha256(item_id.encode()).hexdigest()[:20]


def _records_path(out: Path, shard: tuple[int, int]) -> Path:
    return out / RECORDS_DIR / f"shard-{shard[0]}-of-{shard[1]}.jsonl"


def read_records(out_dir: str | os.PathLike) -> tuple[dict[str, dict[str, Any]], int]:
    """Every finished caption's record (by item id) from all shard files, and how many lines
    were ignored (cut short by a killed run: not valid JSON, or without an id)."""
    folder = Path(out_dir) / RECORDS_DIR
    records: dict[str, dict[str, Any]] = {}
    ignored = 0
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                ignored += 1
                continue
            if not isinstance(rec, dict) or "id" not in rec or rec.get("status") not in ("flagged", "unflagged"):
                ignored += 1
                continue
            records[str(rec["id"])] = rec  # a caption redone after a damaged line: the last one holds
    return records, ignored


def _drop_damaged_lines(path: Path) -> int:
    """Rewrite this shard's own record file without lines cut short by a killed run (atomically),
    so they are reported once, by the run that redoes their captions. Returns how many."""
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = []
    for line in lines:
        try:
            rec = json.loads(line)
            ok = isinstance(rec, dict) and "id" in rec and rec.get("status") in ("flagged", "unflagged")
        except json.JSONDecodeError:
            ok = False
        if ok:
            kept.append(line)
    dropped = sum(1 for line in lines if line.strip()) - len(kept)
    if dropped:
        with atomic_path(path, suffix=".jsonl") as tmp:
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    return dropped


def _append_record(path: Path, record: Mapping[str, Any]) -> None:
    """One line, one write, then fsync: a kill leaves at most a cut-short last line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n"
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # a line cut short by a kill: keep it apart from ours
                line = "\n" + line
        f.write(line.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _settings(split: QuadrupletSet, config: GenerationConfig, extra: Mapping[str, Any]) -> dict[str, Any]:
    source = Path(split.source)
    return {
        "config": asdict(config),
        "input": {
            "file": source.name,
            "sha256": _file_sha256(source) if source.is_file() else None,
            "items": len(split),
        },
        **{k: v for k, v in extra.items() if v is not None},
    }


def _check_settings(out: Path, settings: Mapping[str, Any]) -> None:
    """The folder's settings, fixed by its first run, must equal this run's."""
    path = out / SETTINGS_FILE
    if not path.is_file():
        write_json_atomic(path, settings)
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataFormatError(path, f"unreadable generation settings ({e})") from None
    new = json.loads(json.dumps(settings, default=str))  # the same normal form as the file
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{key}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            diffs.append(f"{key}: {a!r} -> {b!r}")
    if diffs:
        raise DataFormatError(
            path,
            f"this folder was generated with other settings ({'; '.join(diffs[:4])}); resume with the same "
            f"settings or write to another folder",
        )


# ---------------------------------------------------------------- the run


def parse_shard(spec: str | tuple[int, int] | None) -> tuple[int, int]:
    """``"i/n"`` -> (i, n); ``"auto"`` reads RANK / WORLD_SIZE (torchrun, accelerate) or
    SLURM_PROCID / SLURM_NTASKS; None -> (0, 1)."""
    if spec is None:
        return 0, 1
    if isinstance(spec, tuple):
        i, n = spec
    elif spec == "auto":
        for rank, world in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
            if rank in os.environ and world in os.environ:
                i, n = int(os.environ[rank]), int(os.environ[world])
                break
        else:
            i, n = 0, 1
    else:
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(spec))
        if not match:
            raise ValueError(f"shard {spec!r}: expected i/n (e.g. 0/4) or auto")
        i, n = int(match.group(1)), int(match.group(2))
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"shard {i}/{n}: expected 0 <= i < n")
    return int(i), int(n)


def load_captions(split: QuadrupletSet | str | os.PathLike, table_split: str | None = None) -> QuadrupletSet:
    """A ViSU(-Text) split, text only: a loaded set, a ViSU JSON, a ViSU-Text table or a HF
    ``datasets`` folder (``table_split`` picks its split)."""
    if isinstance(split, QuadrupletSet):
        return split
    from ..data import load_quadruplets

    return load_quadruplets(split, split=table_split, mode="text")


def _scores(scorer: Scorer, image: Image.Image, item: Quadruplet) -> float:
    out = list(scorer([image]))
    if len(out) != 1:
        raise ValueError(f"the scorer returned {len(out)} scores for 1 image (item {item.id})")
    score = float(out[0])
    if math.isnan(score):
        raise ValueError(f"the scorer returned NaN (item {item.id})")
    return score


def generate_visu_images(
    split: QuadrupletSet | str | os.PathLike,
    out_dir: str | os.PathLike,
    generator_factory: Callable[[], ImageGenerator],
    scorer: Scorer,
    config: GenerationConfig = GenerationConfig(),
    *,
    shard: tuple[int, int] | str | None = None,
    limit: int | None = None,
    settings: Mapping[str, Any] | None = None,
    merge: bool = True,
    progress: bool = False,
) -> GenerationReport:
    """Generate and keep an unsafe image for each unsafe caption of this shard (module doc).

    Args:
        split: the ViSU(-Text) split (see :func:`load_captions`).
        out_dir: the output folder, shared by every shard and every resumed run.
        generator_factory: called once, when the first caption needs an image (a run with
            nothing left to do loads no pipeline); returns ``(prompt, seed) -> image``.
        scorer: ``images -> scores`` in [0, 1]; flagged when ``>= config.threshold``.
        config: seeds, threshold and the pipeline's call settings.
        shard: ``(i, n)``, ``"i/n"`` or ``"auto"`` (:func:`parse_shard`).
        limit: generate at most this many captions in this call (a trial run).
        settings: extra identity of the run stored in ``generation.json`` and checked on
            resume (the pipeline's name, the scorer's description).
        merge: write the merged ViSU JSON when every caption of the split has a record.

    Returns:
        a :class:`GenerationReport`.
    """
    start = time.perf_counter()
    split = load_captions(split)
    shard = parse_shard(shard)
    out = Path(out_dir).expanduser().absolute()
    out.mkdir(parents=True, exist_ok=True)
    merged_path(split, out)  # refuse before any work when it would replace the input
    _check_settings(out, _settings(split, config, settings or {}))
    ids = [q.id for q in split.items]
    if len(set(ids)) != len(ids):
        raise DataFormatError(split.source, "duplicate item ids; each caption needs its own id for its record")

    records_file = _records_path(out, shard)
    dropped = _drop_damaged_lines(records_file)
    records, ignored = read_records(out)
    mine = [q for k, q in enumerate(split.items) if k % shard[1] == shard[0]]
    todo = [q for q in mine if q.id not in records]
    report = GenerationReport(len(split), shard, len(mine), len(mine) - len(todo), ignored_lines=dropped + ignored)
    if limit is not None:
        todo = todo[: max(0, int(limit))]
    generate: ImageGenerator | None = None
    iterator: Iterable[Quadruplet] = todo
    from ..console import show_progress

    if show_progress(progress) and todo:
        from tqdm import tqdm

        iterator = tqdm(todo, desc=f"shard {shard[0]}/{shard[1]}", unit="caption")
    for item in iterator:
        if generate is None:
            generate = generator_factory()
        record = _generate_one(item, generate, scorer, config, out, shard)
        _append_record(records_file, record)
        records[item.id] = record
        if record["status"] == "flagged":
            report.flagged += 1
        else:
            report.unflagged += 1
    records, _ = read_records(out)  # again: other shards may have finished meanwhile
    report.remaining = sum(1 for i in ids if i not in records)
    if merge and report.remaining == 0:
        report.merged = merge_generation(split, out)
    report.seconds = time.perf_counter() - start
    return report


def _generate_one(
    item: Quadruplet, generate: ImageGenerator, scorer: Scorer, config: GenerationConfig, out: Path, shard: tuple[int, int]
) -> dict[str, Any]:
    scores: dict[str, float] = {}
    kept: tuple[int, int, float] | None = None
    t0 = time.perf_counter()
    for seed in config.seeds:
        torch_seed = config.generator_seed(item.id, seed)
        image = generate(item.unsafe_caption, torch_seed)
        score = _scores(scorer, image, item)
        scores[str(seed)] = score
        if score >= config.threshold:
            rel = f"{IMAGES_DIR}/{image_stem(item.id)}.png"
            with atomic_path(out / rel, suffix=".png") as tmp:
                image.save(tmp, format="PNG")
            kept = (seed, torch_seed, score)
            break
    record: dict[str, Any] = {
        "id": item.id,
        "nsfw": item.unsafe_caption,
        "status": "flagged" if kept else "unflagged",
        "scores": scores,
        "shard": f"{shard[0]}/{shard[1]}",
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if kept:
        record.update(image=f"{IMAGES_DIR}/{image_stem(item.id)}.png", seed=kept[0], generator_seed=kept[1], score=kept[2])
    return record


# ---------------------------------------------------------------- the merged ViSU file


def merged_path(split: QuadrupletSet, out: Path) -> Path:
    """``<out>/<input stem>.json``, refused where it would replace the input or the settings."""
    path = out / f"{Path(split.source).stem or 'visu'}.json"
    if path.name == SETTINGS_FILE or path.resolve() == Path(split.source).resolve():
        raise ValueError(f"{path}: the merged ViSU file would replace {path.name} there; choose another output folder")
    return path


def merge_generation(split: QuadrupletSet | str | os.PathLike, out_dir: str | os.PathLike, *, allow_partial: bool = False) -> Path:
    """Write ``<out_dir>/<input stem>.json``: a ViSU JSON of the flagged captions with
    ``nsfw_im_path`` relative to ``out_dir`` (+ ``nsfw_im_seed``, ``nsfw_im_score``), and in
    ``info`` the counts and the ids of the captions with no flagged image.

    Raises ValueError while captions lack a record (unless ``allow_partial``: they are then
    listed in ``info.missing``), and DataFormatError when a record's image is missing.
    """
    split = load_captions(split)
    out = Path(out_dir).expanduser().absolute()
    records, ignored = read_records(out)
    missing = [q.id for q in split.items if q.id not in records]
    if missing and not allow_partial:
        raise ValueError(
            f"{out}: {len(missing)} of {len(split)} captions have no record yet (e.g. {missing[:3]}); "
            f"finish every shard first"
        )
    data: dict[str, dict[str, Any]] = {}
    unflagged: list[str] = []
    for q in split.items:
        rec = records.get(q.id)
        if rec is None:
            continue
        if rec["status"] != "flagged":
            unflagged.append(q.id)
            continue
        image = out / rec["image"]
        if not image.is_file():
            raise DataFormatError(out / RECORDS_DIR, f"the record of item {q.id} names {rec['image']}, which is missing", row=q.id)
        meta = {k: v for k, v in q.meta.items() if k != "coco_id"}
        data[q.id] = {
            "coco_id": q.meta.get("coco_id"),
            "safe": q.safe_caption,
            "nsfw": q.unsafe_caption,
            "tag": q.tag,
            **meta,
            "nsfw_im_path": rec["image"],
            "nsfw_im_seed": rec["seed"],
            "nsfw_im_score": rec["score"],
        }
    settings = json.loads((out / SETTINGS_FILE).read_text()) if (out / SETTINGS_FILE).is_file() else {}
    info = {
        "description": (
            "ViSU unsafe images regenerated by saferclip-generate-visu: the first image, over the "
            "configured seeds, that the NSFW scorer flagged; nsfw_im_path is relative to this folder"
        ),
        "source": public_model_name(split.source),
        "generation": settings,
        "counts": {"captions": len(split), "flagged": len(data), "unflagged": len(unflagged), "missing": len(missing)},
        "unflagged": unflagged,
    }
    if missing:
        info["missing"] = missing
    if ignored:
        info["counts"]["ignored_record_lines"] = ignored
    path = merged_path(split, out)
    write_json_atomic(path, {"info": info, "data": data})
    return path


__all__ = [
    "ClipNsfwScorer",
    "DEFAULT_SAFE_PROMPTS",
    "DEFAULT_UNSAFE_PROMPTS",
    "DiffusersImageGenerator",
    "GenerationConfig",
    "GenerationReport",
    "ImageGenerator",
    "PUBLISHED_SEEDS",
    "Scorer",
    "generate_visu_images",
    "image_stem",
    "load_captions",
    "load_diffusion_pipeline",
    "load_scorer",
    "merge_generation",
    "parse_shard",
    "read_records",
]
