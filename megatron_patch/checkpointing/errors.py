"""The error every checkpoint reader and writer raises for a bad checkpoint.

Its own module so that the layout, the integrity checks, the format modules and Megatron-LM's unpickler can
all raise it without importing one another.
"""


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, foreign or inconsistent (the message names the problem)."""
