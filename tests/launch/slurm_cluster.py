"""A real Slurm cluster for the launcher tests (Debian's slurm-wlm + munge): one node on 127.0.0.1,
or one node per host of ``tests/launch/two_host.py`` (node1 and node2 on their own network stacks).

Everything lives in a temp dir: a munge key and socket, ``slurm.conf``/``cgroup.conf``, state dirs,
per-node spool dirs, pid and log files (``%n``: the node's name).  The daemons (munged, slurmctld on
the first host, one slurmd per host) run in the foreground as our own children, so teardown stops
exactly those PIDs and nothing else on the machine.  One munged serves every host: its socket is a
file, which all network namespaces see.  Clients run on the first host and find the cluster through
``SLURM_CONF`` (see :meth:`SlurmCluster.env`); the munge socket is named in ``AuthInfo=socket=...``,
which both auth/munge and cred/munge read.

    with SlurmCluster() as cluster:
        out = cluster.run("sbatch", "--parsable", "slurm/train_cdiv.sh", ...)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from recall_dist.distributed.net import free_port
from tests.launch.two_host import Host

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue")
INSTALL_HINT = (
    "the Slurm test cluster needs Debian's slurm-wlm and munge: run "
    "`bash tests/launch/install_slurm.sh` as root (or `apt-get install -y slurm-wlm munge`)"
)
NODE = "localhost"  # resolves to 127.0.0.1 everywhere; it is also the job's rendezvous host
LOCALHOST = Host(NODE, "127.0.0.1")


class SlurmError(RuntimeError):
    pass


def missing_binaries() -> list[str]:
    return [b for b in DAEMONS if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    """slurmctld on the first host, one slurmd per host (``CPUs=cpus`` each), a private munged.

    Default: one node, ``localhost``.  ``slurmd_timeout`` is how long a silent slurmd takes to be
    declared DOWN (and its jobs NODE_FAIL); slurmctld pings the nodes every third of it."""

    def __init__(
        self,
        cpus: int | None = None,
        cred_expire: int = 10,
        root: str | None = None,
        hosts: list[Host] | None = None,
        slurmd_timeout: int = 60,
    ):
        missing = missing_binaries()
        if missing:
            raise SlurmError(f"missing {', '.join(missing)}: {INSTALL_HINT}")
        if os.geteuid() != 0:
            # slurmd must run as root to launch job steps (setuid to the job's user).
            raise SlurmError("the Slurm test cluster must run as root (slurmd launches the job steps)")
        self.cpus = cpus or os.cpu_count() or 1
        self.hosts = hosts or [LOCALHOST]
        self.head = self.hosts[0]
        self.slurmd_timeout = slurmd_timeout
        # cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
        self.cred_expire = cred_expire
        # A short path: the munge socket path must fit in sun_path (108 bytes).
        self.dir = Path(tempfile.mkdtemp(prefix="rdslurm-", dir=root or "/tmp"))
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = self.dir / "slurm.conf"
        self.munge_socket = self.dir / "munge" / "munge.sock"

    # ---------------------------------------------------------------- set-up
    def _write_files(self) -> None:
        d = self.dir
        for sub in ("munge", "state", "log", "run", *(f"spool/{h.name}" for h in self.hosts)):
            (d / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(d, 0o755)  # job steps (root here) read slurm.conf; munged checks its dirs' modes
        key = d / "munge" / "munge.key"
        subprocess.run([_which("mungekey"), "--create", f"--keyfile={key}", "--force"], check=True, capture_output=True)
        os.chmod(key, 0o600)
        ctld_port, slurmd_port = free_port(), free_port()
        nodes = "\n".join(
            f"NodeName={h.name} NodeAddr={h.addr} NodeHostname={h.name} CPUs={self.cpus} State=UNKNOWN"
            for h in self.hosts
        )
        self.conf.write_text(f"""\
