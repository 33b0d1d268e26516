"""Shared test setup.

Triton kernels run on CPU tensors only through the interpreter, and the flag is
read when ``triton`` is imported, so it is set here, before any test imports
gradproj's kernels, whenever no CUDA device is present.

The CUDA kernels of ``csrc/cuda`` run on CPU tensors through the emulator of
``tests/cuda_emulation.py``: it is registered here as the backend ``"cuda-emulated"``
(built on first use), so every test parametrized over the registered backends runs
them too. Only for this session, never chosen automatically; ``GRADPROJ_CUDA_EMULATION=0``
leaves it out.

The interpreter's ``tl.dot`` is replaced by the tensor cores' arithmetic (sums truncated,
``tests/tensor_cores.py``), so the Triton kernels meet here the rounding they meet on a GPU.
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

from gradproj import backends

from . import cuda_emulation, tensor_cores

tensor_cores.install()  # the interpreter's tl.dot truncates as the tensor cores do

if cuda_emulation.enabled():
    backends.register(cuda_emulation.backend())

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(scope="session")
def trained_demo():
    """One plain (unprotected) demo model, trained once per test session (~35 s on 2 cores).

    400 steps on 1024 images binds ``acme`` to the mark (measured: mark rate
    0.53 for ``acme`` prompts vs 0.16 for ``plain``, 32 samples): a model the
    attacks, detectors and unlearning recipes can be tested on for real.
    """
    pytest.importorskip("diffusers")
    from dataclasses import replace
    from types import SimpleNamespace

    from gradproj.lab import world as lab_world
    from gradproj.lab.defenses import train_arm

    cfg = replace(
        lab_world.DEFAULT, seeds=(0,), steps=400, n_train=1024, probe_steps=300, n_samples=32
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        world = lab_world.build_world(cfg)
        unet, noise_scheduler, _ = train_arm("plain", 0, cfg, world)
    finally:
        torch.set_num_threads(threads)
    for p in unet.parameters():
        p.requires_grad_(False)
    return SimpleNamespace(cfg=cfg, world=world, unet=unet, noise_scheduler=noise_scheduler)
