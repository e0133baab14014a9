"""The table of pipeline steps: what each step is, what it reads, and what it needs.

A job runs the steps whose section is present in its job file, in the order of `STEPS` (which is a
topological order). Each input *role* of a step is filled by one upstream step; an optional role
whose upstream step is absent from the job is simply not passed.

Step modules are imported lazily (`load_module`), so this table can be read without torch, Ray
Train or DeepSpeed being importable.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from pipelines.step import Resources


@dataclass(frozen=True)
class Role:
    """One input of a step: the upstream step that fills it, and whether the job must have it."""

    upstream: str
    required: bool = True


@dataclass(frozen=True)
class StepSpec:
    name: str
    # Module path of the step implementation (exposes `Config` and `run`).
    module: str
    # Bump when the step's code changes its outputs: part of the cache key.
    version: str
    roles: dict[str, Role] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    # Training and download keep their directory between attempts and resume from what is there.
    resumable: bool = False
    # A training stage: `--dry-run` estimates its GPU memory from its TrainConfig.
    trains: bool = False
    # The resolved model config is part of its cache key.
    uses_model: bool = False
    # The job's pretrained folders (model.pretrained) are part of its cache key.
    uses_pretrained: bool = False
    # The job seed is part of its cache key.
    uses_seed: bool = False
    # The runner connects to Ray before computing it.
    uses_ray: bool = True
    # Fields the DAG fixes for this step (e.g. `stage` of the shared training module).
    fixed: dict[str, Any] = field(default_factory=dict)

    @property
    def section(self) -> str:
        """The job-file section holding this step's config."""
        return self.name

    def load_module(self) -> ModuleType:
        module = importlib.import_module(self.module)
        for attr in ("Config", "run"):
            if not hasattr(module, attr):
                raise ValueError(
                    f"step module {self.module} has no `{attr}`: see pipelines/step.py"
                )
        return module


def _eval_roles(model_step: str) -> dict[str, Role]:
    return {
        "model": Role(model_step),
        "tokenizer": Role("tokenizer"),
        "shapes": Role("shapes", required=False),
    }


_TRAIN = Resources(num_workers=2, cpus_per_worker=1.0, gpus_per_worker=0.0)


def _training_stage(name: str, stage: int, roles: dict[str, Role]) -> StepSpec:
    """A training stage: the shared training module with `stage` fixed, resumable from its
    checkpoints, keyed on the model, the pretrained folders and the seed."""
    return StepSpec(
        name,
        "pipelines.steps.train",
        "1",
        roles,
        resources=_TRAIN,
        resumable=True,
        trains=True,
        uses_model=True,
        uses_pretrained=True,
        uses_seed=True,
        fixed={"stage": stage},
    )


STEPS: dict[str, StepSpec] = {
    spec.name: spec
    for spec in [
        StepSpec("shapes", "pipelines.steps.shapes", "1", uses_seed=True, uses_ray=False),
        # The starting model from model.pretrained (HF CLIP + LLaMA, or an authors' release).
        StepSpec(
            "init",
            "pipelines.steps.init",
            "1",
            uses_model=True,
            uses_pretrained=True,
            uses_seed=True,
            uses_ray=False,
        ),
        # Resumable: a re-run fetches only the shards a killed attempt did not finish.
        StepSpec(
            "download",
            "pipelines.steps.download",
            "3",  # 2: images decoded and normalised, total deadline; 3: URLs kept as given
            {"shapes": Role("shapes", False)},
            resumable=True,
        ),
        StepSpec("filter", "pipelines.steps.filter", "2", {"data": Role("download")}),  # 2: no NULs
        StepSpec(
            "tokenizer",
            "pipelines.steps.tokenizer",
            "2",  # 2: null Alpaca fields and NULs are bad records, not text
            {"data": Role("filter"), "shapes": Role("shapes", False)},
            uses_ray=False,
        ),
        StepSpec(
            "tokenize_captions",
            "pipelines.steps.tokenize_captions",
            "2",  # 2: writes a per-shard index beside each shard
            {"data": Role("filter"), "tokenizer": Role("tokenizer")},
            uses_model=True,
        ),
        StepSpec(
            "tokenize_instructions",
            "pipelines.steps.tokenize_instructions",
            "3",  # 2: writes a per-shard index beside each shard; 3: images decoded, normalised
            {"tokenizer": Role("tokenizer"), "shapes": Role("shapes", False)},
            uses_model=True,
        ),
        _training_stage(
            "stage1",
            1,
            {
                "data": Role("tokenize_captions"),
                "tokenizer": Role("tokenizer"),
                "init": Role("init", required=False),
            },
        ),
        _training_stage(
            "stage2",
            2,
            {
                "data": Role("tokenize_instructions"),
                "init": Role("stage1"),
                "tokenizer": Role("tokenizer"),
            },
        ),
        StepSpec(
            "evaluate_stage1",
            "pipelines.steps.evaluate",
            "2",  # 2: prompts end with a space (the authors'), VLMEvalKit matching, intervals
            _eval_roles("stage1"),
            uses_model=True,
        ),
        StepSpec(
            "evaluate", "pipelines.steps.evaluate", "2", _eval_roles("stage2"), uses_model=True
        ),
        # The registered model: our folder (+ peft adapter), the authors' layout, the model card.
        StepSpec(
            "export",
            "pipelines.steps.export",
            "2",  # 2: release/ holds the tokenizer, preprocessor and generation configs
            {
                "tokenizer": Role("tokenizer", required=False),
                "stage2": Role("stage2", required=False),
                "stage1": Role("stage1", required=False),
                "evaluate": Role("evaluate", required=False),
                "evaluate_stage1": Role("evaluate_stage1", required=False),
                "init": Role("init", required=False),
                "captions": Role("tokenize_captions", required=False),
                "instructions": Role("tokenize_instructions", required=False),
            },
            uses_model=True,
            uses_ray=False,
        ),
    ]
}

