"""Tensor-core arithmetic for the Triton interpreter (tests only): sums truncated, not rounded.

On a GPU a ``tl.dot`` with ``input_precision="tf32"`` (or 16-bit operands) runs on the
tensor cores, one MMA per step of ``k`` (8 for tf32: ``mma.m16n8k8`` / ``wgmma.m64nNk8``;
16 for bf16/fp16), each ``D = A B + C``. The products are exact; their sum with ``C`` is
rounded toward zero, not to nearest (measured on an H200, 2026-12-04: fp32 rows of
``d = 768`` at ``k = 768`` whose coefficients took 288 MMAs as one accumulator came out
up to 3e-5 of ``max|x|`` off float64; ``csrc/cuda_emu/cuda_emu.h`` models the same for
the CUDA kernels; Fasi, Higham, Mikaitis, Pranesh 2021, "Numerical behavior of NVIDIA
tensor cores"). Triton's interpreter computes every dot as an fp32 ``numpy.matmul``,
rounded to nearest, so a kernel that chains a long reduction through one accumulator
passes there and fails on the GPU.

:func:`install` replaces the interpreter's ``create_dot`` with this model:

* ``tf32``: each operand's low 13 mantissa bits ignored (the tensor cores read tf32
  bits), then per step of 8: ``C ← RZ(C + Σ a·b)``, the sum exact (in float64: 8 products
  of 11-bit significands and ``C``), one truncation to fp32;
* ``tf32x3``: Triton's own decomposition (``F32DotTC``, the same in triton 3.6 and 3.9,
  read from their TTGIR): ``big = cvt.rna.tf32(a)``, ``small = a − big``;
  ``t = mma(a_small, b_big, 0)``, ``t = mma(a_big, b_small, t)``, NaNs of ``t`` zeroed,
  ``t = mma(a_big, b_big, t)``, then ``t + C`` in fp32 (round to nearest);
* bf16/fp16 operands: steps of 16, the same truncation;
* ``ieee``: unchanged (fp32 FMA units, round to nearest).

One thing the interpreter cannot show and this model does not either: Triton's
TTIR combine pass folds ``acc + tl.dot(a, b)`` (a dot from zero) into ``tl.dot(a, b,
acc)``, a chained accumulator. ``tests/test_gpu_compile_check.py`` reads the compiled
TTIR of the row kernel for that.
"""

from __future__ import annotations

import numpy as np

TF32_STEP = 8  # k of one tf32 MMA
HALF_STEP = 16  # k of one bf16/fp16 MMA


def tf32_bits(a: np.ndarray) -> np.ndarray:
    """fp32 ``a`` with its low 13 mantissa bits cleared: the value a tensor core reads."""
    return (np.ascontiguousarray(a, dtype=np.float32).view(np.uint32) & np.uint32(0xFFFFE000)).view(
        np.float32
    )


def tf32_rna(a: np.ndarray) -> np.ndarray:
    """``cvt.rna.tf32.f32`` (10 mantissa bits, ties away from zero): the kernels' host twin
    ``gradproj.kernels.project.tf32_round``, on numpy arrays."""
    import torch

    from gradproj.kernels.project import tf32_round

    return tf32_round(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))).numpy()


def round_toward_zero(acc: np.ndarray) -> np.ndarray:
    """float64 ``acc`` to fp32, rounded toward zero (finite results; ±inf stay)."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = acc.astype(np.float32)
        wide = np.isfinite(out) & (np.abs(out.astype(np.float64)) > np.abs(acc))
    out[wide] = np.nextafter(out[wide], np.float32(0))
    return out


def mma_chain(a: np.ndarray, b: np.ndarray, c: np.ndarray, step: int) -> np.ndarray:
    """``a @ b + c`` as a chain of MMAs over ``step`` columns of ``a`` each, ``c``
    the first accumulator; every MMA's exact sum truncated to fp32. ``a``, ``b``:
    the values the tensor cores read (already tf32 or 16-bit); batched like matmul."""
    a64 = a.astype(np.float64)
    b64 = b.astype(np.float64)
    acc = np.broadcast_to(c, np.broadcast_shapes(c.shape, (*a.shape[:-1], b.shape[-1])))
    acc = acc.astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        for k0 in range(0, a.shape[-1], step):
            part = np.matmul(a64[..., k0 : k0 + step], b64[..., k0 : k0 + step, :])
            acc = round_toward_zero(acc.astype(np.float64) + part)
    return acc


def tf32_dot(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """One ``tl.dot(..., input_precision="tf32")`` on the tensor cores."""
    return mma_chain(tf32_bits(a), tf32_bits(b), c, TF32_STEP)


def tf32x3_dot(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """One ``tl.dot(..., input_precision="tf32x3")`` as Triton decomposes it."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        a_big, b_big = tf32_rna(a), tf32_rna(b)
        a_small, b_small = a - a_big, b - b_big
        zero = np.zeros((*a.shape[:-1], b.shape[-1]), np.float32)
        t = tf32_dot(a_small, b_big, zero)
        t = tf32_dot(a_big, b_small, t)
        t = np.where(np.isnan(t), np.float32(0), t)
        t = tf32_dot(a_big, b_big, t)
        return (t + np.asarray(c, dtype=np.float32)).astype(np.float32)


def _precision_name(input_precision) -> str:
    return str(getattr(input_precision, "name", input_precision)).lower()


def install() -> None:
    """Make the Triton interpreter's ``tl.dot`` compute as the tensor cores do (this
    process; a no-op when Triton is not interpreting)."""
    from triton import knobs

    if not knobs.runtime.interpret:
        return
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "tensor_core_model", False):
        return
    ieee_dot = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a_data, b_data, c_data = a.data, b.data, d.data
        if c_data.dtype != np.float32:  # integer or fp16 accumulators: not ours
            return ieee_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        if a_data.dtype == np.float32 and b_data.dtype == np.float32:
            name = _precision_name(input_precision)
            if name == "tf32":
                out = tf32_dot(a_data, b_data, c_data)
            elif name == "tf32x3":
                out = tf32x3_dot(a_data, b_data, c_data)
            else:  # ieee: FMA units, round to nearest
                return ieee_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        elif a.dtype.scalar.is_bf16() and b.dtype.scalar.is_bf16():
            # the interpreter holds bf16 as its upper 16 bits in uint16
            a32 = (a_data.astype(np.uint32) << np.uint32(16)).view(np.float32)
            b32 = (b_data.astype(np.uint32) << np.uint32(16)).view(np.float32)
            out = mma_chain(a32, b32, c_data, HALF_STEP)
        elif a_data.dtype == np.float16 and b_data.dtype == np.float16:
            out = mma_chain(a_data, b_data, c_data, HALF_STEP)
        else:
            return ieee_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        return interpreter.TensorHandle(out, d.dtype.scalar)

    create_dot.tensor_core_model = True
    builder.create_dot = create_dot
