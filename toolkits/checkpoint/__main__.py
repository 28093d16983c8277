"""Entry point of ``python -m toolkits.checkpoint`` and the ``mpatch-convert`` console script."""

import sys


def main(argv=None) -> int:
    from toolkits.checkpoint.cli import main as cli_main

    return cli_main(argv)


# The guard matters: torch_dist saving and --verify spawn processes, which re-import the main module.
if __name__ == "__main__":
    sys.exit(main())
