"""Importers: the official files of each benchmark -> one benchmark file of ours (JSONL).

`import_benchmark(kind, paths, out_dir)` reads the files a user downloaded from the benchmark's
owners (their schema, untouched), keeps the official question ids (`id`, and `question_id` as
the owners type it), sets each record's scoring rule and prompt style, and writes
`<out_dir>/<name>.jsonl` whose image paths point at the user's image folder (MMBench ships its
images inside the TSV: they are decoded into `<out_dir>/<name>_images/`). Splits without public
answers (VQAv2 test-dev, MMBench test, VizWiz test) are imported without answers and marked with
their submission format (owl.eval.submissions).

A spec string names an import in one token, as `owl eval --benchmark` and the evaluate step take
it: `[name=]kind:path,path,...`, e.g. `vqav2:questions.json,annotations.json,images/`.
docs/benchmarks.md lists each kind's files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from owl.eval.importers.captions import import_coco_karpathy, import_flickr30k, import_nocaps
from owl.eval.importers.choice import import_mmbench, import_scienceqa, import_seed
from owl.eval.importers.official import Record, _Inputs
from owl.eval.importers.video import import_msrvtt_qa, import_msvd_qa
from owl.eval.importers.vqa import (
    import_gqa,
    import_mme,
    import_okvqa,
    import_pope,
    import_textvqa,
    import_vizwiz,
    import_vqav2,
)

KINDS: dict[str, Callable[..., list[Record]]] = {
    "vqav2": import_vqav2,
    "okvqa": import_okvqa,
    "gqa": import_gqa,
    "textvqa": import_textvqa,
    "vizwiz": import_vizwiz,
    "scienceqa": import_scienceqa,
    "coco_karpathy": import_coco_karpathy,
    "flickr30k": import_flickr30k,
    "nocaps": import_nocaps,
    "mmbench": import_mmbench,
    "mme": import_mme,
    "pope": import_pope,
    "seed": import_seed,
    "msrvtt_qa": import_msrvtt_qa,
    "msvd_qa": import_msvd_qa,
}


# The kinds whose records are captions (scored by the COCO caption toolkit: PTB tokenizer, Java).
CAPTION_KINDS = frozenset({"coco_karpathy", "flickr30k", "nocaps"})


def import_benchmark(
    kind: str, paths: Iterable[str | os.PathLike], out_dir: str | os.PathLike, name: str = ""
) -> Path:
    """Import the official files `paths` of benchmark `kind`; returns the JSONL file written."""
    if kind not in KINDS:
        raise ValueError(f"unknown benchmark kind {kind!r}; use one of {sorted(KINDS)}")
    name = name or kind
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    inputs = _Inputs(kind, paths)
    if kind == "mmbench":
        records = import_mmbench(inputs, out, name)
    else:
        records = KINDS[kind](inputs)
    if not records:
        raise ValueError(f"{kind}: the files hold no question")
    target = out / f"{name}.jsonl"
    tmp = target.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    tmp.replace(target)
    return target


def parse_spec(spec: str) -> tuple[str, str, list[str]] | None:
    """`[name=]kind:path,path,...` -> (name, kind, paths); None when `spec` is a plain path."""
    head, sep, tail = spec.partition(":")
    name, _, kind = head.rpartition("=")
    if not sep or kind not in KINDS or "/" in head:
        return None
    paths = [p for p in tail.split(",") if p]
    if not paths:
        raise ValueError(f"benchmark spec {spec!r}: list the official files after '{kind}:'")
    return name or kind, kind, paths
