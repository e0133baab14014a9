"""infra/ files as the tools read them: cluster.yaml against Ray's own autoscaler schema, with the
shared storage mounted and the container's env file written on the host (initialization_commands,
before `docker run` bind-mounts /mnt/shared and reads --env-file); the image build context
without .venv/.git/runs; torch installed before the pinned set and held there."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"


def test_cluster_yaml_is_valid_and_prepares_the_host():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cluster = yaml.safe_load((INFRA / "cluster.yaml").read_text())
    jsonschema.validate(cluster, schema)

    host = " ".join(cluster["initialization_commands"])
    container = " ".join(cluster.get("setup_commands") or [])
    assert "mount" in host and "/mnt/shared" in host and "mount" not in container
    options = " ".join(cluster["docker"]["run_options"])
    env_file = re.search(r"--env-file (\S+)", options).group(1)
    assert f"tee {env_file}" in host and f"chmod 600 {env_file}" in host
    assert "-v /mnt/shared:/mnt/shared" in options


def test_docker_build_context_and_torch_order():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "runs", "data"} <= set(ignored)
    dockerfile = (INFRA / "Dockerfile").read_text()
    torch_at = dockerfile.index('pip install --no-cache-dir "torch==${TORCH_VERSION}"')
    pinned_at = dockerfile.index("-r requirements-ci.txt -c /tmp/torch-constraint.txt")
    assert torch_at < pinned_at
    copied = re.findall(r"^COPY --chown=\S+ (.+) \S+$", dockerfile, flags=re.M)
    needed = {p for line in copied for p in line.split()}
    assert not needed & set(ignored)  # nothing the build needs is ignored


def test_mlflow_server_has_the_auth_extra_and_cache():
    docs = [d for d in yaml.safe_load_all((INFRA / "mlflow.yaml").read_text()) if d]
    (server,) = [d for d in docs if d["kind"] == "Deployment"]
    (container,) = server["spec"]["template"]["spec"]["containers"]
    command = " ".join(container["args"])
    assert '"mlflow[auth]==' in command and "--app-name basic-auth" in command
    (config,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert "auth_cache_ttl_seconds = 60" in config["data"]["basic_auth.ini"]
    requirements = (ROOT / "requirements-ci.txt").read_text()
    assert "Flask-WTF==" in requirements  # the test server runs on the project's dependencies


def test_docker_image_installs_a_java_runtime():
    """The caption benchmarks need Java: the image installs a JRE package that Debian's lists
    know (apt-cache, the distribution's own index) as root, then returns to Ray's user."""
    import shutil
    import subprocess

    dockerfile = (INFRA / "Dockerfile").read_text()
    run = re.search(r"^RUN apt-get update \\\n(?:.*\\\n)*.*$", dockerfile, flags=re.M).group(0)
    (install,) = re.findall(r"apt-get install -y --no-install-recommends ([\w .+-]+?) \\", run)
    packages = install.split()
    assert "java -version" in run and any("jre" in p for p in packages)
    user_before = re.findall(r"^USER (\S+)", dockerfile[: dockerfile.index(run)], flags=re.M)
    assert user_before[-1] == "root"
    assert re.findall(r"^USER (\S+)", dockerfile, flags=re.M)[-1] == "ray"
    if shutil.which("apt-cache") is None:
        import pytest

        pytest.skip("no apt-cache on this machine: cannot look the package up")
    for package in packages:
        shown = subprocess.run(["apt-cache", "show", package], capture_output=True, text=True)
        assert shown.returncode == 0 and f"Package: {package}" in shown.stdout, package
        assert "jre-headless" in shown.stdout  # it depends on a headless JRE (a `java` binary)
