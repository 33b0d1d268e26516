"""Which weights of a diffusers model read the text, and the bases mapping that protects them.

A concept subspace ``U (d × k)`` lives among the vectors a layer reads. The
input-side guarantee ``ΔW U = 0`` is about one linear layer ``y = W x``, so the
layers to protect are the linear layers whose input ``x`` is (a function of) the
text tokens, and ``d`` must be their input width. Two sets, chosen by ``target``:

``"input"`` (default) — the layers that read the text encoder's output itself,
    the space ``ConceptSubspace.from_prompts`` builds its basis in:

    - ``UNet2DConditionModel``: every cross-attention ``attn2.to_k`` / ``attn2.to_v``
      (``Attention`` modules named ``attn2``; ``d = cross_attention_dim``);
    - ``SD3Transformer2DModel`` and ``FluxTransformer2DModel``: ``context_embedder``
      (``d = joint_attention_dim``), the only layer that reads the text encoder's
      token states; every later block reads the embedded text *stream*, which the
      joint blocks transform.

``"attention"`` — the projections that read the text stream inside the blocks
    (for a basis built among *stream* states, ``d = inner_dim``):

    - ``UNet2DConditionModel``: the same ``attn2.to_k`` / ``attn2.to_v`` (the UNet
      has no text stream);
    - ``SD3Transformer2DModel``: ``attn.add_q_proj`` / ``add_k_proj`` / ``add_v_proj``
      of every ``JointTransformerBlock`` (text tokens' queries, keys and values);
    - ``FluxTransformer2DModel``: the same three of every ``FluxTransformerBlock``,
      plus ``attn.to_q`` / ``to_k`` / ``to_v`` and ``proj_mlp`` of every
      ``FluxSingleTransformerBlock``, which read the concatenated [text; image]
      tokens (so the basis also constrains how they read image tokens).

Layers are found by module *name and class* (``isinstance`` against the diffusers
classes), never by position, so a config with more or fewer blocks, a
``torch.compile``'d model (``_orig_mod``) or a DDP/accelerate wrapper (``module``)
resolves the same way. A layer that peft has wrapped for LoRA (``add_adapter``,
``get_peft_model``) is found through its base layer, so :func:`protect` works
before and after the adapter is added (see there for what it protects then).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gradproj.optim import NamedBases

TARGETS = ("input", "attention")


def _unwrap(model: nn.Module) -> nn.Module:
    # torch.compile keeps the original in _orig_mod; DDP / accelerate wrap it in .module.
    while True:
        inner = getattr(model, "_orig_mod", None) or (
            model.module if isinstance(getattr(model, "module", None), nn.Module) else None
        )
        if inner is None:
            return model
        model = inner


def _rules(model: nn.Module, target: str) -> list[tuple[type, str, tuple[str, ...]]]:
    """``[(parent class, child name of the parent, linear names within the child)]`` for ``model``.

    A rule ``(Cls, "attn", ("add_k_proj",))`` selects ``<parent>.attn.add_k_proj`` of
    every submodule ``parent`` that is an instance of ``Cls``; an empty child name
    means the linear layers are direct children of the parent.
    """
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
    from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock
    from diffusers.models.transformers.transformer_flux import (
        FluxSingleTransformerBlock,
        FluxTransformerBlock,
    )

    if isinstance(model, UNet2DConditionModel):
        return [(BasicTransformerBlock, "attn2", ("to_k", "to_v"))]
    if isinstance(model, SD3Transformer2DModel):
        if target == "input":
            return [(SD3Transformer2DModel, "", ("context_embedder",))]
        return [(JointTransformerBlock, "attn", ("add_q_proj", "add_k_proj", "add_v_proj"))]
    if isinstance(model, FluxTransformer2DModel):
        if target == "input":
            return [(FluxTransformer2DModel, "", ("context_embedder",))]
        return [
            (FluxTransformerBlock, "attn", ("add_q_proj", "add_k_proj", "add_v_proj")),
            (FluxSingleTransformerBlock, "attn", ("to_q", "to_k", "to_v")),
            (FluxSingleTransformerBlock, "", ("proj_mlp",)),
        ]
    raise TypeError(
        "gradproj.diffusers knows UNet2DConditionModel, SD3Transformer2DModel and "
        f"FluxTransformer2DModel; got {type(model).__name__}. Build the bases mapping by hand: "
        "{param: subspace} for the linear layers that read the text"
    )


def _linear(module: object) -> nn.Linear | None:
    """``module`` if it is a linear layer, its base layer if peft wrapped one, else None."""
    if isinstance(module, nn.Linear):
        return module
    base = getattr(module, "get_base_layer", None)  # peft's BaseTunerLayer
    if callable(base) and isinstance(module, nn.Module):
        inner = base()
        if isinstance(inner, nn.Linear):
            return inner
    return None


def _is_lora(module: object) -> bool:
    """Whether ``module`` is a peft LoRA layer (it has ``lora_A`` adapters)."""
    return isinstance(module, nn.Module) and isinstance(
        getattr(module, "lora_A", None), nn.ModuleDict
    )


def _text_reading_modules(model: nn.Module, target: str) -> dict[str, nn.Module]:
    """``{qualified name: module}`` as the model holds them (a peft LoRA layer stays wrapped)."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    model = _unwrap(model)
    base_model = getattr(model, "get_base_model", None)  # peft.get_peft_model's PeftModel
    if callable(base_model) and not _is_known(model):
        model = _unwrap(base_model())
    rules = _rules(model, target)
    found: dict[str, nn.Module] = {}
    for parent_name, parent in model.named_modules():
        for cls, child, leaves in rules:
            if not isinstance(parent, cls):
                continue
            holder = getattr(parent, child, None) if child else parent
            if holder is None:
                continue
            for leaf in leaves:
                layer = getattr(holder, leaf, None)
                if _linear(layer) is not None:
                    found[".".join(s for s in (parent_name, child, leaf) if s)] = layer
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no text-reading layers for target={target!r} "
            f"(looked for {[(c.__name__, ch, lv) for c, ch, lv in rules]}); "
            "does this model have cross-attention?"
        )
    return found


