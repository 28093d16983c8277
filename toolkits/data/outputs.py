"""Crash-safe output files for the preprocessor: unique temporary names, stale-file cleanup, atomic placement.

Every output ``DIR/NAME`` is first written as ``DIR/.NAME.tmp-HOST-PID-RANDOM``, created with ``O_EXCL``
(two runs, even on the same prefix, never share a temporary file) and moved into place only when complete.
The host name and PID in the name let a later run recognise files left by a run that died without cleaning
up (SIGKILL, OOM, power loss): those are removed when they are older than ``STALE_AFTER_S`` seconds and their
PID is not running on this host, or now belongs to a process that started after the file was last written.
Files from other hosts (shared file systems) are never touched: their PIDs mean nothing here.

SIGTERM and SIGINT are turned into :class:`Interrupted` (see :func:`signals_raise`) so that the normal
exception path removes the temporary files and the process exits promptly with ``128 + signal``.
"""

from __future__ import annotations

import contextlib
import errno
import os
from typing import Optional, Sequence

from megatron_patch import safety
# The temporary-name, staleness and signal mechanisms are the project's one implementation (megatron_patch.safety,
# shared with the checkpoint converter and the trainer).
from megatron_patch.safety import signals_blocked as _signals_blocked
from megatron_patch.safety import temp_name

# A run that is alive rewrites its .bin temp file continuously, so an hour-old file is not needed to be
# sure; five minutes also covers the seconds-long gaps while one huge document is being tokenized.
STALE_AFTER_S = safety.STALE_AFTER_S


class OutputExists(Exception):
    """The final output appeared while this run was writing (another run won); nothing was replaced."""


def remove_stale(finals: Sequence[str], now: Optional[float] = None) -> list[str]:
    """Delete temp files of ``finals`` left by dead runs on this host; returns the removed paths."""
    return safety.remove_stale(finals, now, STALE_AFTER_S)


def _fsync(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _place(tmp: str, final: str, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, final)
        return
    try:
        os.link(tmp, final)  # atomic "create only if absent": a concurrent run's output is never replaced
    except FileExistsError:
        raise OutputExists(final) from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if os.path.exists(final):  # a file system without hard links: check, then rename
            raise OutputExists(final) from None
        os.replace(tmp, final)
        return
    os.remove(tmp)


class TempOutputs:
    """Exclusive temporary files for ``finals``; :meth:`commit` moves them all into place, :meth:`discard`
    removes them. Raises OSError when the directory cannot be written (read-only, permissions, full)."""

    def __init__(self, finals: Sequence[str]):
        self.finals = [os.path.abspath(f) for f in finals]
        self.paths: list[str] = []
        try:
            for final in self.finals:
                path = temp_name(final)
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                self.paths.append(path)
        except BaseException:
            self.discard()
            raise

    def commit(self, overwrite: bool) -> None:
        """fsync, then rename every temp file to its final name, with SIGTERM/SIGINT deferred meanwhile."""
        for path in self.paths:
            _fsync(path)
        placed = []
        with _signals_blocked():
            try:
                if overwrite:
                    # Remove old outputs first: a crash between the renames then leaves a missing file
                    # (a loud failure when loading) rather than a new .bin next to a stale .idx.
                    for final in self.finals[1:]:
                        with contextlib.suppress(FileNotFoundError):
                            os.remove(final)
                for tmp, final in zip(self.paths, self.finals):
                    _place(tmp, final, overwrite)
                    placed.append(final)
            except OutputExists:
                for final in placed:  # ours (hard links just made): undo, keep the other run's output
                    with contextlib.suppress(OSError):
                        os.remove(final)
                raise
        for d in sorted({os.path.dirname(f) for f in self.finals}):
            with contextlib.suppress(OSError):  # some file systems cannot fsync a directory
                _fsync(d, directory=True)

    def discard(self) -> None:
        for path in self.paths:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
