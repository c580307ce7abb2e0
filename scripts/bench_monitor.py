"""What the safety monitor costs: extra time per input over a plain forward pass (target: at
most 10% of it).

    python scripts/bench_monitor.py                                   # the toy base CLIP, toy world under $SAFERCLIP_HOME
    python scripts/bench_monitor.py --model outputs/runs/<run>/export --batch 64 --repeats 30

It fits the monitor of each tower as ``saferclip-attack`` does (:func:`saferclip.robustness.
monitor.fit_monitor`: the head from labelled training inputs, the bank of the model's own
training embeddings, the threshold on clean safe validation inputs), then times, on the same
batch of test inputs (preprocessed tensors / tokens: file reading is not counted),
``encode_image`` / ``encode_text`` alone against the monitored pass (the same forward with the
head read by one hook, plus the signals and the flag). Prints the median per input over
``--repeats`` (the two interleaved) and the overhead in % of the plain forward.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def main() -> None:
    from saferclip.analysis.detector import sample
    from saferclip.data.splits import load_split
    from saferclip.locations import home
    from saferclip.model.build import default_base_checkpoint, encode_tokens, eval_mode
    from saferclip.model.trained import load_model
    from saferclip.robustness.image_attacks import load_pixels, split_normalisation
    from saferclip.robustness.monitor import fit_monitor, reading_head
    from saferclip.robustness.runner import SplitInputs, monitor_bank

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(default_base_checkpoint()))
    parser.add_argument("--arch", default=None)
    parser.add_argument("--mode", default=None, help="a HySAC export's mode (safe | moderation)")
    parser.add_argument("--toy", default=str(home() / "data" / "toy"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--bank-items", type=int, default=250, help="per kind (safe / unsafe captions / images)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    v = os.path.join(args.toy, "visu")
    data = {
        "splits": {
            s: {"path": f"{v}/{s}.json", "image_root": v, "split_dir": d, "unsafe_image_root": v, "image_ext": ".png"}
            for s, d in (("train", "train2017"), ("validation", "val2017"), ("test", "test2017"))
        }
    }
    arch = args.arch or ("saferclip-toy" if args.model.endswith(".safetensors") else None)
    bundle = load_model(arch, args.model, **({"mode": args.mode} if args.mode else {}))
    model = bundle.model
    train, val, test = (SplitInputs.of(load_split(data, s)) for s in ("train", "validation", "test"))
    bank = monitor_bank(bundle, train, args.bank_items, 0, 256)
    print(
        f"model {args.model}; batch {args.batch}; {args.repeats} repeats; torch threads {args.threads}; bank {len(bank[0])} embeddings"
    )
    rows = []
    for tower in ("image", "text"):
        safe, unsafe, clean = (
            (train.safe_images, train.unsafe_images, val.safe_images)
            if tower == "image"
            else (train.safe_captions, train.unsafe_captions, val.safe_captions)
        )
        monitor = fit_monitor(
            bundle, tower, (sample(safe, 150, 5), sample(unsafe, 150, 6)), bank, sample(clean, 300, 7)
        )
        if tower == "image":
            to_pixels, mean, std = split_normalisation(bundle.preprocess)
            batch = (load_pixels(test.safe_images[: args.batch], to_pixels) - mean.view(1, 3, 1, 1)) / std.view(
                1, 3, 1, 1
            )
            forward = lambda: bundle.similarity.embed(model.encode_image(batch), "image")  # noqa: E731
        else:
            tokens = bundle.tokenizer(test.safe_captions[: args.batch])
            forward = lambda: bundle.similarity.embed(encode_tokens(model, tokens, normalize=False), "text")  # noqa: E731
        n = args.batch
        layer, head = monitor.head if monitor.head else (None, None)

        def monitored():
            with reading_head(model, tower, layer, head) as store:
                final = forward()
            return monitor.flags(final, torch.cat(store) if store else None)

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
            f"{tower}: signals {', '.join(monitor.signals)} (head {monitor.head}); forward {1e3 * plain / n:.3f} ms/input, "
            f"monitored {1e3 * mon / n:.3f} ms/input, overhead {100 * (mon - plain) / plain:+.1f}%"
        )
        rows.append(
            {
                "tower": tower,
                "forward_ms": 1e3 * plain / n,
                "monitored_ms": 1e3 * mon / n,
                "batch": n,
                "repeats": args.repeats,
                "threads": args.threads,
                "model": args.model,
                "bank": len(bank[0]),
                "signals": list(monitor.signals),
            }
        )
    if args.json:
        import json
        from pathlib import Path

        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
