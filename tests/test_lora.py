"""protect_lora_ on a real peft-wrapped diffusers UNet: (B A) U = 0 at every step.

The UNet is built from a tiny config (nothing is downloaded); LoRA goes on every
``to_k``/``to_v`` (self- and cross-attention); only the cross-attention (``attn2``)
ones, which read the text embeddings, are protected.
"""

from __future__ import annotations

import pytest
import torch

from gradproj import ProjectedOptimizer, protect_lora_

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

CROSS_DIM, K, RANK = 64, 6, 4
# ‖(B A) U‖ ≤ ‖B‖·‖A U‖ and A U stays at fp32 rounding (≈ 1e-7·‖A‖, anchored);
# 1e-6 leaves 10x headroom. Measured: ≈ 5e-8 protected, ≈ 0.18 unprotected.
BOUND = 1e-6


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64),
        cross_attention_dim=CROSS_DIM,
        layers_per_block=1,
        sample_size=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=8,
    )


def cross_attention_kv(unet) -> list[tuple[str, torch.nn.Module]]:
    return [
        (f"{name}.{proj}", getattr(module, proj))
        for name, module in unet.named_modules()
        if name.endswith("attn2")
        for proj in ("to_k", "to_v")
    ]


def wrapped(protect: bool):
    unet = tiny_unet()
    basis = torch.linalg.qr(torch.randn(CROSS_DIM, K, generator=torch.Generator().manual_seed(1)))[
        0
    ]
    layers = cross_attention_kv(unet)
    # keyed by the base weight (identity), one by name to exercise both
    bases = {linear.weight: basis for _, linear in layers[1:]}
    bases[f"{layers[0][0]}.weight"] = basis
    unet.requires_grad_(False)
    config = peft.LoraConfig(
        r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=["to_k", "to_v"]
    )
    unet.add_adapter(config)
    lora_bases = protect_lora_(unet, bases) if protect else {}
    trainable = [p for p in unet.parameters() if p.requires_grad]
    inner = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=1e-2)
    opt = ProjectedOptimizer(inner, lora_bases, named_parameters=unet)
    return unet, opt, basis, [m for _, m in cross_attention_kv(unet)]


def worst_violation(lora_layers, basis) -> tuple[float, float]:
    """max over layers of ‖(B A) U‖ / (‖B‖‖A‖), and the smallest ‖B A‖ (to see it moved)."""
    worst, smallest = 0.0, float("inf")
    for layer in lora_layers:
        a = layer.lora_A["default"].weight.detach().double()
        b = layer.lora_B["default"].weight.detach().double()
        ba = b @ a
        worst = max(worst, ((ba @ basis.double()).norm() / (b.norm() * a.norm() + 1e-30)).item())
        smallest = min(smallest, ba.norm().item())
    return worst, smallest


def train_steps(unet, opt, lora_layers, basis, steps: int = 3) -> list[tuple[float, float]]:
    gen = torch.Generator().manual_seed(2)
    seen = []
    for _ in range(steps):
        latents = torch.randn(2, 4, 16, 16, generator=gen)
        text = torch.randn(2, 7, CROSS_DIM, generator=gen)
        t = torch.randint(0, 1000, (2,), generator=gen)
        noise = torch.randn(2, 4, 16, 16, generator=gen)
        opt.zero_grad()
        pred = unet(latents, t, encoder_hidden_states=text).sample
        torch.nn.functional.mse_loss(pred, noise).backward()
        opt.step()
        seen.append(worst_violation(lora_layers, basis))
    return seen


def test_protect_lora_projects_a_at_wrap_time():
    _, _, basis, layers = wrapped(protect=True)
    assert len(layers) == 8  # to_k/to_v of 4 cross-attention blocks (1 down, 1 mid, 2 up)
    for layer in layers:
        a = layer.lora_A["default"].weight.detach()
        assert (a @ basis).norm() <= BOUND * a.norm()
        assert layer.get_base_layer().weight.requires_grad is False


def test_lora_keeps_ba_u_zero_at_every_step():
    unet, opt, basis, layers = wrapped(protect=True)
    for step, (violation, moved) in enumerate(train_steps(unet, opt, layers, basis)):
        assert moved > 0, "B A is still zero: the test would be vacuous"
        assert violation <= BOUND, f"step {step}: ‖(BA)U‖/(‖B‖‖A‖) = {violation:.3g}"
    # what the guarantee means: a concept embedding's keys and values are unchanged
    concept = torch.randn(3, K) @ basis.T
    for layer in layers:
        base = layer.get_base_layer()
        torch.testing.assert_close(layer(concept), base(concept), rtol=0, atol=1e-6)


def test_without_protection_ba_u_grows():
    unet, opt, basis, layers = wrapped(protect=False)
    violation, _ = train_steps(unet, opt, layers, basis)[-1]
    assert violation > 1e-2


def test_protect_lora_errors_name_the_weight():
    unet = tiny_unet()
    name, layer = cross_attention_kv(unet)[0]
    unet.add_adapter(peft.LoraConfig(r=RANK, target_modules=["to_k", "to_v"]))
    bad = torch.linalg.qr(torch.randn(32, K))[0]
    with pytest.raises(ValueError, match=f"{name}.weight.*needs {CROSS_DIM} rows"):
        protect_lora_(unet, {layer.weight: bad})
    with pytest.raises(ValueError, match="no LoRA layer wraps"):
        protect_lora_(unet, {"conv_in.weight": bad})


