"""Nothing a user had is lost: crash-safe outputs shared by the converter, the trainer and the preprocessor.

- Temporary outputs are siblings named ``.NAME.tmp-HOST-PID-RANDOM`` (``temp_name``), created exclusively
  and renamed into place only when complete. The host and PID in the name let a later run recognise what a
  dead run left behind (SIGKILL, OOM, power loss): ``remove_stale`` deletes such files or directories when
  they are older than ``STALE_AFTER_S`` and their PID is not running on this host, or now belongs to a
  process that started after the entry was last written (PID reuse). Entries of other hosts (shared file
  systems) are never touched: their PIDs mean nothing here.
- ``signals_raise`` turns SIGTERM/SIGINT into :class:`Interrupted`, so the ordinary exception path removes
  the temporary output and the process exits promptly; ``signals_blocked`` defers them around a group of
  renames that must happen completely or not at all.
- ``OutputLock``: an exclusive ``fcntl.flock`` on ``.NAME.lock`` next to an output, so a second writer of
  the same output is refused instead of silently replacing the first one's result.
- ``check_output_path``: the output is neither an input, nor inside one, nor an ancestor of one (symlinks
  and hard links resolved: ``overlapping_input``, the one rule of the converter, the trainer and the
  preprocessor), so even ``--overwrite`` can never delete what is being read.
- ``check_writable``: an output location that cannot be written is refused before any work is done for it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import time
from typing import Iterator, Optional, Sequence

# A live run keeps writing its temporary output, so an entry untouched for five minutes whose owner is gone
# is certainly stale; the age limit also covers the seconds-long gaps of one huge write.
STALE_AFTER_S = 300.0
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class OutputRefused(ValueError):
    """An output location that must not be written (it overlaps an input, or another run writes it)."""


class OutputError(OSError):
    """Writing an output failed (disk full, read-only, ...): ``cannot write PATH: REASON`` on one line."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


def disk_full(path: str) -> bool:
    """Whether the file system holding ``path`` (a file or folder, existing or not yet) has under 1 MiB free.

    torch's and megatron's writers report a full disk as "unexpected pos" errors (or wrap it): the file
    system is asked instead, before the failed output is removed and frees the space again.
    """
    probe = path
    while probe and not os.path.isdir(probe):
        probe = os.path.dirname(probe)
    try:
        st = os.statvfs(probe or ".")
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