def _is_known(model: nn.Module) -> bool:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    return isinstance(model, (UNet2DConditionModel, SD3Transformer2DModel, FluxTransformer2DModel))


def text_readers(model: nn.Module, *, target: str = "input") -> dict[str, nn.Linear]:
    """``{qualified name: nn.Linear}``: the layers of ``model`` that read the text (module doc).

    For a layer peft wrapped for LoRA this is its (frozen) base layer. Raises
    ``TypeError`` for a model class it does not know and ``ValueError`` when the
    model has no such layer (e.g. a UNet without cross-attention).
    """
    return {name: _linear(module) for name, module in _text_reading_modules(model, target).items()}


def protect(
    model: nn.Module,
    subspace: Any,
    *,
    target: str = "input",
    lora_dtype: torch.dtype | None = torch.float32,
) -> dict[torch.nn.Parameter, Any]:
    """The ``bases`` mapping that keeps every text-reading weight of ``model`` off ``subspace``.

    Returns ``{parameter: subspace}`` (a :class:`gradproj.optim.NamedBases`, so
    errors and saved state name each parameter as the model does) for the layers of
    :func:`text_readers`. Pass it to ``gradproj.ProjectedOptimizer(opt, bases)``
    or ``gradproj.ProjectedAdamW(..., bases=bases)``; all parameters share the one
    subspace object, so they are projected in one fused launch. Call it where the
    optimizer is built: it describes the model as it is then.

    - A plain layer contributes its weight ``W`` (guarantee ``(W_T − W₀) U = 0``).
      In a model with LoRA adapters, a frozen plain layer cannot move and is left out.
    - A layer peft wrapped for LoRA (``y = W x + s·B A x``, so ``ΔW U = s·B (A U)``)
      contributes the ``A`` of every adapter. Each such ``A`` is projected **in place**
      once here, ``A ← A (I − U Uᵀ)``, so ``A U = 0`` from the start and, with the
      optimizer projecting ``A``'s updates, ``(B A) U`` stays at rounding level
      whatever ``B`` does (:mod:`gradproj.lora`). Its base weight is protected too
      if it is trainable.
    - ``lora_dtype`` (default float32): the protected adapters' ``A`` and ``B`` stored
      in a narrower float type (bf16/fp16, e.g. a model cast to the mixed-precision
      dtype before ``add_adapter``) are upcast to it in place, as diffusers'
      ``cast_training_params`` does, so that ``A U`` is kept at float32 rounding
      (≈ 1e-7‖A‖) rather than at bf16's (≈ 4e-3‖A‖); autocast still runs the
      adapter's matmuls in the mixed-precision dtype. ``None`` keeps their dtype, and
      the guarantee then holds at that dtype's rounding only.

    ``subspace`` is a ``ConceptSubspace`` or a ``(d × k)`` basis tensor; ``d`` must
    equal the input width of every selected layer, else ``ValueError`` naming the
    layers and widths. ``ValueError`` too when nothing selected can be trained
    (every text-reading layer frozen and without a LoRA adapter): protection that
    protects nothing is refused, never returned empty.
    """
    from gradproj.lora import protect_lora_

    if lora_dtype is not None and not (
        isinstance(lora_dtype, torch.dtype) and lora_dtype.is_floating_point
    ):
        raise TypeError(f"lora_dtype must be a floating torch.dtype or None, got {lora_dtype!r}")
    modules = _text_reading_modules(model, target)
    layers = {n: _linear(m) for n, m in modules.items()}
    basis = getattr(subspace, "basis", subspace)
    if not isinstance(basis, torch.Tensor) or basis.dim() != 2:
        raise TypeError(
            "subspace must be a ConceptSubspace or a (d × k) basis tensor, got "
            f"{type(subspace).__name__}"
        )
    d = basis.shape[0]
    wrong = {n: layer.in_features for n, layer in layers.items() if layer.in_features != d}
    if wrong:
        shown = ", ".join(f"{n} reads {w}" for n, w in list(wrong.items())[:4])
        raise ValueError(
            f"subspace dimension d={d} does not match the input width of {len(wrong)} of the "
            f"{len(layers)} layers selected by target={target!r} ({shown}"
            f"{', …' if len(wrong) > 4 else ''}); build the subspace in the space these layers "
            "read (target='input': the text encoder's hidden size)"
        )
    lora = {n: m for n, m in modules.items() if _is_lora(m)}
    any_lora = bool(lora) or any(_is_lora(m) for m in _unwrap(model).modules())
    params: dict[torch.Tensor, Any] = {}
    names: dict[torch.Tensor, str] = {}
    for n, layer in layers.items():
        if layer.weight.requires_grad or not any_lora:
            params[layer.weight] = subspace
            names[layer.weight] = f"{n}.weight"
    if lora:
        if lora_dtype is not None:
            # Before projecting: A rounded to bf16 after the projection would keep A U at
            # bf16 rounding, and the optimizer's anchor would then hold it there.
            for module in lora.values():
                for adapter, lora_a in module.lora_A.items():
                    _upcast_(lora_a.weight, lora_dtype)
                    _upcast_(module.lora_B[adapter].weight, lora_dtype)
        # A has d = in_features columns, checked above through its base layer.
        a_bases = protect_lora_(model, {layers[n].weight: subspace for n in lora})
        for n, module in lora.items():
            for adapter, lora_a in module.lora_A.items():
                params[lora_a.weight] = a_bases[lora_a.weight]
                names[lora_a.weight] = f"{n}.lora_A.{adapter}.weight"
    if not params:
        raise ValueError(
            f"nothing to protect in {type(_unwrap(model)).__name__} for target={target!r}: its "
            f"{len(layers)} text-reading layers ({', '.join(list(layers)[:3])}"
            f"{', …' if len(layers) > 3 else ''}) are frozen and none has a LoRA adapter; add "
            "them to the adapter's target modules (e.g. --lora_layers) or train them"
        )
    return NamedBases(params, names)


def _upcast_(param: torch.Tensor, dtype: torch.dtype) -> None:
    """Store ``param`` in ``dtype`` if that is wider (same tensor object, as ``.data`` swaps do)."""
    if param.dtype.is_floating_point and torch.finfo(param.dtype).bits < torch.finfo(dtype).bits:
        param.data = param.data.to(dtype)
