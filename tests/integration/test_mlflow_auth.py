"""infra/mlflow.yaml's server, for real: `mlflow server --app-name basic-auth` with the auth config
of its ConfigMap, the project's dependencies (Flask-WTF) and a user the test creates. A job of
light fake steps runs against it with the tracking URI and credentials from the environment only
(MLFLOW_TRACKING_URI / _USERNAME / _PASSWORD, as the RayJob's Secret gives them), re-runs fully
cached, and `owl audit` walks its lineage; missing or wrong credentials are one-line errors that
say so (not "no such version")."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest
import yaml

from pipelines import cli
from tests.integration.fake_steps import fake_job
from tests.integration.servers import start_mlflow, stop

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration
ADMIN_PASSWORD = secrets.token_hex(12)


def deployment_auth_ini(database: Path) -> str:
    """basic_auth.ini from infra/mlflow.yaml's ConfigMap, its database moved to `database`."""
    docs = list(yaml.safe_load_all((ROOT / "infra" / "mlflow.yaml").read_text()))
    (config,) = [d for d in docs if d and d["kind"] == "ConfigMap"]
    lines = config["data"]["basic_auth.ini"].splitlines()
    return "\n".join(
        f"database_uri = sqlite:///{database}" if line.startswith("database_uri") else line
        for line in lines
    )


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow-auth")
    (tmp / "basic_auth.ini").write_text(deployment_auth_ini(tmp / "auth.db"))
    proc, uri = start_mlflow(
        tmp,
        ("--app-name", "basic-auth"),
        {
            "MLFLOW_AUTH_CONFIG_PATH": str(tmp / "basic_auth.ini"),
            "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        },
    )
    try:
        yield uri
    finally:
        stop(proc)


def create_user(uri: str, monkeypatch) -> tuple[str, str]:
    from mlflow.server.auth.client import AuthServiceClient

    user, password = "trainer", secrets.token_hex(12)
    with monkeypatch.context() as admin:
        admin.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        admin.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
        AuthServiceClient(uri).create_user(user, password)
    return user, password


def owl(args: list[str], capfd) -> tuple[int, str, str]:
    capfd.readouterr()
    rc = cli.main(args)
    out, err = capfd.readouterr()
    return rc, out, err


def test_a_job_records_and_audits_through_basic_auth(auth_server, tmp_path, monkeypatch, capfd):
    user, password = create_user(auth_server, monkeypatch)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(fake_job("authjob", tmp_path / "storage")))  # no mlflow_uri
    monkeypatch.setenv("OWL_STEPS_TABLE", "tests.integration.fake_steps:TABLE")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", auth_server)
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)

    # No credentials: one line that says which, before any step runs.
    rc, _, err = owl(["run", str(job_file), "--json"], capfd)
    assert rc == 2 and err.strip().splitlines()[-1] == (
        f"error: the MLflow server at {auth_server} requires credentials: set "
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
    )
    assert not (tmp_path / "storage" / "steps").exists()

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    rc, out, err = owl(["run", str(job_file), "--json"], capfd)
    assert rc == 0 and out.startswith("{"), (out[-2000:], err[-3000:])
    first = json.loads(out)
    rc, out, _ = owl(["run", str(job_file), "--json"], capfd)
    second = json.loads(out)
    assert [s["state"] for s in second["steps"]] == ["cached"] * 4
    assert first["registered_model"] == second["registered_model"] == {
        "name": "authjob", "version": "1",
    }  # fmt: skip
    assert not (tmp_path / "storage" / "mlflow.db").exists()  # the server, not the default store

    rc, out, _ = owl(["status", str(job_file), "--json"], capfd)
    status = json.loads(out)
    assert (status["mlflow_uri"], status["mlflow_uri_from"]) == (auth_server, "MLFLOW_TRACKING_URI")

    rc, out, err = owl(["audit", "model", "authjob@current", "--json"], capfd)
    assert rc == 0, err
    audit = json.loads(out)
    assert [e["step"] for e in audit["chain"]] == ["stage1", "filter", "download"]
    stage1 = audit["chain"][0]
    assert stage1["run_id"] == audit["model"]["tags"]["owl.run.stage1"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(auth_server)
    run = client.get_run(stage1["run_id"])
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    # A model that is not there: said as such (the server answers 403 for it), not "refused".
    rc, _, err = owl(["audit", "model", "nosuch@current"], capfd)
    assert rc == 2 and err.strip() == "error: nosuch@current: no registered model named 'nosuch'"

    # Wrong password, and none at all: said as such, not "no such registered model version".
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
    rc, _, err = owl(["audit", "model", "authjob@current"], capfd)
    assert rc == 2 and f"refused user '{user}'" in err and "no such" not in err
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    rc, _, err = owl(["audit", "model", "authjob@current"], capfd)
    assert rc == 2 and "requires credentials" in err and "no such" not in err
