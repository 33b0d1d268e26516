"""The compiled extension ``gradproj._C``: lazy loading, fake kernels, bucket adapters.

``gradproj._C`` registers torch ops (``torch.ops.gradproj.*``, schemas in
``csrc/ops.cpp``) with CPU kernels (``csrc/cpu/``) and, when built with CUDA,
CUDA kernels (``csrc/cuda/``). Nothing here is imported by ``import gradproj``:
the backends ``"cpp"`` and ``"cuda"`` of :mod:`gradproj.backends` call
:func:`load` the first time dispatch considers them. When the extension was not
built, :func:`load` warns once and returns ``None``, and dispatch falls back to
the Triton / reference backends.

The ops are the bucket-level contracts of :mod:`gradproj.backends` under the same
names:

* ``project_bucket_(matrices, basis, weights, side)``: every row ``x`` of every
  matrix becomes ``x − U (w ⊙ Uᵀ x)``;
* ``project_anchored_bucket_(matrices, anchors, basis, weights, side)``: with
  ``a = Uᵀ x`` and anchor row ``c``, ``x ← x − U (w ⊙ (a − c))`` and, with
  weights, ``c ← c + (1 − w) ⊙ (a − c)``.
"""

from __future__ import annotations

import warnings
from types import ModuleType

import torch

OPS = ("project_bucket_", "project_anchored_bucket_")

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

    Both ops only mutate their inputs in place and return nothing, so the fake
    kernels have nothing to compute; the schemas' ``Tensor(a!)[]`` annotations tell
    functionalization what is written.
    """

    @torch.library.register_fake("gradproj::project_bucket_")
    def _project_bucket_fake(matrices, basis, weights, side) -> None:
        return None

    @torch.library.register_fake("gradproj::project_anchored_bucket_")
    def _project_anchored_bucket_fake(matrices, anchors, basis, weights, side) -> None:
        return None


def project_bucket_(
    matrices: list[torch.Tensor],
    basis: torch.Tensor,
    weights: torch.Tensor | None,
    side: str,
) -> None:
    """Backends ``"cpp"``/``"cuda"``: ``torch.ops.gradproj.project_bucket_``.

    In place, every row ``x`` of every matrix: ``x ← x − U (w ⊙ Uᵀ x)`` (contract in
    :mod:`gradproj.backends`).
    """
    torch.ops.gradproj.project_bucket_(list(matrices), basis, weights, side)


def project_anchored_bucket_(
    matrices: list[torch.Tensor],
    anchors: list[torch.Tensor],
    basis: torch.Tensor,
    weights: torch.Tensor | None,
    side: str,
) -> None:
    """Backends ``"cpp"``/``"cuda"``: ``torch.ops.gradproj.project_anchored_bucket_``.

    In place, every row ``x`` with anchor row ``c`` and ``a = Uᵀ x``:
    ``x ← x − U (w ⊙ (a − c))``; with weights also ``c ← c + (1 − w) ⊙ (a − c)``.
    """
    torch.ops.gradproj.project_anchored_bucket_(list(matrices), list(anchors), basis, weights, side)


load()
