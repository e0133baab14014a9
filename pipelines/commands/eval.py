"""`owl eval` (score a model on benchmark files, in this process) and `owl chat` (a multi-turn
terminal conversation with streamed replies, images addable mid-conversation).

Both build prompts with the training template (`owl.data.templates`) of the model's variant.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

CHAT_HELP = "commands: /image PATH (add an image to your next message), /reset, /quit"


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_eval(subparsers)
    _register_chat(subparsers)
    _register_bench(subparsers)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="model folder (config.json + safetensors), or a training "
        "step's output folder holding model/",
    )  # fmt: skip
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer folder (default: <model>/tokenizer, or the "
        "tokenizer/ next to model/)",
    )  # fmt: skip
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    parser.add_argument(
        "--json", action="store_true", help="print JSON (chat: one object per reply)"
    )


def _register_eval(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="score a model on benchmark files")
    _add_model_args(parser)
    parser.add_argument(
        "--benchmark", required=True, action="append", help="benchmark file (.jsonl/.parquet) "
        "or official files as [name=]kind:path,path (e.g. vqav2:questions.json,annotations.json,"
        "images/); repeat for several (docs/benchmarks.md)",
    )  # fmt: skip
    _add_eval_options(parser)
    parser.add_argument(
        "--blank-images", action="store_true", help="replace every image by a blank one"
    )
    parser.add_argument(
        "--predictions", default=None, help="folder to write <benchmark>.parquet to, the "
        "per-item scores to units/ (owl compare reads them) and submission files for splits "
        "without public answers",
    )  # fmt: skip
    parser.add_argument(
        "--imported", default=None, help="folder for benchmarks imported from official files "
        "(default: a temporary folder)",
    )  # fmt: skip
    parser.set_defaults(func=_eval)


def _add_eval_options(parser: argparse.ArgumentParser) -> None:
    """One flag per field of owl.eval.evaluate.EvalOptions (the evaluate step's options too),
    named and explained by the field's metadata."""
    from dataclasses import MISSING, fields

    from owl.eval.evaluate import EvalOptions

    for f in fields(EvalOptions):
        meta = dict(f.metadata)
        flag, help_text = meta.pop("flag"), meta.pop("help")
        if f.default is True:  # `--no-X` turns it off
            parser.add_argument(flag, dest=f.name, action="store_false", help=help_text)
            continue
        assert f.default is not MISSING, f"EvalOptions.{f.name} needs a default"
        value_type = {"int": int, "int | None": int, "str": str}[str(f.type)]
        parser.add_argument(
            flag, dest=f.name, type=value_type, default=f.default, help=help_text, **meta
        )


def _eval_options(args: argparse.Namespace) -> Any:
    """The EvalOptions of the parsed flags; a bad value is reported under its flag's name."""
    from dataclasses import fields

    from owl.eval.evaluate import EvalOptions

    flags = {f.name: f.metadata["flag"] for f in fields(EvalOptions)}
    try:
        return EvalOptions(**{name: getattr(args, name) for name in flags})
    except ValueError as exc:
        name = str(exc).split(" ", 1)[0].rstrip(":")
        if name not in flags:
            raise
        raise ValueError(flags[name] + str(exc)[len(name) :]) from None


def _register_bench(subparsers: argparse._SubParsersAction) -> None:
    from owl.eval.importers import KINDS

    bench = subparsers.add_parser("bench", help="benchmark files: import official formats")
    commands = bench.add_subparsers(dest="bench_command", metavar="COMMAND")
    parser = commands.add_parser(
        "import", help="official benchmark files -> a benchmark file (docs/benchmarks.md)"
    )
    parser.add_argument("kind", choices=sorted(KINDS), help="which benchmark's files")
    parser.add_argument("paths", nargs="+", help="the official files and the image folder")
    parser.add_argument("--out", required=True, help="folder to write <name>.jsonl into")
    parser.add_argument("--name", default="", help="benchmark name (default: the kind)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=_bench_import)
    bench.set_defaults(func=lambda args: bench.print_help() or 2)


def _bench_import(args: argparse.Namespace) -> int:
    from collections import Counter

    from owl.eval.benchmarks import read_benchmark
    from owl.eval.importers import import_benchmark

    try:
        path = import_benchmark(args.kind, args.paths, args.out, args.name)
        records = read_benchmark(path)  # the written file must read back cleanly
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    types = dict(Counter(r.type for r in records))
    unanswered = sum(1 for r in records if r.extra.get("submission"))
    if args.json:
        print(json.dumps({"kind": args.kind, "path": str(path), "records": len(records),
                          "types": types, "unanswered": unanswered}))  # fmt: skip
        return 0
    note = f" ({unanswered} without answers: submission split)" if unanswered else ""
    print(f"{args.kind}: {len(records)} records {types} -> {path}{note}")
    return 0


def _register_chat(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("chat", help="talk to a model in the terminal")
    _add_model_args(parser)
    parser.add_argument("--image", action="append", default=[], help="image for the first message")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.set_defaults(func=_chat)


def resolve_model_dirs(model: str, tokenizer: str | None) -> tuple[Path, Path]:
    """(model folder, tokenizer folder) from the CLI arguments, with a message saying what to pass."""
    model_dir = Path(model)
    if not (model_dir / "config.json").exists() and (model_dir / "model" / "config.json").exists():
        model_dir = model_dir / "model"  # a training step's output folder
    if not (model_dir / "config.json").exists():
        raise ValueError(f"--model {model}: no config.json there (nor in {model}/model)")
    if tokenizer is not None:
        return model_dir, Path(tokenizer)
    for candidate in (model_dir / "tokenizer", model_dir.parent / "tokenizer"):
        if (candidate / "tokenizer.json").exists():
            return model_dir, candidate
    found = job_tokenizer(model_dir.parent)
    if found is not None:
        return model_dir, found
    raise ValueError(f"--model {model}: no tokenizer/ folder inside or beside it; pass --tokenizer")


def job_tokenizer(step_dir: Path) -> Path | None:
    """The tokenizer a training step's output was trained with: `<storage>/steps/<stage>/<key>`
    names its `tokenizer` input in its manifest; outputs committed before owl recorded inputs
    fall back to the storage's only tokenizer output."""
    from owl.data.manifest import MANIFEST_NAME

    steps = step_dir.parent.parent
    if steps.name != "steps" or not (step_dir / MANIFEST_NAME).is_file():
        return None
    info = json.loads((step_dir / MANIFEST_NAME).read_text()).get("info", {})
    source = info.get("inputs", {}).get("tokenizer")
    if source:
        folder = steps / source["step"] / source["key"] / "tokenizer"
        return folder if (folder / "tokenizer.json").is_file() else None
    committed = [p.parent / "tokenizer" for p in steps.glob(f"tokenizer/*/{MANIFEST_NAME}")]
    committed = [p for p in committed if (p / "tokenizer.json").is_file()]
    if len(committed) > 1:
        raise ValueError(
            f"--model {step_dir}: this storage has {len(committed)} tokenizer outputs and the "
            f"model's manifest does not say which it used; pass --tokenizer "
            f"{steps / 'tokenizer'}/<key>/tokenizer"
        )
    return committed[0] if committed else None


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    import torch

    from owl.data.tokenizer import load_tokenizer
    from owl.model import load_model

    model_dir, tokenizer_dir = resolve_model_dirs(args.model, args.tokenizer)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = load_model(model_dir, device=device, dtype=dtype).eval()
    return model, load_tokenizer(tokenizer_dir)


# ---------------------------------------------------------------------------------------------
# owl eval


def _eval(args: argparse.Namespace) -> int:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="owl-imported-") as scratch:
        return _eval_in(args, args.imported or scratch)


def _eval_in(args: argparse.Namespace, imported: str) -> int:
    """`owl eval` with imported benchmarks written under `imported` (kept while it runs): the
    model in this process, one evaluation through owl.eval.evaluate."""
    from owl.eval.evaluate import EvalLayout, evaluate, load_benchmarks
    from owl.eval.generate import predict

    try:
        options = _eval_options(args)
        benchmarks = load_benchmarks(args.benchmark, options, imported)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model, tokenizer = _load(args)

    def predict_passes(passes: list[tuple[str, bool]]) -> list[list[dict[str, Any]]]:
        return [
            predict(
                model, tokenizer, benchmarks[name].records, batch_size=options.batch_size,
                blank_images=args.blank_images, circular=options.circular,
                num_frames=options.num_frames,
            )
            for name, _ in passes
        ]  # fmt: skip

    root = Path(args.predictions) if args.predictions else None
    results = evaluate(benchmarks, predict_passes, options, root and EvalLayout(root))
    metrics = {r.name: r.metrics for r in results}
    submissions = {r.name: str(root / r.submission) for r in results if root and r.submission}
    for r in results:
        if root is None and r.submission_format is not None:
            print(f"note: {r.name} has no public answers; pass --predictions DIR to write its "
                  "submission file", file=sys.stderr)  # fmt: skip
    if args.json:
        print(json.dumps({"model": args.model, "metrics": metrics, "submissions": submissions},
                         indent=2))  # fmt: skip
        return 0
    for name, values in metrics.items():
        for metric, value in values.items():
            print(f"{name:<20} {metric:<36} {value:10.4f}")
    for name, path in submissions.items():
        print(f"{name:<20} submission file: {path}")
    return 0


# ---------------------------------------------------------------------------------------------
# owl chat


class ChatSession:
    """A conversation: turns so far, their images, and images waiting for the next message."""

    def __init__(self, model: Any, tokenizer: Any, **generation: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.generation = generation
        self.turns: list[Any] = []
        self.images: list[Any] = []  # (3, S, S) tensors, in placeholder order
        self.pending: list[Any] = []

    def reset(self) -> None:
        self.turns, self.images, self.pending = [], [], []

    def add_image(self, path: str) -> None:
        from owl.data.image import preprocess_images

        cfg = self.model.cfg
        pixels = preprocess_images([Path(path).read_bytes()], cfg.vision.image_size, cfg.image_mode)
        self.pending.append(pixels[0])

    def reply(self, text: str) -> Iterator[str]:
        """Stream the reply to `text` as printable pieces; the turn is recorded at the end."""
        import torch

        from owl.data.templates import Turn
        from owl.data.tokenize import encode_prompt

        cfg = self.model.cfg
        user = Turn("user", cfg.image_placeholder * len(self.pending) + text)
        ids = encode_prompt(
            self.tokenizer, [*self.turns, user], variant=cfg.variant,
            num_visual_tokens=cfg.num_visual_tokens,
        )  # fmt: skip
        max_new = self.generation["max_new_tokens"]
        if len(ids) + max_new > cfg.decoder.max_positions:
            raise ValueError(
                f"the conversation is {len(ids)} tokens; with {max_new} new ones it exceeds the "
                f"model's {cfg.decoder.max_positions} positions: /reset to start over"
            )
        images = [*self.images, *self.pending]
        dtype = next(self.model.parameters()).dtype
        device = next(self.model.parameters()).device
        pixels = torch.stack(images).to(device, dtype) if images else None  # (N, 3, S, S)
        tokens = self.model.stream(
            ids, pixels, eos_token_id=self.tokenizer.eos_token_id, **self.generation
        )
        reply = yield from _decode_stream(self.tokenizer, tokens)
        self.images, self.pending = images, []
        self.turns += [user, Turn("assistant", reply)]


def _decode_stream(tokenizer: Any, tokens: Iterable[int]) -> Iterator[str]:
    """Printable text as tokens arrive (waits out partial UTF-8 sequences); returns the reply."""
    ids: list[int] = []
    shown = ""
    for token in tokens:
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True).lstrip()
        if text.endswith("\ufffd"):
            continue  # a multi-byte character split across tokens
        yield text[len(shown) :]
        shown = text
    final = tokenizer.decode(ids, skip_special_tokens=True).lstrip()
    if final != shown:
        yield final[len(shown) :]  # whatever a trailing partial character decodes to
    return final.strip()


def run_chat(
    session: ChatSession,
    lines: Iterable[str],
    out: TextIO,
    interactive: bool,
    json_lines: bool = False,
) -> None:
    """The chat loop over input lines: replies to `out` (streamed, or one JSON object per reply
    with `json_lines`), notices to stderr."""
    for raw in lines:
        line = raw.strip()
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            session.reset()
            print("[conversation reset]", file=sys.stderr)
        elif line.startswith("/image"):
            _add_image(session, line.removeprefix("/image").strip())
        elif line.startswith("/"):
            print(f"[unknown command {line.split()[0]}; {CHAT_HELP}]", file=sys.stderr)
        elif line:
            _answer(session, line, out, json_lines)
        if interactive:
            out.write("you> ")
            out.flush()


def _answer(session: ChatSession, line: str, out: TextIO, json_lines: bool) -> None:
    pieces = []
    try:
        for piece in session.reply(line):
            pieces.append(piece)
            if not json_lines:
                out.write(piece)
                out.flush()
    except ValueError as exc:
        print(f"[{exc}]", file=sys.stderr)
        return
    out.write(json.dumps({"reply": "".join(pieces).strip()}) + "\n" if json_lines else "\n")
    out.flush()


def _add_image(session: ChatSession, path: str) -> None:
    if not path or not Path(path).is_file():
        print(f"[no image file at {path!r}; usage: /image PATH]", file=sys.stderr)
        return
    session.add_image(path)
    print(f"[image added: {path}; it goes with your next message]", file=sys.stderr)


def _chat(args: argparse.Namespace) -> int:
    model, tokenizer = _load(args)
    session = ChatSession(
        model, tokenizer, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_p=args.top_p,
    )  # fmt: skip
    for path in args.image:
        _add_image(session, path)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"owl chat ({model.cfg.name}, {model.cfg.variant}); {CHAT_HELP}")
        print("you> ", end="", flush=True)
    run_chat(session, sys.stdin, sys.stdout, interactive, json_lines=args.json)
    return 0
