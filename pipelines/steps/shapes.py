"""Step `shapes`: write the synthetic demo source (captions URL list, LLaVA and Alpaca instructions,
held-out benchmarks, and when asked tiny videos) in the formats users bring, so the demo runs the
real data path."""

from __future__ import annotations

from owl.data.manifest import Manifest
from owl.data.shapes_files import ShapesConfig, write_shapes_dataset
from pipelines.step import StepContext, StepInput

# The job's `shapes:` section is the library's config itself: one set of fields and defaults.
Config = ShapesConfig


def run(ctx: StepContext, cfg: Config, inputs: dict[str, StepInput]) -> Manifest:
    if inputs:
        raise ValueError(f"the shapes step takes no inputs, got roles {sorted(inputs)}")
    ctx.progress(0, None, "rendering shapes scenes")
    written = write_shapes_dataset(ctx.out_dir, cfg)
    manifest = Manifest(step=ctx.step)
    for rel in written.files:
        manifest.add_file(ctx.out_dir, rel)
    manifest.stats = {f"num_{name}": float(n) for name, n in written.counts.items()}
    manifest.info = {"formats": {"captions.parquet": "url list (url, caption, similarity, punsafe, "
                                 "pwatermark); urls are file://", "instructions.json": "LLaVA",
                                 "text_instructions.json": "Alpaca", "benchmarks": "owl jsonl"}}  # fmt: skip
    if cfg.num_videos or cfg.num_eval_videos:  # off by default: the demo's manifest unchanged
        manifest.info["formats"]["video_instructions.json"] = "LLaVA with mp4 videos"
    ctx.progress(1, 1, f"wrote {len(written.files)} files")
    return manifest
