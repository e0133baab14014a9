"""Every user error of every `owl` command is one `error: ...` line and a non-zero exit, never a
traceback; and the fixes that come with them (`owl chat` finds a training step's tokenizer,
audits never create an empty store, `owl submit` from an installed package ships no
site-packages)."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from pipelines import cli
from pipelines.commands.eval import resolve_model_dirs
from pipelines.jobspec import parse_job
from pipelines.progress import Reporter
from pipelines.ray_jobs import code_runtime_env
from pipelines.runner import Runner
from tests.integration.fake_steps import TABLE, fake_job

ROOT = Path(__file__).resolve().parents[2]


def owl(args: list[str], cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    """The real `owl` entry point in a fresh interpreter."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


class Done:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def owl_here(monkeypatch, capsys):
    """`owl ARGS` in this process (cheaper than a new interpreter each time), in folder `cwd`."""

    def call(args: list[str], cwd: Path = ROOT, **env: str) -> Done:
        with monkeypatch.context() as patch:
            patch.chdir(cwd)
            patch.delenv("MLFLOW_TRACKING_URI", raising=False)
            patch.setenv("RAY_AUTH_MODE", os.environ.get("RAY_AUTH_MODE", "disabled"))
            patch.setenv("OWL_STEPS_TABLE", _TABLE)
            for key, value in env.items():
                patch.setenv(key, value)
            capsys.readouterr()
            rc = cli.main(args)
            out, err = capsys.readouterr()
        return Done(rc, out, err)

    return call


def one_error_line(done) -> str:
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory):
    """A finished fake job with a relative storage, as a user's job file has it."""
    folder = tmp_path_factory.mktemp("project")
    (folder / "job.yaml").write_text(yaml.safe_dump(fake_job("errs", "runs/errs")))
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        job = parse_job(yaml.safe_load((folder / "job.yaml").read_text()), TABLE)
        assert Runner(job, Reporter(quiet=True)).run().ok
    finally:
        os.chdir(cwd)
    return folder


def test_user_errors_are_one_line(tmp_path, finished_job, owl_here):
    job = str(finished_job / "job.yaml")
    cases = {
        ("run", str(tmp_path / "nope.yaml")): "no such job file",
        ("run", job, "--until", "nosuch"): "--until nosuch: not a step",
        ("submit", job, "--address", "http://127.0.0.1:9"): "cannot reach the Ray dashboard",
        ("logs", "owl-x", "--address", "http://127.0.0.1:9"): "cannot reach the Ray dashboard",
        ("stop", "owl-x"): "no Ray address",
        ("eval", "--model", str(tmp_path), "--benchmark", str(tmp_path / "vqa.jsonl")):
            "vqa.jsonl: benchmark file not found",
        ("eval", "--model", str(tmp_path), "--benchmark", "b.jsonl", "--num-frames", "0"):
            "--num-frames must be >= 1",  # owl.eval.evaluate.EvalOptions, named by its flag
        ("chat", "--model", str(tmp_path)): "no config.json",
        ("model", "summary", "nosuch"): "unknown model config",
        ("audit", "model", "errs@current"): "no MLflow tracking URI",
    }  # fmt: skip
    for args, expected in cases.items():
        line = one_error_line(owl_here(list(args), cwd=finished_job))
        assert expected in line, (args, line)
    missing_token = owl_here(
        ["submit", job, "--address", "http://127.0.0.1:9"], cwd=finished_job,
        RAY_AUTH_TOKEN_PATH=str(tmp_path / "none.token"),
    )  # fmt: skip
    assert "RAY_AUTH_TOKEN_PATH" in one_error_line(missing_token)
    # The real entry point, in a fresh interpreter: the same one line.
    assert "no such job file" in one_error_line(owl_here(["status", str(tmp_path / "nope.yaml")]))


class _Dashboard(http.server.BaseHTTPRequestHandler):
    """Answers Ray's version check, then drops every other request (a dashboard going away after
    the client connected), or with `not_ray` answers a web page (something else at the address)."""

    not_ray = False

    def do_GET(self) -> None:
        body = b"<html>sign in</html>" if self.not_ray else b'{"ray_version": "2.60.0"}'
        if self.path.startswith("/api/version"):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("not_ray", [False, True])
def test_submit_to_a_lost_or_wrong_dashboard_is_one_line(finished_job, owl_here, not_ray):
    handler = type("Handler", (_Dashboard,), {"not_ray": not_ray})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        job = str(finished_job / "job.yaml")
        for args in (["submit", job], ["logs", "owl-x"], ["stop", "owl-x"]):
            line = one_error_line(owl_here([*args, "--address", address], cwd=finished_job))
            expected = "not as a Ray dashboard" if not_ray else "cannot reach the Ray dashboard"
            assert expected in line and "(http://HEAD:8265)?" in line, (args, line)
    finally:
        server.shutdown()
        server.server_close()


_TABLE = "tests.integration.fake_steps:TABLE"


