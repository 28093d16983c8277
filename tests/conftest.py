import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from megatron_patch.testing.tiny_models import CONFIGS  # noqa: E402

# Every tiny config (one per family variant worth testing): parity and conversion run over all of them.
FAMILIES = tuple(CONFIGS)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """One saved tiny random HF model per family: {name: dir}."""
    from megatron_patch.testing.tiny_models import save_tiny_model

    root = tmp_path_factory.mktemp("hf")
    return {name: save_tiny_model(name, str(root / name), seed=i) for i, name in enumerate(FAMILIES)}
