"""Keys and plans: a step's cache key and its parts, which steps a run selects and forces, what
`owl run` would do now (`plan`, `--dry-run`), and the checks made before anything starts
(environment, GPU memory plan, input files)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from owl.configs import input_path_fields
from owl.data.manifest import Manifest
from pipelines import cache
from pipelines.dag import StepSpec, downstream, upstream_of
from pipelines.jobspec import JobSpec, StepSection

if TYPE_CHECKING:
    from owl.train.memory import MemoryPlan


def key_parts(job: JobSpec, spec: StepSpec, section: StepSection) -> tuple[Any, Any]:
    """(config part, model part) of a step's cache key."""
    model: dict[str, Any] = {}
    if spec.uses_model:
        model["owl"] = job.owl_config.to_dict()
    if spec.uses_pretrained:
        model["pretrained"] = dataclasses.asdict(job.model.pretrained)
    if spec.uses_seed:
        model["seed"] = job.seed
    # Fields a step module names in NOT_IN_KEY change how it runs, never what it outputs (e.g.
    # training's policy when the cluster offers fewer workers): setting one keeps the key, so a
    # re-run with it resumes the same checkpoints.
    module = spec.load_module()
    skipped = set(getattr(module, "NOT_IN_KEY", ()))
    # Fields named in KEY_WHEN_SET enter the key only when set (not at their default): the keys
    # of the steps that leave them alone stay those from before the field existed.
    when_set = getattr(module, "KEY_WHEN_SET", ())
    if when_set:
        defaults = cache.plain(type(section.config)())
        plain = cache.plain(section.config)
        skipped.update(k for k in when_set if plain[k] == defaults[k])
    if not skipped:
        return section.config, model
    return _without(cache.plain(section.config), skipped), model


def _without(config: dict[str, Any], paths: set[str]) -> dict[str, Any]:
    """`config` without the fields `paths` name (`a` or `a.b`: a field of section `a`)."""
    kept = {}
    for name, value in config.items():
        if name in paths:
            continue
        inner = {p.partition(".")[2] for p in paths if p.startswith(f"{name}.")}
        kept[name] = _without(value, inner) if inner else value
    return kept


def input_files(job: JobSpec, name: str) -> dict[str, str]:
    """Content digest of every local file or folder the step's key parts name (URL lists,
    instruction files, image folders, benchmark files, pretrained folders)."""
    section = job.steps[name]
    config, model = key_parts(job, section.spec, section)
    return cache.input_digests(job.storage, cache.input_paths(config, model))


def step_key(
    job: JobSpec, name: str, digests: dict[str, str], files: dict[str, str] | None = None
) -> str:
    """The step's cache key; `files` as `input_files` gives them (computed when not passed)."""
    section = job.steps[name]
    config, model = key_parts(job, section.spec, section)
    files = input_files(job, name) if files is None else files
    return cache.cache_key(name, section.spec.version, config, model, digests, files)


def select_steps(job: JobSpec, until: str | None) -> list[str]:
    """The job's steps, or with `until` that step and everything it depends on."""
    present = list(job.steps)  # in DAG order, the job's own steps of a repeated kind included
    if until is None:
        return present
    if until not in job.steps:
        raise ValueError(f"--until {until}: not a step of this job; its steps are {present}")
    needed = {until}
    for name in reversed(present):
        if name in needed:
            needed.update(upstream_of(job.steps[name].spec, job.steps).values())
    return [name for name in present if name in needed]


def forced_steps(job: JobSpec, force: list[str]) -> set[str]:
    forced: set[str] = set()
    for name in force:
        if name not in job.steps:
            raise ValueError(
                f"--force {name}: not a step of this job; its steps are {list(job.steps)}"
            )
        # The job's own specs: a stage's roles include the steps its `data.mix` names.
        specs = {step: section.spec for step, section in job.steps.items()}
        forced.update(downstream(name, list(job.steps), specs))
    return forced


