"""``tpns-batcher bench --ingest``: how fast the doors take intents, as ratios in one run (SPEC §10).

* ``post_per_s``: single-intent ``POST /v1/intents`` to ``tpns-batcher serve``, next to
  ``bare_post_per_s``, a bare Starlette endpoint that reads and JSON-parses the body and answers
  ``{"ids": [...], "errors": []}``, under the same load — ``--connections`` keep-alive
  connections each posting one intent at a time — with the same uvicorn options
  (``serve.app.UVICORN_OPTIONS``) and the same process model (one server process). The load
  comes from another process (asyncio over raw sockets), so that it is not what is measured,
  and the two servers are loaded in turn, a few rounds each, so that the machine's load
  drifting between phases does not pass for a difference between them.
* ``submit_1_per_s``, ``submit_16_per_s``: ``Producer.submit`` from 1 and 16 threads;
  ``async_submit_256_per_s``: ``AsyncProducer.submit`` from 256 tasks; ``submit_many_per_s``:
  one ``submit_many`` of 20,000 intents. These run in the bench's own process; ``*_per_cpu_s``
  divides by that process's CPU time instead of the wall clock: what one core of producer does,
  however busy the rest of the machine (Redis included) is.

Everything runs against one private Redis (or ``REDIS_URL`` under a fresh prefix).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ..aproducer import AsyncProducer
from ..producer import Producer
from ..settings import Settings
from .harness import Reporter
from .measure import machine
from .stack import local_redis, stack_env, stop_process

#: targets of issue 13 (SPEC §10): ratio of serve to the bare endpoint, and intents per second
TARGETS = {"post_ratio": 0.5, "submit_16_per_s": 10_000, "submit_many_per_s": 20_000}
#: seconds a server may take to answer its first request
START_S = 30.0


def bare_app() -> Any:
    """The bare endpoint: read the body, parse it as JSON, answer one id per intent."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def post(request: Request) -> JSONResponse:
        doc = json.loads(await request.body())
        count = len(doc) if isinstance(doc, list) else 1
        return JSONResponse({"ids": [secrets.token_hex(10) for _ in range(count)], "errors": []})

    return Starlette(routes=[Route("/v1/intents", post, methods=["POST"])])


# -- the load: another process, raw HTTP/1.1 over keep-alive connections --------------------------

