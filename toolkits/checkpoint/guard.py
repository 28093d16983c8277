"""What every conversion does around its work, so that nothing a user had is lost.

``@conversion`` wraps ``hf2mcore`` / ``mcore2hf`` / ``mcore2mcore``:

1. before anything is read, the output is checked against the input (``safety.check_output_path``: not
   the load dir, not inside it, not an ancestor of it, symlinks resolved; an existing non-empty output
   needs ``overwrite``);
2. the output's lock (``safety.OutputLock``, ``.NAME.lock`` beside it) is held for the whole conversion,
   so a second conversion into the same directory is refused instead of replacing the first one's result;
3. writer threads stop early when the conversion fails or is interrupted: ``run_parallel`` sets a stop
   flag that every worker checks between tensors (``check_stop``), so SIGTERM/SIGINT end a conversion in
   about the time one tensor takes, not the time of the whole conversion.

The temporary output itself (``.NAME.tmp-HOST-PID-RANDOM``, removed on any failure, stale ones of dead
runs removed by the next run) is ``checkpointing.layout.prepare_output`` / ``replace_dir``.
"""

from __future__ import annotations

import functools
import inspect
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Callable

from megatron_patch import safety

_STOP = threading.Event()


class Cancelled(BaseException):
    """Raised in a writer thread once the conversion has failed elsewhere or been interrupted."""


def check_stop() -> None:
    """Called by writer threads between tensors."""
    if _STOP.is_set():
        raise Cancelled()


def run_parallel(jobs: list[Callable[[], None]], workers: int) -> None:
    """Run ``jobs`` on ``workers`` threads; the first failure (or a signal in the main thread) stops the rest."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            job()
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(job) for job in jobs]
        try:
            wait(futures, return_when=FIRST_EXCEPTION)  # interruptible: SIGTERM raises here
            errors = [f.exception() for f in futures if f.done() and f.exception() is not None]
            if errors:
                raise next((e for e in errors if not isinstance(e, Cancelled)), errors[0])
        except BaseException:
            _STOP.set()  # the pool's exit then joins workers that stop at their next tensor
            raise


def conversion(fn: Callable) -> Callable:
    """Check and lock the output of a conversion function taking ``load_dir``, ``save_dir``, ``overwrite``."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        safety.check_output_path(a["save_dir"], [a["load_dir"], a.get("hf_config")], a["overwrite"])
        with safety.OutputLock(a["save_dir"]):
            _STOP.clear()
            try:
                return fn(*args, **kwargs)
            finally:
                _STOP.clear()

    return wrapper
