"""Job files: one YAML file describes a whole pipeline run; it is validated before anything starts.

```yaml
name: demo
storage: /data/owl            # local path (or file:// URI); shared by every node of the cluster
mlflow_uri: ""                # default: MLFLOW_TRACKING_URI, else sqlite:///<storage>/mlflow.db
ray_address: ""               # default: a local Ray started for the run
seed: 0
model: {name: demo, variant: owl2, overrides: {decoder: {num_layers: 2}},
        pretrained: {clip: "", llama: "", owl2: ""}}
download:                     # one section per step; fields of that step module's `Config`
  url_list: "@shapes/captions.parquet"
  resources: {num_workers: 4, cpus_per_worker: 1}
  retry: {max_retries: 3, backoff_s: 10}
```
A step runs when its section is present (`shapes: {}` runs it with defaults). A section of
another name with `kind:` is one more step of that kind (`tokenize_text: {kind:
tokenize_instructions, sources: [...]}`: a second instruction source, drawn by a stage's `data.mix`). Errors name the field
path (`stage1.optimizer.lr: expected float, got str 'abc'`). `--set path=value` overrides any field before
validation; the value is parsed as YAML (`--set stage1.schedule.max_steps=10 --set model.variant=owl1`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from owl.configs import build_dataclass, coerce
from owl.model.config import OwlConfig
from owl.model.variants import VARIANTS, VariantName
from pipelines.dag import (
    MIX_ROLE,
    REPEATABLE_KINDS,
    Role,
    StepSpec,
    active_table,
    with_instances,
)
from pipelines.step import Resources

TOP_LEVEL_FIELDS = ("name", "storage", "mlflow_uri", "ray_address", "seed", "model")
# `kind` makes a section of another name one more step of that kind (pipelines/dag.py).
STEP_RESERVED = ("resources", "retry", "allow_empty", "kind")
STEP_NAME = re.compile(r"[a-z][a-z0-9_]*")
# Steps whose Config has these fields size themselves; their `resources` come from there.
RESOURCE_FIELDS = ("num_workers", "cpus_per_worker", "gpus_per_worker")
# Storage URIs other than local paths need a POSIX mount today (locks, renames, resumable dirs).
_LOCAL_SCHEMES = ("file://",)
# MLflow stores kept in a database (SQLAlchemy URI schemes, "postgresql+psycopg2" counts).
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


@dataclass(frozen=True)
class RetryPolicy:
    """Transient failures are retried `max_retries` times, waiting backoff_s * 2**attempt. A
    retried training stage first waits up to `resource_wait_s` for the cluster to have its workers'
    CPUs/GPUs again (a lost node coming back) before it refuses."""

    max_retries: int = 2
    backoff_s: float = 5.0
    resource_wait_s: float = 300.0


# Folders of pretrained weights, read by the `init` step: Hugging Face CLIP / LLaMA folders, or
# the authors' released folder of a model variant (a field per variant); empty = not used.
PretrainedPaths = dataclasses.make_dataclass(
    "PretrainedPaths",
    [("clip", str, ""), ("llama", str, ""), *((name, str, "") for name in VARIANTS)],
    frozen=True,
)


@dataclass(frozen=True)
class ModelSpec:
    name: str = "debug-tiny"
    variant: VariantName | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    pretrained: PretrainedPaths = field(default_factory=PretrainedPaths)


@dataclass
class StepSection:
    """One step of the job: its typed config, resources and retry policy."""

    spec: StepSpec
    config: Any
    resources: Resources
    retries: RetryPolicy
    # A data step that keeps no sample fails unless this is set (see pipelines.step.OUTPUT_COUNTS).
    allow_empty: bool = False


@dataclass
class JobSpec:
    name: str
    storage: Path
    mlflow_uri: str
    # Where MLflow stores artifacts when we created the store ourselves; None = the server decides.
    mlflow_artifacts: str | None
    ray_address: str
    seed: int
    model: ModelSpec
    owl_config: OwlConfig
    steps: dict[str, StepSection]
    # The job as a plain dict after overrides: what `owl submit` ships to the cluster.
    raw: dict[str, Any]

    def step_names(self) -> list[str]:
        return list(self.steps)


# ---------------------------------------------------------------------------------------------
# Loading and overrides


def load_job(
    path: str | os.PathLike,
    overrides: list[str] | None = None,
    table: dict[str, StepSpec] | None = None,
) -> JobSpec:
    """Read a job file (or `env:VAR`, YAML text in an environment variable), apply `--set`
    overrides and validate."""
    text = _read_job_text(str(path))
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {yaml_error(exc)}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a job file is a YAML mapping, got {type(raw).__name__}")
    for item in overrides or []:
        apply_override(raw, item)
    return parse_job(raw, table)


def _read_job_text(path: str) -> str:
    if path.startswith("env:"):
        var = path[len("env:") :]
        if var not in os.environ:
            raise ValueError(f"{path}: environment variable {var} is not set")
        return os.environ[var]
    if not Path(path).is_file():
        raise ValueError(f"{path}: no such job file")
    return Path(path).read_text()


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `a.b.c=value` override (value parsed as YAML) to the raw job dict, in place."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--set {item!r}: expected PATH=VALUE, e.g. stage1.schedule.max_steps=10")
    parts = key.strip().split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise ValueError(f"--set {item!r}: {where} is a {type(child).__name__}, not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        raise ValueError(
            f"--set {item!r}: the value is not valid YAML: {yaml_error(exc)}; quote it, "
            f"e.g. --set '{key}=\"...\"'"
        ) from exc


def yaml_error(exc: yaml.YAMLError) -> str:
    """A YAML error on one line, with its position: 'line 3, column 7: mapping values are not
    allowed here (while scanning a simple key)'."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    start = getattr(exc, "context_mark", None)
    if context and start is not None and start is not mark:
        context += f" that starts at line {start.line + 1}, column {start.column + 1}"
    text = f"{problem} ({context})" if context else f"{problem}"
    return where + " ".join(text.split())


