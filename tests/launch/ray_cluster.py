"""A real local Ray head on 127.0.0.1 for the launcher tests: ``ray start --head --block`` on free
ports with its own ``--temp-dir``, driven with the real ``ray job submit`` / ``ray job status``.

Teardown never runs ``ray stop`` (it would stop every Ray process on the machine, other users'
too).  The head is started in a new session, so our Ray processes are exactly those whose session
id is the head's pid, plus any that name our temp dir on their command line; those PIDs, and only
those, are terminated.
"""

from __future__ import annotations

import contextlib
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

RAY = str(Path(sys.executable).with_name("ray"))


class RayError(RuntimeError):
    pass


class RayHead:
    def __init__(self, num_cpus: int = 2, env: dict[str, str] | None = None):
        # Short: Ray puts unix sockets under the temp dir (sun_path is 108 bytes).
        self.dir = Path(tempfile.mkdtemp(prefix="rdray-", dir="/tmp"))
        self.num_cpus = num_cpus
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.proc: subprocess.Popen | None = None
        # Ray's executables and the job's `python` come from this venv.
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: Ray's single-machine mode. Without it Ray replaces
        # --node-ip-address=127.0.0.1 by the machine's outward address (services.resolve_ip_for_localhost)
        # and the GCS, the workers and the torch rendezvous leave loopback.
        self._env = {
            **os.environ,
            "PATH": path,
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            **(env or {}),
        }
        for k in [k for k in self._env if k.startswith("RAY_ADDRESS")]:
            del self._env[k]

    def env(self) -> dict[str, str]:
        return dict(self._env)

    def start(self, timeout: float = 180.0) -> RayHead:
        worker_base = random.randrange(20000, 60000, 200)
        argv = [
            RAY,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={self.port}",
            f"--num-cpus={self.num_cpus}",
            "--num-gpus=0",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={free_port()}",
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--min-worker-port={worker_base}",
            f"--max-worker-port={worker_base + 199}",
            "--object-store-memory=200000000",
            f"--temp-dir={self.dir}",
            "--disable-usage-stats",
            "--log-style=record",
        ]
        log = open(self.dir / "ray_start.log", "ab")  # noqa: SIM115 - handed to Popen, closed below
        self.proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self._env, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RayError(f"`ray start` exited with {self.proc.returncode}\n{self.logs()}")
                if self._job_server_up():
                    return self
                time.sleep(1.0)
            raise RayError(f"Ray job server not up at {self.address} after {timeout:.0f}s\n{self.logs()}")
        except BaseException:
            self.stop()
            raise

    def _job_server_up(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.address}/api/jobs/", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def ray(self, *args: str, check: bool = True, timeout: float = 120.0, cwd: str | None = None) -> str:
        r = subprocess.run(
            [RAY, *args], capture_output=True, text=True, env=self._env, timeout=timeout, cwd=cwd, check=False
        )
        if check and r.returncode != 0:
            raise RayError(f"`ray {' '.join(args)}` failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r.stdout + r.stderr

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
        out = []
        for f in [self.dir / "ray_start.log", *sorted(self.dir.glob("session_latest/logs/*.err"))]:
            if f.is_file():
                lines = f.read_text(errors="replace").splitlines()[-tail:]
                if lines:
                    out.append(f"--- {f.name}\n" + "\n".join(lines))
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

    def __enter__(self) -> RayHead:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
