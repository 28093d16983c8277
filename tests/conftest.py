import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every process the tests start (spawned ranks, torchrun, subprocesses) runs megatron-core's CPU adaptations in
# strict-device mode: a host tensor of this project's reaching a collective fails the test, as NCCL would fail
# the run on a GPU (runtime/strict_device.py, tests/test_device_placement.py).
os.environ.setdefault("MEGATRON_PATCH_STRICT_DEVICE", "1")

from megatron_patch.testing.tiny_models import CONFIGS  # noqa: E402

# Every tiny config (one per family variant worth testing): parity and conversion run over all of them.
FAMILIES = tuple(CONFIGS)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip without CUDA (one rule for every file; gpu_check.sh selects them with -m gpu)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """One saved tiny random HF model per family: {name: dir}."""
    from megatron_patch.testing.tiny_models import save_tiny_model

    root = tmp_path_factory.mktemp("hf")
    return {name: save_tiny_model(name, str(root / name), seed=i) for i, name in enumerate(FAMILIES)}


# The converter tests' shared inputs (module-scoped: each test file converts its own copy).
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny Llama 3.1 (llama3 rope) HF directory."""
    from megatron_patch.testing.tiny_models import save_tiny_model

    return save_tiny_model("llama3.1", str(tmp_path_factory.mktemp("hf") / "llama"))


@pytest.fixture(scope="module")
def mcore_dir(hf_dir, tmp_path_factory):
    """``hf_dir`` converted to a TP=2 x PP=2 torch checkpoint (local layer names)."""
    from megatron_patch.parallel import ParallelLayout
    from toolkits.checkpoint import convert

    return convert.hf2mcore(hf_dir, str(tmp_path_factory.mktemp("m") / "m22"), ParallelLayout(tp=2, pp=2),
                            transformer_impl="local")


@pytest.fixture
def hang_guard():
    """``with hang_guard(seconds):`` fails the test with a message instead of hanging the suite when the block
    does not finish (SIGALRM in the main thread). A guard against hangs, far above any expected time: not a
    speed limit."""
    import contextlib
    import signal

    @contextlib.contextmanager
    def guard(seconds: int = 120, what: str = "the block"):
        def fire(signum, frame):
            raise AssertionError(f"{what} did not finish within {seconds} s: it hangs")

        old = signal.signal(signal.SIGALRM, fire)
        signal.alarm(seconds)
        try:
            yield
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)

    return guard