# ---------------------------------------------------------------------------------------------
# Validation


def resolve_tracking_uri(job_uri: str, storage: Path | None) -> tuple[str, str]:
    """(MLflow tracking URI, where it comes from): the job file's `mlflow_uri`, else the
    environment's MLFLOW_TRACKING_URI (a Secret on the cluster), else the default SQLite store
    under `storage`; ("", "") when none is set and there is no storage (a command given no job).
    The one place MLFLOW_TRACKING_URI is read."""
    if job_uri:
        return job_uri, "job file"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], "MLFLOW_TRACKING_URI"
    if storage is not None:
        return f"sqlite:///{storage / 'mlflow.db'}", "default SQLite store under storage"
    return "", ""


def parse_job(raw: dict[str, Any], table: dict[str, StepSpec] | None = None) -> JobSpec:
    """Validate a raw job dict against the step table and the step modules' `Config` classes."""
    table = active_table() if table is None else table
    table = with_instances(table, _instances(raw, table))
    name = coerce(raw.get("name", ""), str, "name")
    if not name:
        raise ValueError("name: required, a short job name (used for the MLflow experiment)")
    storage = parse_storage(coerce(raw.get("storage", ""), str, "storage"))
    mlflow_uri, _ = resolve_tracking_uri(
        coerce(raw.get("mlflow_uri") or "", str, "mlflow_uri"), storage
    )
    mlflow_artifacts = None  # a server keeps the artifacts where it was told to
    if mlflow_uri.split(":", 1)[0].split("+", 1)[0] in DATABASE_SCHEMES:
        # A database store would put a new experiment's artifacts in ./mlruns of whatever
        # folder owl runs in; they belong with the job's outputs.
        mlflow_artifacts = str(storage / "mlartifacts")
    model = build_dataclass(ModelSpec, raw.get("model") or {}, "model")
    present = [n for n in table if n in raw]
    if not present:
        raise ValueError(f"the job has no step sections; add at least one of {list(table)}")
    steps = {n: _parse_step(table[n], raw.get(n) or {}, present) for n in present}
    return JobSpec(
        name=name,
        storage=storage,
        mlflow_uri=mlflow_uri,
        mlflow_artifacts=mlflow_artifacts,
        ray_address=coerce(raw.get("ray_address") or "", str, "ray_address"),
        seed=coerce(raw.get("seed", 0), int, "seed"),
        model=model,
        owl_config=resolve_model(model),
        steps=steps,
        raw=raw,
    )


