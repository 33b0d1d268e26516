"""Property fuzz of the public in-place ops: a right answer or a clean refusal, never a wrong one.

For every generated call of ``project_``, ``anchor`` + ``project_anchored_`` and
``surgery_`` (backends ``"reference"``, ``"cpp"``, ``"triton"`` and the CUDA kernels
through the emulator of the tests, ``"cuda-emulated"``, on CPU) the test
first decides, from the inputs alone, whether the call is valid, and then checks that

* a valid call succeeds; every written tensor equals the float64 reference
  computed from a copy taken before the call (tolerances of
  ``tests/test_project.py`` / ``tests/test_surgery.py``), its version counter
  went up as after a torch in-place op, and every other byte of every input
  buffer (gaps of strided views, neighbours, bases, weights) is unchanged;
* an invalid call raises ``TypeError``/``ValueError``/``RuntimeError`` with a
  message and leaves every input bit-identical (no partial writes).

Inputs are views ``buffer.as_strided(shape, strides, offset)`` of 1-D buffers, so
one case can hold transposed, stepped and padded views, ``expand``-like stride-0
dims, rows that overlap each other, several grads cut from one buffer (overlapping
or interleaved), the same tensor twice, and a basis that aliases a grad. Which
pairs of tensors overlap is decided exactly, by enumerating element addresses.

Validity, decided up front (``Verdict``):

* must raise: a pair the op validates is malformed (basis rows or ``k > d``,
  ``side="input"`` on a 1-D grad, weights of the wrong length or outside
  ``[0, 1]``, a bad anchor, mismatched surgery pair), float64 reaching a backend
  other than the reference, a written tensor whose elements overlap each other,
  or a written tensor sharing an element with any other input the call reads or
  writes;
* may raise or succeed: the same problems in a pair that is skipped anyway
  (``k = 0``, an empty grad, a ``None`` basis), views whose address ranges
  interleave without sharing an element (``G[:, 0::2]`` and ``G[:, 1::2]``),
  strides whose non-overlap a stride test cannot prove, and memory shared by an
  input the op declares mutable but this call only reads (an anchor under hard
  weights, the retain grad of one-sided surgery) with another input;
* everything else must succeed.

Triton runs under ``TRITON_INTERPRET=1`` (tests/conftest.py): 25 small examples a
test, not shrunk. ``FUZZ_EXAMPLES`` sets the count of the others (default 500).

Each case is a frozen dataclass whose repr, with the ``seed`` of its values, is
the reproducer that hypothesis prints for a failure.
"""

from __future__ import annotations

import math
import os
from dataclasses import astuple, dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

import gradproj
from gradproj import backends, ops
from gradproj import reference as R
from gradproj.inplace import may_overlap_internally

from .test_project import HALF_ULP

# FUZZ_EXAMPLES=5000 for a deeper local run; 500 each keeps the file near 2 minutes on 2 cores.
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "500"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

DTYPES = (torch.float32, torch.float32, torch.bfloat16, torch.float16, torch.float64)
BASIS_DTYPES = (torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.float16)
SIDES = ("input", "output", "flat")
INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
ERRORS = (TypeError, ValueError, RuntimeError)


# The Triton interpreter takes 0.1-9 s a call (growing with the shapes): a short run of
# its own on small shapes (``small=True``), and no shrinking, which would spend
# hypothesis' 5 minutes on a failure; the reported example is small already.
TRITON_FUZZ = settings(
    FUZZ,
    max_examples=min(EXAMPLES, 25),
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)


def fuzz_backends(op: str, names=("reference", "cpp", "cuda-emulated")) -> list:
    """``names`` as pytest params, skipped where the backend cannot run ``op`` on CPU here
    or is not registered (``"cuda-emulated"``: tests/conftest.py)."""
    cpu = torch.device("cpu")
    return [
        pytest.param(n)
        if n in backends.registered()
        and backends.get(n).unsupported_reason(op, cpu, torch.float32) is None
        else pytest.param(n, marks=pytest.mark.skip(reason=f"backend {n!r} not runnable"))
        for n in names
    ]


def takes(backend: str, dtype: torch.dtype) -> bool:
    """Whether ``backend`` accepts grads of ``dtype`` (float64: only the reference)."""
    return dtype in backends.get(backend).dtypes


# ------------------------------------------------------------------ layouts


def one_in(n: int):
    """A draw that is True one time in ``n`` and shrinks to False.

    (``integers(0, n - 1) == 0`` would fire far more often: hypothesis favours 0.)
    """
    return lambda draw: draw(st.integers(0, n - 1)) == n // 2


@dataclass(frozen=True)
class View:
    """``buffer.as_strided(shape, strides, offset)``."""

    shape: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int

    @property
    def end(self) -> int:
        """One past the farthest element offset (just ``offset`` when empty)."""
        if 0 in self.shape:
            return self.offset
        return (
            self.offset
            + sum((n - 1) * s for n, s in zip(self.shape, self.strides, strict=True))
            + 1
        )


@st.composite
def views(draw, shape: tuple[int, ...], overlapping: bool = True) -> View:
    """A memory layout for ``shape``: contiguous, permuted/stepped/padded, or self-overlapping."""
    n = len(shape)
    kinds = ["contiguous", "strided", "strided"] + (["expand", "squeeze"] if overlapping else [])
    kind = draw(st.sampled_from(kinds))
    order = list(range(n))[::-1]  # innermost dimension first
    step, pads = 1, [0] * n
    if kind != "contiguous":
        order = draw(st.permutations(range(n)))
        step = draw(st.sampled_from([1, 2, 3]))
        pads = [draw(st.sampled_from([0, 0, 1, 3])) for _ in range(n)]
    strides = [0] * n
    s = step
    for dim, pad in zip(order, pads, strict=True):
        strides[dim] = s
        s = s * max(shape[dim], 1) + pad
    if kind in ("expand", "squeeze") and n:
        dim = draw(st.integers(0, n - 1))
        # expand: stride 0; squeeze: a stride too small for the dims inside it (rows overlap)
        strides[dim] = 0 if kind == "expand" else draw(st.integers(0, max(strides[dim] - 1, 0)))
    return View(tuple(shape), tuple(strides), draw(st.integers(0, 3)))


