"""The one registry of backends and the one function that picks one.

A backend is a named set of bucket-level kernels ("ops"), each given as a
``"module:function"`` string so nothing heavy (Triton, the compiled extension)
is imported before it is used. :func:`select` is the only place a backend is
chosen: an explicit ``backend=`` argument wins, then the ``GRADPROJ_BACKEND``
environment variable, then the preference order for the device type among the
backends that are installed and support the device and dtype.

Bucket-level op contracts (what every backend implements):

``project_bucket_(matrices, basis, weights, side) -> None``
    In place. ``side`` is ``"input"``/``"output"``: ``matrices`` are 2-D strided
    views ``(R_i × D)`` sharing storage with the gradients (``"output"`` passes
    transposed views, stride ``(1, in)``); every row ``m`` becomes
    ``m − U (w ⊙ Uᵀ m)``. ``side="flat"``: ``matrices`` are contiguous 1-D views
    of ``D`` elements, projected as one vector each. ``basis`` is ``(D × k)``
    contiguous with ``k ≥ 1``, float32 (float64 for float64 grads, which only the
    reference accepts); ``weights`` is ``(k,)`` in the basis dtype, or ``None``.
    All matrices share one dtype and device, none is empty, no two overlap.

``project_anchored_bucket_(matrices, anchors, basis, weights, side) -> None``
    In place on ``matrices`` (as above; ``"flat"`` views count as one row) and on
    ``anchors``: one contiguous ``(R_i × k)`` tensor per matrix, basis dtype (``R_i = 1``
    for ``"flat"``). For every row ``x`` with anchor row ``c``: ``a = Uᵀ x``;
    ``x ← x − U (w ⊙ (a − c))``; and, only when ``weights`` is given,
    ``c ← c + (1 − w) ⊙ (a − c)``. This is the update projection
    ``p ← p₀ + P (p − p₀)`` with ``p₀`` known only through ``c = Uᵀ x₀``.

``projected_adamw_bucket_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
anchors, basis, weights, side, *, lr, beta1, beta2, eps, weight_decay, maximize) -> None``
    One AdamW step, then the anchored projection of ``project_anchored_bucket_``,
    in place on ``params``, ``exp_avgs``, ``exp_avg_sqs``, ``max_exp_avg_sqs`` (a
    list when amsgrad, else ``None``) and, for soft weights, ``anchors``. All
    lists are row views as above (same shapes; ``exp_avg*`` share ``params``'
    strides, ``grads`` may not) in the params' dtype; ``steps`` are float32 0-d
    device tensors holding the step count *including* this step (already
    incremented, read on the device: no host sync). Math in
    :func:`gradproj.reference.projected_adamw`.

``surgery_bucket_(g_unlearn, g_retain, strength, variant, symmetric) -> None``
    In place on contiguous 1-D views, pairwise (same numel, dtype and device;
    none empty, no two overlap). Per pair with ``d = u·r``: when ``d < 0``,
    ``u ← u − c_u r`` and, if ``symmetric``, ``r ← r − c_r u`` from the original
    pair, with ``c`` as in ``gradproj.reference.surgery`` for ``variant``
    (``"projection"`` or ``"cosine"``). The conflict test never leaves the device.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

KERNEL_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})
ALL_FLOAT_DTYPES = KERNEL_DTYPES | {torch.float64}


def _always() -> bool:
    return True


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """True when Triton kernels run on CPU tensors through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class Backend:
    """One way to run gradproj's ops.

    ``devices``: device types it runs on; ``dtypes``: gradient dtypes it accepts;
    ``ops``: op name -> ``"module:function"``; ``is_installed``: can it be imported.
    """

    name: str
    devices: Callable[[], frozenset[str]]
    dtypes: frozenset[torch.dtype]
    ops: dict[str, str] = field(default_factory=dict)
    is_installed: Callable[[], bool] = _always
    description: str = ""
    # runs another device's kernels in emulation (the tests' CUDA emulator): correct,
    # never a performance figure
    emulated: bool = False

    def unsupported_reason(self, op: str, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why this backend cannot run ``op`` on ``device``/``dtype``, or ``None`` if it can."""
        if op not in self.ops:
            return f"backend {self.name!r} does not implement op {op!r}"
        if not self.is_installed():
            return f"backend {self.name!r} is not installed"
        devices = self.devices()
        if device.type not in devices:
            return (
                f"backend {self.name!r} runs on device types {sorted(devices)}, "
                f"not on {device.type!r}"
            )
        if dtype not in self.dtypes:
            names = sorted(str(d).removeprefix("torch.") for d in self.dtypes)
            return f"backend {self.name!r} accepts dtypes {names}, not {dtype}"
        return None

    def op(self, name: str) -> Callable:
        """The callable implementing op ``name`` (imported on first use)."""
        return _resolve(self.ops[name])


@functools.cache
def _resolve(target: str) -> Callable:
    module, fn = target.split(":")
    # sys.modules first: torch.compile traces a dict lookup but not importlib.
    loaded = sys.modules.get(module)
    return getattr(loaded if loaded is not None else importlib.import_module(module), fn)


_REGISTRY: dict[str, Backend] = {}

# Preference per device type, fastest first. The reference is the fallback for all.
# "cpp"/"cuda" come from the compiled extension (gradproj._C) once it is built.
_PREFERENCE: dict[str, tuple[str, ...]] = {
    # Triton before the extension's CUDA kernels. The GPU runbook (scripts/gpu_check.sh)
    # verified and timed both on an H200 (benchmarks/results/gpu-H200-2026-12-04b), with
    # no clear winner (Triton ahead at k = 1 and on fp32 transposed views, CUDA on bf16
    # rows at k = 8), and the CUDA kernels redesigned since have run only in the emulator.
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpp", "reference"),
}


def register(backend: Backend) -> None:
    """Add (or replace) a backend in the registry."""
    _REGISTRY[backend.name] = backend


def registered() -> list[str]:
    """Names of all registered backends, installed or not."""
    return list(_REGISTRY)


def get(name: str) -> Backend:
    """The registered backend called ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; registered backends: {registered()}") from None


def select(
    op: str, device: torch.device, dtype: torch.dtype, requested: str | None = None
) -> Backend:
    """Pick the backend that runs ``op`` for tensors of ``dtype`` on ``device``.

    ``requested`` (the ``backend=`` argument) wins, then ``$GRADPROJ_BACKEND``; an
    explicit choice that cannot run raises ``ValueError`` saying why. Otherwise the
    first backend in the device type's preference order that can run is taken.
    """
    choice = requested if requested is not None else os.environ.get("GRADPROJ_BACKEND") or None
    if choice is not None:
        origin = "backend=" if requested is not None else "GRADPROJ_BACKEND="
        if choice not in _REGISTRY:
            raise ValueError(
                f"{origin}{choice!r}: unknown backend; registered backends: {registered()}"
            )
        backend = _REGISTRY[choice]
        reason = backend.unsupported_reason(op, device, dtype)
        if reason is not None:
            raise ValueError(f"{origin}{choice!r} cannot run {op!r}: {reason}")
        return backend
    for name in _PREFERENCE.get(device.type, ("reference",)):
        backend = _REGISTRY.get(name)
        if backend is not None and backend.unsupported_reason(op, device, dtype) is None:
            return backend
    raise ValueError(f"no backend can run {op!r} on {device} for dtype {dtype}")


def _triton_devices() -> frozenset[str]:
    # Under the interpreter Triton kernels take CPU tensors; it is never picked
    # automatically there (it is slow), only when asked for by name.
    return frozenset({"cuda", "cpu"}) if triton_interpreting() else frozenset({"cuda"})


register(
    Backend(
        name="reference",
        devices=lambda: frozenset({"cpu", "cuda"}),
        dtypes=ALL_FLOAT_DTYPES,
        ops={
            "project_bucket_": "gradproj.reference:project_bucket_",
            "project_anchored_bucket_": "gradproj.reference:project_anchored_bucket_",
            "projected_adamw_bucket_": "gradproj.reference:projected_adamw_bucket_",
            "surgery_bucket_": "gradproj.reference:surgery_bucket_",
        },
        description="plain PyTorch (gradproj/reference.py); the oracle and the fallback",
    )
)
register(
    Backend(
        name="triton",
        devices=_triton_devices,
        dtypes=KERNEL_DTYPES,
        ops={
            "project_bucket_": "gradproj.kernels.project:project_bucket_",
            "project_anchored_bucket_": "gradproj.kernels.project:project_anchored_bucket_",
            "projected_adamw_bucket_": "gradproj.kernels.adamw:projected_adamw_bucket_",
            "surgery_bucket_": "gradproj.kernels.surgery:surgery_bucket_",
        },
        is_installed=_triton_installed,
        description="fused Triton kernels, one launch per bucket (CPU only via TRITON_INTERPRET=1)",
    )
)


def _extension_installed() -> bool:
    # Imported here, not at the top: gradproj._C is loaded (and a missing build
    # warned about) only when dispatch first considers a compiled backend.
    from gradproj import _extension

    return _extension.is_loaded()


def _extension_cuda_installed() -> bool:
    from gradproj import _extension

    return _extension.has_cuda()


register(
    Backend(
        name="cpp",
        devices=lambda: frozenset({"cpu"}),
        dtypes=KERNEL_DTYPES,
        ops={
            "project_bucket_": "gradproj._extension:project_bucket_",
            "project_anchored_bucket_": "gradproj._extension:project_anchored_bucket_",
            "projected_adamw_bucket_": "gradproj._extension:projected_adamw_bucket_",
            "surgery_bucket_": "gradproj._extension:surgery_bucket_",
        },
        is_installed=_extension_installed,
        description="C++ CPU kernels of gradproj._C (csrc/cpu), torch.ops.gradproj.*",
    )
)
register(
    Backend(
        name="cuda",
        devices=lambda: frozenset({"cuda"}),
        dtypes=KERNEL_DTYPES,
        ops={
            "project_bucket_": "gradproj._extension:project_bucket_",
            "project_anchored_bucket_": "gradproj._extension:project_anchored_bucket_",
            "projected_adamw_bucket_": "gradproj._extension:projected_adamw_bucket_",
            "surgery_bucket_": "gradproj._extension:surgery_bucket_",
        },
        is_installed=_extension_cuda_installed,
        description="CUDA kernels of gradproj._C (csrc/cuda), one launch per bucket",
    )
)
