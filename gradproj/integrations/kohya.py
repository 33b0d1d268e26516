"""kohya-ss sd-scripts: protect a LoRA with command-line flags only (``docs/kohya.md``).

``train_network.py`` / ``sdxl_train_network.py`` take a network module and an
optimizer class by dotted name, so both can come from here without changing
kohya's code::

    --network_module gradproj.integrations.kohya
    --optimizer_type gradproj.integrations.kohya.ProjectedAdamW
    --optimizer_args "subspace='acme.safetensors'"

kohya's LoRA (``networks/lora.py``) adds ``s·m·B A x`` to a layer ``y = W x``
(``A = lora_down.weight (r × in)``, ``B = lora_up.weight``, ``s = alpha / r``,
``m`` the multiplier), so ``ΔW U = s·m·B (A U)`` and ``A U = 0`` is enough. The
layers that read the text are the UNet's cross-attention ``attn2.to_k`` /
``attn2.to_v``, named ``lora_unet_…_attn2_to_k`` / ``…_to_v`` by kohya for SD 1.x,
2.x and SDXL alike. The optimizer projects each of their ``A`` once in place,
``A ← A (I − U Uᵀ)``, then keeps ``A U`` there with the anchored update projection
(anchor ``C = A U ≈ 0``), whatever ``B`` does.

Why a network module too: kohya hands the optimizer param groups without names
(``train_network.py:746`` → ``library/train_util.py:5134``, sd-scripts 48d368f).
:func:`create_network` delegates to kohya's ``networks.lora`` and registers the
network it returns (a weak reference); the optimizer looks its parameters up
there *by identity*, so it knows each ``A``'s ``lora_name`` and refuses to start
when nothing it would protect is found.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import warnings
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from gradproj import adamw, ops, optim
from gradproj.subspace import ConceptSubspace

logger = logging.getLogger(__name__)

# kohya's LoRA implementation that the network module wraps (SD 1.x, 2.x, SDXL).
KOHYA_NETWORK = "networks.lora"
# kohya names a LoRA module prefix + "." + module path with "." -> "_"
# (networks/lora.py:970-971, prefixes :870-875). The text encoder's LoRAs start
# with "lora_te" ("lora_te1"/"lora_te2" for SDXL's two encoders).
PROTECTED_NAME = re.compile(r"^lora_unet_.*_attn2_to_[kv]$")
TEXT_ENCODER_PREFIX = "lora_te"

# Networks built by create_network*, weakly held: the optimizer matches parameters
# by identity, so a network that is gone, or built for another run, cannot match.
_NETWORKS: weakref.WeakSet[nn.Module] = weakref.WeakSet()

_FLAG = "--network_module gradproj.integrations.kohya"


def _kohya_networks():
    try:
        return importlib.import_module(KOHYA_NETWORK)
    except ImportError as e:
        raise ImportError(
            f"gradproj.integrations.kohya builds kohya's LoRA, but {KOHYA_NETWORK} could not be "
            f"imported ({e}): use it as --network_module of kohya-ss sd-scripts' "
            "train_network.py or sdxl_train_network.py, run from the sd-scripts folder"
        ) from e


def create_network(*args: Any, **kwargs: Any) -> nn.Module:
    """kohya's ``networks.lora.create_network(...)``, registered for the gradproj optimizers.

    Same arguments as kohya's (``train_network.py:678-687``); ``--network_args``
    pass through unchanged.
    """
    network = _kohya_networks().create_network(*args, **kwargs)
    if network is not None:
        _NETWORKS.add(network)
    return network


def create_network_from_weights(*args: Any, **kwargs: Any) -> tuple[nn.Module, Any]:
    """kohya's ``networks.lora.create_network_from_weights(...)``, registered likewise.

    Used by kohya for ``--dim_from_weights`` (``train_network.py:672``) and for
    merging ``--base_weights`` (``:656``; those networks are never trained).
    """
    network, weights_sd = _kohya_networks().create_network_from_weights(*args, **kwargs)
    _NETWORKS.add(network)
    return network, weights_sd


def _lora_modules(network: nn.Module) -> list[nn.Module]:
    """The LoRA modules of a kohya network: what ``prepare_optimizer_params`` reads.

    ``apply_to`` empties ``text_encoder_loras`` or ``unet_loras`` for the part
    that is not trained (``networks/lora.py:1082-1095``).
    """
    modules = list(getattr(network, "text_encoder_loras", [])) + list(
        getattr(network, "unet_loras", [])
    )
    return [
        m
        for m in modules
        if isinstance(getattr(m, "lora_name", None), str)
        and isinstance(getattr(m, "lora_down", None), nn.Module)
        and isinstance(getattr(m, "lora_up", None), nn.Module)
    ]


def _factors(module: nn.Module) -> list[torch.Tensor]:
    # Not module.parameters(): before apply_to a LoRA module still holds the layer
    # it wraps (org_module, networks/lora.py:80), frozen base weight included.
    return [*module.lora_down.parameters(), *module.lora_up.parameters()]


def _as_groups(params: Iterable[Any]) -> list[dict[str, Any]]:
    """kohya's param groups as plain lists: their ``"params"`` are ``dict.values()`` views
    (``networks/lora.py:1176``), and they are read twice, here and by ``Optimizer``."""
    groups = []
    for g in params:
        if isinstance(g, dict):
            ps = g["params"]
            groups.append({**g, "params": [ps] if isinstance(ps, torch.Tensor) else list(ps)})
        else:
            groups.append(g)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    return groups


def _load_subspace(subspace: Any) -> ConceptSubspace:
    if subspace is None:
        raise ValueError(
            "subspace is missing: give the concept subspace file as an optimizer argument, "
            "--optimizer_args \"subspace='concept.safetensors'\" (the inner quotes are "
            "needed: kohya reads each value with ast.literal_eval)"
        )
    if isinstance(subspace, ConceptSubspace):
        return subspace
    if not isinstance(subspace, (str, os.PathLike)):
        raise ValueError(
            "subspace must be the path of a ConceptSubspace .safetensors file (or a "
            f"ConceptSubspace), got {type(subspace).__name__} {subspace!r}"
        )
    if not os.path.isfile(subspace):
        raise ValueError(
            f"subspace file {os.fspath(subspace)!r} does not exist (working directory "
            f"{os.getcwd()!r}); build it with `gradproj subspace ... --out FILE.safetensors`"
        )
    return ConceptSubspace.load(subspace)


class _Plan:
    """What the optimizer will protect, found and checked before anything is written."""

    def __init__(self, subspace: ConceptSubspace, factors: list[tuple[str, torch.Tensor]]):
        self.subspace = subspace
        self.factors = factors  # (lora_name, A = lora_down.weight) of every protected module

    def bases(self, in_optimizer: set[int]) -> optim.NamedBases:
        """``{A: subspace}`` for the protected ``A`` that the optimizer trains, named as
        in kohya's saved LoRA files (``lora_unet_…_attn2_to_k.lora_down.weight``)."""
        trained = [(n, a) for n, a in self.factors if id(a) in in_optimizer]
        return optim.NamedBases(
            {a: self.subspace for _, a in trained},
            {a: f"{n}.lora_down.weight" for n, a in trained},
        )

    @torch.no_grad()
    def project_factors_(self) -> None:
        """``A ← A (I − U diag(w) Uᵀ)`` for every protected ``A`` of the networks being trained.

        In the optimizer or not (kohya drops a group whose lr is 0,
        ``networks/lora.py:1187-1189``, and LoRA+ gives ``B`` a group of its own):
        a frozen ``A`` never moves again, and the saved network must read nothing
        along ``U`` in any protected module.
        """
        on: dict[torch.device, ConceptSubspace] = {}
        worst = 0.0
        for _, a in self.factors:
            sub = on.setdefault(a.device, self.subspace.to(a.device))
            before = ops.anchor(a, sub).norm() / a.norm().clamp_min(torch.finfo(a.dtype).tiny)
            worst = max(worst, float(before))
            ops.project_(a, sub)
        logger.info(
            "gradproj: %d LoRA A factors (UNet cross-attention to_k/to_v) projected off %r; "
            "largest ‖A U‖/‖A‖ before: %.3g",
            len(self.factors),
            self.subspace,
            worst,
        )