@st.composite
def shapes(draw, side: str, small: bool = False) -> tuple[int, ...]:
    """1-4 dims (4-D: a conv weight), sizes 1..9 (fewer for more dims), one time in ten
    empty; mostly valid for ``side``."""
    n = draw(st.sampled_from([2, 2, 3, 4, 1] if side == "input" else [1, 2, 2, 3, 4]))
    limit = ({1: 5, 2: 4, 3: 3, 4: 2} if small else {1: 9, 2: 9, 3: 5, 4: 4})[n]
    shape = [draw(st.integers(1, limit)) for _ in range(n)]
    if one_in(10)(draw):
        shape[draw(st.integers(0, n - 1))] = 0
    return tuple(shape)


def ranks(d: int):
    """k for a d-dim side: mostly 1..d, sometimes 0 (nothing to do) or d + 1 (invalid)."""

    @st.composite
    def draw_k(draw) -> int:
        if one_in(16)(draw):
            return d + 1
        if d == 0 or one_in(8)(draw):
            return 0
        return draw(st.integers(1, d))

    return draw_k()


@dataclass(frozen=True)
class Fresh:
    """A tensor in a buffer of its own."""

    dtype: torch.dtype
    view: View


@dataclass(frozen=True)
class Alias:
    """A tensor in slot ``of``'s buffer: the same object, ``.view_as`` of it, or a window."""

    of: int
    how: str  # "same" | "view" | "window"
    view: View | None = None


TensorSpec = Fresh | Alias


def root(specs: list, i: int) -> int:
    """The slot whose buffer slot ``i`` lives in."""
    while isinstance(specs[i], Alias):
        i = specs[i].of
    return i


def spec_view(specs: list, i: int) -> View:
    """The layout of slot ``i`` (following ``same``/``view`` aliases)."""
    s = specs[i]
    while isinstance(s, Alias) and s.how != "window":
        s = specs[s.of]
    return s.view


def spec_dtype(specs: list, i: int) -> torch.dtype:
    return specs[root(specs, i)].dtype


@st.composite
def tensor_specs(draw, shape_st, specs: list, hazards: bool, dtypes=DTYPES) -> TensorSpec:
    """A fresh tensor or, with ``hazards``, (one time in four) an alias of an earlier slot
    of ``specs``, and layouts that may overlap themselves."""
    earlier = [j for j, s in enumerate(specs) if s is not None]
    if hazards and earlier and one_in(4)(draw):
        j = draw(st.sampled_from(earlier))
        how = draw(st.sampled_from(["same", "view", "window", "window", "interleave"]))
        if how in ("same", "view"):
            return Alias(j, how)
        vj = spec_view(specs, j)
        if how == "interleave":  # j's layout shifted by one element: G[:, 1::2] beside G[:, 0::2]
            return Alias(j, "window", View(vj.shape, vj.strides, vj.offset + 1))
        v = draw(views(draw(shape_st)))
        if draw(st.booleans()):  # start past j's last element: disjoint, same buffer
            v = View(v.shape, v.strides, v.offset + vj.end)
        return Alias(j, "window", v)
    return Fresh(draw(st.sampled_from(dtypes)), draw(views(draw(shape_st), hazards)))


# ------------------------------------------------------------------ materializing


def materialize(specs: list, extra_windows: dict[int, list[View]], gen, scale: float):
    """Buffers (keyed by root slot) filled with ``scale``·N(0, 1), and each slot's tensor."""
    need: dict[int, int] = {}
    for i, s in enumerate(specs):
        if s is None:
            continue
        r = root(specs, i)
        if isinstance(s, Fresh) or s.how == "window":
            need[r] = max(need.get(r, 1), s.view.end + 2)
    for r, vs in extra_windows.items():
        for v in vs:
            need[r] = max(need.get(r, 1), v.end + 2)
    buffers = {
        r: (torch.randn(n, generator=gen, dtype=torch.float64) * scale).to(specs[r].dtype)
        for r, n in need.items()
    }
    tensors: list[torch.Tensor | None] = []
    for i, s in enumerate(specs):
        if s is None:
            tensors.append(None)
        elif isinstance(s, Fresh) or s.how == "window":
            tensors.append(
                buffers[root(specs, i)].as_strided(s.view.shape, s.view.strides, s.view.offset)
            )
        elif s.how == "same":
            tensors.append(tensors[s.of])
        else:
            tensors.append(tensors[s.of].view_as(tensors[s.of]))
    return buffers, tensors


def orthonormal64(d: int, k: int, gen) -> torch.Tensor:
    """A float64 (d × k) basis: orthonormal columns when k ≤ d, plain noise otherwise."""
    a = torch.randn(d, k, generator=gen, dtype=torch.float64)
    return torch.linalg.qr(a)[0] if 0 < k <= d else a


# ------------------------------------------------------------------ memory oracle


def addresses(t: torch.Tensor) -> list[int]:
    """Start address of every element of ``t`` (with repeats when elements share memory)."""
    if t.numel() == 0:
        return []
    off = torch.zeros((), dtype=torch.int64)
    for dim, (n, s) in enumerate(zip(t.shape, t.stride(), strict=True)):
        shape = [1] * t.dim()
        shape[dim] = n
        off = off + (torch.arange(n) * s).reshape(shape)
    return (t.data_ptr() + off.reshape(-1) * t.element_size()).tolist()


