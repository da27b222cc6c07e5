"""Test-session setup shared by all test files.

Triton decides between compiling for the GPU and its CPU interpreter when a kernel is defined,
i.e. when kernels.py is first imported, from the TRITON_INTERPRET environment variable. Without
a GPU, switch the interpreter on here, before any test module imports kernels, so that
tests/test_kernels.py can run every Triton kernel on the CPU. This changes nothing for other
tests: on CPU tensors kernels.py takes the PyTorch path unless MIMOVL_KERNELS=triton.
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