def _plan(
    groups: list[dict[str, Any]], subspace: Any, *, allow_text_encoder: bool
) -> tuple[_Plan, set[int]]:
    """Find and check the protected LoRA factors of ``groups``; refuse what cannot be protected."""
    sub = _load_subspace(subspace)
    in_optimizer = {id(p) for g in groups for p in g["params"]}
    networks = list(_NETWORKS)
    if not networks:
        raise ValueError(
            "no LoRA network was built by gradproj.integrations.kohya in this process, so the "
            f"optimizer cannot tell which parameters to protect: add {_FLAG}"
        )
    trained: list[nn.Module] = []  # LoRA modules with a parameter in the optimizer
    in_use: list[nn.Module] = []  # every LoRA module of the networks being trained
    for net in networks:
        modules = _lora_modules(net)
        mine = [m for m in modules if any(id(p) in in_optimizer for p in _factors(m))]
        trained += mine
        in_use += modules if mine else []
    if not trained:
        raise ValueError(
            f"none of the optimizer's {len(in_optimizer)} parameters belongs to a LoRA network "
            f"built by gradproj.integrations.kohya: add {_FLAG} (kohya's own networks.lora, "
            "LyCORIS and the other network modules are not recognised)"
        )
    if not any(PROTECTED_NAME.match(m.lora_name) for m in trained):
        raise ValueError(
            f"no trained LoRA module is on a UNet cross-attention to_k/to_v (names matching "
            f"{PROTECTED_NAME.pattern!r}; {len(trained)} trained modules, e.g. "
            f"{trained[0].lora_name!r}), so nothing would be protected: train the UNet's LoRA "
            "(not --network_train_text_encoder_only) and keep its attention blocks"
        )
    # Projected whether trained or not: the saved network must read nothing along U.
    protected = [m for m in in_use if PROTECTED_NAME.match(m.lora_name)]
    text = sorted(m.lora_name for m in trained if m.lora_name.startswith(TEXT_ENCODER_PREFIX))
    if text and not allow_text_encoder:
        raise ValueError(
            f"{len(text)} text-encoder LoRA modules are trained (e.g. {text[0]!r}): they change "
            "the prompts' embeddings themselves, which the subspace was built from, so the "
            "concept could move out of it. Add --network_train_unet_only, or pass "
            "allow_text_encoder=True in --optimizer_args to accept it"
        )
    factors: list[tuple[str, torch.Tensor]] = []
    wrong: list[str] = []
    for m in protected:
        a = m.lora_down.weight
        if a.dim() != 2:
            raise ValueError(
                f"{m.lora_name}.lora_down.weight has shape {tuple(a.shape)}; a cross-attention "
                "to_k/to_v LoRA is Linear (2-D)"
            )
        if a.shape[1] != sub.dim:
            wrong.append(f"{m.lora_name} reads {a.shape[1]}")
        factors.append((m.lora_name, a))
    if wrong:
        raise ValueError(
            f"the subspace has d={sub.dim}, but {len(wrong)} of {len(protected)} protected LoRA "
            f"modules read another width ({', '.join(wrong[:3])}{', …' if len(wrong) > 3 else ''})"
            "; build the subspace in the UNet's context space (SD 1.x: 768, SD 2.x: 1024, "
            "SDXL: 2048, its two text encoders' states concatenated)"
        )
    return _Plan(sub, factors), in_optimizer