def byte_set(t: torch.Tensor) -> set[int]:
    es = t.element_size()
    return {a + b for a in addresses(t) for b in range(es)}


def byte_range(t: torch.Tensor) -> tuple[int, int] | None:
    a = addresses(t)
    return None if not a else (min(a), max(a) + t.element_size())


@dataclass
class Role:
    """One tensor the call sees: ``write`` (changed in place), ``read``, or ``inert`` (skipped).

    ``mutable``: declared mutable by the op although this call only reads it (an
    anchor under hard weights, a retain grad of one-sided surgery); sharing memory
    with another live input, or overlapping itself, may then be refused.
    """

    name: str
    tensor: torch.Tensor
    access: str
    mutable: bool = False


@dataclass
class Verdict:
    must: list[str] = field(default_factory=list)  # reasons the call must raise
    may: list[str] = field(default_factory=list)  # reasons it may raise

    def memory(self, roles: list[Role]) -> None:
        """Add the overlap reasons of ``roles`` (exact element sets, then address ranges)."""
        info = [(r, byte_set(r.tensor), byte_range(r.tensor)) for r in roles]
        for r, _, _ in info:
            t = r.tensor
            if r.access == "inert" or t.numel() == 0:
                continue
            dup = len(set(addresses(t))) < t.numel()
            if dup and r.access == "write":
                self.must.append(f"{r.name} overlaps itself")
            elif dup and r.mutable:
                self.may.append(f"{r.name} (read, declared mutable) overlaps itself")
            elif may_overlap_internally(t) and (r.access == "write" or r.mutable):
                self.may.append(f"{r.name}: strides cannot prove its elements distinct")
        for a in range(len(info)):
            for b in range(a + 1, len(info)):
                (ra, sa, ga), (rb, sb, gb) = info[a], info[b]
                if not (sa and sb):
                    continue
                writes = "write" in (ra.access, rb.access)
                mutable = writes or ra.mutable or rb.mutable
                both_live = "inert" not in (ra.access, rb.access)
                shared = not sa.isdisjoint(sb)
                meets = ga[0] < gb[1] and gb[0] < ga[1]
                pair = f"{ra.name} and {rb.name}"
                if shared and writes and both_live:
                    self.must.append(f"{pair} share memory")
                elif shared and mutable and both_live:
                    self.may.append(f"{pair} share memory (read, one declared mutable)")
                elif shared and writes:
                    self.may.append(f"{pair} share memory ({ra.access}/{rb.access})")
                elif meets and mutable and both_live:
                    self.may.append(f"{pair} interleave without sharing an element")


# ------------------------------------------------------------------ checks


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().reshape(-1).view(INT_OF_SIZE[t.element_size()])


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def close(
    name: str,
    out: torch.Tensor,
    ref: torch.Tensor,
    scale: float,
    k: int = 1,
    atol: float = 2e-6,
    backend: str = "",
) -> str | None:
    """``|out − ref| ≤ 1.01·half_ulp·|ref| + (atol + chunk roundings)·scale`` or a message.

    The terms of ``tests/test_project.assert_matches`` (a full ulp for bf16 under the
    Triton interpreter, which truncates); ``scale`` is ``max |x|`` of the input.
    """
    dt = out.dtype
    ulp = HALF_ULP[dt]
    if dt == torch.bfloat16 and backend == "triton":
        ulp *= 2
    extra = max(0, math.ceil(k / 128) - 1) if dt in (torch.bfloat16, torch.float16) else 0
    # rounding near 0 is absolute: half the subnormal spacing (fp16: 3e-8; matters at scale 1e-2)
    subnormal = 0.5 * torch.finfo(dt).tiny * torch.finfo(dt).eps
    o = out.double()
    diff = (o - ref).abs()
    bound = 1.01 * ulp * ref.abs() + (atol + 1.01 * extra * ulp) * scale + subnormal
    # NaN/inf propagate (a NaN weight written into a grad's buffer): the same value matches
    bad = ~((diff <= bound) | (o == ref) | (o.isnan() & ref.isnan()))
    if not bad.any():
        return None
    idx = tuple(bad.nonzero()[0].tolist())
    return (
        f"{name}: {int(bad.sum())} of {bad.numel()} elements out of tolerance ({dt}); first at "
        f"{list(idx)}: got {out[idx].item()!r}, float64 reference {ref[idx].item()!r}, "
        f"bound {bound[idx].item():.3g}"
    )


def amax(*ts: torch.Tensor) -> float:
    """The largest finite ``|x|`` over ``ts`` (0 when there is none): the error scale."""
    finite = [t.double().abs().nan_to_num(0.0, 0.0, 0.0) for t in ts if t.numel()]
    return max([t.max().item() for t in finite] + [0.0])


def basis_scale(u: torch.Tensor) -> float:
    """``max(1, max |U|)``: an orthonormal basis has entries ≤ 1, but one that shares a
    buffer with a weight or anchor written after it (a read-read alias, valid) does not,
    and the rounding of ``U c`` grows with it."""
    return max(1.0, amax(u))


@dataclass
class Inputs:
    """Everything a call can touch, snapshotted before it runs."""

    buffers: dict[str, torch.Tensor]  # every storage the inputs live in

    def __post_init__(self) -> None:
        self.before = {k: v.detach().clone() for k, v in self.buffers.items()}

    def changed(self) -> list[str]:
        return [k for k, v in self.buffers.items() if not bit_equal(v, self.before[k])]

    def untouched_outside(self, written: list[torch.Tensor]) -> list[str]:
        """Buffers with a changed byte outside the written tensors' elements."""
        out = []
        for key, buf in self.buffers.items():
            keep = torch.ones(buf.numel(), dtype=torch.bool)
            es, base = buf.element_size(), buf.data_ptr()
            for t in written:
                for a in addresses(t):
                    i, rem = divmod(a - base, es)
                    if rem == 0 and 0 <= i < buf.numel():
                        keep[i] = False
            if not torch.equal(bits(buf)[keep], bits(self.before[key])[keep]):
                out.append(key)
        return out


