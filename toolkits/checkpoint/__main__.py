"""Entry point of ``python -m toolkits.checkpoint`` and the ``mpatch-convert`` console script."""


def main(argv=None) -> int:
    from toolkits.checkpoint.cli import main as cli_main

    return cli_main(argv)


# The guard matters: torch_dist saving and --verify spawn processes, which re-import the main module.
if __name__ == "__main__":
    from megatron_patch.safety import exit_with

    exit_with(main())
