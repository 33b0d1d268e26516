"""Shared test setup.

Triton kernels run on CPU tensors only through the interpreter, and the flag is
read when ``triton`` is imported, so it is set here, before any test imports
gradproj's kernels, whenever no CUDA device is present.
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)
