"""`owl model summary NAME`; `owl convert mplug-owl2|mplug-owl SRC DST` (the authors' releases
into our folder: a subcommand per model variant) and `owl convert to-release SRC DST` (our folder into their layout)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from owl.model.variants import VARIANTS


def register(subparsers: argparse._SubParsersAction) -> None:
    model = subparsers.add_parser("model", help="inspect model configs")
    model_sub = model.add_subparsers(dest="model_command", metavar="SUBCOMMAND")
    summary = model_sub.add_parser(
        "summary", help="parameter counts per component (nothing is allocated)"
    )
    summary.add_argument("name", help="registry name, e.g. debug-tiny, demo, owl2-llama2-7b")
    summary.add_argument("--variant", choices=list(VARIANTS), default=None)
    summary.add_argument("--json", action="store_true", help="print JSON")
    summary.set_defaults(func=_summary)

    convert = subparsers.add_parser(
        "convert", help="the authors' released weights into our format, and back"
    )
    convert_sub = convert.add_subparsers(dest="convert_command", metavar="FORMAT")
    commands = {}  # variants that share a release share its subcommand: the first converts it
    for variant in VARIANTS.values():
        commands.setdefault(variant.release.convert_command, variant)
    for variant in commands.values():
        release = convert_sub.add_parser(
            variant.release.convert_command,
            help=f"the authors' released {variant.title} folder ({variant.name}) -> our folder",
        )
        release.add_argument(
            "src", help="their folder: config.json + pytorch_model*.bin or *.safetensors"
        )
        release.add_argument("dst", help="output folder (config.json + safetensors)")
        release.add_argument("--json", action="store_true", help="print JSON")
        release.set_defaults(func=_convert_release, variant=variant.name)
    back = convert_sub.add_parser(
        "to-release", help="our folder -> the authors' layout (their config.json + safetensors)"
    )
    back.add_argument("src", help="our model folder (config.json + model.safetensors)")
    back.add_argument("dst", help="output folder in the authors' layout of the model's variant")
    back.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="the tokenizer folder the model was trained with (the tokenizer step's tokenizer/): "
        "written in the form the authors' transformers reads",
    )
    back.add_argument(
        "--weights",
        choices=["safetensors", "bin"],
        default="safetensors",
        help="bin: pytorch_model*.bin, for a stack without the safetensors package",
    )
    back.add_argument("--json", action="store_true", help="print JSON")
    back.set_defaults(func=_convert_to_release)


def _progress(message: str) -> None:
    print(f"{message} ...", file=sys.stderr, flush=True)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _summary(args: argparse.Namespace) -> int:
    from owl.model import get_config, summarize

    result = summarize(get_config(args.name, args.variant))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    _print_table(result)
    return 0


def _print_table(result: dict[str, Any]) -> None:
    print(f"{result['name']} ({result['variant']}, {result['num_visual_tokens']} tokens per image)")
    for component, count in result["params"].items():
        print(f"  {component:<24} {count:>16,}  ({count / 1e9:.3f}B)")
    total = result["total_params"]
    print(f"  {'total':<24} {total:>16,}  ({total / 1e9:.3f}B)")


def _convert_release(args: argparse.Namespace) -> int:
    from owl.model.releases import convert_release
    from owl.model.summary import summarize

    try:
        cfg, _ = convert_release(args.src, args.dst, args.variant, progress=_progress)
    except (ValueError, OSError) as exc:
        return _fail(str(exc))
    result = {
        "dst": args.dst,
        "variant": cfg.variant,
        "total_params": summarize(cfg)["total_params"],
        "config": cfg.to_dict(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"wrote {args.dst} ({result['total_params']:,} parameters, {cfg.variant})")
    return 0


def _convert_to_release(args: argparse.Namespace) -> int:
    from owl.model.releases import export_release

    try:
        files = export_release(
            args.src, args.dst, _progress, tokenizer_dir=args.tokenizer, weights=args.weights
        )
    except (ValueError, OSError) as exc:
        return _fail(str(exc))
    result = {"src": args.src, "dst": args.dst, "files": files}
    print(json.dumps(result, indent=2) if args.json else f"wrote {args.dst}: {', '.join(files)}")
    return 0
