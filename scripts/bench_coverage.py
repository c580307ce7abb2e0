"""What the coverage monitor costs: extra time per input over a plain forward pass, and the
memory of its profile.

    python scripts/bench_coverage.py                                   # the toy base CLIP, toy world under $SAFERCLIP_HOME
    python scripts/bench_coverage.py --model outputs/runs/<run>/export --batch 64 --repeats 30

It profiles and calibrates a monitor per tower on the toy world's training / validation split,
then times, on the same batch of test inputs (preprocessed tensors / tokens, so that file
reading is not counted), ``encode_image`` / ``encode_text`` alone against the monitored pass
(the same forward with the monitor's hooks, plus scoring). Prints the median per input over
``--repeats`` and the overhead in % of the plain forward.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def main() -> None:
    from saferclip.analysis.heads import recording, tower_blocks
    from saferclip.data.splits import load_split
    from saferclip.locations import home
    from saferclip.model.build import default_base_checkpoint, eval_mode
    from saferclip.model.trained import load_model
    from saferclip.robustness.coverage import (
        KINDS,
        calibrate,
        neurons,
        profile,
        token_means,
        watched_with_groups,
        with_token_means,
    )
    from saferclip.robustness.image_attacks import load_pixels, split_normalisation
    from saferclip.robustness.runner import SplitInputs

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(default_base_checkpoint()))
    parser.add_argument("--arch", default=None)
    parser.add_argument("--toy", default=str(home() / "data" / "toy"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--train-items", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    v = os.path.join(args.toy, "visu")
    data = {
        "splits": {
            s: {"path": f"{v}/{s}.json", "image_root": v, "split_dir": d, "unsafe_image_root": v, "image_ext": ".png"}
            for s, d in (("train", "train2017"), ("validation", "val2017"), ("test", "test2017"))
        }
    }
    bundle = load_model(args.arch or ("saferclip-toy" if args.model.endswith(".safetensors") else None), args.model)
    model = bundle.model
    train, val, test = (
        load_split(data, "train"),
        load_split(data, "validation"),
        SplitInputs.of(load_split(data, "test")),
    )
    print(f"model {args.model}; batch {args.batch}; {args.repeats} repeats; torch threads {args.threads}")
    for tower in ("image", "text"):
        layers = list(range(len(tower_blocks(model, tower))))
        pool = ([str(q.safe_image) for q in train] if tower == "image" else list(train.safe_captions))[
            : args.train_items
        ]
        x, groups = watched_with_groups(bundle, tower, pool, layers)
        valp = [str(q.safe_image) for q in val] if tower == "image" else list(val.safe_captions)
        monitor = calibrate(
            profile(x, groups, tower, layers), watched_with_groups(bundle, tower, valp[:600], layers)[0]
        )
        if tower == "image":
            to_pixels, mean, std = split_normalisation(bundle.preprocess)
            batch = (load_pixels(test.safe_images[: args.batch], to_pixels) - mean.view(1, 3, 1, 1)) / std.view(
                1, 3, 1, 1
            )
            forward = lambda: model.encode_image(batch)  # noqa: E731
        else:
            tokens = bundle.tokenizer(test.safe_captions[: args.batch])
            forward = lambda: model.encode_text(tokens)  # noqa: E731
        n = len(batch) if tower == "image" else len(tokens)

        def monitored():
            with (
                recording(model, tower, KINDS, layers) as rec,
                token_means(model, tower, layers if tower == "image" else []) as store,
            ):
                final = bundle.similarity.embed(forward(), tower)
                return monitor.flags(neurons(with_token_means(rec.take(final), store))[0])

        timings = {"plain": [], "monitored": []}
        with torch.no_grad(), eval_mode(model):
            for _ in range(3):
                forward(), monitored()
            for _ in range(args.repeats):
                for name, fn in (("plain", forward), ("monitored", monitored)):
                    t = time.perf_counter()
                    fn()
                    timings[name].append(time.perf_counter() - t)
        plain, mon = statistics.median(timings["plain"]), statistics.median(timings["monitored"])
        print(
            f"{tower}: forward {1e3 * plain / n:.3f} ms/input, monitored {1e3 * mon / n:.3f} ms/input, "
            f"overhead {100 * (mon - plain) / plain:+.1f}%; profile {monitor.nbytes() / 1024:.1f} KiB "
            f"({len(monitor.low)} neurons, {monitor.sections} sections)"
        )


if __name__ == "__main__":
    main()
