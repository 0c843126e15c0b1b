"""Two network hosts on one machine for the multi-node launcher tests.

``node1`` (10.77.0.1) and ``node2`` (10.77.0.2) are two network namespaces joined by a veth pair whose
ends are both named ``rdnet0`` (so ``GLOO_SOCKET_IFNAME=rdnet0`` holds on every host, as ``ib0`` does
on a real cluster).  Each has its own loopback, ports and routes.  A command started on a host
(:meth:`Host.argv`) enters its network namespace (``nsenter``, which keeps this machine's /sys and
its cgroup mounts, which slurmd needs) and gets private mount and UTS namespaces in which the host's
hosts file (``/etc/netns/<ns>/hosts``, naming both hosts) is bound over ``/etc/hosts`` (and a
resolv.conf without a reachable DNS server over ``/etc/resolv.conf``) and the hostname is set, so
``hostname`` and ``socket.getfqdn()`` say ``node1``/``node2`` there.  The filesystem is shared: the
repository, the virtualenv, the munge socket and the run directories are what a cluster's shared
storage would be.

A process "of node2" is any process in node2's network namespace (``ip netns pids``): that is what
:meth:`Host.kill_all` kills to simulate a lost node, and what teardown kills before deleting the
namespaces.  Namespace names carry the owning pytest's pid; ones left by a pytest that no longer
exists are removed at creation.

    hosts = TwoHosts().create()
    subprocess.run(hosts.node1.argv(["hostname"]))    # node1
    hosts.destroy()
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

IFACE = "rdnet0"
SUBNET = "10.77.0"
_NETNS_NAME = re.compile(r"^rdn(\d)-(\d+)$")


class HostError(RuntimeError):
    pass


def _ip(*args: str, check: bool = True) -> str:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and r.returncode != 0:
        raise HostError(f"`ip {' '.join(args)}` failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def namespaces_unavailable() -> str | None:
    """Why network namespaces cannot be made here (None when they can)."""
    if os.geteuid() != 0:
        return "the two-host cluster needs root (network namespaces, veth pairs, slurmd)"
    missing = [b for b in ("ip", "nsenter", "unshare") if shutil.which(b) is None]
    if missing:
        return f"missing {', '.join(missing)} (iproute2, util-linux): run `bash tests/setup_clusters.sh` as root"
    return None


@dataclass
class Host:
    """One host: its name, address and network namespace (None: this machine itself, on loopback)."""

    name: str
    addr: str
    netns: str | None = None

    def argv(self, argv: list[str]) -> list[str]:
        """``argv`` run on this host: in its network namespace, with its own hostname."""
        if self.netns is None:
            return list(argv)
        # nsenter and unshare exec (no fork), and so does the shell: the pid of a Popen of this
        # argv is the pid of the command itself.  unshare --mount makes the bind mount private.
        etc = f"/etc/netns/{self.netns}"
        setup = (
            f"mount --bind {etc}/hosts /etc/hosts && mount --bind {etc}/resolv.conf /etc/resolv.conf"
            ' && hostname "$0" && exec "$@"'
        )
        return [
            "nsenter", f"--net=/run/netns/{self.netns}", "unshare", "--mount", "--uts", "--",
            "sh", "-c", setup, self.name, *argv,
        ]  # fmt: skip

    def pids(self) -> list[int]:
        """Every process on this host (in its network namespace)."""
        if self.netns is None:
            raise HostError("the processes of this machine are not a host's")
        return [int(p) for p in _ip("netns", "pids", self.netns, check=False).split()]

    def kill_all(self, timeout: float = 30.0) -> list[int]:
        """SIGKILL every process of this host (a lost node), wait until none is left; -> the pids."""
        killed: set[int] = set()
        deadline = time.monotonic() + timeout
        while pids := self.pids():
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            if time.monotonic() > deadline:
                raise HostError(f"{self.name}: processes {pids} survive SIGKILL")
            time.sleep(0.2)
        return sorted(killed)

    def iface_bytes(self) -> int:
        """Bytes received + sent on this host's ``rdnet0`` (the link to the other host) so far."""
        # /proc/net/dev is the reading process's namespace's (/sys here is this machine's).
        argv = self.argv(["cat", "/proc/net/dev"])
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout
        for line in out.splitlines():
            name, _, values = line.partition(":")
            if name.strip() == IFACE:
                fields = values.split()
                return int(fields[0]) + int(fields[8])  # rx bytes, tx bytes
        raise HostError(f"{self.name}: no {IFACE} in /proc/net/dev:\n{out}")


class TwoHosts:
    """node1 and node2, joined by a veth pair; :meth:`destroy` kills their processes and removes them."""

    def __init__(self, subnet: str = SUBNET):
        self.tag = os.getpid()
        self.hosts = [Host(f"node{i}", f"{subnet}.{i}", f"rdn{i}-{self.tag}") for i in (1, 2)]
        self.node1, self.node2 = self.hosts

    def create(self) -> TwoHosts:
        reason = namespaces_unavailable()
        if reason:
            raise HostError(reason)
        remove_stale_namespaces()
        try:
            for h in self.hosts:
                _ip("netns", "add", h.netns)
            a, b = f"rdv{self.tag}a"[-15:], f"rdv{self.tag}b"[-15:]  # interface names: 15 chars at most
            _ip("link", "add", a, "type", "veth", "peer", "name", b)
            # The v4-mapped forms too: torch looks up the peers of its dual-stack sockets by those.
            hosts_file = "".join(f"{h.addr} {h.name}\n::ffff:{h.addr} {h.name}\n" for h in self.hosts)
            for h, end in zip(self.hosts, (a, b), strict=True):
                _ip("link", "set", end, "netns", h.netns)
                _ip("-n", h.netns, "link", "set", end, "name", IFACE)
                _ip("-n", h.netns, "addr", "add", f"{h.addr}/24", "dev", IFACE)
                _ip("-n", h.netns, "link", "set", "lo", "up")
                _ip("-n", h.netns, "link", "set", IFACE, "up")
                # A default route over the link: tools that find "this host's address" by routing
                # towards a public address (Ray, torch's fallbacks) then get 10.77.0.x, not an error.
                _ip("-n", h.netns, "route", "add", "default", "dev", IFACE)
                etc = Path("/etc/netns") / h.netns
                etc.mkdir(parents=True, exist_ok=True)
                (etc / "hosts").write_text(f"127.0.0.1 localhost\n{hosts_file}")
                # No DNS on these hosts: a lookup that misses the hosts file (torch's reverse lookup
                # of a peer's v4-mapped address) fails at once on loopback instead of timing out.
                (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        except BaseException:
            self.destroy()
            raise
        return self

    def destroy(self) -> None:
        """Kill every process of both hosts, delete the namespaces (the veth pair goes with them)."""
        for h in self.hosts:
            _remove_namespace(h.netns)

    def __enter__(self) -> TwoHosts:
        return self.create()

    def __exit__(self, *exc) -> None:
        self.destroy()


def _remove_namespace(netns: str) -> None:
    if netns in _ip("netns", "list", check=False).split():
        with contextlib.suppress(HostError):
            Host("", "", netns).kill_all()
        _ip("netns", "del", netns, check=False)
    shutil.rmtree(Path("/etc/netns") / netns, ignore_errors=True)


def remove_stale_namespaces() -> None:
    """Remove the namespaces of test sessions whose pytest is gone (a killed run leaves them)."""
    for line in _ip("netns", "list", check=False).splitlines():
        name = line.split()[0] if line.split() else ""
        match = _NETNS_NAME.match(name)
        if match and not Path(f"/proc/{match.group(2)}").exists():
            _remove_namespace(name)
