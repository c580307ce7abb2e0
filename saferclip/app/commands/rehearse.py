"""saferclip-rehearse: the real-data recipe at real size on a rehearsal world, stage by stage
(cache, neighbours, training steps, evaluation, export), with each stage's items/s and peak memory.

    saferclip-rehearse model=vit_b32_random                     # CPU: a few minutes
    saferclip-rehearse model=vit_l14_random --items 32 --steps 2
    saferclip-rehearse model=vit_l14_random --items 4096 --steps 50 --device cuda   # a GPU

The stages are :func:`saferclip.app.pipelines.rehearse.rehearse`: the real open_clip
architecture with random weights (nothing downloaded) on toy scenes in ViSU's real layout.
Extra arguments are Hydra overrides of the ``train`` config; ``--json`` writes the table.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..cli import argparse_epilog, command, doc_summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="saferclip-rehearse",
        description=doc_summary(__doc__),
        epilog=argparse_epilog(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the train config, e.g. model=vit_l14_random")
    parser.add_argument("--items", type=int, default=64, help="training quadruplets of the rehearsal world")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, ... (default auto: cuda when torch sees one)"
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="DataLoader workers (default: 0 on a CPU, up to 8 with CUDA)"
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/rehearsal"))
    parser.add_argument("--json", type=Path, default=None, help="write the stage table here")
    args = parser.parse_args(argv)

    def body() -> None:
        from ..hydra_utils import resolve_device
        from ..pipelines.rehearse import rehearse

        device = resolve_device(args.device)
        workers = (
            args.workers
            if args.workers is not None
            else (0 if device == "cpu" else max(1, min(8, (os.cpu_count() or 2) - 2)))
        )
        rows = rehearse(args.out, args.overrides, args.items, args.steps, device, args.batch_size, workers)
        if args.json:
            from ...files import write_json_atomic

            write_json_atomic(args.json, {"device": device, "overrides": args.overrides, "stages": rows})

    return command("saferclip-rehearse", body)


if __name__ == "__main__":
    sys.exit(main())
