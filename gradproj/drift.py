"""The guarantee, measured on saved models: how far a trained model moved along the concept.

For every protected weight ``W`` (the layers :func:`gradproj.diffusers.protect`
selects) the *drift* is

    drift = ‖(W_T − W₀) U‖_F / ‖W₀‖_F

with ``W₀`` the base model's weight and ``W_T`` the trained one (full fine-tune,
an EMA copy, a checkpoint). For a LoRA file the change is ``ΔW = s·B A``
(``s = lora_alpha / r``), so ``drift = ‖s·B (A U)‖_F / ‖W₀‖_F``, and the pass/fail
test is on ``‖A U‖_F / ‖A‖_F``, which bounds ``‖ΔW U‖ / (s‖B‖‖A‖)`` whatever
``B`` is: the quantity the optimizer keeps at zero.

The bound a protected run meets depends on the dtype the trained tensor is
*stored* in (:func:`bound`): float32 arithmetic leaves ``≈ 1e-7`` (the tests
assert ``≤ 1e-6``); storing the result in bf16/fp16 adds its rounding error's
component along ``span(U)``, about ``ε·√(k/d)`` relative. An unprotected run
drifts by orders of magnitude more (``≈ 1e-2`` in the official scripts' tests).
A soft subspace (``ridge``) damps the updates along ``U`` by ``1 − w``, it does
not zero them: its drift is reported without a bound.

Reads the host copies of the weights (safetensors, one tensor at a time); it is
a measurement, not for a training step.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradproj import ops, reference

# Stored at float32 or wider: what the float32 projection leaves (tests: ≤ 1e-6).
COMPUTE_BOUND = 8 * torch.finfo(torch.float32).eps
# Rounding a weight to a narrower dtype: relative error ≤ ε/2 per entry, and a
# random error keeps ≈ √(k/d) of its norm along a k-dim subspace of R^d; 8x
# headroom over ε/2.
STORAGE_HEADROOM = 4.0
LORA_FILE = "pytorch_lora_weights.safetensors"
_MODEL_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
_SUBFOLDERS = ("unet", "transformer")
_LORA_PREFIXES = ("unet.", "transformer.", "base_model.model.")


def bound(dtype: torch.dtype, k: int, d: int) -> float:
    """The largest drift a protected weight stored in ``dtype`` shows, relative.

    ``8·ε_fp32 + 4·ε_dtype·√(k/d)`` for a dtype narrower than float32, ``8·ε_fp32``
    otherwise (``ε`` = ``torch.finfo(dtype).eps``).
    """
    if not dtype.is_floating_point or torch.finfo(dtype).bits >= 32:
        return COMPUTE_BOUND
    return COMPUTE_BOUND + STORAGE_HEADROOM * torch.finfo(dtype).eps * math.sqrt(k / max(d, 1))


@torch.no_grad()
def weight_drift(
    w: torch.Tensor, w0: torch.Tensor, basis: ops.BasisLike, *, side: str = "input"
) -> float:
    """``‖rows(W − W₀) U‖_F / ‖W₀‖_F`` in float64 for one weight (``side`` as the optimizers).

    Reads the result on the host (synchronizes): a measurement, not for a training step.
    """
    u = ops.unpack_basis(basis, None, "basis")[0].to(device=w.device, dtype=torch.float64)
    d = w.detach().to(torch.float64) - w0.detach().to(torch.float64)
    along = d - reference.project(d, u, side=side)  # = rows(d) U Uᵀ, same norm as rows(d) U
    return (along.norm() / w0.detach().to(torch.float64).norm()).item()


@dataclass(frozen=True)
class WeightDrift:
    """The drift of one protected weight (see the module doc)."""

    name: str
    drift: float
    bound: float | None
    dtype: torch.dtype
    lora_a: float | None = None  # LoRA: ‖A U‖/‖A‖, what ``bound`` applies to

    @property
    def checked(self) -> float:
        """The number held against ``bound``: ``lora_a`` for an adapter, else ``drift``."""
        return self.drift if self.lora_a is None else self.lora_a

    @property
    def ok(self) -> bool | None:
        return None if self.bound is None else self.checked <= self.bound


@dataclass(frozen=True)
class DriftReport:
    """Every protected weight's drift, and whether the run kept the guarantee."""

    weights: tuple[WeightDrift, ...]
    k: int
    d: int
    lora: bool
    notes: tuple[str, ...] = ()

    @property
    def worst(self) -> WeightDrift:
        return max(self.weights, key=lambda w: w.checked / w.bound if w.bound else w.checked)

    @property
    def ok(self) -> bool | None:
        """True when every weight is within its bound (None: a soft subspace, no bound)."""
        if any(w.bound is None for w in self.weights):
            return None
        return all(w.ok for w in self.weights)

    def table(self) -> str:
        what = "‖A U‖/‖A‖" if self.lora else "drift"
        lines = [f"{'weight':<70} {'dtype':<9} {what:>11} {'bound':>9}  ok"]
        for w in self.weights:
            b = "—" if w.bound is None else f"{w.bound:.2e}"
            ok = {True: "yes", False: "NO", None: "—"}[w.ok]
            lines.append(f"{w.name:<70} {str(w.dtype)[6:]:<9} {w.checked:>11.2e} {b:>9}  {ok}")
        return "\n".join(lines)

    def summary(self) -> str:
        w = self.worst
        what = "‖A U‖/‖A‖" if self.lora else "‖(W_T − W₀)U‖/‖W₀‖"
        head = f"{len(self.weights)} protected weight(s), k={self.k}, d={self.d}"
        if self.ok is None:
            verdict = f"NO BOUND (soft subspace): worst {what} = {w.checked:.2e} ({w.name})"
        else:
            cmp = "≤" if self.ok else ">"
            verdict = (
                f"{'PASS' if self.ok else 'FAIL'}: worst {what} = {w.checked:.2e} {cmp} "
                f"bound {w.bound:.2e} ({str(w.dtype)[6:]}) at {w.name}"
            )
        if self.lora:
            verdict += f"; worst ‖s·B A U‖/‖W₀‖ = {max(x.drift for x in self.weights):.2e}"
        return "\n".join([f"{verdict}", head, *self.notes])


