"""A Ray cluster of several nodes on this machine, for integration tests: a head and worker nodes
(`ray start --block`, each its own process group, temp dir and free ports), every node in its own
mount namespace (`unshare -m`, needs root) where /tmp, /dev/shm and the home folder are private
(node-local disks) and the project's sources are hidden (the Python environment stays visible,
as an image's would). Code reaches the nodes only through `owl submit`'s runtime environment; only
the storage root is shared. A node can be killed (SIGKILL to every process of its namespace, as a
machine that dies) and a replacement started, with a fresh disk.

    with Cluster(tmp, storage, env, num_workers=2) as cluster:
        cluster.address           # the head's dashboard, for `owl submit --address`
        cluster.kill(1); cluster.start(1)
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from urllib.parse import urlparse

from tests.integration.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
# The environment's real folder (the checkout's `.venv` may be a link into a folder we hide).
VENV = Path(sys.prefix).resolve()
PYTHON = VENV / "bin" / "python"
# What every node sees as an image would have it: the environment, the interpreter it was made
# from (which may live under the home folder, e.g. pyenv's), and the compiled torch extensions
# folder an image would carry (training builds none since owl/train/deepspeed_cpu.py).
TORCH_EXTENSIONS = Path(
    os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
).resolve()
IMAGE = sorted({VENV, Path(sys.base_prefix).resolve(), TORCH_EXTENSIONS})


def source_folders() -> list[Path]:
    """The project folders a node must not see: this checkout, and the one an editable install of
    `owl` in the environment points at (its `.pth` maps `owl` there)."""
    folders = {ROOT}
    try:
        direct = json.loads(importlib.metadata.distribution("owl").read_text("direct_url.json"))
    except (importlib.metadata.PackageNotFoundError, TypeError, ValueError):
        direct = {}
    if direct.get("dir_info", {}).get("editable"):
        folders.add(Path(urlparse(direct["url"]).path).resolve())
    return sorted(folders)


def node_command(index: int, head_port: int, dashboard_port: int, cpus: float) -> list[str]:
    """`ray start --block` for one node, every port chosen free (other Ray clusters may run here).
    Its temp dir is /tmp/ray inside the node's private /tmp."""
    ports = {
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(),
    }
    command = [str(VENV / "bin" / "ray"), "start", "--block", f"--num-cpus={cpus:g}",
               "--node-ip-address=127.0.0.1", "--disable-usage-stats", "--temp-dir=/tmp/ray",
               f"--object-store-memory={400 * 2**20}"]  # fmt: skip
    command += [f"{flag}={port}" for flag, port in ports.items()]
    if index == 0:
        command += ["--head", f"--port={head_port}", f"--dashboard-port={dashboard_port}",
                    "--dashboard-host=127.0.0.1", f"--ray-client-server-port={free_port()}",
                    "--include-dashboard=true"]  # fmt: skip
    else:
        command += [f"--address=127.0.0.1:{head_port}"]
    return command


def namespace_script(disk: Path, hidden: list[Path], keep: list[Path], command: list[str]) -> str:
    """The shell lines run inside `unshare -m`: each hidden folder replaced by an empty folder of
    the node's `disk` (kept paths under it bound back in first), a fresh /dev/shm, then `command`.
    /tmp is replaced last: the node's own folders live under the real /tmp until then."""
    home = Path(os.environ.get("HOME", "/root")).resolve()
    order = [h for h in [*hidden, home] if h != Path("/tmp")] + [Path("/tmp")]
    lines = ["set -e", "mount --make-rprivate /"]
    for n, folder in enumerate(order):
        private = disk / f"m{n}"
        lines.append(f"mkdir -p {shlex.quote(str(private))}")
        for path in keep:
            if path.is_relative_to(folder):
                inside = private / path.relative_to(folder)
                lines.append(f"mkdir -p {shlex.quote(str(inside))}")
                lines.append(f"mount --bind {shlex.quote(str(path))} {shlex.quote(str(inside))}")
        lines.append(f"mount --rbind {shlex.quote(str(private))} {shlex.quote(str(folder))}")
    lines += ["mount -t tmpfs -o size=2g owl-shm /dev/shm", "cd /", "exec " + shlex.join(command)]
    return "\n".join(lines)


