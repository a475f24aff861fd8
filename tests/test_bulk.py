"""``worker.bulk``: ids drawn in advance stay unique across threads and across a fork."""

from __future__ import annotations

import os
import re
import threading

from worker.bulk import new_id


def test_ids_are_20_hex_digits_and_unique_across_threads() -> None:
    drawn: list[list[str]] = [[] for _ in range(8)]

    def draw(k: int) -> None:
        drawn[k] = [new_id() for _ in range(3000)]  # several refills of the pool each

    threads = [threading.Thread(target=draw, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [i for part in drawn for i in part]
    assert len(set(ids)) == len(ids) == 24_000
    assert all(re.fullmatch(r"[0-9a-f]{20}", i) for i in ids)


def test_a_forked_child_never_draws_its_parents_ids() -> None:
    new_id()  # the pool holds ids now; a child must not inherit them
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next ids and leave at once
        os.write(write, " ".join(new_id() for _ in range(10)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        child = set(pipe.read().decode().split())
    os.waitpid(pid, 0)
    parent = {new_id() for _ in range(600)}
    assert len(child) == 10 and not child & parent