def run_checked(call, verdict: Verdict, inputs: Inputs, check_success) -> None:
    """Run ``call``; a valid call must succeed and pass ``check_success``, an invalid one
    must raise cleanly and change nothing."""
    event("must raise" if verdict.must else "may raise" if verdict.may else "valid")
    try:
        call()
    except ERRORS as exc:
        event("raised")
        assert str(exc), f"{type(exc).__name__} raised without a message"
        assert verdict.must or verdict.may, (
            f"unjustified error on a valid call: {type(exc).__name__}: {exc}"
        )
        changed = inputs.changed()
        assert not changed, (
            f"raised {type(exc).__name__} ({exc}) after changing inputs {changed} "
            f"(must-raise reasons: {verdict.must}; may: {verdict.may})"
        )
        return
    assert not verdict.must, f"silently accepted an invalid call: {verdict.must}"
    event("succeeded")
    check_success()


def check_versions(written: list[tuple[str, torch.Tensor, int]]) -> None:
    stale = [name for name, t, v0 in written if not t._version > v0]
    assert not stale, f"version counter not bumped for written tensors {stale}"


# ------------------------------------------------------------------ project_ / project_anchored_


@dataclass(frozen=True)
class Basis:
    """A (rows × k) basis: orthonormal values, in a buffer of its own or in slot ``in_grad``'s."""

    rows: int
    k: int
    dtype: torch.dtype
    view: View
    in_grad: int | None = None  # alias: lives in the buffer of this grad slot


@dataclass(frozen=True)
class SharedBasis:
    of: int  # the same basis object as slot ``of``


@dataclass(frozen=True)
class Weights:
    """``weights=``: a list, or a (strided) tensor in its own buffer or in slot ``in_grad``'s."""

    k: int
    form: str  # "float32" | "float64" | "bfloat16" | "float16" | "list"
    bad: str | None  # None, or the out-of-range value put at index 0: "-0.25" | "1.5" | "nan"
    view: View | None = None
    in_grad: int | None = None


@dataclass(frozen=True)
class AnchorIn:
    """An anchor cut from the buffer of grad slot ``of`` (contiguous, at ``offset``)."""

    of: int
    offset: int


@dataclass(frozen=True)
class ProjectCase:
    side: str
    grads: tuple[TensorSpec | None, ...]
    bases: tuple[Basis | SharedBasis | None, ...]
    weights: Weights | None
    anchors: tuple[str | AnchorIn | None, ...]  # project_anchored_ only: "anchor" | "share:j" | ...
    names: bool
    single: bool  # one grad passed as a tensor, not a list
    scale: float
    seed: int


@st.composite
def project_cases(draw, anchored: bool = False, small: bool = False) -> ProjectCase:
    side = draw(st.sampled_from(SIDES))
    n = draw(st.integers(1, 4))
    hazards = draw(st.booleans())  # half the cases share or overlap memory somewhere
    grads: list = []
    for _ in range(n):
        grads.append(
            None if one_in(8)(draw) else draw(tensor_specs(shapes(side, small), grads, hazards))
        )
    dims = [
        None if g is None else R.side_dim(spec_view(grads, i).shape, side)
        for i, g in enumerate(grads)
    ]
    has_basis = [g is not None and not one_in(8)(draw) for g in grads]
    live = [d for d, b in zip(dims, has_basis, strict=True) if b]
    weighted = draw(st.booleans())
    k_common = None
    if weighted and live:
        top = min(live)
        k_common = draw(ranks(top))
    bases: list = []
    for i, g in enumerate(grads):
        if g is None:
            # a None grad may still come with a basis (any shape: it is never looked at)
            bases.append(
                None if draw(st.booleans()) else Basis(3, 1, torch.float32, View((3, 1), (1, 1), 0))
            )
            continue
        if not has_basis[i]:
            bases.append(None)
            continue
        d = dims[i]
        shared = [
            j
            for j in range(i)
            if isinstance(bases[j], Basis) and bases[j].rows == d and grads[j] is not None
        ]
        if shared and one_in(5)(draw):
            bases.append(SharedBasis(draw(st.sampled_from(shared))))
            continue
        rows = d
        if one_in(32)(draw):
            rows = d + draw(st.sampled_from([-1, 1]))
            rows = max(rows, 0)
        if k_common is not None:
            k = k_common
        else:
            k = draw(ranks(d))
        view = draw(views((rows, k), overlapping=False))
        in_grad = None
        dtype = draw(st.sampled_from(BASIS_DTYPES))
        grad_slots = [j for j, s in enumerate(grads) if s is not None]
        if hazards and one_in(5)(draw):  # a basis cut from a grad's buffer
            in_grad = draw(st.sampled_from(grad_slots))
            dtype = spec_dtype(grads, in_grad)
        bases.append(Basis(rows, k, dtype, view, in_grad))
    weights = None
    if weighted:
        k = k_common if k_common is not None else draw(st.integers(0, 4))
        if one_in(20)(draw):
            k += 1  # wrong length
        form = draw(
            st.sampled_from(["float32", "float32", "float64", "bfloat16", "float16", "list"])
        )
        bad = draw(st.sampled_from([None] * 9 + ["-0.25", "1.5", "nan"])) if k else None
        view = in_grad = None
        if form != "list":
            view = draw(views((k,), overlapping=False))
            slots = [j for j, g in enumerate(grads) if g is not None]
            if hazards and slots and one_in(4)(draw):  # weights cut from a grad's buffer
                in_grad = draw(st.sampled_from(slots))
                form = str(spec_dtype(grads, in_grad)).removeprefix("torch.")
        weights = Weights(k, form, bad, view, in_grad)
    anchors: tuple = ()
    if anchored:
        choice = []
        for i in range(n):
            if grads[i] is None or bases[i] is None:
                choice.append(None)
                continue
            kinds = ["anchor"] * 12 + ["wrong_dtype", "transposed", "none"]
            if i:
                kinds += ["share:" + str(draw(st.integers(0, i - 1)))] * 2
            kind = draw(st.sampled_from(kinds))
            want = torch.float64 if spec_dtype(grads, i) == torch.float64 else torch.float32
            slots = [
                j for j, g in enumerate(grads) if g is not None and spec_dtype(grads, j) == want
            ]
            if hazards and slots and one_in(4)(draw):  # an anchor cut from a grad's buffer
                kind = AnchorIn(draw(st.sampled_from(slots)), draw(st.integers(0, 6)))
            choice.append(kind)
        anchors = tuple(choice)
    return ProjectCase(
        side=side,
        grads=tuple(grads),
        bases=tuple(bases),
        weights=weights,
        anchors=anchors,
        names=draw(st.booleans()),
        single=n == 1 and draw(st.booleans()),
        scale=draw(st.sampled_from([1.0, 1.0, 1e-3, 1e3])),
        seed=draw(st.integers(0, 2**16)),
    )


