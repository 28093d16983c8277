"""Entry point of ``python -m toolkits.checkpoint`` and the ``mpatch-convert`` console script."""

import os
import sys


def main(argv=None) -> int:
    from toolkits.checkpoint.cli import main as cli_main

    return cli_main(argv)


# The guard matters: torch_dist saving and --verify spawn processes, which re-import the main module.
if __name__ == "__main__":
    status = main()
    if status >= 128:
        # Interrupted, partial output already removed: exit now, as the signal's default action would,
        # instead of waiting for the interpreter's teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