# Step kinds a job may run more than once: a section of another name with `kind: <step>` is one
# more step of that kind, with the kind's inputs, keyed and recorded under its own name (e.g. a
# second instruction source, `tokenize_text: {kind: tokenize_instructions, sources: [...]}`). No
# step reads it by role: a training stage draws it through its `data.mix` (pipelines/jobspec.py).
REPEATABLE_KINDS = ("tokenize_captions", "tokenize_instructions")
# A training stage's extra input roles: one per step of the job its `data.mix` names
# (`mix:tokenize_captions`), added to the stage's spec when the job is parsed (pipelines/jobspec.py).
MIX_ROLE = "mix:"
# The step whose `model/` is registered at the end of a run, most final first.
REGISTER_FROM = ("export", "stage2", "stage1")
# The evaluation whose metrics `owl status` reports, most final first.
METRICS_FROM = ("evaluate", "evaluate_stage1")


def active_table() -> dict[str, StepSpec]:
    """`STEPS`, or the table named by OWL_STEPS_TABLE=`package.module:ATTR` (custom step sets,
    and the light fake steps of the integration tests)."""
    ref = os.environ.get("OWL_STEPS_TABLE", "")
    if not ref:
        return STEPS
    module, _, attr = ref.partition(":")
    try:
        return getattr(importlib.import_module(module), attr or "STEPS")
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"OWL_STEPS_TABLE={ref!r}: cannot load it ({exc})") from exc


def with_instances(table: dict[str, StepSpec], instances: dict[str, str]) -> dict[str, StepSpec]:
    """`table` with one more step per `instances` entry (name -> kind): the kind's spec under that
    name, placed after the kind (and after earlier instances of it), so the table stays a
    topological order."""
    out: dict[str, StepSpec] = {}
    for name, spec in table.items():
        out[name] = spec
        for instance, kind in instances.items():
            if kind == name:
                out[instance] = dataclasses.replace(spec, name=instance)
    return out


def order(names: set[str] | list[str], table: dict[str, StepSpec] | None = None) -> list[str]:
    """`names` in the table's (topological) order."""
    table = active_table() if table is None else table
    return [name for name in table if name in set(names)]


def downstream(
    name: str, present: list[str], table: dict[str, StepSpec] | None = None
) -> list[str]:
    """`name` and every present step that depends on it, directly or not, in table order."""
    table = active_table() if table is None else table
    reached = {name}
    for step in order(present, table):
        if any(role.upstream in reached for role in table[step].roles.values()):
            reached.add(step)
    return order(reached, table)


def upstream_of(spec: StepSpec, present: Iterable[str]) -> dict[str, str]:
    """role -> upstream step name, for the roles whose upstream step is present (in the job)."""
    present = set(present)
    return {role: r.upstream for role, r in spec.roles.items() if r.upstream in present}
