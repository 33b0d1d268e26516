"""Every registered backend of ``project_`` / ``project_anchored_`` against the float64 reference.

Tolerances (``assert_matches``): the reference is computed in float64 from the
*same* low-precision input, so a correct kernel differs from it only by

* rounding the result to the grad's dtype: at most half an ulp, i.e. a relative
  ``2⁻²⁴`` (fp32), ``2⁻¹¹`` (fp16), ``2⁻⁸`` (bf16) of ``|ref|``;
* fp32 accumulation of ``Uᵀx`` and ``U c``: about ``√d · 2⁻²⁴`` of the vector's
  scale, which we bound by ``2e-6 · max|x|`` (measured worst: 3e-7 at d = 768);
* for bf16/fp16 rows stored more than once (Triton: ``k > 128``, a store per chunk of
  128 basis columns; CUDA: a launch per block of columns where the basis exceeds shared
  memory, ``k > 64`` at ``d`` = 768 on the emulated 227 KiB, mma_rows.cuh [columns]):
  one more half-ulp of ``max|x|`` per extra store.

Exception, measured: the Triton *interpreter* (CPU) converts fp32 → bf16 by
truncation, not round-to-nearest (-0.5968 → -0.59375, not -0.59766), so for
that backend on CPU bf16 gets a full ulp. On a GPU Triton rounds to nearest and
the half-ulp bound applies.

``rtol`` is the half ulp plus a hair; ``atol`` is the accumulation term (plus the
chunk roundings), scaled by ``max|x|`` of the input. A kernel that drops a term,
reads a wrong stride or mixes up tensors misses these bounds by orders of magnitude.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradproj
from gradproj import backends, ops
from gradproj import reference as R

from . import cuda_emulation
from .conftest import DEVICES

KERNEL_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HALF_ULP = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11}
HALF_ULP[torch.bfloat16] = 2.0**-8


def runnable(op: str, dtype: torch.dtype = torch.float32) -> list[tuple[str, str]]:
    """(device, backend) pairs that can run ``op`` here: the suite's parametrization."""
    return [
        (dev, name)
        for dev in DEVICES
        for name in backends.registered()
        if backends.get(name).unsupported_reason(op, torch.device(dev), dtype) is None
    ]


PROJECT = runnable("project_bucket_")
ANCHORED = runnable("project_anchored_bucket_")
BACKEND_IDS = [f"{d}-{b}" for d, b in PROJECT]


