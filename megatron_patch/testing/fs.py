"""File-system conditions for tests: a disk that fills up, or one that cannot be written at all."""

from __future__ import annotations

import contextlib
import os
import subprocess


@contextlib.contextmanager
def small_tmpfs(path, size: str = "256k", read_only: bool = False):
    """Mount a tmpfs of ``size`` on ``path`` (created empty) for the block: writes beyond it fail with ENOSPC,
    as on a full disk (``read_only``: every write fails with EROFS). Skips the calling test where mounting is
    not allowed (it needs root)."""
    import pytest

    os.makedirs(path, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)