def anchor_view(case: ProjectCase, i: int) -> View:
    """The contiguous ``(rows, k)`` layout of an ``AnchorIn`` anchor of slot ``i``."""
    b = case.bases[i]
    k = (case.bases[b.of] if isinstance(b, SharedBasis) else b).k
    rows = ops.rows_of(spec_view(list(case.grads), i).shape, case.side)
    return View((rows, k), (k, 1), case.anchors[i].offset)


def build_project(case: ProjectCase):
    """Tensors of ``case``: grads, bases, weights (and a float64 copy), ``AnchorIn`` windows."""
    gen = torch.Generator().manual_seed(case.seed)
    specs = list(case.grads)
    windows: dict[int, list[View]] = {}
    for b in case.bases:
        if isinstance(b, Basis) and b.in_grad is not None:
            windows.setdefault(root(specs, b.in_grad), []).append(b.view)
    if case.weights is not None and case.weights.in_grad is not None:
        windows.setdefault(root(specs, case.weights.in_grad), []).append(case.weights.view)
    for i, a in enumerate(case.anchors):
        if isinstance(a, AnchorIn):
            windows.setdefault(root(specs, a.of), []).append(anchor_view(case, i))
    buffers, grads = materialize(specs, windows, gen, case.scale)
    storage = {f"buffer of grads[{r}]": buf for r, buf in buffers.items()}
    bases: list[torch.Tensor | None] = []
    for i, b in enumerate(case.bases):
        if b is None:
            bases.append(None)
        elif isinstance(b, SharedBasis):
            bases.append(bases[b.of])
        else:
            if b.in_grad is not None:
                buf = buffers[root(specs, b.in_grad)]
            else:
                buf = torch.zeros(b.view.end + 1, dtype=b.dtype)
                storage[f"buffer of basis {i}"] = buf
            u = buf.as_strided(b.view.shape, b.view.strides, b.view.offset)
            u.copy_(orthonormal64(b.rows, b.k, gen).to(b.dtype))
            bases.append(u)
    w = w64 = None
    if case.weights is not None:
        spec = case.weights
        vals = torch.rand(spec.k, generator=gen, dtype=torch.float64)
        if spec.k > 1:
            vals[-1] = 1.0  # the ends of [0, 1] are valid
        if spec.k > 2:
            vals[-2] = 0.0
        if spec.bad is not None:
            vals[0] = float(spec.bad)
        if spec.form == "list":
            w = vals.tolist()
            w64 = torch.tensor(w, dtype=torch.float32).double()
        else:
            if spec.in_grad is not None:
                buf = buffers[root(specs, spec.in_grad)]
            else:
                buf = storage["buffer of weights"] = torch.zeros(
                    spec.view.end + 1, dtype=getattr(torch, spec.form)
                )
            w = buf.as_strided(spec.view.shape, spec.view.strides, spec.view.offset)
            w.copy_(vals.to(w.dtype))
            w64 = w.double()
    anchor_windows = {
        i: buffers[root(specs, a.of)].as_strided(*astuple(anchor_view(case, i)))
        for i, a in enumerate(case.anchors)
        if isinstance(a, AnchorIn)
    }
    return grads, bases, w, w64, storage, anchor_windows


