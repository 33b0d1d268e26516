"""Tiny random diffusers pipelines (SD, SDXL, Flux, SD3) saved as folders: no hub, no network.

Built from configs with fixed seeds and saved with ``save_pretrained``, so that code
under test loads them as it would a hub model. Tokenizers are built offline: a
``CLIPTokenizer`` over single letters and a unigram ``T5TokenizerFast``. Shared by
``tests/test_diffusers_examples.py`` (the official training scripts) and
``tests/test_subspace_pipelines.py`` (subspaces from ``encode_prompt``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

PROMPT = "a photo of sks dog"

# Built from configs with fixed seeds and saved with save_pretrained as pipeline folders, so
# every script loads them as it would a hub model. Widths: SD text 32; SDXL 32 + 32 = 64;
# Flux context 32 (T5), stream 32; SD3 context 64 (T5, ≥ the two CLIPs' 32 + 32), stream 32.

CHARS = "abcdefghijklmnopqrstuvwxyz"
CLIP_TOKENS = 77  # the SD3 and Flux scripts tokenize CLIP prompts to 77 whatever the tokenizer says


def _clip_tokenizer(folder: Path):
    """A ``CLIPTokenizer`` over single letters (no merges): every word becomes its letters."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>", *CHARS, *(c + "</w>" for c in CHARS)]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=CLIP_TOKENS
    )


def _t5_tokenizer():
    """A ``T5TokenizerFast`` (a unigram ``tokenizers`` model): the prompt's words, then letters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    words = [("\u2581" + w, -1.0) for w in PROMPT.split()]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0), *words]
    tok = Tokenizer(models.Unigram([*pieces, *((c, -5.0) for c in CHARS)], unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0
    )


def _clip(hidden: int, *, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=2 + 2 * len(CHARS),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_TOKENS,
        projection_dim=hidden,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _t5(d_model: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=64,
            d_model=d_model,
            d_kv=8,
            d_ff=2 * d_model,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )


def _vae(latent_channels: int = 4, **kw):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=32,
        **kw,
    )


def _unet(cross_attention_dim: int, **kw):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=4,
        cross_attention_dim=cross_attention_dim,
        **kw,
    )


def build_sd(folder: Path) -> None:
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=_clip(32),
        tokenizer=_clip_tokenizer(folder / "_vocab"),
        unet=_unet(32),
        scheduler=DDPMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(folder)


def build_sdxl(folder: Path) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    torch.manual_seed(0)
    tokenizer = _clip_tokenizer(folder / "_vocab")
    StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=_clip(32),
        text_encoder_2=_clip(32, projection=True),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        # text_time: pooled text (32) + 6 size/crop numbers of 8 each
        unet=_unet(
            64,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
        ),
        scheduler=EulerDiscreteScheduler(steps_offset=1),
    ).save_pretrained(folder)


def build_flux(folder: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(
            16,
            shift_factor=0.0609,
            scaling_factor=1.5035,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        text_encoder=_clip(32),
        tokenizer=_clip_tokenizer(folder / "_vocab"),
        text_encoder_2=_t5(32),
        tokenizer_2=_t5_tokenizer(),
        transformer=FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,  # 16 latent channels packed 2 × 2
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=(4, 4, 8),
        ),
    ).save_pretrained(folder)


def build_sd3(folder: Path) -> None:
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(0)
    tokenizer = _clip_tokenizer(folder / "_vocab")
    StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(16, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=_clip(32, projection=True),
        tokenizer=tokenizer,
        text_encoder_2=_clip(32, projection=True),
        tokenizer_2=tokenizer,
        text_encoder_3=_t5(64),
        tokenizer_3=_t5_tokenizer(),
        transformer=SD3Transformer2DModel(
            sample_size=16,
            patch_size=1,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=64,
            caption_projection_dim=32,
            pooled_projection_dim=64,  # the two CLIPs' projections, 32 + 32
        ),
    ).save_pretrained(folder)


def tiny_unet(cross_dim: int = 16):
    """A two-block ``UNet2DConditionModel`` (3 channels, 8×8) reading ``cross_dim``-wide text."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_dim,
        attention_head_dim=4,
        norm_num_groups=4,
    )


BUILDERS = {"sd": build_sd, "sdxl": build_sdxl, "flux": build_flux, "sd3": build_sd3}