async def _connection(port: int, conn: int, deadline: float, warm_until: float,
                      counts: dict[str, int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    k = 0
    try:
        # at least one request: on a loaded machine a connection may open after the deadline,
        # and a run whose figures are all zero tells nothing
        while k == 0 or time.monotonic() < deadline:
            body = b'{"operator_type":4,"token":"ingest-%d-%d-%s"}' % (conn, k, secrets.token_hex(4).encode())
            writer.write(b"POST /v1/intents HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json"
                         b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            answer = await reader.readexactly(length)
            k += 1
            if time.monotonic() < warm_until:
                continue
            ok = head.startswith(b"HTTP/1.1 200") and b'"ids":["' in answer
            counts["ok" if ok else "bad"] += 1
    finally:
        writer.close()


async def _load(port: int, connections: int, seconds: float, warm_s: float) -> dict[str, Any]:
    counts = {"ok": 0, "bad": 0}
    start = time.monotonic()
    warm_until = start + warm_s
    await asyncio.gather(*(_connection(port, c, warm_until + seconds, warm_until, counts)
                           for c in range(connections)))
    return {**counts, "seconds": seconds}


def post_rate(port: int, connections: int, seconds: float, warm_s: float = 0.5) -> dict[str, Any]:
    """Run the load in a child process; its counts of good and bad answers."""
    out = subprocess.run(
        [sys.executable, "-m", "worker.tools.ingest", "load", str(port), str(connections),
         str(seconds), str(warm_s)], capture_output=True, timeout=seconds + warm_s + 60, check=True)
    return dict(json.loads(out.stdout))


# -- the servers ---------------------------------------------------------------------------------

class Server:
    """A server process on a free port (``serve`` or the bare endpoint), stopped on exit; its
    stderr goes to a file (a pipe nobody reads could fill up and stall it)."""

    def __init__(self, argv: list[str], env: dict[str, str], port: int, log: Path) -> None:
        self.port = port
        self.log = log
        with log.open("wb") as err:
            self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + START_S
        while not _answers(port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"server did not start: {tail}")
            time.sleep(0.05)

    def stop(self) -> None:
        stop_process(self.proc)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _answers(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (all held open while they are chosen: never the same twice)."""
    import socket

    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def serve_bare(port: int) -> None:
    """Run the bare endpoint with serve's uvicorn options (``python -m worker.tools.ingest bare``)."""
    import uvicorn

    from ..serve.app import UVICORN_OPTIONS

    uvicorn.Server(uvicorn.Config(bare_app(), host="127.0.0.1", port=port,
                                  **{**UVICORN_OPTIONS, "lifespan": "off"})).run()


# -- the producer doors, in this process ---------------------------------------------------------

def _intent(tag: str, k: int) -> dict[str, Any]:
    # a 64-character token, as TPNS's are, and an e-mail account
    return {"operator_type": 2, "token": f"{tag}-{k}-".ljust(64, "0"),
            "account_list": [{"account": f"{tag}-{k}@example.com"}]}


def submit_rate(producer: Producer, threads: int, seconds: float) -> tuple[float, float]:
    """``Producer.submit`` from ``threads`` threads for ``seconds``: intents per second, and
    per second of this process's CPU (what one core of producer does, whatever else runs)."""
    done = [0] * threads
    deadline = time.monotonic() + seconds

    def run(t: int) -> None:
        k = 0
        while k == 0 or time.monotonic() < deadline:  # one at least, however late it starts
            producer.submit(_intent(f"s{threads}x{t}", k))
            k += 1
        done[t] = k

    started, cpu = time.monotonic(), time.process_time()
    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(done) / (time.monotonic() - started), sum(done) / (time.process_time() - cpu)


async def async_submit_rate(producer: AsyncProducer, tasks: int, seconds: float) -> float:
    """``AsyncProducer.submit`` from ``tasks`` tasks for ``seconds``: intents per second."""
    deadline = time.monotonic() + seconds

    async def run(t: int) -> int:
        k = 0
        while k == 0 or time.monotonic() < deadline:  # one at least, however late it starts
            await producer.submit(_intent(f"a{t}", k))
            k += 1
        return k

    started = time.monotonic()
    done = await asyncio.gather(*(run(t) for t in range(tasks)))
    return sum(done) / (time.monotonic() - started)


def submit_many_rate(producer: Producer, count: int) -> tuple[float, float]:
    """One ``submit_many``: intents per second, and per second of this process's CPU."""
    intents = [_intent("many", k) for k in range(count)]
    started, cpu = time.monotonic(), time.process_time()
    ids = producer.submit_many(intents)
    if None in ids:
        raise RuntimeError(f"submit_many refused {ids.count(None)} of the bench's intents")
    return count / (time.monotonic() - started), count / (time.process_time() - cpu)


def producer_doors(settings: Settings, url: str, prefix: str, seconds: float,
                   many: int) -> dict[str, Any]:
    """The four producer figures, each on fresh producers."""
    out: dict[str, Any] = {}
    with Producer(url, prefix, settings=settings) as producer:
        producer.apps()
        out["submit_1_per_s"] = round(submit_rate(producer, 1, seconds)[0])
        before = (producer.group.commits, producer.group.items)
        rate, per_cpu_s = submit_rate(producer, 16, seconds)
        out["submit_16_per_s"], out["submit_16_per_cpu_s"] = round(rate), round(per_cpu_s)
        commits = producer.group.commits - before[0]
        out["submit_16_intents_per_commit"] = round((producer.group.items - before[1]) / max(1, commits), 1)
        rate, per_cpu_s = submit_many_rate(producer, many)
        out["submit_many_per_s"], out["submit_many_per_cpu_s"] = round(rate), round(per_cpu_s)

    async def run_async() -> tuple[float, float]:
        async with AsyncProducer(url, prefix, settings=settings) as aproducer:
            await aproducer.apps()
            rate = await async_submit_rate(aproducer, 256, seconds)
            return rate, aproducer.group.items / max(1, aproducer.group.commits)

    rate, per_commit = asyncio.run(run_async())
    out["async_submit_256_per_s"] = round(rate)
    out["async_256_intents_per_commit"] = round(per_commit, 1)
    return out


def post_rates(tmp: Path, env: dict[str, str], connections: int, seconds: float,
               rounds: int) -> dict[str, Any]:
    """The bare endpoint and ``serve`` side by side, loaded in turn (``rounds`` times each,
    ``seconds`` in all), so that a change in the machine's load between phases does not pass
    for a difference between the two. Only one of them is loaded at a time."""
    ports = dict(zip(("bare", "serve"), _free_ports(2), strict=True))
    argv = {"bare": [sys.executable, "-m", "worker.tools.ingest", "bare", str(ports["bare"])],
            "serve": [sys.executable, "-c", "from worker.cli import main; main()", "serve",
                      "--port", str(ports["serve"])]}
    ok = {"bare": 0, "serve": 0}
    bad = 0
    with Server(argv["bare"], env, ports["bare"], tmp / "bare.log"), \
            Server(argv["serve"], env, ports["serve"], tmp / "serve.log"):
        for _ in range(rounds):
            for name in ("bare", "serve"):
                counts = post_rate(ports[name], connections, seconds / rounds)
                ok[name] += counts["ok"]
                bad += counts["bad"]
    bare_per_s, post_per_s = round(ok["bare"] / seconds), round(ok["serve"] / seconds)
    return {"bare_post_per_s": bare_per_s, "post_per_s": post_per_s, "post_errors": bad,
            "post_ratio": round(post_per_s / max(1, bare_per_s), 2)}


def run_ingest(report: Reporter, *, connections: int = 16, seconds: float = 3.0,
               many: int = 20_000, rounds: int = 3) -> dict[str, Any]:
    """Every door, one after the other (never two at once: they would share the cores)."""
    with tempfile.TemporaryDirectory(prefix="tpns-ingest-") as tmp, \
            local_redis(Path(tmp), "ingest") as target:
        env = stack_env(target, "http://127.0.0.1:9", TPNS_APPS="default")
        settings = Settings.from_env({k: v for k, v in env.items() if k.startswith(("TPNS_", "REDIS"))})
        results: dict[str, Any] = {"connections": connections, "seconds": seconds}
        report.phase(f"serve and a bare Starlette endpoint in turn: {connections} keep-alive "
                     f"connections, one intent a POST")
        results.update(post_rates(Path(tmp), env, connections, seconds, rounds))
        report.phase("Producer.submit (1 and 16 threads), submit_many, AsyncProducer.submit (256 tasks)")
        results.update(producer_doors(settings, target.url, target.prefix, seconds, many))
        info = machine(target.url)
    results["targets"] = TARGETS
    results["targets_met"] = {k: results[k] >= v for k, v in TARGETS.items()}
    results["machine"] = info
    return results


def print_ingest(seconds: float, as_json: bool) -> None:
    """``bench --ingest``: every door, its figures as JSON on stdout (progress on stderr)."""
    figures = run_ingest(Reporter(), seconds=seconds)
    print(json.dumps(figures) if as_json else json.dumps(figures, indent=2))


def main(argv: list[str]) -> None:
    """The child processes: ``bare PORT`` (the bare endpoint) and ``load PORT CONNS S WARM``."""
    if argv[0] == "bare":
        serve_bare(int(argv[1]))
    elif argv[0] == "load":
        port, conns, seconds, warm = int(argv[1]), int(argv[2]), float(argv[3]), float(argv[4])
        try:
            import uvloop

            counts = uvloop.run(_load(port, conns, seconds, warm))
        except ImportError:  # the plain asyncio loop is slower, but still measures
            counts = asyncio.run(_load(port, conns, seconds, warm))
        print(json.dumps(counts))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main(sys.argv[1:])
