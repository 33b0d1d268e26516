"""The tensor-core model of ``tests/tensor_cores.py``: truncated MMA sums, on its own and
inside the Triton interpreter (installed by ``tests/conftest.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from . import tensor_cores as TC

ULP = 2.0**-23  # of 1.0 in fp32


def test_round_toward_zero_truncates_both_signs():
    # 1 + 1.5 ulp lies halfway between 1 + 1 ulp and 1 + 2 ulp: to nearest (even) is 2 ulp,
    # toward zero 1 ulp
    acc = np.array([1 + 1.5 * ULP, -(1 + 1.5 * ULP), 1 + 0.9 * ULP, 3.0, 0.0, np.inf])
    out = TC.round_toward_zero(acc)
    assert out.dtype == np.float32
    assert out.tolist() == [1 + ULP, -(1 + ULP), 1.0, 3.0, 0.0, np.inf]
    assert acc.astype(np.float32)[0] == 1 + 2 * ULP  # what round to nearest gives


def test_mma_chain_truncates_once_per_step_of_k():
    # 1 and fifteen terms of 0.75 ulp: the first MMA of 8 sums 1 + 5.25 ulp and keeps
    # 1 + 5 ulp; the second adds 6 ulp exactly: 1 + 11 ulp, not the exact 11.25 ulp
    a = np.zeros((1, 16), np.float32)
    a[0, 0], a[0, 1:] = 1.0, 0.75 * ULP
    out = TC.mma_chain(a, np.ones((16, 1), np.float32), np.zeros((1, 1), np.float32), 8)
    assert out[0, 0] == np.float32(1 + 11 * ULP)
    # a truncation per step: four steps of 1.5 ulp after a 1 keep 1 ulp each, one step of
    # four keeps all 6
    c = np.ones((1, 1), np.float32)
    terms = np.full((1, 4), 1.5 * ULP, np.float32)
    ones = np.ones((4, 1), np.float32)
    assert TC.mma_chain(terms, ones, c, 1)[0, 0] == np.float32(1 + 4 * ULP)
    assert TC.mma_chain(terms, ones, c, 4)[0, 0] == np.float32(1 + 6 * ULP)


def test_tf32_operands_lose_their_low_bits():
    a = np.array([[1 + 2.0**-12]], np.float32)  # below tf32's 10 mantissa bits
    assert TC.tf32_bits(a)[0, 0] == 1.0
    assert TC.tf32_rna(np.array([1 + 2.0**-11], np.float32))[0] == np.float32(1 + 2.0**-10)


def test_tf32x3_is_close_to_float64_and_adds_the_accumulator_in_fp32():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((32, 64)).astype(np.float32)
    b = rng.standard_normal((64, 16)).astype(np.float32)
    c = rng.standard_normal((32, 16)).astype(np.float32)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    got = TC.tf32x3_dot(a, b, np.zeros_like(c))
    scale = np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64)
    assert (np.abs(got - exact) <= 2.0**-19 * scale).all()
    assert np.array_equal(TC.tf32x3_dot(a, b, c), (got + c).astype(np.float32))


@pytest.fixture(scope="module")
def dot_kernel():
    triton = pytest.importorskip("triton")
    from triton import knobs

    if not knobs.runtime.interpret:
        pytest.skip("the model replaces the interpreter's tl.dot; compiled kernels use the GPU's")
    import triton.language as tl

    @triton.jit
    def dot16(a_ptr, b_ptr, c_ptr, PRECISION: tl.constexpr):
        i = tl.arange(0, 16)
        a = tl.load(a_ptr + i[:, None] * 16 + i[None, :])
        b = tl.load(b_ptr + i[:, None] * 16 + i[None, :])
        tl.store(c_ptr + i[:, None] * 16 + i[None, :], tl.dot(a, b, input_precision=PRECISION))

    def run(dtype: torch.dtype, precision: str) -> float:
        a = torch.zeros(16, 16, dtype=dtype)
        b = torch.zeros(16, 16, dtype=dtype)
        a[0, 0], a[0, 1] = 1.0, 1.5 * ULP  # 1 + 1.5 ulp: a tie
        b[0, 0] = b[1, 0] = 1.0
        c = torch.empty(16, 16)
        dot16[(1,)](a, b, c, PRECISION=precision)
        return c[0, 0].item()

    return run


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_interpreter_tensor_core_dots_truncate(dot_kernel, dtype):
    # 1.5 ulp of fp32 is 3 * 2^-24: exact in bf16, and a subnormal of fp16
    assert dot_kernel(dtype, "tf32") == np.float32(1 + ULP)


def test_interpreter_ieee_dots_round_to_nearest(dot_kernel):
    assert dot_kernel(torch.float32, "ieee") == np.float32(1 + 2 * ULP)
