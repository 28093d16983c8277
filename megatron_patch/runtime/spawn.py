"""Run a function on N real processes with a real process group (gloo on CPU, NCCL on GPU).

``run(fn, world_size, *args)`` spawns the processes, sets torchrun's environment variables, calls
``fn(*args)`` on each and returns the per-rank results in rank order. Any rank's exception is re-raised
with its traceback; a rank that dies without reporting (a crash, a kill) fails the run at once instead of
after the timeout. The converter's ``--verify`` and torch_dist helper, the tests and the benchmarks use it.
"""

from __future__ import annotations

import os
import queue as queue_mod
import socket
import time
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args, queue):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(1)
    try:
        queue.put((rank, True, fn(*args)))
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        from megatron_patch import runtime

        try:
            runtime.teardown()
        except Exception:
            pass


def run(fn, world_size: int, *args, timeout: float = 600):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    deadline = time.monotonic() + timeout
    interrupted = True  # until the wait loop ends normally: an exception here (SIGTERM) kills the ranks at once
    try:
        while len(results) < world_size and not errors:
            try:
                rank, ok, value = queue.get(timeout=1.0)
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    errors.append(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode} before reporting")
                elif time.monotonic() > deadline:
                    errors.append(f"timed out after {timeout}s; exit codes {[p.exitcode for p in procs]}")
                continue
            if ok:
                results[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
        interrupted = False
    finally:
        for p in procs:
            if interrupted:
                p.kill()
            p.join(timeout=5 if errors or len(results) < world_size else timeout)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("distributed run failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