class Node:
    """One `ray start --block` process group in its own mount namespace."""

    def __init__(self, index: int, proc: subprocess.Popen, log: Path):
        self.index = index
        self.proc = proc
        self.log = log
        self.namespace = ""  # /proc/<pid>/ns/mnt once the node runs

    def processes(self) -> list[int]:
        """Every process of this node: those in its mount namespace, and its process group."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                same_ns = self.namespace and os.readlink(entry / "ns" / "mnt") == self.namespace
                if same_ns or os.getpgid(int(entry.name)) == self.proc.pid:
                    pids.append(int(entry.name))
            except OSError:
                continue
        return pids

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """Send `sig` to every process of the node; the number of processes it reached."""
        pids = self.processes()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return len(pids)


class Cluster:
    """A head (no CPUs: it only schedules and runs the job's driver) and `num_workers` nodes with
    `cpus` CPUs each. `storage` is the only folder every node shares (it must not be inside the
    checkout)."""

    def __init__(
        self, tmp: Path, storage: Path, env: dict[str, str], num_workers: int = 2, cpus: float = 1
    ) -> None:
        self.tmp = tmp
        self.storage = storage.resolve()
        self.env = {
            **env,
            "PATH": f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}",
            # On a loaded machine the dashboard agent may take longer than the raylet's default
            # wait for its ports (the raylet then aborts); `ray start`'s own 30 s wait for the
            # raylet is fixed, hence the restarts in wait_for_nodes.
            "RAY_agent_register_timeout_ms": "120000",
        }
        self.num_workers = num_workers
        self.cpus = cpus
        self.head_port, self.dashboard_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        # Ray's state API (Ray Train's placement-group cleaner asks it every few seconds whether
        # the controller lives) finds its cluster by scanning this machine's processes for GCS
        # servers: here it found every other Ray cluster of the machine too, scanned all processes
        # each time and logged "Found multiple active Ray instances" to the job's log hundreds of
        # times. A real node runs one Ray instance; name ours.
        self.env["RAY_API_SERVER_ADDRESS"] = self.address
        # Each node's private folders; short, under the real /tmp (Ray's socket paths < 108 bytes).
        self.disks = Path(tempfile.mkdtemp(prefix="owlnodes", dir="/tmp"))
        self.nodes: dict[int, Node] = {}
        self.starts = 0

    def __enter__(self) -> Cluster:
        try:
            for index in range(self.num_workers + 1):  # one at a time: each start is heavy
                self.start(index)
                self.wait_for_nodes(index + 1)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: TracebackType | None):
        self.stop()

    def start(self, index: int) -> Node:
        """Start node `index` (0: the head) on a fresh private disk."""
        self.storage.mkdir(parents=True, exist_ok=True)
        TORCH_EXTENSIONS.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        disk = self.disks / f"n{index}-{self.starts}"
        disk.mkdir()
        cpus = 0 if index == 0 else self.cpus
        command = node_command(index, self.head_port, self.dashboard_port, cpus)
        script = namespace_script(disk, source_folders(), [*IMAGE, self.storage], command)
        log = self.tmp / f"node{index}-{self.starts}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(["unshare", "--mount", "bash", "-c", script], env=self.env,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        node = Node(index, proc, log)
        self.nodes[index] = node
        deadline = time.monotonic() + 30
        while not node.namespace and time.monotonic() < deadline:
            time.sleep(0.2)  # unshare has switched once `ray` runs under the pid
            try:
                if "ray" in Path(f"/proc/{proc.pid}/cmdline").read_text():
                    node.namespace = os.readlink(f"/proc/{proc.pid}/ns/mnt")
            except OSError:
                break
        if not node.namespace:
            raise RuntimeError(f"node {index} did not start: {log.read_text()[-2000:]}")
        return node

    def kill(self, index: int) -> int:
        """kill -9 every process of node `index`, as when its machine dies."""
        node = self.nodes.pop(index)
        count = node.kill(signal.SIGKILL)
        node.proc.wait(timeout=30)
        return count

    def state(self, code: str) -> list[dict]:
        """What `code` (a Python expression over `list_nodes`, `list_actors`, `list_tasks` of
        ray.util.state and the head's `address`) returns, evaluated by a client process."""
        script = (
            "import json, sys\nfrom ray.util.state import list_actors, list_nodes, list_tasks\n"
            f"address = sys.argv[1]\nprint(json.dumps({code}))"
        )
        out = subprocess.run([str(PYTHON), "-c", script, self.address], env=self.env,
                             capture_output=True, text=True, timeout=180)  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-2000:])
        return json.loads(out.stdout.splitlines()[-1])

    def alive_nodes(self) -> list[dict]:
        return self.state(
            "[{'node_id': n.node_id, 'is_head_node': n.is_head_node} for n in "
            "list_nodes(address=address) if n.state == 'ALIVE']"
        )

    def placements(self) -> list[dict]:
        """Every actor and task the cluster knows (finished ones too): kind, name, node id."""
        return self.state(
            "[{'kind': 'actor', 'name': a.class_name, 'node_id': a.node_id} for a in "
            "list_actors(address=address, limit=10000, detail=True, raise_on_missing_output=False)]"
            " + [{'kind': 'task', 'name': t.name, 'node_id': t.node_id} for t in "
            "list_tasks(address=address, limit=10000, detail=True, raise_on_missing_output=False)"
            " if t.type == 'NORMAL_TASK']"
        )

    def wait_for_nodes(self, count: int, timeout_s: float = 600) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while True:
            for index, node in list(self.nodes.items()):
                # On a loaded machine a node may miss one of `ray start`'s fixed waits (15 s for
                # the dashboard agent, 30 s for the raylet to register) and exit: start it again.
                if node.proc.poll() is not None:
                    self.start(index)
            try:
                nodes = self.alive_nodes()
                if len(nodes) >= count:
                    return nodes
                error = f"{len(nodes)} alive"
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                error = str(exc)
            if time.monotonic() > deadline:
                logs = "\n".join(n.log.read_text()[-1500:] for n in self.nodes.values())
                raise TimeoutError(f"the cluster did not get {count} nodes ({error}):\n{logs}")
            time.sleep(2)

    def stop(self) -> None:
        """Every node's processes: SIGTERM (ray start --block stops what it started), then
        SIGKILL for whatever is left. Never `ray stop`: other clusters run on this machine."""
        for node in reversed(list(self.nodes.values())):
            node.kill(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for node in self.nodes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            node.kill(signal.SIGKILL)
            node.proc.wait(timeout=30)
        self.nodes.clear()
        if not os.environ.get("OWL_KEEP_NODE_DISKS"):  # for debugging: the nodes' Ray logs
            subprocess.run(["rm", "-rf", str(self.disks)], check=False)
