"""Client time of a fully cached step against MLflow servers: a plain `mlflow server` (the
baseline), the basic-auth server as infra/mlflow.yaml deploys it (auth cache 60 s), and the same
without the auth cache (MLflow's default). Each server gets a light fake job (tests/integration/
fake_steps.py, 4 steps) computed once, then `--repeats` fully cached runs in this process; we
report the client wall time of the cached runs per step and the HTTP requests they make.

    python bench/bench_mlflow_auth.py [--repeats 5] [--servers plain,auth,auth-nocache]

Target (issue 17): a cached step on the authenticated server under 1 s of client time.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def start(kind: str, tmp: Path) -> tuple[subprocess.Popen, str, dict[str, str]]:
    """A server of `kind` on loopback; (process, uri, client credentials)."""
    from tests.integration.servers import start_mlflow
    from tests.integration.test_mlflow_auth import deployment_auth_ini

    args: tuple[str, ...] = ()
    env: dict[str, str] = {}
    credentials: dict[str, str] = {}
    if kind.startswith("auth"):
        ini = deployment_auth_ini(tmp / "auth.db")
        if kind == "auth-nocache":
            ini = "\n".join(line for line in ini.splitlines() if "auth_cache_ttl" not in line)
        (tmp / "basic_auth.ini").write_text(ini)
        password = secrets.token_hex(12)
        args = ("--app-name", "basic-auth")
        env.update(
            MLFLOW_AUTH_CONFIG_PATH=str(tmp / "basic_auth.ini"),
            MLFLOW_AUTH_ADMIN_PASSWORD=password,
            MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16),
        )
        credentials = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password}
    proc, uri = start_mlflow(tmp, args, env, wait_s=600)
    return proc, uri, credentials


class RequestCounter:
    """Counts the HTTP requests MLflow's client sends (requests.Session.request)."""

    def __init__(self) -> None:
        import requests

        self.count = 0
        self._original = requests.Session.request
        counter = self

        def counted(session, *args, **kwargs):
            counter.count += 1
            return counter._original(session, *args, **kwargs)

        requests.Session.request = counted


def measure(kind: str, repeats: int, counter: RequestCounter) -> dict:
    from pipelines.jobspec import parse_job
    from pipelines.progress import Reporter
    from pipelines.runner import Runner
    from tests.integration.fake_steps import TABLE, fake_job
    from tests.integration.servers import stop

    tmp = Path(tempfile.mkdtemp(prefix=f"owl-bench-mlflow-{kind}-"))
    proc, uri, credentials = start(kind, tmp)
    saved = {k: os.environ.get(k) for k in credentials}
    os.environ.update(credentials)
    try:
        job = parse_job(fake_job(f"bench-{kind}", tmp / "storage", mlflow_uri=uri), TABLE)
        first = Runner(job, Reporter(quiet=True)).run()
        assert first.ok, first.error
        times, requests_per_run = [], []
        for _ in range(repeats):
            before = counter.count
            started = time.perf_counter()
            result = Runner(job, Reporter(quiet=True)).run()
            times.append(time.perf_counter() - started)
            requests_per_run.append(counter.count - before)
            assert {s.state for s in result.steps} == {"cached"}
        steps = len(first.steps)
        return {
            "server": kind,
            "steps": steps,
            "cached_run_s": [round(t, 3) for t in times],
            "median_run_s": round(statistics.median(times), 3),
            "median_per_step_s": round(statistics.median(times) / steps, 3),
            "requests_per_run": requests_per_run[-1],
            "median_per_request_s": round(statistics.median(times) / requests_per_run[-1], 4),
        }
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--servers", default="plain,auth,auth-nocache")
    args = parser.parse_args()
    counter = RequestCounter()
    rows = []
    for kind in args.servers.split(","):
        rows.append(measure(kind, args.repeats, counter))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # each result as it comes
    print(json.dumps({"load_avg_1m": os.getloadavg()[0], "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
