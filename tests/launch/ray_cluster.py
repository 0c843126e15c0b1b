"""Real local Ray clusters for the launcher tests, driven with the real ``ray job submit`` / ``ray job
status``: a head on 127.0.0.1 (:class:`RayHead`), or a head on node1 and a worker on node2 of
``tests/launch/two_host.py`` (:class:`RayCluster`).

Each node is ``ray start --block`` with its own ``--temp-dir`` (node1 and node2 share the filesystem:
one temp dir would mix their session files and sockets).  Teardown never runs ``ray stop`` (it would
stop every Ray process on the machine, other users' too).  Each node is started in a new session, so
its Ray processes are exactly those whose session id is that ``ray start``'s pid, plus any that name
its temp dir on their command line; those PIDs, and only those, are terminated.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

from recall_dist.distributed.net import free_port
from tests.launch.two_host import Host

RAY = str(Path(sys.executable).with_name("ray"))
LOOPBACK = Host("localhost", "127.0.0.1")


class RayError(RuntimeError):
    pass


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out for bind(port 0) (free_port)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


class RayNode:
    """One Ray node on ``host``: the head when ``head_address`` is None, else a worker joining it."""

    def __init__(self, host: Host, num_cpus: int, env: dict[str, str], head_address: str | None = None):
        # Short: Ray puts unix sockets under the temp dir (sun_path is 108 bytes).
        self.dir = Path(tempfile.mkdtemp(prefix="rdray-", dir="/tmp"))
        self.host, self.num_cpus, self.head_address = host, num_cpus, head_address
        self.port, self.dashboard_port = free_port(), free_port()
        self.proc: subprocess.Popen | None = None
        self._env = env

    def _argv(self) -> list[str]:
        # Worker ports below the kernel's ephemeral range, where free_port() picks the other components'
        # ports: the two can never collide (Ray refuses to start when they do).
        worker_base = random.randrange(10000, _ephemeral_low() - 200, 200)
        role = (
            [
                "--head",
                f"--port={self.port}",
                "--include-dashboard=true",
                f"--dashboard-host={self.host.addr}",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port()}",
            ]
            if self.head_address is None
            else [f"--address={self.head_address}"]
        )
        return [
            RAY, "start", "--block", *role,
            f"--node-ip-address={self.host.addr}",
            f"--num-cpus={self.num_cpus}", "--num-gpus=0",
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
            f"--min-worker-port={worker_base}", f"--max-worker-port={worker_base + 199}",
            "--object-store-memory=200000000", f"--temp-dir={self.dir}",
            "--disable-usage-stats", "--log-style=record",
        ]  # fmt: skip

    def start(self) -> None:
        log = open(self.dir / "ray_start.log", "ab")  # noqa: SIM115 - handed to Popen, closed below
        self.proc = subprocess.Popen(
            self.host.argv(self._argv()),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self._env,
            start_new_session=True,
        )
        log.close()

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RayError(f"`ray start` on {self.host.name} exited with {self.proc.returncode}\n{self.logs()}")

    def logs(self, tail: int = 30) -> str:
        out = []
        for f in [self.dir / "ray_start.log", *sorted(self.dir.glob("session_latest/logs/*.err"))]:
            if f.is_file():
                lines = f.read_text(errors="replace").splitlines()[-tail:]
                if lines:
                    out.append(f"--- {self.host.name}: {f.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def our_processes(self) -> list[psutil.Process]:
        if self.proc is None:
            return []
        ours = {}
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if p.pid == os.getpid():
                    continue
                if os.getsid(p.pid) == self.proc.pid or str(self.dir) in " ".join(p.info["cmdline"] or []):
                    ours[p.pid] = p
            except (psutil.Error, OSError):
                continue
        return list(ours.values())

    def stop(self, grace: float = 8.0) -> None:
        procs = self.our_processes()
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=grace)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=5)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(timeout=10)

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def ray_env(env: dict[str, str] | None, loopback: bool) -> dict[str, str]:
    # Ray's executables and the job's `python` come from this venv.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    out = {**os.environ, "PATH": path, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    if loopback:
        # Ray's single-machine mode. Without it Ray replaces --node-ip-address=127.0.0.1 by the
        # machine's outward address (services.resolve_ip_for_localhost) and the GCS, the workers and
        # the torch rendezvous leave loopback.
        out["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    for k in [k for k in out if k.startswith("RAY_ADDRESS")]:
        del out[k]
    return out


class RayHead:
    """A Ray cluster whose head runs on ``host`` (default 127.0.0.1), with the job server; clients
    (``ray job ...``) run on that host too."""

    def __init__(self, num_cpus: int = 2, env: dict[str, str] | None = None, host: Host = LOOPBACK):
        self._env = ray_env(env, loopback=host.netns is None and host.addr == "127.0.0.1")
        self.head = RayNode(host, num_cpus, self._env)
        self.host = host
        self.dir = self.head.dir
        self.address = f"http://{host.addr}:{self.head.dashboard_port}"
        self.gcs_address = f"{host.addr}:{self.head.port}"

    def env(self) -> dict[str, str]:
        return dict(self._env)

    @property
    def nodes(self) -> list[RayNode]:
        return [self.head]

    def start(self, timeout: float = 180.0) -> RayHead:
        try:
            self.head.start()
            self._wait(self._job_server_up, timeout, f"the Ray job server at {self.address}")
        except BaseException:
            self.stop()
            raise
        return self

    def _wait(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in self.nodes:
                node.check_alive()
            if predicate():
                return
            time.sleep(1.0)
        raise RayError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.logs()}")

    def _job_server_up(self) -> bool:
        url = f"{self.address}/api/jobs/"
        if self.host.netns is None:
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    return r.status == 200
            except OSError:
                return False
        probe = f"import urllib.request as u; u.urlopen({url!r}, timeout=5)"
        argv = self.host.argv([sys.executable, "-c", probe])
        return subprocess.run(argv, capture_output=True, timeout=30, check=False).returncode == 0

    def ray(self, *args: str, check: bool = True, timeout: float = 120.0, cwd: str | None = None) -> str:
        r = subprocess.run(
            self.host.argv([RAY, *args]),
            capture_output=True,
            text=True,
            env=self._env,
            timeout=timeout,
            cwd=cwd,
            check=False,
        )
        if check and r.returncode != 0:
            raise RayError(f"`ray {' '.join(args)}` failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r.stdout + r.stderr

    def alive_nodes(self) -> list[dict]:
        """The cluster's ALIVE nodes as the state API lists them (node_ip, resources_total, ...)."""
        out = self.ray("list", "nodes", "--address", self.address, "--format", "json", check=False, timeout=60)
        try:
            nodes = json.loads(out[out.index("[") :]) if "[" in out else []
        except ValueError:
            return []
        return [n for n in nodes if n.get("state") == "ALIVE"]

    def job_status(self, job_id: str) -> str:
        """PENDING / RUNNING / SUCCEEDED / FAILED / STOPPED, read from what `ray job status` prints
        ("Status for job 'ID': RUNNING" while it runs, "Job 'ID' succeeded" at the end)."""
        out = re.sub(r"\x1b\[[0-9;]*m", "", self.ray("job", "status", "--address", self.address, job_id, timeout=60))
        q = re.escape(job_id)
        match = re.search(rf"Status for job '{q}': (\w+)", out) or re.search(
            rf"Job '{q}' (succeeded|failed|stopped)", out
        )
        if not match:
            raise RayError(f"cannot read the status of {job_id} from `ray job status`:\n{out}")
        self.last_status_line = match.group(0)
        return match.group(1).upper()

    def wait_job(self, job_id: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        status = "?"
        while time.monotonic() < deadline:
            status = self.job_status(job_id)
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                return status
            time.sleep(2.0)
        raise RayError(f"job {job_id} still {status} after {timeout:.0f}s\n{self.job_logs(job_id)}")

    def job_logs(self, job_id: str) -> str:
        return self.ray("job", "logs", "--address", self.address, job_id, check=False, timeout=60)

    def logs(self, tail: int = 30) -> str:
        return "\n".join(node.logs(tail) for node in self.nodes)

    def our_processes(self) -> list[psutil.Process]:
        return [p for node in self.nodes for p in node.our_processes()]

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()

    def __enter__(self) -> RayHead:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class RayCluster(RayHead):
    """The head on ``hosts[0]`` and one worker node on each other host (``ray start --address``)."""

    def __init__(self, hosts: list[Host], num_cpus: int = 2, env: dict[str, str] | None = None):
        super().__init__(num_cpus, env, hosts[0])
        self.workers = [RayNode(h, num_cpus, self._env, head_address=self.gcs_address) for h in hosts[1:]]
        self.retired: list[RayNode] = []

    @property
    def nodes(self) -> list[RayNode]:
        return [self.head, *self.workers]

    def start(self, timeout: float = 180.0) -> RayCluster:
        try:
            super().start(timeout)
            for w in self.workers:
                w.start()
            self.wait_nodes(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_nodes(self, timeout: float = 180.0) -> None:
        want = {n.host.addr for n in self.nodes}
        self._wait(lambda: {n["node_ip"] for n in self.alive_nodes()} >= want, timeout, f"Ray nodes {sorted(want)}")

    def restart_worker(self, host: Host, timeout: float = 180.0) -> None:
        """Start ``host``'s Ray worker node again (after it was lost) and wait until it is ALIVE."""
        i = next(i for i, w in enumerate(self.workers) if w.host is host)
        old = self.workers[i]
        old.stop()
        self.retired.append(old)  # its temp dir holds the lost node's logs: removed by cleanup()
        # A fresh temp dir: the lost node's session dir still has its sockets and state.
        self.workers[i] = RayNode(host, old.num_cpus, self._env, head_address=self.gcs_address)
        self.workers[i].start()
        self.wait_nodes(timeout)

    def cleanup(self) -> None:
        super().cleanup()
        for node in self.retired:
            node.cleanup()