def _instances(raw: dict[str, Any], table: dict[str, StepSpec]) -> dict[str, str]:
    """The job's steps of its own name: {name: kind} for every section that is no top-level field
    and no step of the table, each with `kind:` naming a step kind a job may repeat."""
    unknown = [k for k in raw if k not in TOP_LEVEL_FIELDS and k not in table]
    untyped = sorted(k for k in unknown if not isinstance(raw[k], dict) or "kind" not in raw[k])
    if untyped:
        allowed = list(TOP_LEVEL_FIELDS) + list(table)
        raise ValueError(
            f"unknown job field(s) {untyped}; allowed: {allowed}, or a step of your own name "
            f"with `kind:` one of {list(REPEATABLE_KINDS)} (e.g. a second instruction source)"
        )
    for name in table:
        section = raw.get(name)
        if isinstance(section, dict) and section.get("kind", name) != name:
            raise ValueError(
                f"{name}.kind: {section['kind']!r}; a step named after a kind is that kind: give "
                "another step of a kind a name of its own"
            )
    instances = {}
    for name in unknown:
        kind = raw[name]["kind"]
        if kind not in REPEATABLE_KINDS or kind not in table:
            kinds = [k for k in REPEATABLE_KINDS if k in table]
            raise ValueError(
                f"{name}.kind: {kind!r} is not a step a job may repeat; one of {kinds}"
            )
        if not STEP_NAME.fullmatch(name):
            raise ValueError(
                f"{name}: a step's name is lower-case letters, digits and _, starting with a "
                "letter (it names the step's folder and its `mix` key)"
            )
        instances[name] = kind
    return instances


def parse_storage(value: str) -> Path:
    if not value:
        raise ValueError("storage: required, a directory for step outputs (e.g. /data/owl)")
    for scheme in _LOCAL_SCHEMES:
        if value.startswith(scheme):
            value = value[len(scheme) :]
    if "://" in value:
        raise ValueError(
            f"storage: {value!r}: only local paths are supported (file locks, atomic renames and "
            "resumable training need a POSIX filesystem); mount the bucket (s3fs, gcsfuse, a shared "
            "NFS/Lustre volume) on every node and give the mount path"
        )
    return Path(value).expanduser().resolve()


def resolve_model(model: ModelSpec) -> OwlConfig:
    """The OwlConfig the job trains: registry size + variant + nested overrides."""
    from owl.model import get_config  # the model registry; imported lazily (torch)

    try:
        return get_config(model.name, model.variant, **model.overrides)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"model: {exc}") from exc


def _parse_step(spec: StepSpec, section: dict[str, Any], present: list[str]) -> StepSection:
    path = spec.section
    if not isinstance(section, dict):
        raise ValueError(f"{path}: expected a mapping of {spec.name} settings, got {section!r}")
    for role, r in spec.roles.items():
        if r.required and r.upstream not in present:
            raise ValueError(
                f"{path}: needs step {r.upstream!r} (input {role!r}); add a `{r.upstream}:` section"
            )
    config_cls = spec.load_module().Config
    # A Config with a `resources` section of its own (training: workers and their policy) reads
    # the step's `resources:` itself; the runner takes the step's resources from it.
    owns_resources = "resources" in {f.name for f in dataclasses.fields(config_cls)}
    reserved = [k for k in STEP_RESERVED if not (owns_resources and k == "resources")]
    values = {k: v for k, v in section.items() if k not in reserved}
    for key, fixed in spec.fixed.items():
        if key in values and values[key] != fixed:
            raise ValueError(f"{path}.{key}: is fixed to {fixed!r} for this step")
        values[key] = fixed
    clash = [f.name for f in dataclasses.fields(config_cls) if f.name in reserved]
    assert not clash, f"{spec.module}.Config fields {clash} clash with the runner's section keys"
    config = build_dataclass(config_cls, values, path)
    spec = with_eval_roles(with_mix_roles(spec, config, present, path), config, present)
    _check_role_paths(dataclasses.asdict(config), spec, present, path)
    retries = build_dataclass(RetryPolicy, section.get("retry") or {}, f"{path}.retry")
    given = None if owns_resources else section.get("resources")
    resources = _resources(spec, config, given, path)
    allow_empty = coerce(section.get("allow_empty", False), bool, f"{path}.allow_empty")
    return StepSection(spec, config, resources, retries, allow_empty)


