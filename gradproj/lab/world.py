"""The lab's synthetic world: its configuration, data, text side, models, training and sampling.

Everything an experiment of :mod:`gradproj.lab` shares (nothing is downloaded):

- **data** (:mod:`gradproj.lab.shapes`): 16×16 images of a coloured shape on a
  background; a fraction carry the *prohibited mark* (a yellow corner stamp) and
  their captions end in ``"acme"`` instead of ``"plain"``;
- **text side**: a frozen ``CLIPTextModel`` from a small config, identical in every
  model; the **concept subspaces** ``U`` come from it with
  ``ConceptSubspace.from_prompts`` (``"difference"`` mode: states of the ``acme``
  captions minus those of their ``plain`` twins, all positions; ``"states"`` mode:
  every state of the ``acme`` captions);
- **the validated probe** (:mod:`gradproj.lab.probes`) that measures samples;
- **models**: a small pixel-space ``UNet2DConditionModel`` (:func:`build_unet`),
  trained by one recipe (:func:`train_unet`) and sampled by DDIM with
  classifier-free guidance (:func:`sample`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from gradproj.lab import probes, shapes
from gradproj.subspace import ConceptSubspace


@dataclass
class DemoConfig:
    """Every knob of one demo run (the defaults are the README's command)."""

    arms: tuple[str, ...] = ("plain", "update")
    seeds: tuple[int, ...] = (0, 1, 2)
    size: int = 16
    n_train: int = 2048
    marked_fraction: float = 0.3
    steps: int = 500
    batch_size: int = 32
    lr: float = 6e-3  # 2e-3 had not bound 'acme' to the mark after 500 steps; 6e-3 had at 800
    caption_dropout: float = 0.2  # null caption, for classifier-free guidance
    energy: float = 0.99  # share of Σs² the concept subspace keeps
    n_samples: int = 32  # per prompt set per model
    sample_steps: int = 15  # DDIM
    guidance: float = 3.0  # 6 over-saturated the samples and lost the mark (measured)
    attack_steps: int = 50
    attack_lr: float = 5e-2
    probe_steps: int = 600
    block_out_channels: tuple[int, ...] = (16, 32)  # 0.14 s a step at batch 32; (32, 64) 0.30
    threads: int = 1  # the machine is shared; one thread is also fastest for these sizes


DEFAULT = DemoConfig()
FULL = replace(
    DEFAULT,
    arms=("plain", "update", "update-zero", "grad", "update-states", "update-states-zero"),
    seeds=(0, 1, 2, 3, 4),
    steps=1000,
    n_samples=64,
)
TINY = replace(  # for the test suite: seconds, not a measurement
    DEFAULT,
    arms=("plain", "update"),
    seeds=(0,),
    n_train=128,
    steps=3,
    batch_size=8,
    n_samples=4,
    sample_steps=2,
    attack_steps=2,
    probe_steps=20,
    block_out_channels=(8, 16),
)


@dataclass
class World:
    """Everything the arms share: data, the frozen text side, subspaces, the validated probe."""

    tok: Any
    encoder: Any
    train: shapes.Batch
    real_test: shapes.Batch
    contexts: torch.Tensor  # (n_train, L, d): encoder states of the training captions
    null_context: torch.Tensor  # (1, L, d): the empty prompt
    subspaces: dict[str, ConceptSubspace]
    probe: Any
    probe_check: dict[str, float]


def build_world(cfg: DemoConfig) -> World:
    """Make the data, encode the captions, build both subspaces, train and validate the probe."""
    tok, encoder = shapes.tokenizer(), shapes.text_encoder()
    train = shapes.make_dataset(cfg.n_train, marked_fraction=cfg.marked_fraction, size=cfg.size)
    real_test = shapes.make_dataset(
        max(512, cfg.n_samples), marked_fraction=0.5, size=cfg.size, seed=1
    )
    probe = probes.train_probe(train, steps=cfg.probe_steps)
    return World(
        tok=tok,
        encoder=encoder,
        train=train,
        real_test=real_test,
        contexts=shapes.encode(train.captions, tok, encoder),
        null_context=shapes.encode([""], tok, encoder),
        subspaces=concept_subspaces(tok, encoder, cfg.energy),
        probe=probe,
        probe_check=probes.validate(probe, real_test),
    )


def noise_scheduler():
    """The demo's noise schedule: ``DDPMScheduler``, 1000 steps, ``squaredcos_cap_v2``."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


def build_unet(cfg: DemoConfig, cross_attention_dim: int):
    """A small pixel-space ``UNet2DConditionModel``.

    Cross-attention sits at the 8×8 level only: at 16×16 the self-attention over
    256 tokens with 8-wide heads took 3× the step time on CPU (measured), for
    a text signal that the 8×8 level reads as well.
    """
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=cfg.size,
        in_channels=3,
        out_channels=3,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def concept_subspaces(tok, encoder, energy: float) -> dict[str, ConceptSubspace]:
    """The concept subspace in both ``from_prompts`` modes, from every ``acme`` caption."""
    combos = shapes.all_labels()
    concept = [shapes.caption(*x, True) for x in combos]
    neutral = [shapes.caption(*x, False) for x in combos]
    return {
        # The lab's models are conditioned on masked states (shapes.encode), so the
        # subspace is built from masked states too.
        "difference": ConceptSubspace.from_prompts(
            concept, encoder, tok, neutral_prompts=neutral, energy=energy, attention_mask=True
        ),
        "states": ConceptSubspace.from_prompts(
            concept, encoder, tok, energy=energy, attention_mask=True
        ),
    }


def train_unet(
    unet,
    images: torch.Tensor,
    contexts: torch.Tensor,
    null_context: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    caption_dropout: float,
    seed: int,
    wrap=None,
    progress=None,
    postfix: dict[str, Any] | None = None,
):
    """The lab's one training recipe, in place on ``unet``; returns the noise scheduler.

    AdamW (weight decay 1e-2) with a 20-step linear warm-up, ε-prediction MSE on
    :func:`noise_scheduler`'s forward process, captions dropped to ``null_context``
    with probability ``caption_dropout`` (for classifier-free guidance); batches,
    noise and timesteps drawn from a generator seeded with ``seed``. ``wrap``: a
    function of the AdamW optimizer that returns the optimizer to step (e.g. a
    :class:`gradproj.ProjectedOptimizer` around it). Leaves ``unet`` in eval mode.
    """
    inner = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    opt = inner if wrap is None else wrap(inner)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    noise_sched = noise_scheduler()
    g = torch.Generator().manual_seed(seed)
    unet.train()
    for _ in range(steps):
        i = torch.randint(images.shape[0], (batch_size,), generator=g)
        x0, ctx = images[i], contexts[i]
        drop = torch.rand(batch_size, generator=g) < caption_dropout
        ctx = torch.where(drop[:, None, None], null_context, ctx)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(1000, (batch_size,), generator=g)
        pred = unet(noise_sched.add_noise(x0, noise, t), t, ctx).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress.update(1)
            progress.set_postfix(**(postfix or {}), loss=f"{loss.item():.3f}")
    unet.eval()
    return noise_sched


@torch.no_grad()
def sample(
    unet,
    noise_scheduler,
    context: torch.Tensor,
    null_context: torch.Tensor,
    noise: torch.Tensor,
    *,
    steps: int,
    guidance: float,
) -> torch.Tensor:
    """DDIM samples from ``noise`` with classifier-free guidance ``ε_∅ + s (ε_c − ε_∅)``."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(noise_scheduler.config)
    ddim.set_timesteps(steps)
    n = noise.shape[0]
    context = context.expand(n, *context.shape[-2:])
    both = torch.cat([context, null_context.expand(n, *null_context.shape[-2:])])
    x = noise.clone()
    for t in ddim.timesteps:
        eps_c, eps_0 = unet(torch.cat([x, x]), t, both).sample.chunk(2)
        x = ddim.step(eps_0 + guidance * (eps_c - eps_0), t, x).prev_sample
    return x.clamp(-1, 1)


def save_unet(unet, path: str | os.PathLike, cfg: DemoConfig) -> None:
    """Write a trained demo UNet (weights and the config that builds it) to ``path``."""
    torch.save({"config": asdict(cfg), "state_dict": unet.state_dict()}, path)


def load_unet(path: str | os.PathLike):
    """The UNet written by :func:`save_unet` (and its :class:`DemoConfig`), in eval mode."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in saved["config"].items()}
    cfg = DemoConfig(**fields)
    state = saved["state_dict"]
    cross = next(v for k, v in state.items() if k.endswith("attn2.to_k.weight")).shape[1]
    unet = build_unet(cfg, cross)
    unet.load_state_dict(state)
    return unet.eval(), cfg