# ---------------------------------------------------------------------------- reading models


def _model_folder(path: str, what: str) -> str:
    """A diffusers model folder: ``path`` itself, or its ``unet``/``transformer`` subfolder."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} {path}: no such folder")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    for sub in _SUBFOLDERS:
        if os.path.isfile(os.path.join(path, sub, "config.json")):
            return os.path.join(path, sub)
    raise FileNotFoundError(
        f"{what} {path}: neither a diffusers model folder (config.json) nor a pipeline or "
        f"checkpoint folder with one of {_SUBFOLDERS}"
    )


def _skeleton(folder: str) -> nn.Module:
    """The model class of ``folder``'s config.json, built on the meta device (no memory)."""
    import diffusers

    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    cls = getattr(diffusers, str(config.get("_class_name")), None)
    if cls is None or not hasattr(cls, "from_config"):
        name = config.get("_class_name")
        raise ValueError(f"{folder}/config.json: not a diffusers model ({name})")
    with torch.device("meta"):
        return cls.from_config(config)


class _Tensors:
    """Named tensors of a model folder (single or sharded safetensors), read one at a time."""

    def __init__(self, folder: str, what: str) -> None:
        from safetensors import safe_open

        self.where: dict[str, str] = {}
        for name in _MODEL_FILES:
            index = os.path.join(folder, name + ".index.json")
            if os.path.isfile(index):
                with open(index) as f:
                    shards = json.load(f)["weight_map"]
                self.where = {k: os.path.join(folder, v) for k, v in shards.items()}
                break
            single = os.path.join(folder, name)
            if os.path.isfile(single):
                with safe_open(single, "pt") as f:
                    self.where = dict.fromkeys(f.keys(), single)
                break
        else:
            raise FileNotFoundError(
                f"{what} {folder}: no {' or '.join(_MODEL_FILES)} (or its .index.json)"
            )
        self.what, self.folder = what, folder

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if key not in self.where:
            raise KeyError(f"{self.what} {self.folder}: no tensor {key!r}")
        with safe_open(self.where[key], "pt") as f:
            return f.get_tensor(key)


def _lora_file(path: str) -> str | None:
    if os.path.isfile(path) and path.endswith(".safetensors"):
        return path
    candidate = os.path.join(path, LORA_FILE)
    return candidate if os.path.isfile(candidate) else None


