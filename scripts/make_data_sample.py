"""Write `data/sample/`: a few records of every real data format saferclip reads, with their
images (data/README.md says what each file is and where real data goes).

The records and images come from the toy world (seed 0, small sizes: synthetic shapes, an
"unsafe" object is a coloured tile), re-laid in the layouts of the real data sets: ViSU JSON
with COCO-named JPEGs, ViSU-Text CSV tables, an NSFW-Caps table whose images are named by
their URL's basename (no unsafe-image column, as in the real benchmark), and a zero-shot image
folder. The loader tests and the README's dry-run example read it.

    python scripts/make_data_sample.py            # rewrites data/sample/ (a few dozen kB)
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import tempfile
from pathlib import Path

from PIL import Image

from saferclip.toyworld.generate import SMALL_SIZES, make_toy_world

REPO = Path(__file__).resolve().parents[1]
# split -> (records kept, COCO folder the data config names for it: conf/data/visu.yaml)
SPLITS = {"train": (6, "train2017"), "validation": (3, "val2017"), "test": (3, "val2017")}
VISU_FIELDS = ("coco_id", "nsfw_im_path", "safe", "nsfw", "tag")
NSFW_CAPS_ROWS = 4
ZEROSHOT = ("shape", ("circle", "square"), 2)  # task, classes, images per class


def jpeg(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as im:
        im.convert("RGB").save(dst, "JPEG", quality=90)


def records(payload: dict) -> list[dict]:
    data = payload["data"] if "data" in payload else payload
    return [data[k] for k in sorted(data, key=int)]


def write_visu(world: Path, out: Path) -> None:
    toy_dirs = {"train": "train2017", "validation": "val2017", "test": "test2017"}
    for split, (n, coco_dir) in SPLITS.items():
        kept = []
        for i, rec in enumerate(records(json.loads((world / "visu" / f"{split}.json").read_text()))[:n]):
            safe_src = world / "visu" / toy_dirs[split] / f"{rec['coco_id']:012d}.png"
            jpeg(safe_src, out / "coco" / coco_dir / f"{rec['coco_id']:012d}.jpg")
            unsafe_rel = f"nsfw_images/{split}/{i:06d}.jpg"
            jpeg(world / "visu" / rec["nsfw_im_path"], out / "visu" / unsafe_rel)
            kept.append({**{k: rec[k] for k in VISU_FIELDS}, "nsfw_im_path": unsafe_rel})
        # both ViSU layouts, as the release has them: {"info", "data"} and keyed by index
        if split == "train":
            payload = {
                "info": {"description": "saferclip data sample (toy world, seed 0)"},
                "data": {str(i): r for i, r in enumerate(kept)},
            }
        else:
            payload = {str(i): r for i, r in enumerate(kept)}
        (out / "visu" / f"{split}.json").write_text(json.dumps(payload, indent=1) + "\n")
        # ViSU-Text: the same records as a text-only table
        table = out / "visu_text" / f"{split}.csv"
        table.parent.mkdir(parents=True, exist_ok=True)
        with open(table, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["incremental_id", "safe", "nsfw", "coco_id", "tag", "prompt_id"])
            for i, r in enumerate(kept):
                w.writerow([i, r["safe"], r["nsfw"], r["coco_id"], r["tag"], i])


def write_nsfw_caps(world: Path, out: Path) -> None:
    with open(world / "nsfw_caps" / "nsfw_caps.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:NSFW_CAPS_ROWS]
    table = out / "nsfw_caps" / "nsfw_caps.csv"
    table.parent.mkdir(parents=True, exist_ok=True)
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_coco_url", "caption", "nsfw_caption", "chosen_category"])
        for r in rows:
            name = Path(r["image_coco_url"]).stem + ".jpg"
            jpeg(world / "nsfw_caps" / "images" / Path(r["image_coco_url"]).name, out / "nocaps" / name)
            w.writerow(
                [f"https://toy.invalid/nocaps/val/{name}", r["caption"], r["nsfw_caption"], r["chosen_category"]]
            )


def write_zeroshot(world: Path, out: Path) -> None:
    task, classes, per_class = ZEROSHOT
    src, dst = world / "zeroshot" / task, out / "zeroshot" / task
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "classnames.json").write_text(json.dumps(list(classes)) + "\n")
    shutil.copyfile(src / "templates.json", dst / "templates.json")
    for c in classes:
        for i, image in enumerate(sorted((src / "test" / c).glob("*.png"))[:per_class]):
            jpeg(image, dst / "test" / c / f"{i:04d}.jpg")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "data" / "sample", help="default: %(default)s")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        world = make_toy_world(Path(tmp) / "world", seed=0, sizes=SMALL_SIZES)
        if args.out.exists():
            shutil.rmtree(args.out)
        write_visu(world, args.out)
        write_nsfw_caps(world, args.out)
        write_zeroshot(world, args.out)
    files = [p for p in args.out.rglob("*") if p.is_file()]
    print(f"{args.out}: {len(files)} files, {sum(p.stat().st_size for p in files) / 1024:.0f} kB")


if __name__ == "__main__":
    main()
