"""Hosts apart on one machine: network namespaces joined by a bridge, for fault tests.

``Network`` makes a "hub" namespace holding a bridge (the shared services listen on
addresses of that bridge) and, per ``add_host``, a namespace of its own joined to the
bridge by a veth pair. Every name carries a random tag, so runs never collide, and every
address is private to the namespaces the test made: nothing is added to the root
namespace (its addresses, routes and links stay as they were; the veth pairs are created
directly inside the namespaces). ``close()`` deletes the namespaces, which takes their
links and the bridge with them.

The test process itself stays in the root namespace. ``Network.executor`` gives threads
that entered a namespace with ``setns(2)``: a network namespace belongs to a thread, so
only those threads see it, and a socket keeps the namespace it was made in. A child
process forked from such a thread starts in that namespace too (``PostgresServer.start``
run there puts the cluster in it); ``exec_prefix`` is the explicit way for the others
(``ip netns exec NS ...``).

Needs root and iproute2 (``ip``); ``NetnsUnavailable`` says what is missing.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

CLONE_NEWNET = 0x40000000
SUBNET = "10.231.0"  # own-namespace addresses only: never reachable from the root namespace
PREFIX_LEN = 24


class NetnsUnavailable(RuntimeError):
    """Not root, no ``ip``, or the kernel refused a namespace, link or address."""


def ip(*args: str, netns: str | None = None) -> str:
    """Run ``ip [-n NS] args``; raises ``NetnsUnavailable`` with its stderr on failure."""
    binary = shutil.which("ip")
    if binary is None:
        raise NetnsUnavailable("iproute2's `ip` is missing (Debian: apt-get install iproute2)")
    argv = [binary, *(["-n", netns] if netns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise NetnsUnavailable(f"{' '.join(argv)} exited with {done.returncode}: {done.stderr}")
    return done.stdout


def enter(netns: str) -> None:
    """Move the calling thread (only it) into ``netns``."""
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise NetnsUnavailable(f"setns({netns}): {os.strerror(errno)}")
    finally:
        os.close(fd)


@dataclass
class Network:
    """A hub namespace with a bridge, and hosts joined to it (``add_host``)."""

    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    hosts: dict[str, str] = field(default_factory=dict)  # host name -> its address
    _namespaces: list[str] = field(default_factory=list)
    _next_host: int = 10

    @property
    def hub(self) -> str:
        return self.ns("hub")

    def ns(self, name: str) -> str:
        """The namespace name of host ``name`` in this run."""
        return f"lw{self.tag}-{name}"

    def _add_ns(self, name: str) -> str:
        netns = self.ns(name)
        ip("netns", "add", netns)
        self._namespaces.append(netns)
        ip("link", "set", "lo", "up", netns=netns)
        return netns

    def start(self, service_addresses: int = 3) -> Network:
        """The hub: a bridge holding ``SUBNET.2``, ``.3``, ... (one per service)."""
        if os.geteuid() != 0:
            raise NetnsUnavailable("network namespaces need root")
        hub = self._add_ns("hub")
        ip("link", "add", "br0", "type", "bridge", netns=hub)
        for n in range(2, 2 + service_addresses):
            ip("addr", "add", f"{SUBNET}.{n}/{PREFIX_LEN}", "dev", "br0", netns=hub)
        ip("link", "set", "br0", "up", netns=hub)
        return self

    def service_address(self, n: int) -> str:
        """The address of the ``n``-th service (0: ``SUBNET.2``)."""
        return f"{SUBNET}.{2 + n}"

    def add_host(self, name: str) -> str:
        """A namespace joined to the hub's bridge; returns its address."""
        netns = self._add_ns(name)
        address = f"{SUBNET}.{self._next_host}"
        port = f"p{self._next_host}"  # the bridge's end, in the hub
        self._next_host += 1
        ip(
            "link", "add", port, "netns", self.hub, "type", "veth",
            "peer", "name", "eth0", "netns", netns,
        )  # fmt: skip
        ip("link", "set", port, "master", "br0", "up", netns=self.hub)
        ip("addr", "add", f"{address}/{PREFIX_LEN}", "dev", "eth0", netns=netns)
        ip("link", "set", "eth0", "up", netns=netns)
        self.hosts[name] = address
        return address

    def exec_prefix(self, name: str) -> list[str]:
        """argv prefix running a command in host ``name``'s namespace ("hub" for the hub)."""
        return ["ip", "netns", "exec", self.ns(name)]

    def executor(self, name: str = "hub", threads: int = 4) -> ThreadPoolExecutor:
        """Threads inside host ``name``'s namespace (the test's way onto the network)."""
        netns = self.ns(name)
        return ThreadPoolExecutor(threads, f"netns-{name}", initializer=enter, initargs=(netns,))

    def cut(self, name: str, address: str) -> None:
        """Partition host ``name`` from ``address``: a blackhole route inside its own
        namespace (its packets to ``address`` are dropped; connect() fails at once)."""
        ip("route", "add", "blackhole", f"{address}/32", netns=self.ns(name))

    def heal(self, name: str, address: str) -> None:
        ip("route", "del", "blackhole", f"{address}/32", netns=self.ns(name))

    def close(self) -> None:
        """Delete every namespace made (their links and the bridge go with them)."""
        for netns in reversed(self._namespaces):
            with contextlib.suppress(NetnsUnavailable):
                ip("netns", "del", netns)
        self._namespaces.clear()
