import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FAMILIES = ("llama3.1", "llama3.2", "qwen2.5", "qwen3")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """One saved tiny random HF model per family: {name: dir}."""
    from megatron_patch.testing.tiny_models import save_tiny_model

    root = tmp_path_factory.mktemp("hf")
    return {name: save_tiny_model(name, str(root / name), seed=i) for i, name in enumerate(FAMILIES)}
