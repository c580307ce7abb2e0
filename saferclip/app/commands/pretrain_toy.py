"""saferclip-pretrain-toy: reproduce the toy world's base CLIP (saferclip.toyworld.pretrain).

    saferclip-pretrain-toy                                  # data/toy_base.safetensors
    saferclip-pretrain-toy --out /tmp/base.safetensors --force
    saferclip-train model.pretrained=/tmp/base.safetensors  # then fine-tune it

The settings (epochs, pairs, batch, learning rate) are its options; the shipped base model was
made with the defaults.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

from ...locations import data_dir
from ...toyworld.pretrain_config import PretrainConfig
from ..cli import argparse_epilog, command, doc_summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="saferclip-pretrain-toy",
        description=doc_summary(__doc__),
        epilog=argparse_epilog(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where to write the checkpoint (default: data/toy_base.safetensors under $SAFERCLIP_HOME or the "
        "working directory; use it with model.pretrained=<path>)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite an existing checkpoint")
    for name, value in asdict(PretrainConfig()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    args.out = args.out or data_dir() / "toy_base.safetensors"
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    logging.getLogger("saferclip").setLevel(logging.INFO)
    if args.out.exists() and not args.force:
        parser.error(f"{args.out} exists; pass --force to overwrite it, or --out to write elsewhere")
    cfg = PretrainConfig(**{k: getattr(args, k) for k in asdict(PretrainConfig())})

    def body() -> None:
        from ...toyworld.pretrain import pretrain

        print(json.dumps(pretrain(cfg, args.out), indent=2))

    return command("saferclip-pretrain-toy", body)


if __name__ == "__main__":
    sys.exit(main())