def test_audit_from_another_folder_creates_no_store(tmp_path, finished_job, owl_here):
    job = str(finished_job / "job.yaml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    line = one_error_line(owl_here(["audit", "model", "errs@current", "--job", job], cwd=elsewhere))
    assert "no MLflow store at" in line and "--set storage" in line
    assert list(elsewhere.rglob("*")) == []  # no runs/errs/mlflow.db made there

    found = owl_here(["audit", "model", "errs@current", "--job", job, "--json"], cwd=finished_job)
    assert found.returncode == 0, found.stderr
    assert [e["step"] for e in json.loads(found.stdout)["chain"]] == [
        "stage1",
        "filter",
        "download",
    ]
    unknown = owl_here(["audit", "dataset", "0123456789abcdef", "--job", job], cwd=finished_job)  # fmt: skip
    assert "no dataset with a digest starting '0123456789abcdef'" in one_error_line(unknown)
    no_version = owl_here(["audit", "model", "errs/7", "--job", job], cwd=finished_job)  # fmt: skip
    assert "errs/7: no such registered model version" in one_error_line(no_version)


def test_chat_finds_the_tokenizer_of_a_training_step_folder(tmp_path):
    steps = tmp_path / "storage" / "steps"
    for key in ("k1", "k2"):  # two tokenizer outputs: the manifest says which one
        tok = steps / "tokenizer" / key / "tokenizer"
        tok.mkdir(parents=True)
        (tok / "tokenizer.json").write_text("{}")
        (tok.parent / "manifest.json").write_text("{}")
    stage2 = steps / "stage2" / "s2"
    (stage2 / "model").mkdir(parents=True)
    (stage2 / "model" / "config.json").write_text("{}")
    manifest = {"info": {"inputs": {"tokenizer": {"step": "tokenizer", "key": "k2"}}}}
    (stage2 / "manifest.json").write_text(json.dumps(manifest))
    model_dir, tokenizer_dir = resolve_model_dirs(str(stage2), None)
    assert model_dir == stage2 / "model"
    assert tokenizer_dir == steps / "tokenizer" / "k2" / "tokenizer"
    (stage2 / "manifest.json").write_text("{}")  # an older output: which of the two is unknown
    with pytest.raises(ValueError, match="2 tokenizer outputs"):
        resolve_model_dirs(str(stage2), None)


def test_the_runner_records_each_outputs_inputs(tmp_path):
    job = parse_job(fake_job("inputs", tmp_path), TABLE)
    result = Runner(job, Reporter(quiet=True)).run()
    keys = {s.step: s.key for s in result.steps}
    manifest = json.loads(
        (tmp_path / "steps" / "stage1" / keys["stage1"] / "manifest.json").read_text()
    )
    assert manifest["info"]["inputs"] == {"data": {"step": "filter", "key": keys["filter"]}}


def test_submit_from_an_installed_package_ships_only_owls_packages(tmp_path):
    from_checkout = code_runtime_env(tmp_path / "storage")
    assert from_checkout["working_dir"] == str(ROOT)
    site_packages = tmp_path / "site-packages"  # no pyproject.toml of owl there
    site_packages.mkdir()
    import pipelines.ray_jobs as ray_jobs

    saved = ray_jobs.PROJECT_ROOT
    ray_jobs.PROJECT_ROOT = site_packages
    try:
        installed = code_runtime_env(tmp_path / "storage")
    finally:
        ray_jobs.PROJECT_ROOT = saved
    assert "working_dir" not in installed
    assert [Path(p).name for p in installed["py_modules"]] == ["owl", "pipelines"]


@pytest.mark.parametrize(
    ("override", "field", "path"),
    [("download.url_list=/nope/urls.parquet", "download.url_list", "/nope/urls.parquet"),
     ("tokenize_instructions.sources=[{format: llava, path: /nope/llava.json}]",
      "tokenize_instructions.sources[0].path", "/nope/llava.json")],
)  # fmt: skip
def test_a_missing_input_file_is_an_error_before_anything_starts(tmp_path, monkeypatch, capsys, override, field, path):  # fmt: skip
    """A URL list or instruction file that is not there: one line at validation, not a step
    failure after Ray has started (20-30 s)."""
    monkeypatch.delenv("OWL_STEPS_TABLE", raising=False)
    storage = tmp_path / "storage"
    args = [
        "run",
        str(ROOT / "jobs" / "demo.yaml"),
        "--set",
        f"storage={storage}",
        "--set",
        override,
    ]
    rc = cli.main(args)
    line = one_error_line(Done(rc, *capsys.readouterr()))
    assert (
        line
        == f"error: {field}: no such file or folder '/nope/{override.split('/nope/')[1].rstrip(']}').strip()}'"
    )
    assert not storage.exists()  # no execution record, no MLflow store, no Ray


def test_an_old_flat_training_key_names_its_new_place(tmp_path, monkeypatch, capsys):
    """TrainConfig is in sections (owl.train.config): a key of the flat layout, given by --set
    or in a job file, is one line saying where it moved, before anything starts."""
    monkeypatch.delenv("OWL_STEPS_TABLE", raising=False)
    storage = tmp_path / "storage"
    demo = str(ROOT / "jobs" / "demo.yaml")
    args = ["run", demo, "--dry-run", "--set", f"storage={storage}", "--set", "stage1.lr=1e-3"]
    line = one_error_line(Done(cli.main(args), *capsys.readouterr()))
    assert line == "error: stage1.lr moved to stage1.optimizer.lr"
    raw = yaml.safe_load(Path(demo).read_text())
    raw["stage2"]["max_steps"] = raw["stage2"].pop("schedule")["max_steps"]
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(raw))
    args = ["run", str(tmp_path / "old.yaml"), "--dry-run", "--set", f"storage={storage}"]
    line = one_error_line(Done(cli.main(args), *capsys.readouterr()))
    assert line == "error: stage2.max_steps moved to stage2.schedule.max_steps"
    assert not storage.exists()