def project_verdict(
    case: ProjectCase, grads, bases, w, backend: str, anchors=None
) -> tuple[Verdict, list[int]]:
    """Decide validity; return it with the slots the call writes."""
    v = Verdict()
    side = case.side
    active = [
        i
        for i, (g, u) in enumerate(zip(grads, bases, strict=True))
        if g is not None and u is not None
    ]
    written = []
    for i in active:
        g, u = grads[i], bases[i]
        d = R.side_dim(g.shape, side)
        problems = []
        if side == "input" and g.dim() < 2:
            problems.append(f"grads[{i}] is {g.dim()}-D with side='input'")
        if u.shape[0] != d:
            problems.append(f"basis of grads[{i}] has {u.shape[0]} rows, needs {d}")
        if u.shape[1] > d:
            problems.append(f"basis of grads[{i}] has k={u.shape[1]} > d={d}")
        if case.weights is not None:
            if case.weights.k != u.shape[1]:
                problems.append(
                    f"weights have length {case.weights.k}, basis of grads[{i}] k={u.shape[1]}"
                )
            elif case.weights.bad is not None:
                problems.append(f"weights hold {case.weights.bad}")
        v.must += problems
        if not problems and g.numel() and u.shape[1]:
            written.append(i)
    for i in active:
        g = grads[i]
        if i not in written and g.numel() and may_overlap_internally(g):
            v.may.append(f"grads[{i}] (skipped: k = 0) may overlap itself")
    if not active and case.weights is not None and case.weights.bad is not None:
        v.may.append(f"weights hold {case.weights.bad} (no grad uses them)")
    for i in active:
        if not takes(backend, grads[i].dtype):
            why = f"grads[{i}] is {grads[i].dtype} on backend {backend}"
            (v.must if i in written else v.may).append(why)
    roles = []
    for i, g in enumerate(grads):
        if g is not None:
            roles.append(Role(f"grads[{i}]", g, "write" if i in written else "inert"))
    seen: dict[int, Role] = {}
    for i, u in enumerate(bases):
        if u is None or grads[i] is None:
            continue
        role = seen.get(id(u))
        if role is None:
            role = seen[id(u)] = Role(f"basis of grads[{i}]", u, "inert")
            roles.append(role)
        if i in written:
            role.access = "read"
    if isinstance(w, torch.Tensor):
        roles.append(Role("weights", w, "read" if written else "inert"))
    if anchors is not None:
        soft = case.weights is not None
        for i in written:
            c = anchors[i]
            if isinstance(c, torch.Tensor) and id(c) not in seen:
                seen[id(c)] = Role(f"anchors[{i}]", c, "write" if soft else "read", mutable=True)
                roles.append(seen[id(c)])
            elif isinstance(c, torch.Tensor):
                other = seen[id(c)]
                if soft:
                    v.must.append(f"anchors[{i}] is {other.name} (both written)")
                else:
                    v.may.append(f"anchors[{i}] is {other.name} (declared mutable)")
    v.memory(roles)
    return v, written


@pytest.mark.parametrize("backend", fuzz_backends("project_bucket_"))
@FUZZ
@given(case=project_cases())
def test_project_fuzz(backend, case):
    check_project(backend, case)


@pytest.mark.parametrize("backend", fuzz_backends("project_bucket_", ["triton"]))
@TRITON_FUZZ
@given(case=project_cases(small=True))
def test_project_fuzz_triton(backend, case):
    check_project(backend, case)


def check_project(backend: str, case: ProjectCase) -> None:
    grads, bases, w, w64, storage, _ = build_project(case)
    verdict, written = project_verdict(case, grads, bases, w, backend)
    inputs = Inputs(storage)
    g0 = [None if g is None else g.detach().clone() for g in grads]
    u0 = [None if u is None else u.detach().clone() for u in bases]
    v0 = [None if g is None else g._version for g in grads]
    names = [f"p{i}" for i in range(len(grads))] if case.names else None

    def call():
        g, u = (grads[0], bases[0]) if case.single else (grads, bases)
        gradproj.project_(g, u, side=case.side, weights=w, backend=backend, names=names)

    def check():
        errors = []
        for i in written:
            ref = R.project(g0[i].double(), u0[i].double(), side=case.side, weights=w64)
            errors.append(
                close(
                    f"grads[{i}]",
                    grads[i],
                    ref,
                    amax(g0[i]) * basis_scale(u0[i]) ** 2,
                    bases[i].shape[1],
                    backend=backend,
                )
            )
        errors = [e for e in errors if e]
        assert not errors, "wrong result: " + "; ".join(errors)
        touched = inputs.untouched_outside([grads[i] for i in written])
        assert not touched, f"bytes outside the written grads changed in {touched}"
        check_versions([(f"grads[{i}]", grads[i], v0[i]) for i in written])

    run_checked(call, verdict, inputs, check)


def make_anchor(p: torch.Tensor, u: torch.Tensor, side: str, gen) -> torch.Tensor:
    """``ops.anchor`` of ``p`` moved by a step of 0.1·N(0, 1) (checked against the reference).

    The anchor belongs to ``p − 0.1·n``, as if ``p`` had taken one update since.
    """
    dt = torch.float64 if p.dtype == torch.float64 else torch.float32
    rows = ops.rows_of(p.shape, side)
    if (
        u.shape[0] != R.side_dim(p.shape, side)
        or u.shape[1] > u.shape[0]
        or (side == "input" and p.dim() < 2)
    ):
        return torch.zeros(rows, u.shape[1], dtype=dt)
    if p.numel() == 0:  # (the reference's reshape(rows, -1) cannot infer -1 with 0 rows)
        ref = torch.zeros(rows, u.shape[1], dtype=torch.float64)
    else:
        ref = R.anchor(p.double(), u.double(), side=side)
    try:
        c = ops.anchor(p, u, side=side)
    except ERRORS:
        # only a self-overlapping p (readable, but not a valid in-place target) may be refused
        assert may_overlap_internally(p), (
            f"anchor() refused a valid param of shape {tuple(p.shape)}"
        )
        c = ref.to(dt)
    else:
        assert c.dtype == dt and tuple(c.shape) == (rows, u.shape[1])
        # fp32 dot products of length d: the error grows like √d (measured 1.6e-7·|c| at d = 200)
        scale = amax(p) * math.sqrt(u.shape[0]) * basis_scale(u)
        err = close("anchor()", c, ref, scale, atol=2e-6)
        assert err is None, err
    noise = torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.1 * amax(p)
    return (c.double() - R.anchor(noise, u.double(), side=side)).to(dt) if p.numel() else c


@pytest.mark.parametrize("backend", fuzz_backends("project_anchored_bucket_"))
@FUZZ
@given(case=project_cases(anchored=True))
def test_project_anchored_fuzz(backend, case):
    check_project_anchored(backend, case)


@pytest.mark.parametrize("backend", fuzz_backends("project_anchored_bucket_", ["triton"]))
@TRITON_FUZZ
@given(case=project_cases(anchored=True, small=True))
def test_project_anchored_fuzz_triton(backend, case):
    check_project_anchored(backend, case)