def _lora_scale(meta: Mapping[str, str], prefix: str, module: str, r: int) -> float | None:
    """``lora_alpha / r`` (``/ √r`` with rslora) from diffusers' adapter metadata, if saved."""
    raw = meta.get("lora_adapter_metadata")
    if raw is None:
        return None
    cfg = json.loads(raw)
    p = prefix.rstrip(".")
    get = lambda key, default=None: cfg.get(f"{p}.{key}", cfg.get(key, default))  # noqa: E731
    if get("use_dora"):
        raise ValueError(
            "the LoRA file holds DoRA adapters: DoRA rescales the rows of W, which moves W U, "
            "so it cannot carry the guarantee"
        )
    alpha = get("lora_alpha")
    for pattern, value in (get("alpha_pattern") or {}).items():
        if module == pattern or module.endswith("." + pattern):
            alpha = value
    if alpha is None:
        return None
    return alpha / (math.sqrt(r) if get("use_rslora") else r)


def _lora_pairs(file: str, names: list[str]) -> tuple[dict[str, tuple], Mapping[str, str]]:
    """``{protected layer name: (A, B, prefix)}`` from a diffusers/peft/kohya LoRA file."""
    from safetensors import safe_open

    with safe_open(file, "pt") as f:
        keys, meta = set(f.keys()), f.metadata() or {}
        out: dict[str, tuple] = {}
        for name in names:
            for prefix in ("", *_LORA_PREFIXES):
                for a_key, b_key in (
                    ("lora_A.weight", "lora_B.weight"),
                    ("lora.down.weight", "lora.up.weight"),
                    ("lora_A.default.weight", "lora_B.default.weight"),
                ):
                    a, b = f"{prefix}{name}.{a_key}", f"{prefix}{name}.{b_key}"
                    if a in keys and b in keys:
                        out[name] = (f.get_tensor(a), f.get_tensor(b), prefix, None)
            kohya = "lora_unet_" + name.replace(".", "_")  # kohya-ss: lora_down = A, lora_up = B
            if f"{kohya}.lora_down.weight" in keys:
                alpha = f.get_tensor(f"{kohya}.alpha").item() if f"{kohya}.alpha" in keys else None
                out[name] = (
                    f.get_tensor(f"{kohya}.lora_down.weight"),
                    f.get_tensor(f"{kohya}.lora_up.weight"),
                    "",
                    alpha,
                )
    return out, meta


def _open_subspace(subspace: Any):
    from gradproj.subspace import ConceptSubspace

    if isinstance(subspace, (str, os.PathLike)):
        return ConceptSubspace.load(os.fspath(subspace))
    return subspace


def _as_state(model: Any, what: str) -> tuple[Any, nn.Module | None]:
    """``(tensors by name, a model to find the protected layers in, or None)``."""
    if isinstance(model, nn.Module):
        return model.state_dict(), model  # detached tensors
    if isinstance(model, Mapping):
        return model, None
    if isinstance(model, (str, os.PathLike)):
        folder = _model_folder(os.fspath(model), what)
        return _Tensors(folder, what), _skeleton(folder)
    raise TypeError(
        f"{what} must be a model, a state dict or a path to a saved model, "
        f"got {type(model).__name__}"
    )


