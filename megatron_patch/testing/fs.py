"""File-system conditions for tests: a disk that fills up."""

from __future__ import annotations

import contextlib
import os
import subprocess


@contextlib.contextmanager
def small_tmpfs(path, size: str = "256k"):
    """Mount a tmpfs of ``size`` on ``path`` (created empty) for the block: writes beyond it fail with ENOSPC,
    as on a full disk. Skips the calling test where mounting is not allowed (it needs root)."""
    import pytest

    os.makedirs(path, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)
