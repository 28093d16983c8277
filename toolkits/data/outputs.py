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
import re
import secrets
import signal
import socket
import time
from typing import Iterator, Optional, Sequence

# A run that is alive rewrites its .bin temp file continuously, so an hour-old file is not needed to be
# sure; five minutes also covers the seconds-long gaps while one huge document is being tokenized.
STALE_AFTER_S = 300.0

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class OutputExists(Exception):
    """The final output appeared while this run was writing (another run won); nothing was replaced."""


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived. A BaseException so that no ``except Exception`` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _host() -> str:
    # Keep the name parseable: host names are [A-Za-z0-9.-] already, anything else becomes "_".
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"


def temp_name(final: str) -> str:
    """A fresh temporary sibling of ``final`` that encodes this host and PID."""
    d, base = os.path.split(os.path.abspath(final))
    return os.path.join(d, f".{base}.tmp-{_host()}-{os.getpid()}-{secrets.token_hex(4)}")


def _temp_pattern(final: str) -> re.Pattern:
    base = os.path.basename(final)
    return re.compile(rf"^\.{re.escape(base)}\.tmp-(?P<host>[A-Za-z0-9._-]+)-(?P<pid>\d+)-[0-9a-f]{{8}}$")


def _process_start(pid: int) -> Optional[float]:
    """When ``pid`` started (epoch seconds), from /proc; None where that cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the command name may hold spaces and parens
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def owner_alive(pid: int, mtime: float) -> bool:
    """Whether the run that last wrote a temp file at ``mtime`` may still be running as ``pid`` here."""
    if pid == os.getpid():
        return False  # this run creates its temp files after the cleanup, so the PID was reused
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    started = _process_start(pid)
    # A process that started after the file was last written cannot be its writer: the PID was reused.
    return started is None or started <= mtime + 1.0


def remove_stale(finals: Sequence[str], now: Optional[float] = None) -> list[str]:
    """Delete temp files of ``finals`` left by dead runs on this host; returns the removed paths."""
    now = time.time() if now is None else now
    removed = []
    for final in finals:
        d = os.path.dirname(os.path.abspath(final))
        pattern = _temp_pattern(final)
        try:
            names = os.listdir(d)
        except OSError:
            continue  # no directory yet: nothing stale either
        for name in sorted(names):
            m = pattern.match(name)
            if not m or m["host"] != _host():
                continue
            path = os.path.join(d, name)
            try:
                mtime = os.stat(path).st_mtime
                if now - mtime < STALE_AFTER_S or owner_alive(int(m["pid"]), mtime):
                    continue
                os.remove(path)
            except OSError:
                continue  # vanished or not ours to delete: leave it to its owner
            removed.append(path)
    return removed


def _fsync(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """Defer SIGTERM/SIGINT so that a set of renames happens completely or not at all."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


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


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise :class:`Interrupted` (once: a second signal during the
    cleanup that follows is ignored, so the cleanup completes). Only usable in the main thread."""
    fired: list[int] = []

    def handler(signum: int, frame) -> None:
        if fired:
            return
        fired.append(signum)
        raise Interrupted(signum)

    old = {s: signal.signal(s, handler) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
