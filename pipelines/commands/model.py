"""`owl model summary NAME` and `owl convert mplug-owl2 SRC DST`."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    model = subparsers.add_parser("model", help="inspect model configs")
    model_sub = model.add_subparsers(dest="model_command", metavar="SUBCOMMAND")
    summary = model_sub.add_parser(
        "summary", help="parameter counts per component (nothing is allocated)"
    )
    summary.add_argument("name", help="registry name, e.g. debug-tiny, demo, owl2-llama2-7b")
    summary.add_argument("--variant", choices=["owl1", "owl2"], default=None)
    summary.add_argument("--json", action="store_true", help="print JSON")
    summary.set_defaults(func=_summary)

    convert = subparsers.add_parser("convert", help="convert released weights into our format")
    convert_sub = convert.add_subparsers(dest="convert_command", metavar="FORMAT")
    owl2 = convert_sub.add_parser(
        "mplug-owl2", help="the authors' released mPLUG-Owl2 folder (.bin shards)"
    )
    owl2.add_argument("src", help="folder with config.json and pytorch_model*.bin")
    owl2.add_argument("dst", help="output folder (config.json + safetensors)")
    owl2.add_argument("--json", action="store_true", help="print JSON")
    owl2.set_defaults(func=_convert_owl2)


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


def _convert_owl2(args: argparse.Namespace) -> int:
    from owl.model.summary import summarize
    from owl.model.weights import convert_mplug_owl2

    cfg = convert_mplug_owl2(args.src, args.dst)
    result = {
        "dst": args.dst,
        "total_params": summarize(cfg)["total_params"],
        "config": cfg.to_dict(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"wrote {args.dst} ({result['total_params']:,} parameters)")
    return 0
