"""A pool of gloo ranks kept alive across tests, so each test pays no process start-up.

``Ranks(n)`` starts ``n`` processes with the spawn method (a fresh interpreter each, so
``TRITON_INTERPRET=1`` is in their environment before anything imports flash_dist), joins them in
one gloo process group on a free port, then runs functions on every rank:
``ranks.run(fn, *args, **kwargs)`` calls ``fn(rank, world_size, *args, **kwargs)`` everywhere and returns the list of
results by rank. ``fn`` must be a module-level function (pickled by name). A rank that raises
makes ``run`` raise with its traceback; the pool is then torn down (the other ranks may be stuck
in a collective) and the next ``run`` starts a fresh one.
"""

from __future__ import annotations

import os
import queue
import socket
import traceback
from datetime import timedelta

import torch
import torch.multiprocessing as mp

#: seconds one ``run`` may take before the pool is declared hung
RUN_TIMEOUT = 240.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, tasks, results) -> None:
    import torch.distributed as dist

    # ranks share two cores: one thread each avoids oversubscription
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=RUN_TIMEOUT))
    results.put((rank, "ready", None))
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            results.put((rank, "ok", fn(rank, world_size, *args, **kwargs)))
        except BaseException:  # noqa: BLE001 - everything goes back to the test
            results.put((rank, "error", traceback.format_exc()))
    # skip the interpreter's slow teardown (process group, Triton): nothing is left to save
    results.close()
    results.join_thread()
    os._exit(0)


class Ranks:
    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._procs: list = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = free_port()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._results = ctx.Queue()
        self._procs = [ctx.Process(target=_worker, args=(r, self.world_size, port, self._tasks[r], self._results),
                                   daemon=True) for r in range(self.world_size)]
        # the ranks inherit the environment at start; this process keeps its own (on a GPU
        # machine it compiles kernels, and Triton would interpret every kernel defined later)
        saved = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            for p in self._procs:
                p.start()
        finally:
            if saved is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = saved
        self._collect("ready")

    def _collect(self, what: str) -> list:
        values: list = [None] * self.world_size
        seen = 0
        while seen < self.world_size:
            try:
                rank, status, value = self._results.get(timeout=RUN_TIMEOUT)
            except queue.Empty:
                self.close()
                raise TimeoutError(f"{self.world_size} ranks: no answer to {what} within {RUN_TIMEOUT} s") from None
            if status == "error":
                self.close()
                raise AssertionError(f"rank {rank} of {self.world_size} failed in {what}:\n{value}")
            values[rank] = value
            seen += 1
        return values

    def run(self, fn, *args, **kwargs) -> list:
        if not self._procs:
            self._start()
        for q in self._tasks:
            q.put((fn, args, kwargs))
        return self._collect(getattr(fn, "__name__", repr(fn)))

    def close(self) -> None:
        for q in getattr(self, "_tasks", []):
            try:
                q.put(None)
            except (OSError, ValueError):
                pass
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        self._procs = []