def check_project_anchored(backend: str, case: ProjectCase) -> None:
    params, bases, w, w64, storage, windows = build_project(case)
    gen = torch.Generator().manual_seed(case.seed + 1)
    anchors: list = []
    for i, kind in enumerate(case.anchors):
        if kind is None or kind == "none":
            anchors.append(None)
        elif isinstance(kind, AnchorIn):
            c = make_anchor(params[i], bases[i], case.side, gen)
            if c.shape == windows[i].shape:
                windows[i].copy_(c.to(windows[i].dtype))
                c = windows[i]
            anchors.append(c)
        elif kind.startswith("share:"):  # (a fresh anchor where the shapes differ)
            j = int(kind.split(":")[1])
            c = anchors[j]
            good = isinstance(c, torch.Tensor) and tuple(c.shape) == (
                ops.rows_of(params[i].shape, case.side),
                bases[i].shape[1],
            )
            anchors.append(c if good else make_anchor(params[i], bases[i], case.side, gen))
        else:
            c = make_anchor(params[i], bases[i], case.side, gen)
            if kind == "wrong_dtype":
                c = c.to(torch.float32 if c.dtype == torch.float64 else torch.float64)
            elif kind == "transposed":
                c = c.T.contiguous().T
            anchors.append(c)
    for i, c in enumerate(anchors):
        if isinstance(c, torch.Tensor) and not any(c is anchors[j] for j in range(i)):
            if i not in windows or c is not windows[i]:  # (windows live in a grad's buffer)
                storage[f"anchors[{i}]"] = c
    verdict, written = project_verdict(case, params, bases, w, backend, anchors)
    for i in written:
        c, p = anchors[i], params[i]
        dt = torch.float64 if p.dtype == torch.float64 else torch.float32
        expected = (ops.rows_of(p.shape, case.side), bases[i].shape[1])
        if not isinstance(c, torch.Tensor):
            verdict.must.append(f"anchors[{i}] is {type(c).__name__}")
        elif c.dtype != dt or tuple(c.shape) != expected or not c.is_contiguous():
            verdict.must.append(f"anchors[{i}] is a {c.dtype} {tuple(c.shape)} {c.stride()} tensor")
    inputs = Inputs(storage)
    p0 = [None if p is None else p.detach().clone() for p in params]
    u0 = [None if u is None else u.detach().clone() for u in bases]
    c0 = [c.clone() if isinstance(c, torch.Tensor) else None for c in anchors]
    v0 = [None if p is None else p._version for p in params]
    cv0 = [c._version if isinstance(c, torch.Tensor) else None for c in anchors]
    names = [f"p{i}" for i in range(len(params))] if case.names else None

    def call():
        p, u = (params[0], bases[0]) if case.single else (params, bases)
        ops.project_anchored_(
            p, anchors, u, side=case.side, weights=w, backend=backend, names=names
        )

    def check():
        errors = []
        for i in written:
            p_ref, c_ref = R.project_anchored(
                p0[i].double(), c0[i].double(), u0[i].double(), side=case.side, weights=w64
            )
            scale = amax(p0[i], c0[i]) * basis_scale(u0[i]) ** 2
            errors.append(
                close(f"params[{i}]", params[i], p_ref, scale, bases[i].shape[1], backend=backend)
            )
            if w is None:
                if not bit_equal(anchors[i], c0[i]):
                    errors.append(f"anchors[{i}] changed under hard weights")
            else:
                errors.append(close(f"anchors[{i}]", anchors[i], c_ref, scale))
        errors = [e for e in errors if e]
        assert not errors, "wrong result: " + "; ".join(errors)
        written_t = [params[i] for i in written]
        if w is not None:
            written_t += [anchors[i] for i in written]
        touched = inputs.untouched_outside(written_t)
        assert not touched, f"bytes outside the written params/anchors changed in {touched}"
        stale = [(f"params[{i}]", params[i], v0[i]) for i in written]
        if w is not None:
            stale += [(f"anchors[{i}]", anchors[i], cv0[i]) for i in written]
        check_versions(stale)

    run_checked(call, verdict, inputs, check)


# ------------------------------------------------------------------ surgery_


@dataclass(frozen=True)
class SurgeryCase:
    # one spec list interleaved: g_unlearn[i] is slot 2i, g_retain[i] slot 2i + 1 (``Alias.of``)
    unlearn: tuple[TensorSpec | None, ...]
    retain: tuple[TensorSpec | None, ...]
    strength: float | str  # a float, or "tensor"/"bool" (invalid types)
    variant: str
    symmetric: bool
    conflict: tuple[bool, ...]
    single: bool  # one pair passed as two tensors, not lists
    scale: float
    seed: int


@st.composite
def surgery_cases(draw, small: bool = False) -> SurgeryCase:
    n = draw(st.integers(1, 4))
    hazards = draw(st.booleans())
    shape_st = shapes("flat", small)  # surgery pairs any shape
    specs: list = []  # unlearn i at slot 2i, retain i at slot 2i + 1
    for _ in range(n):
        u = None if one_in(10)(draw) else draw(tensor_specs(shape_st, specs, hazards))
        specs.append(u)
        if u is None or one_in(10)(draw):
            r = None if draw(st.booleans()) else draw(tensor_specs(shape_st, specs, hazards))
        else:
            # mostly a partner of the same shape and dtype (fresh, or an alias of anything)
            shape = spec_view(specs, len(specs) - 1).shape
            dtype = spec_dtype(specs, len(specs) - 1)
            if one_in(20)(draw):
                shape = draw(shape_st)
            if one_in(20)(draw):
                dtype = draw(st.sampled_from(DTYPES))
            r = draw(tensor_specs(st.just(shape), specs, hazards, dtypes=(dtype,)))
        specs.append(r)
    strength = draw(st.floats(0.0, 2.0, allow_nan=False))
    if one_in(30)(draw):
        strength = draw(st.sampled_from(["tensor", "bool"]))
    variant = draw(st.sampled_from(["projection", "cosine"] * 10 + ["pcgrad"]))
    return SurgeryCase(
        unlearn=tuple(specs[0::2]),
        retain=tuple(specs[1::2]),
        strength=strength,
        variant=variant,
        symmetric=draw(st.booleans()),
        conflict=tuple(draw(st.booleans()) for _ in range(n)),
        single=n == 1 and draw(st.booleans()),
        scale=draw(st.sampled_from([1.0, 1.0, 1e-2, 1e2])),
        seed=draw(st.integers(0, 2**16)),
    )


