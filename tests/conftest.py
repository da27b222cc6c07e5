"""Test-session setup shared by all test files.

Triton decides between compiling for the GPU and its CPU interpreter when a kernel is defined,
i.e. when kernels.py is first imported, from the TRITON_INTERPRET environment variable. Without
a GPU, switch the interpreter on here, before any test module imports kernels, so that
tests/test_kernels.py can run every Triton kernel on the CPU. This changes nothing for other
tests: on CPU tensors kernels.py takes the PyTorch path unless MIMOVL_KERNELS=triton.
"""

import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def one_thread():
    """One intra-op thread: on the shared 2-core machine, steps of these small models were
    measured up to 9x slower with 2 threads than with 1 (the threads spin against other
    processes). Test files that want it for every test set
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
