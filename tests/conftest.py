"""Test setup: Triton runs on the CPU through its interpreter, which must be switched on
before ``triton`` is first imported."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# the vLLM serving tests run in their own environment (`make test-vllm`), never in this suite
collect_ignore = ["vllm"]
import torch  # noqa: E402

# Tiny models and small kernels: on 2 shared cores, extra intra-op threads only contend
# (measured up to 15x slower for the tiny-model training tests).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


KERNEL_BACKENDS = ["triton", "ext"]


@pytest.fixture(params=KERNEL_BACKENDS)
def backend(request):
    """Each kernel backend that can run here (Triton under the interpreter, the extension)."""
    import m2iv_kernels as mk

    why = mk.available_backends("cpu")[request.param]
    if why is not True:
        pytest.skip(f"{request.param} unavailable: {why}")
    return request.param
