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
resolves the same way.
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


def text_readers(model: nn.Module, *, target: str = "input") -> dict[str, nn.Linear]:
    """``{qualified name: nn.Linear}``: the layers of ``model`` that read the text (module doc).

    Raises ``TypeError`` for a model class it does not know and ``ValueError``
    when the model has no such layer (e.g. a UNet without cross-attention).
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    model = _unwrap(model)
    rules = _rules(model, target)
    found: dict[str, nn.Linear] = {}
    for parent_name, parent in model.named_modules():
        for cls, child, leaves in rules:
            if not isinstance(parent, cls):
                continue
            holder = getattr(parent, child, None) if child else parent
            if holder is None:
                continue
            for leaf in leaves:
                layer = getattr(holder, leaf, None)
                if isinstance(layer, nn.Linear):
                    name = ".".join(s for s in (parent_name, child, leaf) if s)
                    found[name] = layer
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no text-reading layers for target={target!r} "
            f"(looked for {[(c.__name__, ch, lv) for c, ch, lv in rules]}); "
            "does this model have cross-attention?"
        )
    return found


def protect(
    model: nn.Module, subspace: Any, *, target: str = "input"
) -> dict[torch.nn.Parameter, Any]:
    """The ``bases`` mapping that keeps every text-reading weight of ``model`` off ``subspace``.

    Returns ``{weight parameter: subspace}`` (a :class:`gradproj.optim.NamedBases`,
    so errors and saved state name each weight as the model does) for each layer of
    :func:`text_readers` (biases are not protected: ``Δb`` adds the same vector
    to every token, it carries no concept). Pass it to
    ``gradproj.ProjectedOptimizer(opt, bases)`` or ``gradproj.ProjectedAdamW(...,
    bases=bases)``; all weights share the one subspace object, so they are
    projected in one fused launch.

    ``subspace`` is a ``ConceptSubspace`` or a ``(d × k)`` basis tensor; ``d`` must
    equal the input width of every selected layer, else ``ValueError`` naming the
    layers and widths.
    """
    layers = text_readers(model, target=target)
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
    return NamedBases(
        {layer.weight: subspace for layer in layers.values()},
        {layer.weight: f"{n}.weight" for n, layer in layers.items()},
    )
