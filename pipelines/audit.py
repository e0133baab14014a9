"""Lineage read back from MLflow: `audit_model` (a registered model version -> the chain of step
runs back to the URL lists), `audit_dataset` (an output digest -> who produced and who read it)
and `download_evaluation` (an evaluation's per-item scores, for `owl compare`). The graph is the
one pipelines.lineage writes.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipelines.errors import UserError
from pipelines.lineage import TAG, auth_message, check_store, is_auth_error


def _store_errors(func: Any) -> Any:
    """Audits read an existing store: a missing SQLite file or refused credentials are one-line
    user errors, not a new empty database or "no such version"."""

    @functools.wraps(func)
    def wrapper(tracking_uri: str, *args: Any) -> Any:
        check_store(tracking_uri, create=False)
        try:
            return func(tracking_uri, *args)
        except MlflowException as exc:
            if is_auth_error(exc):
                raise UserError(auth_message(tracking_uri)) from None
            raise UserError(f"the MLflow store at {tracking_uri}: {exc.message}") from None

    return wrapper


def _model_visible(client: MlflowClient, name: str) -> bool:
    """Whether a registered model `name` exists that these credentials may see."""
    try:
        return bool(client.search_registered_models(f"name = '{name}'", max_results=1))
    except MlflowException:
        return True  # cannot tell: the refusal stands


@_store_errors
def audit_model(tracking_uri: str, ref: str) -> dict[str, Any]:
    """`NAME`, `NAME@alias` or `NAME/version` -> the model version and the chain of step runs
    that produced it, back to the steps without inputs (the URL lists)."""
    client = MlflowClient(tracking_uri)
    version = _model_version(client, ref)
    chain, seen = [], set()
    todo = [version.run_id]
    while todo:
        run_id = todo.pop(0)
        if not run_id or run_id in seen:
            continue
        seen.add(run_id)
        entry = _run_entry(client, run_id)
        chain.append(entry)
        todo.extend(i["producer_run_id"] for i in entry["inputs"])
    return {
        "model": {
            "name": version.name,
            "version": str(version.version),
            "tags": dict(version.tags),
        },
        "chain": chain,
    }


def _model_version(client: MlflowClient, ref: str) -> Any:
    name = ref.split("@", 1)[0] if "@" in ref else ref.rsplit("/", 1)[0]
    try:
        if "@" in ref:
            return client.get_model_version_by_alias(name, ref.split("@", 1)[1])
        if "/" in ref:
            return client.get_model_version(name, ref.rsplit("/", 1)[1])
        versions = client.search_model_versions(f"name = '{ref}'")
    except MlflowException as exc:
        if exc.error_code == "PERMISSION_DENIED" and not _model_visible(client, name):
            # A basic-auth server answers 403 for a model that does not exist.
            raise UserError(f"{ref}: no registered model named {name!r}") from None
        if is_auth_error(exc):
            raise UserError(auth_message(client.tracking_uri)) from None
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise UserError(
                f"{ref}: the MLflow store at {client.tracking_uri} failed: {exc.message}"
            ) from None
        raise UserError(f"{ref}: no such registered model version ({exc.message})") from None
    if not versions:
        raise UserError(f"{ref}: no registered model of that name")
    return max(versions, key=lambda v: int(v.version))


def _run_entry(client: MlflowClient, run_id: str) -> dict[str, Any]:
    run = client.get_run(run_id)
    tags = run.data.tags
    inputs = []
    for dataset_input in run.inputs.dataset_inputs if run.inputs else []:
        input_tags = {t.key: t.value for t in dataset_input.tags}
        inputs.append(
            {
                "role": input_tags.get("mlflow.data.context", ""),
                "step": dataset_input.dataset.name,
                "digest": input_tags.get(f"{TAG}sha256", dataset_input.dataset.digest),
                "producer_run_id": input_tags.get(f"{TAG}producer_run_id", ""),
                **({"path": input_tags[f"{TAG}path"]} if f"{TAG}path" in input_tags else {}),
            }
        )
    metrics = run.data.metrics
    entry = {
        "step": tags.get(f"{TAG}step", ""),
        "run_id": run_id,
        "cache_key": tags.get(f"{TAG}cache_key", ""),
        "output_digest": tags.get(f"{TAG}output_digest", ""),
        "inputs": inputs,
        "counts": {k: metrics[k] for k in ("files", "shards", "rows", "tokens") if k in metrics},
    }
    if not inputs:  # a source step: its parameters name the URL lists / files it read
        entry["params"] = dict(run.data.params)
    return entry


def _all_step_runs(client: MlflowClient) -> Iterable[Any]:
    for experiment in client.search_experiments():
        token = None
        while True:
            page = client.search_runs(
                [experiment.experiment_id],
                filter_string=f"tags.`{TAG}step` != ''",
                max_results=1000,
                page_token=token,
            )
            yield from page
            token = page.token
            if not token:
                break


@_store_errors
def audit_dataset(tracking_uri: str, digest: str) -> dict[str, Any]:
    """Who produced the output with this digest (full or a prefix of >= 8 chars) and who read it."""
    if len(digest) < 8:
        raise UserError(f"{digest!r}: give at least 8 characters of the digest")
    client = MlflowClient(tracking_uri)
    producers, consumers = [], []
    for run in _all_step_runs(client):
        tags = run.data.tags
        summary = {
            "step": tags.get(f"{TAG}step"),
            "run_id": run.info.run_id,
            "cache": tags.get(f"{TAG}cache"),
        }
        if tags.get(f"{TAG}output_digest", "").startswith(digest):
            producers.append({**summary, "digest": tags[f"{TAG}output_digest"]})
        for dataset_input in run.inputs.dataset_inputs if run.inputs else []:
            full = {t.key: t.value for t in dataset_input.tags}.get(f"{TAG}sha256", "")
            if full.startswith(digest):
                consumers.append({**summary, "input_step": dataset_input.dataset.name})
    if not producers and not consumers:
        raise UserError(f"no dataset with a digest starting {digest!r} in {tracking_uri}")
    return {"digest": digest, "producers": producers, "consumers": consumers}


_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@_store_errors
def download_evaluation(tracking_uri: str, ref: str, folder: str, dst: Path) -> Path:
    """The artifacts under `folder` (e.g. "units") of an evaluation, downloaded into `dst`:
    `ref` is an evaluate step's MLflow run id, or a model version (`NAME`, `NAME@alias`,
    `NAME/version`), whose registering run's `evaluate` input is followed. A cache-hit run
    points at the run that computed the output and holds its artifacts."""
    client = MlflowClient(tracking_uri)
    if _RUN_ID.match(ref):
        run_id = ref
    else:
        entry = _run_entry(client, _model_version(client, ref).run_id)
        found = [i for i in entry["inputs"] if i["role"] == "evaluate"]
        if not found:
            raise UserError(f"{ref}: its run {entry['run_id']} read no evaluate step's output")
        run_id = found[0]["producer_run_id"]
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise UserError(f"{ref}: no such MLflow run ({exc.message})") from None
    run_id = run.data.tags.get(f"{TAG}producer_run_id") or run_id
    if not client.list_artifacts(run_id, folder):
        raise UserError(f"{ref}: run {run_id} has no {folder}/ artifacts (not an evaluate run?)")
    dst.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, folder, str(dst)))
