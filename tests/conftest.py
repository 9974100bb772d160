"""Test setup: without a GPU, Triton runs on the CPU through its interpreter, which must be
switched on before ``triton`` is first imported. With a GPU, Triton compiles for it and the
kernel parity tests run on CUDA too."""
import os

import pytest
import torch

# the vLLM serving tests run in their own environment (`make test-vllm`), never in this suite
collect_ignore = ["vllm"]

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from m2iv_kernels.backends import BACKENDS, uses_launchers  # noqa: E402 - imports no triton

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


KERNEL_BACKENDS = [b.name for b in BACKENDS if uses_launchers(b.name)]  # kernels of their own
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=DEVICES)
def device(request):
    """Each device the kernels run on here; tensor factories default to it for the test."""
    dev = torch.device(request.param)
    torch.set_default_device(dev)
    yield dev
    torch.set_default_device(None)


@pytest.fixture(params=KERNEL_BACKENDS)
def backend(request, device):
    """Each kernel backend that can run on ``device`` (on the CPU: Triton under the
    interpreter, the extension)."""
    import m2iv_kernels as mk

    why = mk.available_backends(device)[request.param]
    if why is not True:
        pytest.skip(f"{request.param} unavailable on {device}: {why}")
    return request.param