def _on_first_step(opt: torch.optim.Optimizer) -> None:
    """Before the first step: say what holds when kohya made the LoRA 16-bit.

    ``--full_bf16`` / ``--full_fp16`` cast the network after the optimizer is built
    (``train_network.py:814-825``), so the dtype is known only then. A pre-hook,
    not a step override: torch wraps each class's ``step`` to run hooks, and a
    subclass calling ``super().step()`` would run them twice. It stays registered
    (removing it from inside the hook loop would mutate the dict being iterated).
    """
    seen: list[bool] = []

    def check(o: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if seen:
            return
        seen.append(True)
        low = {e.param.dtype for e in o.protection.entries} & {torch.bfloat16, torch.float16}
        if low:
            warnings.warn(
                f"the protected LoRA factors are {sorted(map(str, low))[0]} (kohya "
                "--full_bf16/--full_fp16): A·U is pulled back to its anchor every step but "
                "stored at that precision, so ‖A U‖/‖A‖ stays at its rounding (≤ 2⁻⁸ for "
                "bfloat16, 2⁻¹¹ for float16), not at float32's ~1e-7; train without "
                "--full_bf16/--full_fp16 for the float32 bound",
                UserWarning,
                stacklevel=4,
            )

    opt.register_step_pre_hook(check)


class ProjectedAdamW(adamw.ProjectedAdamW):
    """:class:`gradproj.ProjectedAdamW` for kohya's ``--optimizer_type``, subspace as an argument.

    kohya calls ``ProjectedAdamW(trainable_params, lr=lr, **optimizer_args)``
    (``library/train_util.py:5121-5134``) with each ``--optimizer_args``
    ``key=value`` read by ``ast.literal_eval`` (``:4858-4875``), so strings need
    inner quotes: ``"subspace='acme.safetensors'"``.

    Args:
        params, lr, betas, eps, weight_decay, amsgrad, maximize, backend: as
            :class:`gradproj.ProjectedAdamW` (kohya's ``--learning_rate`` arrives as ``lr``).
        subspace: path of a ``ConceptSubspace`` file (or the object).
        allow_text_encoder: accept a trained text-encoder LoRA (refused by default).

    Raises ``ValueError`` before anything is written when the subspace is missing,
    when no protected module is found (the network was not built by
    :func:`create_network`, or no UNet cross-attention ``to_k``/``to_v`` LoRA is
    trained), when a text-encoder LoRA is trained, or when ``d`` does not match.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        subspace: str | os.PathLike | ConceptSubspace | None = None,
        allow_text_encoder: bool = False,
        amsgrad: bool = False,
        maximize: bool = False,
        backend: str | None = None,
    ) -> None:
        groups = _as_groups(params)
        plan, in_optimizer = _plan(groups, subspace, allow_text_encoder=allow_text_encoder)
        super().__init__(
            groups,
            lr,
            tuple(betas),
            eps,
            weight_decay,
            bases=plan.bases(in_optimizer),
            side="input",
            amsgrad=amsgrad,
            maximize=maximize,
            backend=backend,
        )
        plan.project_factors_()
        _on_first_step(self)


class ProjectedOptimizer(optim.ProjectedOptimizer):
    """Any optimizer for kohya's ``--optimizer_type``, in :class:`gradproj.ProjectedOptimizer`.

    ``--optimizer_args "subspace='acme.safetensors'" "inner='bitsandbytes.optim.AdamW8bit'"
    "weight_decay=0.01"``: the inner class is built as kohya builds one,
    ``inner(params, lr=lr, **rest)``, and wrapped in update mode (the guarantee
    holds for every inner optimizer). Schedule-free optimizers are refused: they need
    ``train()``/``eval()`` switches, which the wrapper does not forward (and kohya
    makes only for its own schedule-free names, ``library/train_util.py:5240-5241``).

    Args:
        params, lr: from kohya.
        subspace, allow_text_encoder: as :class:`ProjectedAdamW`.
        inner: dotted name of the inner optimizer class (or the class).
        backend: force a gradproj backend for the projection.
        **inner_kwargs: the inner optimizer's own arguments.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        *,
        subspace: str | os.PathLike | ConceptSubspace | None = None,
        inner: str | type = "torch.optim.AdamW",
        allow_text_encoder: bool = False,
        backend: str | None = None,
        **inner_kwargs: Any,
    ) -> None:
        cls = _optimizer_class(inner)
        groups = _as_groups(params)
        plan, in_optimizer = _plan(groups, subspace, allow_text_encoder=allow_text_encoder)
        optimizer = cls(groups, lr=lr, **inner_kwargs)
        if callable(getattr(optimizer, "train", None)):
            raise ValueError(
                f"inner={inner!r} has train()/eval() modes (a schedule-free optimizer), which "
                "gradproj's wrapper does not forward; use another inner optimizer"
            )
        super().__init__(optimizer, plan.bases(in_optimizer), mode="update", backend=backend)
        plan.project_factors_()
        _on_first_step(self)


def _optimizer_class(inner: str | type) -> type:
    if isinstance(inner, type):
        cls = inner
    else:
        module, _, name = str(inner).rpartition(".")
        try:
            cls = getattr(importlib.import_module(module or "torch.optim"), name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"inner={inner!r}: no such optimizer class ({e})") from e
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"inner={inner!r} is not a torch.optim.Optimizer class")
    return cls
