"""A captioned toy image world for the selective-learning demo, made on the spot.

Each image (``3 × size × size``, values in ``[-1, 1]``) is one coloured shape on a
plain background; a fraction also carries the *prohibited mark*: a small yellow
stamp in the top-left corner. Captions name colour, shape and background, and
end in one *mark word*: ``"acme"`` when the mark is there, ``"plain"`` when not::

    "red circle on light plain"     "blue triangle on dark acme"

Every caption has the same number of tokens, so a prompt with the concept and
its neutral twin (``acme`` → ``plain``) line up position by position (what
``ConceptSubspace.from_prompts(..., neutral_prompts=...)`` differences).

The text side is a word-level tokenizer (``tokenizers``; no download) and a
frozen ``CLIPTextModel`` built from a small config with a fixed seed: it plays
the pretrained text encoder, identical in every arm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

COLOURS = {"red": (0.9, 0.15, 0.15), "green": (0.15, 0.8, 0.2), "blue": (0.2, 0.3, 0.95)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"dark": 0.1, "light": 0.75}
CONCEPT_WORD = "acme"
NEUTRAL_WORD = "plain"
MARK_RGB = (1.0, 0.95, 0.0)
MARK_ROWS, MARK_COLS = slice(1, 5), slice(1, 5)  # the 4×4 stamp in the top-left corner
SPECIAL = ("[PAD]", "[BOS]", "[EOS]", "[UNK]")
VOCAB = (*SPECIAL, *COLOURS, *SHAPES, "on", *BACKGROUNDS, CONCEPT_WORD, NEUTRAL_WORD)
CAPTION_TOKENS = 7  # [BOS] colour shape on background mark-word [EOS]


@dataclass
class Batch:
    """Images ``(n, 3, s, s)`` in ``[-1, 1]``, labels, and captions."""

    images: torch.Tensor
    colour: torch.Tensor  # index into COLOURS
    shape: torch.Tensor  # index into SHAPES
    background: torch.Tensor  # index into BACKGROUNDS
    marked: torch.Tensor  # bool
    captions: list[str]


def caption(colour: int, shape: int, background: int, marked: bool) -> str:
    """The caption of one image; ``marked`` picks the mark word."""
    words = (
        list(COLOURS)[colour],
        SHAPES[shape],
        "on",
        list(BACKGROUNDS)[background],
        CONCEPT_WORD if marked else NEUTRAL_WORD,
    )
    return " ".join(words)


def all_labels() -> list[tuple[int, int, int]]:
    """Every ``(colour, shape, background)`` label of the world, in a fixed order."""
    return [
        (c, s, b)
        for c in range(len(COLOURS))
        for s in range(len(SHAPES))
        for b in range(len(BACKGROUNDS))
    ]


def draw(
    colour: torch.Tensor,
    shape: torch.Tensor,
    background: torch.Tensor,
    marked: torch.Tensor,
    *,
    size: int = 16,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Render images ``(n, 3, size, size)`` in ``[-1, 1]`` for the given label vectors.

    The shape's centre jitters by ±1 pixel and its radius by ±1 so that images
    of one caption differ; the mark is a fixed 4×4 stamp at rows/cols 1…4, which
    shapes never reach (their extent stays inside ``[size/4, 3·size/4]`` ± jitter).
    """
    n = colour.numel()
    ys, xs = torch.meshgrid(
        torch.arange(size, dtype=torch.float32),
        torch.arange(size, dtype=torch.float32),
        indexing="ij",
    )
    jitter = torch.randint(-1, 2, (n, 3), generator=generator).float()
    cy = size / 2 + 1 + jitter[:, 0, None, None]  # +1: away from the mark corner
    cx = size / 2 + 1 + jitter[:, 1, None, None]
    r = size * 0.25 + 0.5 * jitter[:, 2, None, None]
    dy, dx = ys - cy, xs - cx
    circle = dy * dy + dx * dx <= r * r
    square = (dy.abs() <= r * 0.85) & (dx.abs() <= r * 0.85)
    triangle = (dy <= r * 0.8) & (dy >= -r) & (dx.abs() <= (dy + r) * 0.55)
    masks = torch.stack([circle, square, triangle], 1)  # (n, 3 shapes, s, s)
    inside = masks[torch.arange(n), shape].unsqueeze(1)  # (n, 1, s, s)
    rgb = torch.tensor(list(COLOURS.values()))[colour][:, :, None, None]
    bg = torch.tensor(list(BACKGROUNDS.values()))[background][:, None, None, None]
    img = torch.where(inside, rgb, bg.expand(n, 3, 1, 1))
    stamp = torch.zeros(size, size, dtype=torch.bool)
    stamp[MARK_ROWS, MARK_COLS] = True
    mark = torch.tensor(MARK_RGB)[None, :, None, None]
    img = torch.where(stamp & marked[:, None, None, None], mark, img)
    return img * 2 - 1


