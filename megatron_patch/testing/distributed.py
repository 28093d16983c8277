"""Run a function on N real processes with a real process group (gloo on CPU, NCCL on GPU).

Used by the tests so that many checks share one launch: ``run(fn, world_size, *args)`` spawns the
processes, sets torchrun's environment variables, calls ``fn(*args)`` on each and returns the
per-rank results (rank order). Any rank's exception is re-raised with its traceback.
"""

from __future__ import annotations

import os
import queue as queue_mod
import socket
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
    for _ in range(world_size):
        try:
            rank, ok, value = queue.get(timeout=timeout)
        except queue_mod.Empty:
            errors.append(f"timed out after {timeout}s; exit codes {[p.exitcode for p in procs]}")
            break
        if ok:
            results[rank] = value
        else:
            errors.append(f"rank {rank}:\n{value}")
            break
    for p in procs:
        p.join(timeout=5 if errors else timeout)
        if p.is_alive():
            p.kill()
    if errors:
        raise RuntimeError("distributed run failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
