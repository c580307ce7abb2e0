"""saferclip-export: a training checkpoint or run folder -> a folder open_clip loads by itself.

    saferclip-export outputs/train/<run> exported/              # the run's best checkpoint
    saferclip-export outputs/train/<run>/checkpoints/last.ckpt exported/ --force
    saferclip-export <run> exported/ --dtype fp16 --single-file --eval-report outputs/eval/<time>
    saferclip-export <run> exported-hf/ --format hf           # a transformers CLIPModel folder

The folder (open_clip's hub layout, adapters merged, a model card) loads with
``open_clip.create_model_and_transforms("local-dir:exported")`` without saferclip; with
``--format hf`` it is a transformers folder (``CLIPModel.from_pretrained``,
``CLIPTextModel.from_pretrained``; see :mod:`saferclip.export.hf`). A plain
argparse CLI: it needs no config tree. What the user can fix (a missing source, a folder
without checkpoints, a truncated / foreign / pickle-needing file, an existing output folder
without --force) is one line on stderr and exit code 2, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..cli import argparse_epilog, command

PROG = "saferclip-export"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Export a saferclip training checkpoint (or a run folder's best) as a folder "
        "open_clip loads by itself: adapters merged, open_clip's hub layout, a model card (--format hf: a transformers folder).",
        epilog=argparse_epilog(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", type=Path, help="a training checkpoint (.ckpt) or a run folder (its best checkpoint)")
    parser.add_argument("out_dir", type=Path, help="the folder to write")
    parser.add_argument(
        "--force", action="store_true", help="replace OUT_DIR if it exists (only once the new one is complete)"
    )
    parser.add_argument(
        "--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="weights dtype (default fp32, exact)"
    )
    parser.add_argument(
        "--format",
        choices=("open_clip", "hf"),
        default="open_clip",
        help="open_clip: open_clip's hub layout (default); hf: a Hugging Face transformers CLIPModel folder "
        "(needs transformers: pip install 'saferclip[downstream]')",
    )
    parser.add_argument(
        "--single-file",
        action="store_true",
        help="also write <arch>-saferclip.safetensors for create_model_and_transforms(arch, pretrained=file)",
    )
    parser.add_argument(
        "--eval-report",
        type=Path,
        default=None,
        metavar="PATH",
        help="an evaluation report (results.json / results.md, or its folder) for the model card; "
        "default: the run's report/ if it has one",
    )
    return parser


def _setup_logging() -> None:
    # open_clip warns on the root logger that the model it builds first is randomly initialised;
    # the trained weights are loaded right after, so that line would only mislead
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("saferclip").setLevel(logging.WARNING)


def _size(path: Path) -> str:
    n = float(path.stat().st_size)
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def usage_snippet(out: Path, format: str = "open_clip") -> list[str]:
    """Three lines of Python that load the export with open_clip (or transformers) alone."""
    if format == "hf":
        return [
            "from transformers import CLIPModel, CLIPTokenizer, CLIPTextModel",
            f'model = CLIPModel.from_pretrained("{out}")',
            f'tokenizer = CLIPTokenizer.from_pretrained("{out}")',
            f'text_encoder = CLIPTextModel.from_pretrained("{out}")  # e.g. for a diffusion pipeline',
        ]
    return [
        "import open_clip",
        f'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:{out}")',
        f'tokenizer = open_clip.get_tokenizer("local-dir:{out}")',
    ]


def summary(out: Path, source: Path | None = None, format: str = "open_clip") -> str:
    from ...export.open_clip import CONFIG_NAME

    if format == "hf":
        from ...export.hf import read_provenance

        info = read_provenance(out)
    else:
        info = json.loads((out / CONFIG_NAME).read_text()).get("saferclip", {})
    progress = ", ".join(
        f"{k.replace('_', ' ')} {info[k]}" for k in ("epoch", "global_step") if info.get(k) is not None
    )
    lines = [
        f"exported {source or info.get('source')}"
        + (f" ({info['training_checkpoint']})" if source and info.get("training_checkpoint") else ""),
        f"  {info.get('arch')}, method {info.get('method')}, base {info.get('pretrained')}"
        + (f", {progress}" if progress else "")
        + f", {info.get('merged_adapters')} adapters merged, {info.get('dtype')}",
        f"to {out}/" + (" (transformers CLIPModel)" if format == "hf" else ""),
    ]
    lines += [f"  {p.name:<40} {_size(p):>10}" for p in sorted(out.iterdir()) if p.is_file()]
    library = "transformers" if format == "hf" else "open_clip"
    lines += ["", f"Load it with {library} alone:", *(f"  {line}" for line in usage_snippet(out, format))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging()
    return command(PROG, lambda: _export(args))


def _export(args: argparse.Namespace) -> None:
    from ...errors import ConfigError
    from ...export.run import export_checkpoint

    if not args.source.exists():
        raise FileNotFoundError(f"{args.source}: no such training checkpoint or run folder")
    try:
        out = export_checkpoint(
            args.source,
            args.out_dir,
            force=args.force,
            dtype=args.dtype,
            also_single_file=args.single_file,
            evaluation=args.eval_report,
            format=args.format,
        )
    except ImportError as e:  # --format hf without transformers installed
        raise ConfigError(f"{e}; install it with: pip install 'saferclip[downstream]'") from None
    print(summary(out, args.source, args.format))


if __name__ == "__main__":
    sys.exit(main())
