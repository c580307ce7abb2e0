"""saferclip-detect: flag unsafe captions or images with a detector saferclip-analyze calibrated,
or flag inputs unlike the training data with a coverage monitor saferclip-attack calibrated.

    saferclip-detect outputs/analyze/<time>/detectors/original.safetensors captions.csv
    saferclip-detect detector.safetensors prompts.txt --out flags.csv
    saferclip-detect detector.safetensors images/ --model my-export/ --force

INPUTS is a caption table (CSV / TSV / JSONL / Parquet: ``--column``, default the first of
caption, text, prompt; or a .txt file, one caption a line) scored by the text detector, or a
folder of images (recursively) scored by the image detector. The model is the one the detector
was calibrated on (recorded in the file; ``--model`` names it if it moved) and its weights must
match the recorded fingerprint. Writes a CSV (``input, score, threshold, flagged``; default
``<INPUTS>.flags.csv`` beside the input) and prints how many inputs were flagged. What the user
can fix is one line on stderr and exit code 2, not a traceback.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import sys
from pathlib import Path

from ...errors import ConfigError
from ..cli import argparse_epilog, command, doc_summary

PROG = "saferclip-detect"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=doc_summary(__doc__),
        epilog=argparse_epilog(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "detector",
        type=Path,
        help="a detector file (detectors/<model>.safetensors from saferclip-analyze) "
        "or a coverage monitor (monitors/<model>.safetensors from saferclip-attack)",
    )
    parser.add_argument("inputs", type=Path, help="a caption table or .txt file, or a folder of images")
    parser.add_argument("--out", type=Path, default=None, help="the CSV to write (default: <INPUTS>.flags.csv)")
    parser.add_argument(
        "--column", default=None, help="the caption column of a table (default: caption, text or prompt)"
    )
    parser.add_argument(
        "--model", default=None, help="the model the detector was calibrated on, if not where the file says"
    )
    parser.add_argument("--arch", default=None, help="its open_clip architecture (default: recorded in the detector)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    return parser


def default_out(inputs: Path) -> Path:
    inputs = Path(inputs)
    return inputs.parent / f"{inputs.name if inputs.is_dir() else inputs.stem}.flags.csv"


def detect(args: argparse.Namespace) -> dict:
    from ...analysis.data import image_files, read_captions
    from ...analysis.detector import load_detectors, read_detector_header
    from ...analysis.guard import score_inputs
    from ...files import atomic_path
    from ...model.build import weights_fingerprint
    from ...model.checkpoints import CheckpointError
    from ...model.trained import load_model
    from ...robustness.coverage import FORMAT as MONITOR_FORMAT
    from ...robustness.coverage import file_format, load_monitors, watched_inputs

    monitor = file_format(args.detector) == MONITOR_FORMAT  # a coverage monitor (saferclip-attack)
    if monitor:
        detectors = load_monitors(args.detector)
        header = {"model_name": next(iter(detectors.values())).model.get("name", "?")}
    else:
        detectors = load_detectors(args.detector)
        header = read_detector_header(args.detector)
    if not args.inputs.exists():
        raise FileNotFoundError(f"inputs not found: {args.inputs}")
    tower = "image" if args.inputs.is_dir() else "text"
    if tower not in detectors:
        raise ConfigError(f"{args.detector} has no {tower} detector (has: {', '.join(detectors)}) for {args.inputs}")
    det = detectors[tower]
    out = args.out or default_out(args.inputs)
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} exists; pass --force to replace it, or --out")
    items = [str(p) for p in image_files(args.inputs)] if tower == "image" else read_captions(args.inputs, args.column)
    source = args.model or det.model.get("source")
    if not source:
        raise ConfigError(f"{args.detector} records no model; pass --model")
    bundle = load_model(args.arch or det.model.get("arch"), source, device=args.device)
    recorded = det.model.get("weights_fingerprint")
    if recorded and weights_fingerprint(bundle.model) != recorded:
        raise CheckpointError(
            f"{source}: not the weights the detector was calibrated on (model {header.get('model_name', '?')!r}, "
            f"fingerprint {recorded[:12]}…); pass the model it was calibrated on with --model"
        )
    if monitor:
        scores = det.scores(watched_inputs(bundle, tower, items, det.layers, args.batch_size))
        flags = scores > det.threshold
    else:
        scores, flags = score_inputs(bundle, det, items, args.batch_size, args.num_workers)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["input", "score", "threshold", "flagged"])
    base = args.inputs if tower == "image" else None
    for item, score, flag in zip(items, scores.tolist(), flags.tolist()):
        shown = str(Path(item).relative_to(base)) if base is not None else item
        writer.writerow([shown, f"{score:.6f}", f"{det.threshold:.6f}", int(flag)])
    with atomic_path(out) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")
    return {"out": out, "tower": tower, "num_inputs": len(items), "num_flagged": int(flags.sum()), "detector": det}


def main(argv: list[str] | None = None) -> int:
    from ..hydra_utils import setup_logging

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    setup_logging()  # quiets open_clip's "initialized randomly" before the weights load
    return command(PROG, lambda: _detect_and_print(args))


def _detect_and_print(args: argparse.Namespace) -> None:
    result = detect(args)
    det = result["detector"]
    n, k = result["num_inputs"], result["num_flagged"]
    where = (
        f"coverage monitor ({len(det.low)} neurons of blocks {det.layers}"
        if getattr(det, "kind", "") == "coverage"
        else f"detector (layer {det.layer}, head {det.head}"
    )
    print(
        f"{k} of {n} {'images' if result['tower'] == 'image' else 'captions'} flagged ({100 * k / n:.1f}%) by the "
        f"{result['tower']} {where}, threshold {det.threshold:.4f}, "
        f"calibrated for {100 * det.target_fpr:.0f}% false positives) -> {result['out']}"
    )


if __name__ == "__main__":
    sys.exit(main())
