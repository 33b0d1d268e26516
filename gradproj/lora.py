"""Protecting LoRA adapters: keep ``(B A) U = 0`` for every protected base weight.

A LoRA layer computes ``y = W x + s·B A x`` (``A: r × in``, ``B: out × r``), so
its effective weight change is ``ΔW = s·B A`` and ``ΔW U = s·B (A U)``. Hence
``A U = 0`` is enough, whatever ``B`` does:

1. at wrap time every protected ``A`` is projected once, ``A ← A (I − U Uᵀ)``
   (:func:`protect_lora_`), which makes ``A U = 0``;
2. from then on ``A``'s *updates* are projected on the input side by
   :class:`gradproj.ProjectedOptimizer` (``mode="update"``) or
   :class:`gradproj.ProjectedAdamW`, with the anchor ``C = A₀ U = 0`` — so
   ``A U`` stays at rounding level for any inner optimizer.

``B`` needs no projection and the frozen base weight is never touched.
Requires ``peft`` (LoRA layers injected by ``peft.get_peft_model`` or by
diffusers' ``model.add_adapter(LoraConfig(...))``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from gradproj import ops
from gradproj.reference import side_dim


def _plain_name(name: str) -> str:
    """A parameter's name in the unwrapped model (peft adds a prefix and ``.base_layer``)."""
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


@torch.no_grad()
def protect_lora_(
    model: nn.Module, bases: Mapping[torch.Tensor | str, object]
) -> dict[torch.Tensor, object]:
    """Project every protected LoRA ``A`` onto ``span(U)^⊥`` in place; return its bases.

    Args:
        model: a model with peft LoRA layers.
        bases: ``{base weight: basis}``, keyed by the frozen base layer's weight
            tensor (identity; it is the same object before and after peft wraps
            the layer) or by its name in the unwrapped model (e.g.
            ``"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"``).
            A basis is an ``(in × k)`` orthonormal tensor or a ``ConceptSubspace``.

    Returns:
        ``{lora_A weight: basis}`` for every adapter of every protected layer:
        pass it as ``bases`` to :class:`gradproj.ProjectedOptimizer` (update
        mode) or :class:`gradproj.ProjectedAdamW`, side ``"input"``.
    """
    from peft.tuners.lora import LoraLayer  # optional dependency

    by_id = {id(k): (k, v) for k, v in bases.items() if isinstance(k, torch.Tensor)}
    by_name = {k: v for k, v in bases.items() if isinstance(k, str)}
    used: set[object] = set()
    out: dict[torch.Tensor, object] = {}
    for module_name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        base_weight = module.get_base_layer().weight
        plain = _plain_name(f"{module_name}.base_layer.weight")
        if id(base_weight) in by_id:
            basis, key = by_id[id(base_weight)][1], id(base_weight)
        elif plain in by_name:
            basis, key = by_name[plain], plain
        else:
            continue
        used.add(key)
        if basis is None:
            continue
        u, w = ops.unpack_basis(basis, None, f"basis for {plain!r}")
        for adapter, lora_a in module.lora_A.items():
            a = lora_a.weight
            d = side_dim(a.shape, "input")
            if u.dim() != 2 or u.shape[0] != d:
                raise ValueError(
                    f"the basis for {plain!r} has shape {tuple(u.shape)}, but LoRA adapter "
                    f"{adapter!r}'s A (shape {tuple(a.shape)}) needs {d} rows"
                )
            ops.check_orthonormal_(u, f"the basis for {plain!r}")
            # Soft weights w project A's rows partially (A U ← A U (1 − w)), as the
            # optimizer will project its updates.
            ops.project_(a, u.to(a.device), weights=None if w is None else w.to(a.device))
            out[a] = basis
    missing = [k for k in by_name if k not in used] + [
        f"tensor of shape {tuple(t.shape)}" for i, (t, _) in by_id.items() if i not in used
    ]
    if missing:
        raise ValueError(f"no LoRA layer wraps these protected weights: {missing}")
    return out