@pytest.mark.parametrize("backend", fuzz_backends("surgery_bucket_"))
@FUZZ
@given(case=surgery_cases())
def test_surgery_fuzz(backend, case):
    check_surgery(backend, case)


@pytest.mark.parametrize("backend", fuzz_backends("surgery_bucket_", ["triton"]))
@TRITON_FUZZ
@given(case=surgery_cases(small=True))
def test_surgery_fuzz_triton(backend, case):
    check_surgery(backend, case)


def check_surgery(backend: str, case: SurgeryCase) -> None:
    gen = torch.Generator().manual_seed(case.seed)
    specs = [s for pair in zip(case.unlearn, case.retain, strict=True) for s in pair]
    buffers, ts = materialize(specs, {}, gen, case.scale)
    us, rs = ts[0::2], ts[1::2]
    n = len(us)
    active = [i for i in range(n) if us[i] is not None and rs[i] is not None]
    v = Verdict()
    pairs_ok = []
    for i in active:
        u, r = us[i], rs[i]
        if u.shape != r.shape:
            v.must.append(f"pair {i}: shapes {tuple(u.shape)} and {tuple(r.shape)}")
        elif u.dtype != r.dtype:
            v.must.append(f"pair {i}: dtypes {u.dtype} and {r.dtype}")
        else:
            pairs_ok.append(i)
    if case.variant not in R.SURGERY_VARIANTS:
        v.must.append(f"variant {case.variant!r}")
    if isinstance(case.strength, str):
        v.must.append(f"strength is a {case.strength}")
    written = [i for i in pairs_ok if us[i].numel()]
    v.must += [
        f"pair {i} is {us[i].dtype} on backend {backend}"
        for i in written
        if not takes(backend, us[i].dtype)
    ]
    # values: g_r = ±0.5·g_u + 0.3·noise (a chosen sign of g_u·g_r) where memory allows
    for i in written:
        u, r = us[i], rs[i]
        if byte_set(u).isdisjoint(byte_set(r)) and len(set(addresses(r))) == r.numel():
            noise = torch.randn(r.shape, generator=gen, dtype=torch.float64) * case.scale
            sign = -1.0 if case.conflict[i] else 1.0
            r.copy_((sign * 0.5 * u.double() + 0.3 * noise).to(r.dtype))
    roles = []
    for i in range(n):
        live = i in written
        if us[i] is not None:
            roles.append(Role(f"g_unlearn[{i}]", us[i], "write" if live else "inert"))
        if rs[i] is not None:
            access = ("write" if case.symmetric else "read") if live else "inert"
            roles.append(Role(f"g_retain[{i}]", rs[i], access, mutable=True))
    v.memory(roles)

    storage = {f"buffer of slot {r}": buf for r, buf in buffers.items()}
    inputs = Inputs(storage)
    u0 = [None if t is None else t.detach().clone() for t in us]
    r0 = [None if t is None else t.detach().clone() for t in rs]
    uv0 = [None if t is None else t._version for t in us]
    rv0 = [None if t is None else t._version for t in rs]
    strength = {"tensor": torch.tensor(1.0), "bool": True}.get(case.strength, case.strength)

    def call():
        gradproj.surgery_(
            us[0] if case.single else us,
            rs[0] if case.single else rs,
            strength=strength,
            variant=case.variant,
            symmetric=case.symmetric,
            backend=backend,
        )

    def check():
        errors = []
        for i in written:
            ref_u, ref_r = R.surgery(
                u0[i].double(),
                r0[i].double(),
                strength=strength,
                variant=case.variant,
                symmetric=case.symmetric,
            )
            scale = amax(u0[i], r0[i], ref_u - u0[i].double(), ref_r - r0[i].double())
            uu, rr = u0[i].double().norm(), r0[i].double().norm()
            d = (u0[i].double() * r0[i].double()).sum()
            borderline = abs(d.item()) <= 1e-4 * (uu * rr).item()  # fp32 may see the other sign
            pairs = [(f"g_unlearn[{i}]", us[i], ref_u, u0[i])]
            if case.symmetric:
                pairs.append((f"g_retain[{i}]", rs[i], ref_r, r0[i]))
            for name, out, ref, before in pairs:
                err = close(name, out, ref, scale, atol=1e-5, backend=backend)
                if err and not (borderline and bit_equal(out, before)):
                    errors.append(err)
        errors = [e for e in errors if e]
        assert not errors, "wrong result: " + "; ".join(errors)
        written_t = [us[i] for i in written] + ([rs[i] for i in written] if case.symmetric else [])
        touched = inputs.untouched_outside(written_t)
        assert not touched, f"bytes outside the written grads changed in {touched}"
        stale = [(f"g_unlearn[{i}]", us[i], uv0[i]) for i in written]
        if case.symmetric:
            stale += [(f"g_retain[{i}]", rs[i], rv0[i]) for i in written]
        check_versions(stale)

    run_checked(call, v, inputs, check)