# Written by tests/launch/slurm_cluster.py: {len(self.hosts)} node(s), {", ".join(h.name for h in self.hosts)}.
ClusterName=rdtest{ctld_port}
SlurmctldHost={self.head.name}({self.head.addr})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: the test machines are containers; linuxproc tracks steps by parent pid.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
# Re-test pending jobs every 2 s (defaults 30-60 s): a requeued job starts as soon as it may.
SchedulerParameters=bf_interval=2,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=10
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout={self.slurmd_timeout}
{nodes}
PartitionName=debug Nodes={",".join(h.name for h in self.hosts)} Default=YES MaxTime=INFINITE State=UP
""")
        (d / "cgroup.conf").write_text(
            "# No cgroup enforcement on the test cluster.\n"
            "ConstrainCores=no\nConstrainRAMSpace=no\nConstrainDevices=no\n"
        )

    def _spawn(self, name: str, argv: list[str], host: Host | None = None) -> None:
        log = open(self.dir / "log" / f"{name}.stdout", "ab")  # noqa: SIM115 - handed to Popen, closed below
        argv = host.argv(argv) if host else argv
        self.procs[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env()
        )
        log.close()

    def start_slurmd(self, host: Host, timeout: float = 90.0) -> None:
        """(Re)start ``host``'s slurmd and wait until its node is back in service (idle, or already
        running the job that waited for it: mixed, allocated)."""
        self.procs.pop(f"slurmd-{host.name}", None)
        self._spawn(f"slurmd-{host.name}", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", host.name], host)

        def in_service() -> bool:
            state = self.node_states().get(host.name, "")
            return state.startswith(("idle", "mix", "alloc", "completing")) and not state.endswith("*")

        self._wait_for(in_service, timeout, f"{host.name} back in service")

    def start(self, timeout: float = 90.0) -> SlurmCluster:
        try:
            self._write_files()
            d = self.dir
            self._spawn(
                "munged",
                [
                    _which("munged"),
                    "--foreground",
                    "--force",
                    f"--key-file={d}/munge/munge.key",
                    f"--socket={self.munge_socket}",
                    f"--pid-file={d}/munge/munged.pid",
                    f"--log-file={d}/log/munged.log",
                    f"--seed-file={d}/munge/munged.seed",
                    "--num-threads=2",
                ],
            )
            self._wait_for(self.munge_socket.exists, timeout, "munged socket")
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-c", "-f", str(self.conf)], self.head)
            self._wait_for(
                lambda: self._ok("scontrol", "ping") and "UP" in self.run("scontrol", "ping"),
                timeout,
                "slurmctld to answer `scontrol ping`",
            )
            for h in self.hosts:
                self._spawn(f"slurmd-{h.name}", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", h.name], h)
            self._wait_for(
                lambda: (
                    all(s.startswith("idle") for s in self.node_states().values())
                    and len(self.node_states()) == len(self.hosts)
                ),
                timeout,
                "every node to be idle",
            )
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_for(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise SlurmError(f"{name} exited with {p.returncode} while waiting for {what}\n" + self.logs())
            if predicate():
                return
            time.sleep(0.5)
        raise SlurmError(f"timed out after {timeout:.0f}s waiting for {what}\n" + self.logs())

    # ---------------------------------------------------------------- clients
    def env(self, **extra: str) -> dict[str, str]:
        env = {**os.environ, "SLURM_CONF": str(self.conf), **extra}
        # A surrounding allocation (tests run inside a Slurm job) must not leak into ours.
        for k in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k != "SLURM_CONF"]:
            del env[k]
        return env

    def run(
        self, *argv: str, check: bool = True, env: dict | None = None, cwd: str | None = None, timeout: float = 60.0
    ) -> str:
        r = subprocess.run(
            self.head.argv(list(argv)),
            capture_output=True,
            text=True,
            env=env or self.env(),
            cwd=cwd,
            timeout=timeout,
            check=False,
        )
        if check and r.returncode != 0:
            raise SlurmError(f"`{' '.join(argv)}` failed ({r.returncode}):\n{r.stdout}{r.stderr}")
        return r.stdout + (r.stderr if not check else "")

    def _ok(self, *argv: str) -> bool:
        try:
            argv = self.head.argv(list(argv))
            return subprocess.run(argv, capture_output=True, env=self.env(), timeout=20, check=False).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def node_states(self) -> dict[str, str]:
        """{node: state} as sinfo says (idle, allocated, down*, ...; a ``*`` is "not responding")."""
        r = subprocess.run(
            self.head.argv(["sinfo", "-h", "-N", "-o", "%N %T"]),
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=20,
            check=False,
        )
        lines = r.stdout.split("\n") if r.returncode == 0 else []
        return dict(line.split(None, 1) for line in lines if len(line.split()) == 2)

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, NodeList, ...); {} once purged."""
        r = subprocess.run(
            self.head.argv(["scontrol", "show", "job", "-o", str(job_id)]),
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=20,
            check=False,
        )
        if r.returncode != 0:
            return {}
        fields = {}
        for tok in r.stdout.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                fields.setdefault(k, v)
        return fields

    def wait_job(
        self,
        job_id: str,
        timeout: float,
        until=(
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "NODE_FAIL",
            "OUT_OF_MEMORY",
            "BOOT_FAIL",
            "DEADLINE",
            "PREEMPTED",
        ),
    ) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id) or info
            if info.get("JobState") in until:
                return info
            time.sleep(1.0)
        raise SlurmError(f"job {job_id} not in {until} after {timeout:.0f}s: {info}\n" + self.logs())

    def logs(self, tail: int = 40) -> str:
        out = []
        for f in sorted((self.dir / "log").glob("*")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            if lines:
                out.append(f"--- {f.name} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(out)

    # ---------------------------------------------------------------- teardown
    def cancel_all_jobs(self, timeout: float = 30.0) -> None:
        """Cancel every job of this (private) cluster and wait for slurmd to kill their processes."""
        ctld = self.procs.get("slurmctld")
        if ctld is None or ctld.poll() is not None:
            return
        try:
            ids = self.run("squeue", "-h", "-o", "%i", check=False, timeout=20).split()
            if not ids:
                return
            self.run("scancel", *ids, check=False, timeout=20)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.run("squeue", "-h", check=False, timeout=20).strip():
                time.sleep(1.0)
        except (subprocess.TimeoutExpired, OSError):
            pass

    def stop(self) -> None:
        """Cancel leftover jobs, then stop our daemons by PID: the slurmds, slurmctld, munged."""
        self.cancel_all_jobs()
        for name in [*(f"slurmd-{h.name}" for h in self.hosts), "slurmctld", "munged"]:
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
