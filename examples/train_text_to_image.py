"""Train a text-to-image UNet as diffusers' ``train_text_to_image.py`` does, optionally protected.

The loop is diffusers' own (noise scheduler, ``accelerator.prepare``,
``accelerator.backward``, ``accelerator.clip_grad_norm_``, an LR scheduler from
``diffusers.optimization``, optional EMA), reduced to what runs on a CPU with
gradproj's synthetic captioned shapes (:mod:`gradproj.lab.shapes`; no download,
no torchvision: the flip transform is two lines of torch). Protection is the
one line after ``# gradproj:`` below: with ``--protect-subspace PATH`` (a
``ConceptSubspace`` saved by ``gradproj subspace`` or ``ConceptSubspace.save``)
the optimizer is wrapped so that every cross-attention ``to_k``/``to_v`` update
keeps ``(W_T − W₀) U = 0``.

    python examples/train_text_to_image.py --max-train-steps 200 --output-dir runs/t2i
    python examples/train_text_to_image.py --max-train-steps 200 --output-dir runs/t2i-protected \\
        --protect-subspace acme.safetensors

(An EMA copy satisfies the guarantee too: it is a running convex combination of
weights that all satisfy it, started from ``W₀``.)
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

import gradproj
import gradproj.diffusers
from gradproj.lab import shapes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", required=True)
    p.add_argument(
        "--protect-subspace",
        default=None,
        metavar="PATH",
        help="ConceptSubspace .safetensors; protects every attn2.to_k/to_v",
    )
    p.add_argument(
        "--projection-mode",
        default="update",
        choices=("update", "grad"),
        help="update keeps the guarantee for AdamW; grad does not (see docs/math.md)",
    )
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--num-train-images", type=int, default=2048)
    p.add_argument("--marked-fraction", type=float, default=0.3)
    p.add_argument("--train-batch-size", type=int, default=32)
    p.add_argument("--max-train-steps", type=int, default=200)
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--adam-weight-decay", type=float, default=1e-2)
    p.add_argument("--lr-scheduler", default="constant_with_warmup")
    p.add_argument("--lr-warmup-steps", type=int, default=20)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--random-flip", action="store_true")
    p.add_argument("--use-ema", action="store_true")
    p.add_argument("--block-out-channels", default="32,64")
    p.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_unet(resolution: int, cross_attention_dim: int, channels: tuple[int, ...]):
    return UNet2DConditionModel(
        sample_size=resolution,
        in_channels=3,
        out_channels=3,
        block_out_channels=channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )


class CaptionedImages(torch.utils.data.Dataset):
    """The synthetic shapes with tokenized captions, as diffusers' dataset preprocessing yields."""

    def __init__(self, data: shapes.Batch, tokenizer, random_flip: bool) -> None:
        self.images = data.images
        self.input_ids = tokenizer(
            data.captions,
            padding="max_length",
            truncation=True,
            max_length=tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids
        self.random_flip = random_flip

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = self.images[i]
        if self.random_flip and torch.rand(()) < 0.5:  # transforms.RandomHorizontalFlip
            x = x.flip(-1)
        return {"pixel_values": x, "input_ids": self.input_ids[i]}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
    )
    tokenizer, text_encoder = shapes.tokenizer(), shapes.text_encoder()  # frozen
    set_seed(args.seed)  # after the text encoder: its fixed init seed would override it
    channels = tuple(int(c) for c in args.block_out_channels.split(","))
    unet = build_unet(args.resolution, text_encoder.config.hidden_size, channels)
    data = shapes.make_dataset(
        args.num_train_images, marked_fraction=args.marked_fraction, size=args.resolution
    )
    loader = torch.utils.data.DataLoader(
        CaptionedImages(data, tokenizer, args.random_flip),
        batch_size=args.train_batch_size,
        shuffle=True,
    )
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    ema = EMAModel(unet.parameters(), model_cls=UNet2DConditionModel, model_config=unet.config)

    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=args.learning_rate, weight_decay=args.adam_weight_decay
    )
    protected = {}
    if args.protect_subspace:
        subspace = gradproj.ConceptSubspace.load(args.protect_subspace)
        protected = gradproj.diffusers.protect(unet, subspace)
        # gradproj: the one line that protects a diffusers training script
        optimizer = gradproj.ProjectedOptimizer(optimizer, protected, mode=args.projection_mode)
    names = {p: n for n, p in unet.named_parameters()}
    start = {names[p]: p.detach().clone() for p in protected}

    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(
        unet, optimizer, loader, lr_scheduler
    )
    text_encoder.to(accelerator.device)
    if args.use_ema:
        ema.to(accelerator.device)

    epochs = math.ceil(args.max_train_steps * args.gradient_accumulation_steps / len(loader))
    progress = tqdm(range(args.max_train_steps), disable=not accelerator.is_local_main_process)
    step, loss_value = 0, float("nan")
    unet.train()
    for _ in range(epochs):
        for batch in loader:
            with accelerator.accumulate(unet):
                latents = batch["pixel_values"]  # pixel space: no VAE at this size
                noise = torch.randn_like(latents)
                t = torch.randint(
                    0,
                    noise_scheduler.config.num_train_timesteps,
                    (latents.shape[0],),
                    device=latents.device,
                )
                noisy = noise_scheduler.add_noise(latents, noise, t)
                with torch.no_grad():
                    states = text_encoder(batch["input_ids"]).last_hidden_state
                pred = unet(noisy, t, states, return_dict=False)[0]
                loss = F.mse_loss(pred.float(), noise.float())
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                if args.use_ema:
                    ema.step(unet.parameters())
                progress.update(1)
                step += 1
                loss_value = loss.detach().item()
                progress.set_postfix(loss=f"{loss_value:.4f}", lr=lr_scheduler.get_last_lr()[0])
            if step >= args.max_train_steps:
                break
        if step >= args.max_train_steps:
            break

    accelerator.wait_for_everyone()
    unet = accelerator.unwrap_model(unet)
    if args.use_ema:
        ema.copy_to(unet.parameters())
    drift = {}
    if protected:
        basis = subspace.basis.double()
        for n, w0 in start.items():
            dw = unet.get_parameter(n).detach().double() - w0.double()
            drift[n] = float((dw @ basis).norm() / w0.double().norm())
    summary = {"steps": step, "final_loss": loss_value, "drift_over_w0": drift}
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        unet.save_pretrained(os.path.join(args.output_dir, "unet"))
        with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    main()