def subspace_drift(
    subspace: Any,
    base: Any,
    trained: Any,
    *,
    target: str = "input",
    lora: bool | None = None,
    lora_scale: float | None = None,
) -> DriftReport:
    """Measure the guarantee ``(W_T − W₀) U = 0`` on a trained model (module doc).

    Args:
        subspace: a ``ConceptSubspace``, its file, or a ``(d × k)`` basis tensor.
        base: the model training started from: a diffusers model, its folder, a
            pipeline folder (its ``unet``/``transformer`` is used) or a state dict.
        trained: the result, as ``base`` (full weights: a saved model, a
            checkpoint's ``unet``, an EMA folder such as ``unet_ema``), or a LoRA
            file (``pytorch_lora_weights.safetensors`` or a folder holding one;
            diffusers, peft and kohya-ss key names).
        target: which layers are protected, as :func:`gradproj.diffusers.protect`.
        lora: ``True`` requires ``trained`` to be a LoRA file, ``False`` full
            weights; ``None`` decides by what ``trained`` is.
        lora_scale: ``s`` in ``ΔW = s·B A`` when the file does not say (default
            ``lora_alpha / r`` from its metadata, else 1); it scales the reported
            ``‖s·B A U‖/‖W₀‖`` only, never the pass/fail test.

    Returns:
        a :class:`DriftReport` (``.ok``, ``.summary()``, ``.table()``).

    Raises ``ValueError`` when the subspace does not fit the protected layers or a
    protected weight is missing from ``trained``, ``FileNotFoundError`` for a path
    that holds no model.
    """
    from gradproj.integrations.diffusers import text_readers

    sub = _open_subspace(subspace)
    u, w = ops.unpack_basis(sub, None, "subspace")
    u64 = u.detach().to("cpu", torch.float64)
    d, k = u64.shape
    soft = w is not None and bool((w < 1).any())

    base_state, base_model = _as_state(base, "base")
    if base_model is None:
        raise TypeError("base must be a model or a path to one: its layers say what is protected")
    layers = text_readers(base_model, target=target)
    wrong = {n: m.in_features for n, m in layers.items() if m.in_features != d}
    if wrong:
        n, width = next(iter(wrong.items()))
        raise ValueError(
            f"the subspace has d={d}, but {len(wrong)} protected layer(s) read another width "
            f"({n} reads {width}): not the subspace this model was protected with"
        )
    names = list(layers)
    lora_path = _lora_file(os.fspath(trained)) if isinstance(trained, (str, os.PathLike)) else None
    if lora is True and lora_path is None:
        raise FileNotFoundError(f"trained {trained}: no LoRA file (*.safetensors or {LORA_FILE})")
    is_lora = lora_path is not None and lora is not False

    notes: list[str] = []
    rows: list[WeightDrift] = []
    if is_lora:
        pairs, meta = _lora_pairs(lora_path, names)
        if not pairs:
            raise ValueError(
                f"trained {lora_path}: no adapter on any protected layer (looked for "
                f"{names[0]}.lora_A/lora.down and kohya's names); this LoRA leaves them unchanged "
                "— or it is not this model's"
            )
        if len(pairs) < len(names):
            left = len(names) - len(pairs)
            notes.append(f"{left} protected layer(s) carry no adapter: unchanged")
        for name, (a, b, prefix, alpha) in pairs.items():
            w0 = base_state[f"{name}.weight"].to(torch.float64)
            r = a.shape[0]
            s = lora_scale
            if s is None:
                s = alpha / r if alpha is not None else _lora_scale(meta, prefix, name, r)
            if s is None:
                s = 1.0
                if not any("assumed" in x for x in notes):
                    notes.append("LoRA scale s assumed 1 (no lora_alpha in the file)")
            au = a.to(torch.float64) @ u64
            rows.append(
                WeightDrift(
                    name=f"{name}.weight",
                    drift=(s * (b.to(torch.float64) @ au)).norm().item() / w0.norm().item(),
                    bound=None if soft else bound(a.dtype, k, d),
                    dtype=a.dtype,
                    lora_a=au.norm().item() / max(a.to(torch.float64).norm().item(), 1e-300),
                )
            )
    else:
        trained_state, _ = _as_state(trained, "trained")
        for name in names:
            key = f"{name}.weight"
            try:
                wt = trained_state[key]
            except KeyError as err:
                raise ValueError(
                    f"trained: no weight {key!r}; is it the same model as base? (a LoRA file "
                    f"needs lora=True or the file's path, {LORA_FILE})"
                ) from err
            w0 = base_state[key]
            if tuple(wt.shape) != tuple(w0.shape):
                raise ValueError(
                    f"{key}: trained {tuple(wt.shape)} vs base {tuple(w0.shape)}: "
                    "not the same model"
                )
            rows.append(
                WeightDrift(
                    name=key,
                    drift=weight_drift(wt.to("cpu"), w0.to("cpu"), u64),
                    bound=None if soft else bound(wt.dtype, k, d),
                    dtype=wt.dtype,
                )
            )
    if soft:
        notes.append(
            "soft subspace (ridge): updates along U are damped by (1 − w), not zeroed; no bound"
        )
    return DriftReport(tuple(rows), k=k, d=d, lora=is_lora, notes=tuple(notes))