@dataclass
class PlannedStep:
    name: str
    key: str | None  # None: an upstream output is not computed yet, so the key is not known
    cached: bool
    forced: bool
    resources: dict[str, float]
    memory_gib: float | None = None  # training: planned GPU memory per worker (owl.train.memory)
    memory: dict[str, Any] | None = None  # training: the plan's parts (MemoryPlan.to_dict)
    # Why a committed output there is not used (an unreadable manifest, a missing file).
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def plan(
    job: JobSpec,
    force: list[str] | None = None,
    until: str | None = None,
    estimate_memory: bool = True,
) -> list[PlannedStep]:
    """What `owl run` would do now: keys that can be known, which outputs are cached."""
    forced = forced_steps(job, force or [])
    manifests: dict[str, Manifest | None] = {}
    planned = []
    names = select_steps(job, until)
    check_environment(job, names)
    for name in names:
        section = job.steps[name]
        ups = upstream_of(section.spec, job.steps)
        known = all(manifests.get(up) is not None for up in ups.values())
        key = (
            step_key(job, name, {role: manifests[up].digest for role, up in ups.items()})
            if known
            else None
        )
        manifest, problems = None, []
        if key is not None and name not in forced:
            manifest, problems = cache.find_committed(cache.step_dir(job.storage, name, key))
        manifests[name] = manifest
        memory = memory_plan(job, name) if estimate_memory and section.spec.trains else None
        planned.append(
            PlannedStep(
                name=name,
                key=key,
                cached=manifest is not None,
                forced=name in forced,
                resources=dataclasses.asdict(section.resources),
                memory_gib=None if memory is None else memory.gib()["total_gib"],
                memory=None if memory is None else memory.to_dict(),
                problems=problems,
            )
        )
    return planned


def read_by_computing(job: JobSpec, force: list[str] | None, until: str | None) -> set[str]:
    """Steps whose committed output a step that computes in this run will read. Their hit
    checks every file's sha256, not only its size: a same-size corruption of a cached shard
    is caught before anything is computed from it (a fully cached re-run hashes nothing)."""
    planned = plan(job, force, until, estimate_memory=False)
    computing = [p.name for p in planned if not p.cached]
    return {
        up for name in computing for up in upstream_of(job.steps[name].spec, job.steps).values()
    }


def memory_plan(job: JobSpec, name: str) -> MemoryPlan:
    """A training step's GPU memory plan per worker (`owl.train.memory`: the model on the meta
    device, the stage's trainable selection, activations per micro-batch); ValueError (one line)
    when it exceeds the step's `memory.gpu_memory_gib` (> 0)."""
    from owl.train.memory import check_fits, plan_memory

    config = job.steps[name].config
    memory = plan_memory(job.owl_config, config)
    check_fits(name, memory, config.memory.gpu_memory_gib)
    return memory


def check_environment(job: JobSpec, names: list[str]) -> None:
    """ValueError (one line) when this machine cannot run a selected step as configured: each
    step module may define `check_environment(config)` (e.g. evaluate: Java for captions)."""
    for name in names:
        check = getattr(job.steps[name].spec.load_module(), "check_environment", None)
        if check is not None:
            check(job.steps[name].config)


def check_memory(job: JobSpec, names: list[str]) -> None:
    """ValueError (one line) when a training step's plan exceeds its `memory.gpu_memory_gib` (the plan
    is computed only for steps that set one)."""
    for name in names:
        if job.steps[name].spec.trains and job.steps[name].config.memory.gpu_memory_gib > 0:
            memory_plan(job, name)


def check_inputs(job: JobSpec, names: list[str]) -> None:
    """ValueError (one line) when a URL list or instruction file the steps name is not there:
    before Ray or MLflow start (`@role/...` outputs and URIs are checked where they are read)."""
    for name in names:
        for field_path, value in input_path_fields(job.steps[name].config, name):
            if value.startswith("@") or "://" in value:
                continue
            if not os.path.exists(os.path.expanduser(value)):
                raise ValueError(f"{field_path}: no such file or folder {value!r}")