# ---------------------------------------------------------------- gradproj.diffusers.protect


def _adapted(target_modules=("to_k", "to_v"), dtype=torch.float32):
    """The official LoRA scripts' order: freeze, cast to the training dtype, add the adapter."""
    unet = tiny_unet()
    unet.requires_grad_(False)
    unet.to(dtype)
    unet.add_adapter(
        peft.LoraConfig(
            r=RANK,
            lora_alpha=RANK,
            init_lora_weights="gaussian",
            target_modules=list(target_modules),
        )
    )
    return unet


def _basis():
    return torch.linalg.qr(torch.randn(CROSS_DIM, K, generator=torch.Generator().manual_seed(1)))[0]


def test_protect_after_add_adapter_returns_the_adapters_a():
    import gradproj.diffusers as gd

    unet, basis = _adapted(), _basis()
    bases = gd.protect(unet, basis)
    layers = [m for _, m in cross_attention_kv(unet)]
    assert {id(p) for p in bases} == {id(m.lora_A["default"].weight) for m in layers}
    assert all(
        n.endswith(".lora_A.default.weight") and ".attn2." in n for n in bases.param_names.values()
    )
    for layer in layers:  # projected in place at call time
        a = layer.lora_A["default"].weight.detach()
        assert (a @ basis).norm() <= BOUND * a.norm()
    trainable = [p for p in unet.parameters() if p.requires_grad]
    opt = ProjectedOptimizer(torch.optim.AdamW(trainable, lr=1e-2, weight_decay=1e-2), bases)
    for step, (violation, moved) in enumerate(train_steps(unet, opt, layers, basis)):
        assert moved > 0
        assert violation <= BOUND, f"step {step}: {violation:.3g}"


def test_protect_before_add_adapter_is_the_plain_weights():
    import gradproj.diffusers as gd

    unet = tiny_unet()
    bases = gd.protect(unet, _basis())
    assert {id(p) for p in bases} == {id(m.weight) for _, m in cross_attention_kv(unet)}


@pytest.mark.parametrize("lora_dtype", [torch.float32, None])
def test_bf16_adapter_is_upcast_so_the_guarantee_holds_at_fp32(lora_dtype):
    """A bf16 model gets bf16 adapters; protect() stores the protected A, B in fp32 (default)."""
    import gradproj.diffusers as gd

    unet, basis = _adapted(dtype=torch.bfloat16), _basis()
    layers = [m for _, m in cross_attention_kv(unet)]
    bases = gd.protect(unet, basis, lora_dtype=lora_dtype)
    want = torch.float32 if lora_dtype is not None else torch.bfloat16
    for layer in layers:
        assert layer.lora_A["default"].weight.dtype == want
        assert layer.lora_B["default"].weight.dtype == want
        assert layer.get_base_layer().weight.dtype == torch.bfloat16  # the base is untouched
    trainable = [p for p in unet.parameters() if p.requires_grad]
    opt = ProjectedOptimizer(torch.optim.AdamW(trainable, lr=1e-2), bases)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = unet(
                torch.randn(2, 4, 16, 16, generator=gen),
                torch.randint(0, 1000, (2,), generator=gen),
                encoder_hidden_states=torch.randn(2, 7, CROSS_DIM, generator=gen),
            ).sample
        torch.nn.functional.mse_loss(
            pred.float(), torch.randn(pred.shape, generator=gen)
        ).backward()
        opt.step()
    worst = max(
        (
            (m.lora_A["default"].weight.double() @ basis.double()).norm()
            / m.lora_A["default"].weight.double().norm()
        ).item()
        for m in layers
    )
    if lora_dtype is not None:
        assert worst <= BOUND
    else:  # only at bf16 rounding (what the docstring says), far above fp32's
        assert 1e-5 < worst < 2e-2


def test_protect_protects_what_is_wrapped_and_refuses_nothing():
    import gradproj.diffusers as gd

    unet = _adapted(target_modules=("to_k",))  # to_v frozen and unwrapped: cannot move
    bases = gd.protect(unet, _basis())
    names = sorted(bases.param_names.values())
    assert names and all(".attn2.to_k.lora_A." in n for n in names)
    with pytest.raises(ValueError, match=r"nothing to protect.*frozen and none has a LoRA adapter"):
        gd.protect(_adapted(target_modules=("to_q",)), _basis())
    with pytest.raises(TypeError, match="lora_dtype"):
        gd.protect(unet, _basis(), lora_dtype="float32")


def test_protect_finds_the_layers_inside_get_peft_model():
    import gradproj.diffusers as gd

    unet = tiny_unet()
    model = peft.get_peft_model(unet, peft.LoraConfig(r=RANK, target_modules=["to_k", "to_v"]))
    bases = gd.protect(model, _basis())
    layers = [m for _, m in cross_attention_kv(unet)]
    assert {id(p) for p in bases} == {id(m.lora_A["default"].weight) for m in layers}


def test_bases_built_before_add_adapter_are_refused_by_name():
    """protect() before add_adapter names the base weights, which LoRA freezes: loud, with why."""
    import gradproj.diffusers as gd

    unet = tiny_unet()
    bases = gd.protect(unet, _basis())
    unet.requires_grad_(False)
    unet.add_adapter(peft.LoraConfig(r=RANK, target_modules=["to_k", "to_v"]))
    trainable = [p for p in unet.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match=r"attn2\.to_k\.weight.*frozen.*after add_adapter"):
        ProjectedOptimizer(torch.optim.AdamW(trainable), bases)
