"""The compiled extension ``gradproj._C``: lazy loading, fake kernels, bucket adapters.

``gradproj._C`` registers torch ops (``torch.ops.gradproj.*``, schemas in
``csrc/op_schemas.h``) with CPU kernels (``csrc/cpu/``) and, when built with CUDA,
CUDA kernels (``csrc/cuda/``). Nothing here is imported by ``import gradproj``:
the backends ``"cpp"`` and ``"cuda"`` of :mod:`gradproj.backends` call
:func:`load` the first time dispatch considers them. When the extension was not
built, :func:`load` warns once and returns ``None``, and dispatch falls back to
the Triton / reference backends.

The ops are the bucket-level contracts of :mod:`gradproj.backends` under the same
names (each adapter's keyword ``library``: the op namespace, ``torch.ops.gradproj``
unless given; the tests pass their CUDA emulator's ``torch.ops.gradproj_emu``):

* ``project_bucket_(matrices, basis, weights, side)``: every row ``x`` of every
  matrix becomes ``x − U (w ⊙ Uᵀ x)``;
* ``project_anchored_bucket_(matrices, anchors, basis, weights, side)``: with
  ``a = Uᵀ x`` and anchor row ``c``, ``x ← x − U (w ⊙ (a − c))`` and, with
  weights, ``c ← c + (1 − w) ⊙ (a − c)``;
* ``projected_adamw_bucket_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
  anchors, basis, weights, side, *, lr, beta1, beta2, eps, weight_decay, maximize)``: one
  AdamW step, then the anchored projection of every row (``max_exp_avg_sqs`` is an
  empty list unless amsgrad, as in ``torch._fused_adamw_``);
* ``surgery_bucket_(g_unlearn, g_retain, strength, variant, symmetric)``: per pair
  with ``d = u·r < 0``, ``u ← u − c_u r`` (and ``r ← r − c_r u`` if symmetric).
"""

from __future__ import annotations

import warnings
from types import ModuleType

import torch