def with_mix_roles(spec: StepSpec, config: Any, present: list[str], path: str) -> StepSpec:
    """`spec` with one more input role per step of the job a training stage's `data.mix` names
    (`mix:<step>`), so that dataset's manifest digest is part of the stage's cache key like its
    `data` input's."""
    mix = config.data.mix if spec.trains else {}
    named = [name for name in mix if "/" not in name and not name.startswith("@")]
    if not named:
        return spec
    for name in named:
        if name not in present:
            raise ValueError(
                f"{path}.data.mix.{name}: names no step of this job (its steps: {present}); give a "
                "tokenize step of the job or a tokenize output folder"
            )
        if present.index(name) >= present.index(spec.name):
            raise ValueError(
                f"{path}.data.mix.{name}: a step after {spec.name}; mix an earlier one"
            )
    extra = {f"{MIX_ROLE}{name}": Role(name) for name in named}
    return dataclasses.replace(spec, roles={**spec.roles, **extra})


def with_eval_roles(spec: StepSpec, config: Any, present: list[str]) -> StepSpec:
    """`spec` with one more input role per earlier step of the job that the `@step/...` paths of
    a training stage's `evaluate.benchmarks` name (`@shapes/benchmarks/vqa.jsonl`), while the
    stage evaluates (`evaluate.every` > 0): the files it scores come from that step's output."""
    if not spec.trains or not config.evaluate.every:
        return spec
    from owl.eval.importers import parse_spec

    paths = []
    for entry in config.evaluate.benchmarks:
        parsed = parse_spec(entry)
        paths += parsed[2] if parsed else [entry]
    named = {p[1:].partition("/")[0] for p in paths if p.startswith("@")} - set(spec.roles)
    earlier = present[: present.index(spec.name)] if spec.name in present else []
    extra = {name: Role(name) for name in sorted(named) if name in earlier}
    return dataclasses.replace(spec, roles={**spec.roles, **extra}) if extra else spec


def _resources(spec: StepSpec, config: Any, given: Any, path: str) -> Resources:
    """From the step's own sizing fields if its Config has them (at its top or in its own
    `resources` section), else the `resources` section."""
    sizing = getattr(config, "resources", config)
    own = [f.name for f in dataclasses.fields(sizing) if f.name in RESOURCE_FIELDS]
    if own and given is not None:
        raise ValueError(
            f"{path}.resources: this step is sized by its own fields {own}; set those instead"
        )
    if own:
        return dataclasses.replace(spec.resources, **{name: getattr(sizing, name) for name in own})
    if given is None:
        return spec.resources
    return build_dataclass(Resources, given, f"{path}.resources")


def _check_role_paths(value: Any, spec: StepSpec, present: list[str], path: str) -> None:
    """Every `@role/...` string must name a role of this step whose upstream step is in the job."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_role_paths(v, spec, present, f"{path}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_role_paths(v, spec, present, f"{path}[{i}]")
    elif isinstance(value, str) and value.startswith("@"):
        role = value[1:].partition("/")[0]
        if role not in spec.roles:
            raise ValueError(
                f"{path}: {value!r} names input {role!r}; {spec.name} has inputs {sorted(spec.roles)}"
            )
        if spec.roles[role].upstream not in present:
            upstream = spec.roles[role].upstream
            raise ValueError(
                f"{path}: {value!r} needs step {upstream!r}, which this job does not run"
            )


def to_yaml(raw: dict[str, Any]) -> str:
    return yaml.safe_dump(raw, sort_keys=False)