def one_line(e: BaseException) -> str:
    """An expected failure as one line: OS errors as ``REASON: FILE`` (``OutputError``: ``cannot write FILE:
    REASON``), without the errno prefix; anything else as the first line of its message."""
    if isinstance(e, OSError) and not isinstance(e, OutputError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived. A BaseException so that no ``except Exception`` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ----------------------------------------------------------------------------- temporary names

def host() -> str:
    # Keep the name parseable: host names are [A-Za-z0-9.-] already, anything else becomes "_".
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"


def temp_name(final: str, kind: str = "tmp") -> str:
    """A fresh hidden sibling of ``final`` that encodes this host and PID (``kind``: ``tmp`` or ``old``)."""
    d, base = os.path.split(os.path.abspath(final))
    return os.path.join(d, f".{base}.{kind}-{host()}-{os.getpid()}-{secrets.token_hex(4)}")


def temp_pattern(base_regex: str, kinds: Sequence[str] = ("tmp",)) -> re.Pattern:
    """The names ``temp_name`` gives to siblings of outputs whose base name matches ``base_regex``."""
    return re.compile(rf"^\.(?:{base_regex})\.(?:{'|'.join(kinds)})-(?P<host>[A-Za-z0-9._-]+)-(?P<pid>\d+)"
                      r"-[0-9a-f]{8}$")


def process_start(pid: int) -> Optional[float]:
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
    """Whether the run that last wrote an entry at ``mtime`` may still be running as ``pid`` here."""
    if pid == os.getpid():
        return False  # runs clean up before creating their own temporaries, so the PID was reused
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    started = process_start(pid)
    # A process that started after the entry was last written cannot be its writer: the PID was reused.
    return started is None or started <= mtime + 1.0


def remove_stale_in(directory: str, base_regex: str, kinds: Sequence[str] = ("tmp",), now: Optional[float] = None,
                    stale_after: Optional[float] = None) -> list[str]:
    """Delete the temporary siblings (files or directories) of ``base_regex`` outputs in ``directory``
    that dead runs on this host left (untouched for ``stale_after``, default ``STALE_AFTER_S``, seconds);
    returns the removed paths."""
    now = time.time() if now is None else now
    stale_after = STALE_AFTER_S if stale_after is None else stale_after
    pattern = temp_pattern(base_regex, kinds)
    try:
        names = os.listdir(directory)
    except OSError:
        return []  # no directory yet: nothing stale either
    removed = []
    for name in sorted(names):
        m = pattern.match(name)
        if not m or m["host"] != host():
            continue
        path = os.path.join(directory, name)
        try:
            mtime = os.lstat(path).st_mtime
            if now - mtime < stale_after or owner_alive(int(m["pid"]), mtime):
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        except OSError:
            continue  # vanished or not ours to delete: leave it to its owner
        removed.append(path)
    return removed


def remove_stale(finals: Sequence[str], now: Optional[float] = None, stale_after: Optional[float] = None,
                 kinds: Sequence[str] = ("tmp",)) -> list[str]:
    """``remove_stale_in`` for the siblings of each path in ``finals``."""
    removed = []
    for final in finals:
        d, base = os.path.split(os.path.abspath(final))
        removed += remove_stale_in(d, re.escape(base), kinds, now, stale_after)
    return removed


# ----------------------------------------------------------------------------- signals

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


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Defer SIGTERM/SIGINT so that a set of renames happens completely or not at all."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# ----------------------------------------------------------------------------- output location

def _inside(path: str, root: str) -> bool:
    return path != root and path.startswith(root.rstrip(os.sep) + os.sep)


def _same_file(a: str, b: str) -> bool:
    """Two existing paths name one file: a hard link (or a bind mount) that no path comparison shows."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def overlapping_input(output: str, inputs: Sequence[Optional[str]]) -> Optional[tuple[str, str]]:
    """(relation, input) for the first input that ``output`` is, lies inside or contains (symlinks and hard
    links resolved), else None. Empty inputs are skipped. The one overlap rule of every tool that writes."""
    out = os.path.realpath(output)
    for src in inputs:
        if not src:
            continue
        s = os.path.realpath(src)
        relation = ("is" if out == s or _same_file(out, s) else "lies inside" if _inside(out, s)
                    else "contains" if _inside(s, out) else None)
        if relation:
            return relation, src
    return None


def check_writable(path: str, what: str) -> None:
    """Refuse an output location that cannot be written, before any work is done for it: ``path`` (existing or
    not) must be a directory or creatable as one, i.e. its nearest existing ancestor is a directory this
    process may write (a read-only file system, a file in the way, a missing permission)."""
    probe = os.path.abspath(path)
    if os.path.exists(probe) and not os.path.isdir(probe):
        raise OutputRefused(f"{what} {path} exists and is not a directory")
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise OutputRefused(f"{what} {path} cannot be created: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        reason = "a read-only file system" if _read_only(probe) else "no write permission"
        raise OutputRefused(f"{what} {path} cannot be written: {probe} is on {reason}"
                            if reason.startswith("a") else f"{what} {path} cannot be written: {reason} in {probe}")


def _read_only(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def check_output_path(output: str, inputs: Sequence[Optional[str]], overwrite: bool, what: str = "--save-dir",
                      input_what: str = "--load-dir") -> None:
    """Refuse an output that is an input, lies inside one or contains one (symlinks resolved), that is
    not a directory, or that exists and is not empty without ``overwrite``. Reads nothing of the inputs."""
    found = overlapping_input(output, inputs)
    if found:
        relation, src = found
        raise OutputRefused(f"{what} {output} {relation} {input_what} {src}: writing there could destroy the "
                            "input (even with --overwrite); choose another directory")
    if os.path.lexists(output) and not os.path.isdir(output):
        raise OutputRefused(f"{what} {output} exists and is not a directory")
    if os.path.isdir(output) and os.listdir(output) and not overwrite:
        raise FileExistsError(f"output {os.path.abspath(output)} exists and is not empty (pass --overwrite to "
                              "replace it)")


class OutputLock:
    """Exclusive, non-blocking ``flock`` on ``.NAME.lock`` beside ``output``; refuses when another run holds it.

    The lock file is removed on release. A process that opened it just before that removal finds, once
    it holds the lock, that the path names another inode (or nothing), and retries with a fresh file.
    """

    def __init__(self, output: str):
        d, base = os.path.split(os.path.abspath(output))
        self.output, self.path, self.fd = os.path.abspath(output), os.path.join(d, f".{base}.lock"), None

    def acquire(self) -> "OutputLock":
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise OutputRefused(f"another run is writing {self.output} (it holds {self.path}); wait for "
                                        "it to finish or choose another directory") from None
                raise
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{host()} {os.getpid()}\n".encode())  # for a human wondering who holds it
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)  # while still holding it: see the class docstring
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot fsync a directory
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def exit_with(status: int) -> None:
    """End an entry point with ``status``. After an interrupt (128 + signal, partial output already removed)
    exit at once, as the signal's default action would, instead of the seconds-long interpreter teardown
    that torch and megatron-core bring."""
    if status >= 128:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
