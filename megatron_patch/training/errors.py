"""One ``error:`` line per failed run, however many ranks see the failure.

Under torchrun every rank runs the same code, so a bad argument or checkpoint would otherwise print the
same error (or a traceback) once per rank.

- Before the process group exists (``before_start``): every rank finds the same problem from the same
  inputs, so rank 0 (``RANK`` from the environment) prints and the others exit quietly.
- After start-up (``report``): a failure may be seen by all ranks (a NaN loss, found through an
  all-reduce) or by some only (a rank's own file). The first rank to claim the run's slot in the process
  group's key-value store (``store.add`` is atomic) prints; ranks that fail afterwards only because a peer
  has gone (a broken collective) see the slot taken and exit quietly (``already_reported``).
- A check shared out over the ranks (``first_failure_everywhere``) fails on every rank with one message.

``DataError`` lives here so that the data modules (``data.py``, ``sft.py``) share it without importing each other.
"""

from __future__ import annotations

import datetime
import os
import sys
from typing import Callable


class DataError(ValueError):
    """Missing or unusable training data (the message names the file)."""


_RUN = [0]  # runs started by this process (tests run several in one process group): one slot each
_STORE_TIMEOUT = datetime.timedelta(seconds=10)


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def before_start(message: str) -> None:
    """Print ``error: message`` on rank 0 only (no process group needed)."""
    if env_rank() == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)


def new_run() -> None:
    """Called by every rank at the start of a run: the next error slot."""
    _RUN[0] += 1


def _store():
    import torch.distributed as dist

    if not dist.is_initialized():
        return None
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(_STORE_TIMEOUT)  # the store's host may be the rank that failed
        return store
    except Exception:  # noqa: BLE001 - no store: fall back to rank 0
        return None


def _key() -> str:
    return f"megatron_patch/error/{_RUN[0]}"


def report(message: str) -> None:
    """Print ``error: message`` unless another rank already reported this run's failure."""
    import torch.distributed as dist

    store = _store()
    try:
        first = store.add(_key(), 1) == 1 if store is not None else dist.get_rank() == 0
    except Exception:  # noqa: BLE001 - the store is gone with the rank that hosted it
        first = True  # a second line beats none
    if first:
        print(f"error: {message}", file=sys.stderr, flush=True)


def first_failure_everywhere(check: Callable[[], None], catch: tuple, error: type) -> None:
    """Run ``check`` on every rank (a share of a job each, e.g. CRC checks); if it failed on any rank, raise
    the failure of the lowest such rank, as ``error``, on every rank (an all-gather of the outcomes)."""
    import torch.distributed as dist

    mine = None
    try:
        check()
    except catch as e:
        mine = str(e)
    outcomes = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, mine)
    first = next((o for o in outcomes if o), None)
    if first:
        raise error(first)


def already_reported() -> bool:
    """Whether some rank has reported this run's failure (so a broken collective here is its echo)."""
    store = _store()
    if store is None:
        return False
    try:
        return store.add(_key(), 0) > 0
    except Exception:  # noqa: BLE001 - the store's host exited: it had failed first
        return True