OPS = (
    "project_bucket_",
    "project_anchored_bucket_",
    "projected_adamw_bucket_",
    "surgery_bucket_",
)

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` (or `make setup`) in the gradproj "
    "checkout, with torch installed; set GRADPROJ_FORCE_CUDA=1 to compile the CUDA kernels "
    "without a GPU"
)

_module: ModuleType | None = None
_tried = False


def _import_c() -> ModuleType:
    """Import ``gradproj._C`` (a seam for tests that simulate a missing build)."""
    from gradproj import _C

    return _C


def load() -> ModuleType | None:
    """``gradproj._C`` (importing it registers ``torch.ops.gradproj.*``), or ``None``.

    The first failed import emits one ``RuntimeWarning`` naming the fallback and how
    to build the extension; later calls return ``None`` silently. This module calls
    it once when imported, so traced code (torch.compile) only reads the result.
    """
    global _module, _tried
    if _tried:
        return _module
    _tried = True
    try:
        module = _import_c()
    except ImportError as exc:
        warnings.warn(
            f"gradproj's compiled extension gradproj._C is not available ({exc}); dispatch "
            f"falls back to the triton/reference backends. To get the C++/CUDA kernels, "
            f"{BUILD_HINT}.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    _register_fakes()
    _module = module
    return _module


def is_loaded() -> bool:
    """True when ``gradproj._C`` imports (loading it on first call)."""
    return load() is not None


def has_cuda() -> bool:
    """True when the extension was built with its CUDA kernels."""
    return load() is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "gradproj::project_bucket_", "CUDA"
    )


def _register_fakes() -> None:
    """Fake (meta) kernels, so the ops trace under torch.compile without running.

    The ops only mutate their inputs in place and return nothing, so the fake
    kernels have nothing to compute; the schemas' ``Tensor(a!)[]`` annotations tell
    functionalization what is written.
    """

    @torch.library.register_fake("gradproj::project_bucket_")
    def _project_bucket_fake(matrices, basis, weights, side) -> None:
        return None

    @torch.library.register_fake("gradproj::project_anchored_bucket_")
    def _project_anchored_bucket_fake(matrices, anchors, basis, weights, side) -> None:
        return None

    @torch.library.register_fake("gradproj::projected_adamw_bucket_")
    def _projected_adamw_bucket_fake(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        steps,
        anchors,
        basis,
        weights,
        side,
        *,
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        maximize,
    ) -> None:
        return None

    @torch.library.register_fake("gradproj::surgery_bucket_")
    def _surgery_bucket_fake(g_unlearn, g_retain, strength, variant, symmetric) -> None:
        return None


def project_bucket_(
    matrices: list[torch.Tensor],
    basis: torch.Tensor,
    weights: torch.Tensor | None,
    side: str,
    *,
    library: object | None = None,
) -> None:
    """Backends ``"cpp"``/``"cuda"``: ``torch.ops.gradproj.project_bucket_``.

    In place, every row ``x`` of every matrix: ``x ← x − U (w ⊙ Uᵀ x)`` (contract in
    :mod:`gradproj.backends`).
    """
    (library or torch.ops.gradproj).project_bucket_(list(matrices), basis, weights, side)


def project_anchored_bucket_(
    matrices: list[torch.Tensor],
    anchors: list[torch.Tensor],
    basis: torch.Tensor,
    weights: torch.Tensor | None,
    side: str,
    *,
    library: object | None = None,
) -> None:
    """Backends ``"cpp"``/``"cuda"``: ``torch.ops.gradproj.project_anchored_bucket_``.

    In place, every row ``x`` with anchor row ``c`` and ``a = Uᵀ x``:
    ``x ← x − U (w ⊙ (a − c))``; with weights also ``c ← c + (1 − w) ⊙ (a − c)``.
    """
    (library or torch.ops.gradproj).project_anchored_bucket_(
        list(matrices), list(anchors), basis, weights, side
    )


def projected_adamw_bucket_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor] | None,
    steps: list[torch.Tensor],
    anchors: list[torch.Tensor],
    basis: torch.Tensor,
    weights: torch.Tensor | None,
    side: str,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    library: object | None = None,
) -> None:
    """Backends ``"cpp"``/``"cuda"``: ``torch.ops.gradproj.projected_adamw_bucket_``.

    One AdamW step, then ``x ← x − U (w ⊙ (Uᵀx − c))`` on every row (contract in
    :mod:`gradproj.backends`). ``max_exp_avg_sqs=None`` (no amsgrad) is passed as an
    empty list. ``lr`` is read as a Python float (a tensor ``lr`` synchronizes).
    """
    (library or torch.ops.gradproj).projected_adamw_bucket_(
        list(params),
        list(grads),
        list(exp_avgs),
        list(exp_avg_sqs),
        [] if max_exp_avg_sqs is None else list(max_exp_avg_sqs),
        list(steps),
        list(anchors),
        basis,
        weights,
        side,
        lr=float(lr),
        beta1=float(beta1),
        beta2=float(beta2),
        eps=float(eps),
        weight_decay=float(weight_decay),
        maximize=bool(maximize),
    )


def surgery_bucket_(
    g_unlearn: list[torch.Tensor],
    g_retain: list[torch.Tensor],
    strength: float,
    variant: str,
    symmetric: bool,
    *,
    library: object | None = None,
) -> None:
    """Backends ``"cpp"``/``"cuda"``: ``torch.ops.gradproj.surgery_bucket_``.

    In place, per pair with ``d = u·r``: when ``d < 0``, ``u ← u − c_u r`` and, if
    ``symmetric``, ``r ← r − c_r u`` (contract in :mod:`gradproj.backends`).
    """
    (library or torch.ops.gradproj).surgery_bucket_(
        list(g_unlearn), list(g_retain), float(strength), variant, bool(symmetric)
    )


load()