def orthonormal(d: int, k: int, device="cpu", dtype=torch.float32, seed=0) -> torch.Tensor:
    """A (d × k) basis straight from QR: column-major strides, as users will pass it."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))
    return q.to(device=device, dtype=dtype)


def assert_matches(
    out: torch.Tensor,
    ref: torch.Tensor,
    x: torch.Tensor,
    k: int = 1,
    backend: str = "",
    d: int = 0,
) -> None:
    """``|out − ref| ≤ rtol·|ref| + atol·max|x|`` with the per-dtype terms of the module doc
    (``d``: the projected vectors' length, for the CUDA kernels' blocks of columns)."""
    assert out.dtype == x.dtype and out.shape == ref.shape
    dt = out.dtype
    ulp = HALF_ULP[dt]
    if dt == torch.bfloat16 and backend == "triton" and out.device.type == "cpu":
        ulp *= 2  # the interpreter truncates fp32 -> bf16 (see module doc)
    stores = math.ceil(k / 128)  # Triton: a chunk of 128 basis columns a store
    if backend == "cuda-emulated" and d:
        stores = max(stores, cuda_emulation.tensor_core_launches(d, k))
    extra_roundings = max(0, stores - 1) if dt in (torch.bfloat16, torch.float16) else 0
    rtol = 1.01 * ulp
    atol = 2e-6 + 1.01 * extra_roundings * ulp
    scale = x.double().abs().max().item() if x.numel() else 0.0
    diff = (out.double() - ref).abs()
    bound = rtol * ref.abs() + atol * scale
    bad = diff > bound
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        pytest.fail(
            f"{int(bad.sum())} of {bad.numel()} elements out of tolerance ({dt}); first at "
            f"{idx}: got {out[tuple(idx)].item()!r}, float64 reference {ref[tuple(idx)].item()!r}, "
            f"bound {bound[tuple(idx)].item():.3g}; max diff {diff.max().item():.3g}"
        )


def ref64(g, u, side, w=None) -> torch.Tensor:
    return R.project(g.double(), u.double(), side=side, weights=None if w is None else w.double())


# (shape, side, k values): odd shapes, k from 1 to the full side dimension.
CASES = [
    ((3, 5), "input", [1, 3, 5]),
    ((37, 129), "input", [1, 7, 129]),
    ((300, 768), "input", [1, 7, 768]),
    ((45, 260), "input", [9, 40]),  # CUDA: the tensor-core kernel (d <= 1280), J odd and even
    ((20, 1000), "input", [24]),  # and its widest blocks (8 a warp), a ragged last block
    ((8, 3, 3, 3), "input", [1, 7, 27]),  # conv weight: rows of in·kh·kw
    ((3, 5), "output", [1, 3]),
    ((37, 129), "output", [1, 7, 37]),
    ((300, 768), "output", [7, 300]),
    ((3, 5), "flat", [1, 7, 15]),
    ((37, 129), "flat", [1, 7]),
    ((8, 3, 3, 3), "flat", [1, 7]),
]
PARAMS = [(shape, side, k) for shape, side, ks in CASES for k in ks]


@pytest.mark.parametrize(("device", "backend"), PROJECT, ids=BACKEND_IDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "side", "k"), PARAMS)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_matches_float64_reference(device, backend, dtype, shape, side, k, soft):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, side, k, soft)).encode()))
    g = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    d = R.side_dim(shape, side)
    u = orthonormal(d, k, device)
    w = torch.rand(k, generator=gen).to(device) if soft else None
    out = g.clone()
    gradproj.project_(out, u, side=side, weights=w, backend=backend)
    assert_matches(out, ref64(g, u, side, w), g, k, backend=backend, d=d)


def test_reference_float64_grads_use_float64(device):
    g = torch.randn(37, 129, dtype=torch.float64, device=device)
    u = orthonormal(129, 7, device, torch.float64)
    out = g.clone()
    gradproj.project_(out, u, backend="reference")
    assert (out @ u).abs().max().item() < 1e-13


@pytest.mark.parametrize(("device", "backend"), PROJECT, ids=BACKEND_IDS)
@pytest.mark.parametrize("side", ["input", "output", "flat"])
def test_k0_leaves_grad_untouched(device, backend, side):
    g = torch.randn(6, 10, device=device)
    out = g.clone()
    gradproj.project_(out, torch.empty(R.side_dim(g.shape, side), 0, device=device), side=side)
    assert torch.equal(out, g)


@pytest.mark.parametrize(("device", "backend"), PROJECT, ids=BACKEND_IDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_mixed_bucket_many_tensors(device, backend, dtype):
    """Several bases, shared bases, None bases, None grads, odd shapes, in one call."""
    gen = torch.Generator().manual_seed(7)
    u64 = orthonormal(64, 5, device)
    u33 = orthonormal(33, 4, device, seed=1)
    u64b = orthonormal(64, 9, device, seed=2)
    shapes = [(40, 64), (1, 64), (17, 64), (5, 33), (40, 64), (9, 64), (2, 33), (3, 64)]
    bases = [u64, u64, u64b, u33, None, u64, u33, u64b]
    grads = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]
    grads.insert(3, None)
    bases.insert(3, u64)
    before = [None if g is None else g.clone() for g in grads]
    gradproj.project_(grads, bases, backend=backend)
    for g, g0, u in zip(grads, before, bases, strict=True):
        if g0 is None:
            assert g is None
        elif u is None:
            assert torch.equal(g, g0)
        else:
            assert_matches(g, ref64(g0, u, "input"), g0, u.shape[1], backend=backend)


@pytest.mark.parametrize(("device", "backend"), PROJECT, ids=BACKEND_IDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_non_contiguous_views(device, backend, dtype):
    """Strided, transposed and non-viewable grads are projected in place, neighbours untouched."""
    parent = torch.randn(37, 258, device=device).to(dtype)
    parent0 = parent.clone()
    strided = parent[:, ::2]  # stride (258, 2)
    u = orthonormal(129, 7, device)
    gradproj.project_(strided, u, backend=backend)
    assert_matches(strided, ref64(parent0[:, ::2], u, "input"), parent0[:, ::2], 7, backend=backend)
    assert torch.equal(parent[:, 1::2], parent0[:, 1::2])

    t = torch.randn(129, 37, device=device).to(dtype).T  # stride (1, 37)
    t0 = t.clone()
    gradproj.project_(t, u, backend=backend)
    assert_matches(t, ref64(t0, u, "input"), t0, 7, backend=backend)

    conv = torch.randn(3, 3, 4, 8, device=device).to(dtype).permute(3, 2, 0, 1)  # (8,4,3,3)
    conv0 = conv.clone()
    u36 = orthonormal(36, 5, device)
    gradproj.project_(conv, u36, backend=backend)
    assert_matches(conv, ref64(conv0, u36, "input"), conv0, 5, backend=backend)

    flat = torch.randn(10, 12, device=device).to(dtype)[:, :6]
    flat0 = flat.clone()
    u60 = orthonormal(60, 3, device)
    gradproj.project_(flat, u60, side="flat", backend=backend)
    assert_matches(flat, ref64(flat0, u60, "flat"), flat0, 3, backend=backend)

    # A view(-1) exists but has stride 2 (the fuzz suite's find: Triton read it as stride 1).
    parent = torch.randn(14, device=device).to(dtype)
    parent0 = parent.clone()
    every_other = parent[::2]
    u7 = orthonormal(7, 1, device)
    gradproj.project_(every_other, u7, side="flat", backend=backend)
    assert_matches(every_other, ref64(parent0[::2], u7, "flat"), parent0[::2], 1, backend=backend)
    assert torch.equal(parent[1::2], parent0[1::2])


@pytest.mark.parametrize(("device", "backend"), PROJECT, ids=BACKEND_IDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_aligned_and_unaligned_tensors_in_one_bucket(device, backend, dtype):
    """A bucket mixing 16-byte aligned grads with grads one element off alignment
    (the Triton kernels vectorize only when every tensor is aligned), input and
    output sides, and flat vectors long enough for several chunks per tensor."""
    gen = torch.Generator().manual_seed(11)
    store = torch.randn(1 + 40 * 64, generator=gen).to(device=device, dtype=dtype)
    u = orthonormal(64, 9, device)
    for side, shape in (("input", (40, 64)), ("output", (64, 40))):
        grads = [
            torch.randn(shape, generator=gen).to(device=device, dtype=dtype),
            store[1:].view(shape),  # one element past a 16-byte boundary
        ]
        before = [g.clone() for g in grads]
        gradproj.project_(grads, [u, u], side=side, backend=backend)
        for g, g0 in zip(grads, before, strict=True):
            assert_matches(g, ref64(g0, u, side), g0, 9, backend=backend)
    n = 20000  # three chunks of 8192 per tensor on the flat side
    flats = [torch.randn(n, generator=gen).to(device=device, dtype=dtype) for _ in range(2)]
    flats.append(torch.randn(n + 1, generator=gen).to(device=device, dtype=dtype)[1:])
    u_flat = orthonormal(n, 3, device)
    before = [f.clone() for f in flats]
    gradproj.project_(flats, [u_flat] * 3, side="flat", backend=backend)
    for f, f0 in zip(flats, before, strict=True):
        assert_matches(f, ref64(f0, u_flat, "flat"), f0, 3, backend=backend)


@pytest.mark.parametrize(("device", "backend"), PROJECT, ids=BACKEND_IDS)
def test_bias_output_side(device, backend):
    v = orthonormal(12, 3, device)
    b = torch.randn(12, device=device)
    b0 = b.clone()
    gradproj.project_(b, v, side="output", backend=backend)
    assert_matches(b, R.project(b0.double(), v.double(), side="flat"), b0, backend=backend)


@pytest.mark.parametrize(("device", "backend"), PROJECT, ids=BACKEND_IDS)
@pytest.mark.parametrize("side", ["input", "output", "flat"])
def test_deterministic(device, backend, side):
    g = torch.randn(70, 130, device=device)
    u = orthonormal(R.side_dim(g.shape, side), 9, device)
    a, b = g.clone(), g.clone()
    gradproj.project_(a, u, side=side, backend=backend)
    gradproj.project_(b, u, side=side, backend=backend)
    assert torch.equal(a, b)


@pytest.mark.parametrize(("device", "backend"), PROJECT, ids=BACKEND_IDS)
def test_hard_projection_annihilates_basis_and_is_idempotent(device, backend):
    g = torch.randn(50, 96, device=device)
    u = orthonormal(96, 12, device)
    gradproj.project_(g, u, backend=backend)
    # (P G) U = 0 up to fp32 accumulation; measured ~5e-7 relative to max|G|.
    assert (g @ u).abs().max().item() <= 5e-6 * g.abs().max().item()
    once = g.clone()
    gradproj.project_(g, u, backend=backend)
    assert (g - once).abs().max().item() <= 5e-6 * once.abs().max().item()


@pytest.mark.parametrize(("device", "backend"), PROJECT, ids=BACKEND_IDS)
def test_soft_weights_equal_ridge_projector(device, backend):
    """project_ with (U, s²/(s²+λ)) from the SVD of C equals I − C(CᵀC+λI)⁻¹Cᵀ."""
    gen = torch.Generator().manual_seed(3)
    c = torch.randn(48, 6, generator=gen, dtype=torch.float64)
    lam = 0.7
    u, w = R.soft_basis_from_ridge(c, lam)
    g = torch.randn(20, 48, generator=gen, dtype=torch.float64)
    dense = g @ R.ridge_projector(c, lam)  # ridge projector is symmetric: rows ← rows·P
    out = g.float().to(device)
    gradproj.project_(out, u.float().to(device), weights=w.float().to(device), backend=backend)
    assert_matches(out, dense.to(device), g.float().to(device), backend=backend)


@pytest.mark.parametrize(("device", "backend"), PROJECT, ids=BACKEND_IDS)
@pytest.mark.parametrize("k", [4, 12])  # CUDA: k = 12 on tensor cores
def test_nan_propagates_to_its_row_only(device, backend, k):
    g = torch.randn(40, 64, device=device)
    g[3, 5] = float("nan")
    g[7, 0] = float("inf")
    g[11, 9] = torch.tensor(0x7FFFFFFF, dtype=torch.int32).view(torch.float32)  # CUDA's NaN
    u = orthonormal(64, k, device)
    g0 = g.clone()
    gradproj.project_(g, u, backend=backend)
    for bad in (3, 7, 11):
        assert not torch.isfinite(g[bad]).any(), bad
    keep = [i for i in range(40) if i not in (3, 7, 11)]
    assert_matches(g[keep], ref64(g0[keep], u, "input"), g0[keep], backend=backend)


@pytest.mark.parametrize(("device", "backend"), PROJECT, ids=BACKEND_IDS)
def test_empty_inputs(device, backend):
    gradproj.project_([], [], backend=backend)
    e = torch.empty(0, 16, device=device)
    gradproj.project_(e, orthonormal(16, 2, device), backend=backend)
    assert e.shape == (0, 16)
    gradproj.project_([None], [orthonormal(16, 2, device)], backend=backend)


# ------------------------------------------------------------------ anchored

ANCHORED_IDS = [f"{d}-{b}" for d, b in ANCHORED]


@pytest.mark.parametrize(("device", "backend"), ANCHORED, ids=ANCHORED_IDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize(
    ("shape", "side", "k"),
    [
        ((37, 129), "input", 7),
        ((45, 260), "input", 12),  # CUDA: the tensor-core kernel
        ((37, 129), "output", 5),
        ((8, 3, 3, 3), "flat", 4),
    ],
)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_anchored_matches_reference(device, backend, dtype, shape, side, k, soft):
    gen = torch.Generator().manual_seed(11)
    p0 = torch.randn(shape, generator=gen).to(device, dtype)
    u = orthonormal(R.side_dim(shape, side), k, device)
    w = torch.rand(k, generator=gen).to(device) if soft else None
    c = ops.anchor(p0, u, side=side)
    p = (p0.float() + 0.1 * torch.randn(shape, generator=gen).to(device)).to(dtype)
    p_in, c_in = p.clone(), c.clone()
    ops.project_anchored_([p], [c], u, side=side, weights=w, backend=backend)
    p_ref, c_ref = R.project_anchored(
        p_in.double(),
        c_in.double(),
        u.double(),
        side=side,
        weights=None if w is None else w.double(),
    )
    assert_matches(p, p_ref, p_in, k, backend=backend)
    assert (c.double() - c_ref).abs().max().item() <= 2e-6 * p_in.abs().max().item()
    if not soft:
        assert torch.equal(c, c_in)  # the hard projector keeps the anchor


@pytest.mark.parametrize(("device", "backend"), ANCHORED, ids=ANCHORED_IDS)
def test_anchored_keeps_parameter_on_its_anchor(device, backend):
    """Many random updates, each projected: (W_T − W_0) U stays at fp32 rounding."""
    gen = torch.Generator().manual_seed(5)
    w0 = torch.randn(64, 96, generator=gen).to(device)
    u = orthonormal(96, 8, device)
    c = ops.anchor(w0, u)
    w = w0.clone()
    for _ in range(20):
        w += 0.05 * torch.randn(64, 96, generator=gen).to(device)
        ops.project_anchored_([w], [c], u, backend=backend)
    assert ((w - w0) @ u).norm().item() <= 1e-6 * w0.norm().item()


# ------------------------------------------------------------------ Triton's resident kernel

TRITON_CPU = ("cpu", "triton") in PROJECT


@pytest.mark.parametrize(
    ("d", "block_r", "block_d", "chunks"),
    [
        (129, 8, 64, 3),
        (200, 8, 256, 1),
        (320, 8, 128, 3),
        (500, 8, 256, 2),
        (768, 8, 256, 3),
        (1024, 8, 256, 4),
        # beyond 4 tiles of 256: 4 rows of 512-column tiles, then 2 rows of 1024
        (1025, 4, 512, 3),
        (1280, 4, 512, 3),
        (2048, 4, 512, 4),
        (2049, 2, 1024, 3),
        (3072, 2, 1024, 3),
        (4096, 2, 1024, 4),
    ],
)
def test_resident_tiles_pad_d_least(d, block_r, block_d, chunks):
    from gradproj.kernels import project as P

    tiles = P._row_tiles(90, 4, d, 8)
    assert tiles.resident and (tiles.block_r, tiles.block_d, tiles.chunks) == (
        block_r,
        block_d,
        chunks,
    )
    assert block_d * chunks >= d and (block_d * (chunks - 1) < d)


def test_resident_tiles_for_at_most_three_tiles():
    # projected AdamW holds 3 tiles on 4 warps: 8 rows up to 768 columns, 4 rows of 512 to
    # 1536, 2 rows of 1024 to 3072
    from gradproj.kernels import project as P

    assert P.resident_tiles(768, max_chunks=3) == (8, 256, 3, False)
    assert P.resident_tiles(769, max_chunks=3) == (4, 512, 2, True)
    assert P.resident_tiles(1536, max_chunks=3) == (4, 512, 3, True)
    assert P.resident_tiles(1537, max_chunks=3) == (2, 1024, 2, True)
    assert P.resident_tiles(3072, max_chunks=3) == (2, 1024, 3, True)
    assert P.resident_tiles(3073, max_chunks=3) is None
    assert P.resident_tiles(128) is None and P.resident_tiles(4097) is None


@pytest.mark.parametrize(
    ("elsize", "d", "k", "contig", "resident"),
    [
        (4, 768, 16, 1, True),  # fp32 up to k = 16
        (4, 768, 17, 1, False),  # then the two-pass tensor-core kernel
        (4, 1024, 16, 1, True),
        (2, 768, 8, 1, True),  # bf16/fp16 up to k = 8
        (2, 768, 9, 1, False),
        (4, 128, 8, 1, False),  # D <= 128: the one-pass tensor-core tile
        (4, 1025, 8, 1, True),  # more than 4 tiles of 256: 4 rows of 512, fp32 to k = 8
        (4, 1025, 9, 1, False),
        (2, 2048, 8, 1, True),  # bf16/fp16 to k = 8
        (2, 2048, 9, 1, False),
        (4, 4096, 8, 1, True),  # 2 rows of 1024-column tiles: fp32 the same k
        (4, 4096, 9, 1, False),
        (2, 2049, 4, 1, True),  # bf16/fp16 to k = 4
        (2, 4096, 5, 1, False),
        (4, 4097, 1, 1, False),  # more than 4 tiles of 1024
        (4, 768, 8, 0, True),  # transposed views (side="output", 16-byte vectors):
        # D <= 768, k <= 8 fp32, 4 bf16/fp16 (RESIDENT_OUTPUT_MAX_K)
        (4, 768, 9, 0, False),
        (2, 200, 4, 0, True),
        (2, 768, 5, 0, False),
        (4, 769, 1, 0, True),  # beyond 3 tiles of 256: 2-3 tiles of 512 on 8 warps,
        (4, 1536, 8, 0, True),  # k <= 8 fp32, 4 bf16/fp16, to D = 1536
        (4, 1536, 9, 0, False),
        (2, 1280, 4, 0, True),
        (2, 1280, 5, 0, False),
        (4, 1537, 1, 0, False),
        (4, 128, 1, 0, False),
        (4, 768, 8, -1, False),  # no unit stride
    ],
)
def test_resident_kernel_only_where_chosen(elsize, d, k, contig, resident):
    from gradproj.kernels import project as P

    vec = 16 // elsize  # 16-byte vectors
    assert P._row_tiles(90, elsize, d, k, contig, vec=vec).resident is resident
    assert P._row_tiles(80, elsize, d, k, contig, True, vec).resident is resident
    if contig == 0:
        # whole sectors along the unit stride: 16 rows; with scalar accesses (VEC = 1) the
        # transposed tile spilled, so it is not resident
        assert not P._row_tiles(90, elsize, d, k, contig, vec=1).resident
        if resident:  # 32 bytes of rows: one sector a column
            assert P._row_tiles(90, elsize, d, k, contig, vec=vec).block_r * elsize == 32
    else:
        assert P._row_tiles(90, elsize, d, k, contig, vec=1).resident is resident


@pytest.mark.parametrize("arch", [80, 90])
def test_resident_warps_and_two_pass_tiles_of_contiguous_rows(arch):
    # the 8-row resident blocks on 8 warps uncapped (RESIDENT_WARPS), but 16-bit ones on 4
    # capped at 192 for soft weights, and for few rows on sm_90 or at k = 1; past
    # RESIDENT_MAX_K (fp32 16, 16-bit 8) contiguous rows, plain or anchored, take the
    # two-pass kernel's 64 x 32 tiles at BLOCK_K = 16 (16-bit) or BLOCK_K = 32
    from gradproj.kernels import project as P

    four = (4, P.RESIDENT_MAXNREG)
    for anchored in (False, True):
        for few in (False, True):
            for weighted in (False, True):
                for k in (8, 16):
                    t = P._row_tiles(arch, 4, 768, k, 1, anchored, 4, few, weighted=weighted)
                    assert t.resident and (t.warps, t.maxnreg) == (8, None)
                for k in (1, 4, 8):
                    t = P._row_tiles(arch, 2, 768, k, 1, anchored, 8, few, weighted=weighted)
                    slow = weighted or (few and (arch >= 90 or k == 1))
                    # RESIDENT_16BIT_ANCHORED_MAXNREG, RESIDENT_16BIT_PLAIN_MAXNREG
                    eight = (8, 80 if anchored else 192)
                    assert t.resident and (t.warps, t.maxnreg) == (four if slow else eight)
        # 4 tiles (D = 1024) stay uncapped; 2 tiles (D = 512) too, and plain 3 of 128 (D =
        # 320; anchored ones take RESIDENT_16BIT_ANCHORED_MAXNREG)
        for d in (1024, 512, 320):
            t = P._row_tiles(arch, 2, d, 8, 1, anchored, 8)
            cap = 80 if anchored and d == 320 else None
            assert t.resident and (t.warps, t.maxnreg) == (8, cap), d
        # the wide blocks and the transposed views' blocks keep their own warps
        t = P._row_tiles(arch, 2, 2048, 8, 1, anchored, 8, True, weighted=True)
        assert t.resident and t.block_r == 4 and t.warps == 4
        t = P._row_tiles(arch, 2, 768, 4, 0, anchored, 8, False, weighted=True)
        assert t.resident and (t.block_r, t.warps) == (16, 8)
        t = P._row_tiles(arch, 2, 768, 9, 1, anchored, 8)
        assert not t.resident and (t.block_r, t.block_d, t.block_k, t.warps) == (64, 32, 16, 4)
        assert not P._row_tiles(arch, 4, 768, 17, 1, anchored, 4).resident
        t = P._row_tiles(arch, 2, 768, 32, 1, anchored, 8)
        sm80 = (16, 32, 4, 1) if anchored else (16, 64, 4, 1)  # docs/gpu.md #raw-lo
        want = (64, 64, 8, 1) if arch >= 90 else sm80
        assert (t.block_r, t.block_d, t.warps, t.stages) == want
        # fp32 at BLOCK_K = 32: 64 x 32 on sm_90 (wgmma; anchored on 8 warps, two stages),
        # 16 x 32 on sm_80 (the waves of 64-row blocks: docs/gpu.md #tiles-waves; anchored
        # on two stages)
        t = P._row_tiles(arch, 4, 768, 32, 1, anchored, 4)
        sm90 = (64, 32, 8, 2) if anchored else (64, 32, 4, 1)
        want = sm90 if arch >= 90 else (16, 32, 4, 2 if anchored else 1)
        assert (t.block_r, t.block_d, t.warps, t.stages) == want


@pytest.mark.parametrize("arch", [80, 90])
def test_transposed_views_tiles_with_the_waves_counted(arch):
    """docs/gpu.md #tiles-waves, #output-warps: the resident transposed blocks on 8 warps,
    fp32's capped at 192 (on sm_90 a bucket of few rows takes 4 warps), 16-bit's uncapped;
    at BLOCK_K = 32 sm_80's 16 x 64; sm_90's 64-row blocks (16-bit 64 x 32 on two stages,
    docs/gpu.md #raw-lo; fp32 64 x 32 on 4)."""
    from gradproj.kernels import project as P

    for anchored in (False, True):
        for k in (1, 4, 8):
            t = P._row_tiles(arch, 4, 768, k, 0, anchored, 4)
            assert t.resident and (t.block_r, t.warps, t.maxnreg) == (8, 8, 192)
            few = P._row_tiles(arch, 4, 768, k, 0, anchored, 4, True)
            want = (8, 4, 192) if arch >= 90 else (8, 8, 192)
            assert few.resident and (few.block_r, few.warps, few.maxnreg) == want
        for k in (1, 2, 4):
            for few in (False, True):
                t = P._row_tiles(arch, 2, 768, k, 0, anchored, 8, few)
                assert t.resident and (t.block_r, t.warps, t.maxnreg) == (16, 8, None)
        # the wider views (768 < D <= 1536) keep their own blocks, few rows or many
        for few in (False, True):
            t = P._row_tiles(arch, 4, 1280, 8, 0, anchored, 4, few)
            assert t.resident and (t.block_r, t.warps, t.maxnreg) == (8, 8, 128)
        for elsize in (4, 2):
            t = P._row_tiles(arch, elsize, 768, 32, 0, anchored, 16 // elsize)
            if arch < 90:
                want = (16, 64, 32, 4, 1)
            else:  # 16-bit: 64 x 32 on two stages (docs/gpu.md #raw-lo)
                want = (64, 32, 32, 4, 1) if elsize == 4 else (64, 32, 32, 4, 2)
            assert (t.block_r, t.block_d, t.block_k, t.warps, t.stages) == want, (elsize, t)
            assert not t.resident and not t.one_pass


@pytest.mark.parametrize("arch", [80, 90])
def test_few_rows_take_their_own_tiles(arch):
    """docs/gpu.md #few-rows: where a bucket's 64-row blocks would be fewer than the SMs, the
    two-pass kernel's 64-row tiles give way (_few_rows_tiles); every other choice stays."""
    from gradproj.kernels import project as P

    def tiles(elsize, k, contig, anchored, few):
        t = P._row_tiles(arch, elsize, 768, k, contig, anchored, 16 // elsize, few)
        return (t.block_r, t.block_d, t.block_k, t.warps, t.stages)

    for elsize in (4, 2):
        for contig in (1, 0):
            for anchored in (False, True):
                # fp32 rows are resident to k = 16 (RESIDENT_MAX_K): k = 12 on views only
                if elsize == 2 or contig == 0:
                    many_16 = tiles(elsize, 12, contig, anchored, False)
                    assert many_16 == (64, 32, 16, 4, 1)
                    few_16 = tiles(elsize, 12, contig, anchored, True)
                    # sm_90: twice the warps a program; sm_80: 4x the programs
                    want = (64, 64, 16, 8, 1) if arch >= 90 else (16, 64, 16, 4, 1)
                    assert few_16 == want
                few_32 = tiles(elsize, 32, contig, anchored, True)
                many_32 = tiles(elsize, 32, contig, anchored, False)
                if arch < 90:  # already 16-row blocks at BLOCK_K = 32
                    assert few_32 == many_32 and many_32[0] == 16
                elif anchored and elsize == 2:  # 16 x 64 on 4 warps spilled: none led
                    # (views: 64 x 32 on two stages, docs/gpu.md #raw-lo)
                    keep = (64, 64, 32, 8, 1) if contig == 1 else (64, 32, 32, 4, 2)
                    assert few_32 == many_32 == keep
                else:
                    assert few_32 == (16, 64, 32, 8 if anchored else 4, 1), (elsize, contig)
                    assert many_32[0] == 64
                # k = 128 and the resident block (k = 4) keep their tiles, but on sm_90 the
                # 16-bit resident rows and fp32 resident views take 4 warps for 8
                # (test_resident_warps_and_two_pass_tiles_..., test_transposed_views_...)
                for k in (128, 4):
                    few_t, many_t = (tiles(elsize, k, contig, anchored, f) for f in (True, False))
                    slow = (elsize == 2) == (contig == 1)
                    if k == 4 and slow and arch >= 90:
                        assert (few_t[3], many_t[3]) == (4, 8)
                        few_t, many_t = few_t[:3], many_t[:3]
                    assert few_t == many_t


def test_the_launcher_counts_the_buckets_rows_against_the_sms(monkeypatch):
    """_launch_rows takes the few-rows tiles for a bucket of fewer than FEW_ROWS_PER_SM rows
    an SM, counting every tensor's rows, and the SMs of the bucket's device; where the SMs
    are unknown (the interpreter: 0) it keeps its tiles."""
    from gradproj.kernels import project as P

    seen = []
    real = P._row_tiles

    def spy(*args, weighted):
        seen.append((args[-1], weighted))
        raise _Stop

    class _Stop(Exception):
        pass

    monkeypatch.setattr(P, "_row_tiles", spy)
    basis = orthonormal(200, 20)
    if TRITON_CPU and not torch.cuda.is_available():  # the interpreter: no driver, no SMs
        assert P._sm_count(torch.device("cpu")) == 0
    cases = ((2, 127, True), (2, 128, False), (0, 5, False), (3, 191, True))
    for (sms, rows, few), w in zip(cases, (None, torch.ones(20)) * 2, strict=True):
        monkeypatch.setattr(P, "_sm_count", lambda device, sms=sms: sms)
        grads = [torch.empty(rows - 5, 200), torch.empty(5, 200)]
        with pytest.raises(_Stop):
            P._launch_rows(grads, None, basis, w)
        assert seen[-1] == (few, w is not None), (sms, rows)
    assert real(90, 4, 768, 32, 1, False, 4, True) != real(90, 4, 768, 32, 1, False, 4, False)


@pytest.mark.skipif(not TRITON_CPU, reason="the Triton interpreter is not available")
def test_resident_kernel_with_k0_leaves_the_bucket_untouched():
    # the ops skip k = 0 before any kernel; the bucket kernel called directly must too
    from gradproj.kernels import project as P

    g = torch.randn(5, 300)
    before = g.clone()
    P.project_bucket_([g], torch.empty(300, 0), None, "input")
    assert torch.equal(g, before)


TRITON_DEVICES = [d for d, b in PROJECT if b == "triton"]  # the interpreter, or a GPU


def _check_resident_bucket(grads, u, w, k, side, anchored, gen) -> None:
    """Project ``grads`` with the Triton backend (anchored: fresh anchors, checked too)
    and compare every tensor with float64."""
    before = [g.clone() for g in grads]
    if anchored:
        n = [g.shape[0] if side == "input" else g.shape[1] for g in grads]
        anchors = [torch.randn(r, k, generator=gen).to(u.device) for r in n]
        c_in = [c.clone() for c in anchors]
        ops.project_anchored_(grads, anchors, u, side=side, weights=w, backend="triton")
        for g, g0, c, c0 in zip(grads, before, anchors, c_in, strict=True):
            p_ref, c_ref = R.project_anchored(
                g0.double(), c0.double(), u.double(), side=side, weights=w.double()
            )
            assert_matches(g, p_ref, g0, k, backend="triton")
            assert (c.double() - c_ref).abs().max().item() <= 2e-6 * g0.abs().max().item()
    else:
        gradproj.project_(grads, u, side=side, weights=w, backend="triton")
        for g, g0 in zip(grads, before, strict=True):
            assert_matches(g, ref64(g0, u, side, w), g0, k, backend="triton")


@pytest.mark.skipif(not TRITON_DEVICES, reason="Triton cannot run here")
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("d", [200, 320, 500, 1024, 1100, 2048, 3000, 4096])
@pytest.mark.parametrize("anchored", [False, True], ids=["plain", "anchored"])
def test_resident_kernel_each_chunking(device, dtype, d, anchored):
    """Every chunking of the resident kernel, a bucket of two tensors whose rows are not a
    multiple of its 8-, 4- or 2-row block, one of them a column slice (row stride > d), soft
    weights; each tier at its largest k for the dtype (resident_max_k). On a GPU this runs
    the compiled tiles, as the compile check builds them."""
    from gradproj.kernels import project as P

    elsize = torch.empty((), dtype=dtype).element_size()
    k = P.resident_max_k(P.resident_tiles(d), elsize)
    assert P._row_tiles(90, elsize, d, k, 1, anchored).resident
    assert not P._row_tiles(90, elsize, d, k + 1, 1, anchored).resident
    gen = torch.Generator().manual_seed(d + 7 * anchored)
    wide = torch.randn(13, d + 24, generator=gen).to(dtype=dtype, device=device)
    wide_in = wide.clone()
    grads = [wide[:, 16 : 16 + d], torch.randn(6, d, generator=gen).to(dtype=dtype, device=device)]
    u = orthonormal(d, k, device=device, seed=d)
    w = torch.rand(k, generator=gen).to(device)
    _check_resident_bucket(grads, u, w, k, "input", anchored, gen)
    # the columns around the slice are not the slice's: untouched
    assert torch.equal(wide[:, :16], wide_in[:, :16])
    assert torch.equal(wide[:, 16 + d :], wide_in[:, 16 + d :])


@pytest.mark.skipif(not TRITON_DEVICES, reason="Triton cannot run here")
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("d", [200, 320, 500, 768, 1024, 1280])
@pytest.mark.parametrize("anchored", [False, True], ids=["plain", "anchored"])
def test_resident_kernel_transposed_views(device, dtype, d, anchored):
    """side="output": the resident kernel's 8- or 16-row blocks over transposed views, a
    bucket of two weights whose widths (the views' rows: 24 and 40, whole 16-byte vectors)
    are not multiples of the block, one of them a row slice of a taller tensor, soft
    weights, the largest k (D <= 768: 8 fp32, 4 16-bit; the 512-column tiles beyond: 8
    and 4)."""
    from gradproj.kernels import project as P

    elsize = torch.empty((), dtype=dtype).element_size()
    k = (P.RESIDENT_OUTPUT_MAX_K if d <= 768 else P.RESIDENT_OUTPUT_WIDE_MAX_K)[elsize]
    vec = 16 // elsize
    assert P._row_tiles(90, elsize, d, k, 0, anchored, vec).resident
    assert not P._row_tiles(90, elsize, d, k + 1, 0, anchored, vec).resident
    gen = torch.Generator().manual_seed(d + 11 * anchored)
    tall = torch.randn(d + 24, 24, generator=gen).to(dtype=dtype, device=device)
    tall_in = tall.clone()
    grads = [tall[16 : 16 + d], torch.randn(d, 40, generator=gen).to(dtype=dtype, device=device)]
    contig, vec = P._row_layout([g.T for g in grads], d)
    assert (contig, vec) == (0, 16 // grads[0].element_size())  # the resident kernel's case
    u = orthonormal(d, k, device=device, seed=d)
    w = torch.rand(k, generator=gen).to(device)
    _check_resident_bucket(grads, u, w, k, "output", anchored, gen)
    # the rows around the slice are not the slice's: untouched
    assert torch.equal(tall[:16], tall_in[:16])
    assert torch.equal(tall[16 + d :], tall_in[16 + d :])


# ------------------------------------------------------------------ dispatch


def test_select_prefers_fast_backends_and_honours_overrides(monkeypatch):
    cpu = torch.device("cpu")
    auto = backends.select("project_bucket_", cpu, torch.float32)
    assert auto.name in ("cpp", "reference")  # never the interpreter automatically
    assert backends.select("project_bucket_", cpu, torch.float64).name == "reference"
    monkeypatch.setenv("GRADPROJ_BACKEND", "reference")
    assert backends.select("project_bucket_", cpu, torch.float32).name == "reference"
    with pytest.raises(ValueError, match="GRADPROJ_BACKEND='nope'"):
        monkeypatch.setenv("GRADPROJ_BACKEND", "nope")
        backends.select("project_bucket_", cpu, torch.float32)
    monkeypatch.delenv("GRADPROJ_BACKEND")
    with pytest.raises(ValueError, match="backend='nope': unknown backend"):
        gradproj.project_(torch.randn(2, 3), orthonormal(3, 1), backend="nope")
    with pytest.raises(ValueError, match=r"backend='triton'.*float64"):
        gradproj.project_(
            torch.randn(2, 3, dtype=torch.float64), orthonormal(3, 1), backend="triton"
        )


# ------------------------------------------------------------------ fuzz


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 70),
    k_frac=st.floats(0.0, 1.0),
    side=st.sampled_from(["input", "output", "flat"]),
    dtype=st.sampled_from(KERNEL_DTYPES),
    soft=st.booleans(),
    backend=st.sampled_from(sorted({b for _, b in PROJECT})),
    seed=st.integers(0, 2**16),
)
def test_fuzz_against_reference(rows, cols, k_frac, side, dtype, soft, backend, seed):
    gen = torch.Generator().manual_seed(seed)
    scale = 10 ** (6 * torch.rand(1, generator=gen).item() - 3)
    g = (torch.randn(rows, cols, generator=gen) * scale).to(dtype)
    d = R.side_dim(g.shape, side)
    k = round(k_frac * d)
    u = orthonormal(d, k, seed=seed)
    w = torch.rand(k, generator=gen) if soft else None
    out = g.clone()
    gradproj.project_(out, u, side=side, weights=w, backend=backend)
    assert_matches(out, ref64(g, u, side, w), g, k, backend=backend, d=d)


# sm_90's own two-pass tiles: (dtypes, k, side, anchored, (BLOCK_R, BLOCK_D, BLOCK_K, warps))
SM90_TWO_PASS = [
    # 64 < k, contiguous rows, plain: 64-row blocks on 8 warps (k = 129: two chunks of 128);
    # fp32 in 32-column chunks (pass 1 holds a second coefficient tile: _row_tiles)
    ([torch.float32], 100, "input", False, (64, 32, 128, 8)),
    ([torch.float32], 129, "input", False, (64, 32, 128, 8)),
    ([torch.bfloat16, torch.float16], 100, "input", False, (64, 64, 128, 8)),
    ([torch.bfloat16, torch.float16], 129, "input", False, (64, 64, 128, 8)),
    # fp32, 16 < k <= 32: 64 rows of 32 columns on 4 warps, rows or transposed views
    # (anchored rows on 8 warps, two stages: docs/gpu.md #raw-lo)
    ([torch.float32], 32, "input", True, (64, 32, 32, 8)),
    ([torch.float32], 20, "output", False, (64, 32, 32, 4)),
    ([torch.float32], 27, "output", True, (64, 32, 32, 4)),
    # transposed views past RESIDENT_OUTPUT_MAX_K, k <= 16: 64 x 32 at BLOCK_K = 16 (the
    # :output cases of tile_sweep --predict), every dtype, plain or anchored
    ([torch.float32, torch.bfloat16, torch.float16], 12, "output", False, (64, 32, 16, 4)),
    ([torch.bfloat16], 5, "output", True, (64, 32, 16, 4)),
    # contiguous rows, k <= 32 (tile_sweep --predict's winners): 16-bit 64 x 32 at BLOCK_K =
    # 16 (from k = 9: RESIDENT_MAX_K; fp32 rows are resident to 16), 64 x 64 on 8 warps at
    # BLOCK_K = 32, plain or anchored
    ([torch.bfloat16], 12, "input", False, (64, 32, 16, 4)),
    ([torch.float16], 16, "input", True, (64, 32, 16, 4)),
    ([torch.bfloat16, torch.float16], 20, "input", False, (64, 64, 32, 8)),
    ([torch.bfloat16], 24, "input", True, (64, 64, 32, 8)),
    # 16-bit transposed views at BLOCK_K = 32: 64 x 32 on 4 warps, two stages (docs/gpu.md
    # #raw-lo)
    ([torch.bfloat16, torch.float16], 24, "output", False, (64, 32, 32, 4)),
    ([torch.bfloat16], 17, "output", True, (64, 32, 32, 4)),
]
# A bucket of few rows for its device (docs/gpu.md #few-rows, _few_rows_tiles):
# (dtypes, k, side, anchored, tiles, arch)
FEW_ROWS = [
    # sm_90 at BLOCK_K = 16: 64 x 64 on 8 warps; at 32: 16 x 64 on 4 (anchored fp32: 8)
    ([torch.bfloat16], 12, "input", True, (64, 64, 16, 8), 90),
    ([torch.float32], 12, "output", True, (64, 64, 16, 8), 90),
    ([torch.float16], 10, "output", False, (64, 64, 16, 8), 90),
    ([torch.float32, torch.bfloat16], 32, "input", False, (16, 64, 32, 4), 90),
    ([torch.float32], 20, "input", True, (16, 64, 32, 8), 90),
    ([torch.float32, torch.float16], 24, "output", False, (16, 64, 32, 4), 90),
    # sm_80 at BLOCK_K = 16: 16 x 64 on 4 warps
    ([torch.bfloat16], 12, "input", False, (16, 64, 16, 4), 80),
    ([torch.float32], 16, "output", True, (16, 64, 16, 4), 80),
]


@pytest.mark.skipif(not TRITON_DEVICES, reason="Triton cannot run here")
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize(
    ("dtype", "k", "side", "anchored", "tiles", "arch", "few"),
    [(dt, *case, 90, False) for dts, *case in SM90_TWO_PASS for dt in dts]
    + [(dt, *case, True) for dts, *case in FEW_ROWS for dt in dts],
    ids=str,
)
def test_two_pass_kernel_sm90_tiles(
    monkeypatch, device, dtype, k, side, anchored, tiles, arch, few
):
    """The two-pass kernel with sm_90's own tiles (and the few-rows tiles of both archs), in
    the interpreter as such a launch would take them: a bucket whose rows (70 + 5) are not
    multiples of the 64-row block, one of them a slice of a wider tensor, soft weights."""
    from gradproj.kernels import project as P

    d = 200
    gen = torch.Generator().manual_seed(k + 3 * anchored)
    if side == "input":
        wide = torch.randn(70, d + 24, generator=gen).to(dtype=dtype, device=device)
        grads = [wide[:, 16 : 16 + d]]
        grads.append(torch.randn(5, d, generator=gen).to(dtype=dtype, device=device))
        views = grads
    else:  # transposed views: the weights' widths are the views' rows
        wide = torch.randn(d + 24, 72, generator=gen).to(dtype=dtype, device=device)
        grads = [wide[16 : 16 + d]]
        grads.append(torch.randn(d, 8, generator=gen).to(dtype=dtype, device=device))
        views = [g.T for g in grads]
    if device == "cpu":  # the interpreter: take the arch's tiles (on a GPU, its own)
        monkeypatch.setattr(P, "_arch", lambda: arch)
        # 75 rows: few for 4 SMs (FEW_ROWS_PER_SM), many where the SMs are unknown (0)
        monkeypatch.setattr(P, "_sm_count", lambda device: 4 if few else 0)
        contig, vec = P._row_layout(views, d)
        got = P._row_tiles(arch, grads[0].element_size(), d, k, contig, anchored, vec, few)
        assert (got.block_r, got.block_d, got.block_k, got.warps) == tiles
        assert not got.resident and not got.one_pass
    wide_in = wide.clone()
    u = orthonormal(d, k, device=device, seed=k)
    w = torch.rand(k, generator=gen).to(device)
    _check_resident_bucket(grads, u, w, k, side, anchored, gen)
    # what lies around the slice is not the slice's: untouched
    inside = torch.zeros_like(wide, dtype=torch.bool)
    (inside[:, 16 : 16 + d] if side == "input" else inside[16 : 16 + d]).fill_(True)
    assert torch.equal(wide[~inside], wide_in[~inside])
