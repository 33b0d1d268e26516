"""``gradproj check``: one real training step of a small diffusers UNet, projected by every backend.

Builds a ``UNet2DConditionModel`` and a ``CLIPTextModel`` from small configs (no
hub downloads), takes one denoising-loss backward pass, then projects the
cross-attention ``attn2.to_k`` / ``attn2.to_v`` weight gradients onto the
complement of a "concept" subspace (the top directions of the text encoder's
hidden states for a concept prompt) with every backend that can run here, and
prints each backend's max error against the float64 reference and how much an
SGD step would move the layers' response to the concept, ``‖ΔW U‖ / ‖ΔW‖``,
before and after projection.
"""

from __future__ import annotations

import time

import torch

from gradproj import backends, ops
from gradproj import reference as R

# The concept is one 16-token prompt: its (16 × 64) hidden states span at most 16 directions.
MAX_K = 16


def _models(seed: int):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=1000,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        )
    )
    return unet, text


def run(seed: int = 0, k: int = 4, batch: int = 4) -> dict[str, tuple[float, float]]:
    """Run the check and print a table.

    Returns ``{"unprojected": (0, ratio)}`` plus ``{backend: (max abs error vs
    float64, ‖ΔW U‖/‖ΔW‖ after projection)}`` for every backend that ran.
    """
    if not 1 <= k <= MAX_K:
        raise ValueError(
            f"k must lie in [1, {MAX_K}] (the concept prompt has {MAX_K} tokens), got {k}"
        )
    unet, text = _models(seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # A "concept": the hidden states of one prompt, as the cross-attention K/V see them.
        concept_ids = torch.randint(0, 1000, (1, 16), generator=gen)
        concept_states = text(concept_ids).last_hidden_state[0].double()  # (16 × 64)
        u = torch.linalg.svd(concept_states.T, full_matrices=False)[0][:, :k].float()
        captions = text(torch.randint(0, 1000, (batch, 16), generator=gen)).last_hidden_state

    latents = torch.randn(batch, 4, 16, 16, generator=gen)
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    noisy = latents + noise  # the scheduler does not matter for the gradient's shape
    loss = torch.nn.functional.mse_loss(unet(noisy, t, captions).sample, noise)
    loss.backward()

    named = [
        (n, p)
        for n, p in unet.named_parameters()
        if n.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))
    ]
    grads = [p.grad for _, p in named]
    ref = [R.project(g.double(), u.double()) for g in grads]

    def response(gs: list[torch.Tensor]) -> float:
        # SGD moves W by -lr·G, so ‖ΔW U‖/‖ΔW‖ = ‖G U‖/‖G‖ over all protected weights.
        num = sum(float((g.double() @ u.double()).norm() ** 2) for g in gs) ** 0.5
        return num / sum(float(g.double().norm() ** 2) for g in gs) ** 0.5

    print(
        f"UNet2DConditionModel ({sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M params), "
        f"{len(named)} protected cross-attention K/V weights {tuple(grads[0].shape)}, "
        f"concept basis k={k}, loss {loss.item():.4f}"
    )
    print(f"before projection: ‖ΔW U‖/‖ΔW‖ = {response(grads):.3e}")
    print(f"{'backend':<10} {'max |err| vs float64':>22} {'‖ΔW U‖/‖ΔW‖ after':>20} {'time':>9}")
    results = {"unprojected": (0.0, response(grads))}
    for name in backends.registered():
        if backends.get(name).unsupported_reason("project_bucket_", u.device, u.dtype):
            continue
        work = [g.clone() for g in grads]
        start = time.perf_counter()
        ops.project_(work, u, backend=name)
        elapsed = time.perf_counter() - start
        err = max(float((w.double() - r).abs().max()) for w, r in zip(work, ref, strict=True))
        results[name] = (err, response(work))
        note = " (interpreter)" if name == "triton" and u.device.type == "cpu" else ""
        note = " (emulated)" if backends.get(name).emulated else note
        print(f"{name:<10} {err:>22.3e} {response(work):>20.3e} {elapsed * 1e3:>7.1f}ms{note}")
    return results