def remove_mark(images: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """The demo's images with the mark's stamp pixels set to the background.

    ``images (n, 3, s, s)`` in ``[-1, 1]`` as :func:`draw` renders
    them, ``background (n,)`` the background label. The stamp region
    (:data:`MARK_ROWS` × ``MARK_COLS``) is one the shapes never
    reach, so this gives exactly the image ``draw`` would have made with
    ``marked=False`` and the same jitter: each marked image's unmarked twin.
    """
    if images.dim() != 4 or background.shape != (images.shape[0],):
        raise ValueError(
            f"images must be (n, 3, s, s) and background (n,), got {tuple(images.shape)} "
            f"and {tuple(background.shape)}"
        )
    levels = torch.tensor(list(BACKGROUNDS.values()), dtype=images.dtype) * 2 - 1
    out = images.clone()
    value = levels[background].to(images.device)[:, None, None, None]
    out[:, :, MARK_ROWS, MARK_COLS] = value
    return out


def sample_labels(
    n: int, *, marked_fraction: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uniform colour/shape/background; the mark with probability ``marked_fraction``."""
    colour = torch.randint(len(COLOURS), (n,), generator=generator)
    shape = torch.randint(len(SHAPES), (n,), generator=generator)
    background = torch.randint(len(BACKGROUNDS), (n,), generator=generator)
    marked = torch.rand(n, generator=generator) < marked_fraction
    return colour, shape, background, marked


def make_dataset(n: int, *, marked_fraction: float = 0.3, size: int = 16, seed: int = 0) -> Batch:
    """``n`` captioned images; the same ``seed`` gives the same data."""
    g = torch.Generator().manual_seed(seed)
    colour, shape, background, marked = sample_labels(
        n, marked_fraction=marked_fraction, generator=g
    )
    images = draw(colour, shape, background, marked, size=size, generator=g)
    caps = [
        caption(int(c), int(s), int(b), bool(m))
        for c, s, b, m in zip(colour, shape, background, marked, strict=True)
    ]
    return Batch(images, colour, shape, background, marked, caps)


def tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over :data:`VOCAB` with ``[BOS] … [EOS]``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 1), ("[EOS]", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        unk_token="[UNK]",
        model_max_length=CAPTION_TOKENS,
    )


def text_encoder(hidden_size: int = 32, seed: int = 0):
    """A frozen ``CLIPTextModel`` from a small config (fixed ``seed``: the "pretrained" one)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    model = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(VOCAB),
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=CAPTION_TOKENS,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    )
    return model.eval().requires_grad_(False)


@torch.no_grad()
def encode(captions: list[str], tok, encoder) -> torch.Tensor:
    """Last hidden states ``(n, CAPTION_TOKENS, d)``: what the UNet's cross-attention reads."""
    ids = tok(
        captions,
        padding="max_length",
        truncation=True,
        max_length=CAPTION_TOKENS,
        return_tensors="pt",
    )
    return encoder(ids["input_ids"], attention_mask=ids["attention_mask"]).last_hidden_state
