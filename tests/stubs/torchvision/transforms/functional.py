"""``torchvision.transforms.functional`` stand-in: the functions the stub's transforms use."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from torchvision.transforms._mode import InterpolationMode

_PIL_FILTERS = {
    InterpolationMode.NEAREST: Image.NEAREST,
    InterpolationMode.NEAREST_EXACT: Image.NEAREST,
    InterpolationMode.BILINEAR: Image.BILINEAR,
    InterpolationMode.BICUBIC: Image.BICUBIC,
    InterpolationMode.BOX: Image.BOX,
    InterpolationMode.HAMMING: Image.HAMMING,
    InterpolationMode.LANCZOS: Image.LANCZOS,
}


def _pil(img: object, what: str) -> Image.Image:
    if not isinstance(img, Image.Image):
        raise TypeError(
            f"the torchvision stub's {what} takes a PIL image, got {type(img).__name__}"
        )
    return img


def resize(
    img: Image.Image, size: int, interpolation: InterpolationMode = InterpolationMode.BILINEAR
) -> Image.Image:
    """The shorter side to ``size``, keeping the aspect ratio (torchvision's int ``size``)."""
    img = _pil(img, "resize")
    if not isinstance(size, int):
        raise TypeError(f"the torchvision stub's resize takes an int size, got {size!r}")
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):  # torchvision returns the input unchanged too
        return img
    return img.resize((new_w, new_h), _PIL_FILTERS[InterpolationMode(interpolation)])


def crop(img: Image.Image, top: int, left: int, height: int, width: int) -> Image.Image:
    """The ``height × width`` window at ``(top, left)``; refuses windows outside the image
    (torchvision would zero-pad them)."""
    img = _pil(img, "crop")
    w, h = img.size
    if top < 0 or left < 0 or top + height > h or left + width > w:
        raise ValueError(
            f"the torchvision stub does not pad: crop ({top}, {left}, {height}, {width}) "
            f"leaves the {w}x{h} image"
        )
    return img.crop((left, top, left + width, top + height))


def center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = _pil(img, "center_crop").size
    top = round((h - size) / 2.0)
    left = round((w - size) / 2.0)
    return crop(img, top, left, size, size)


def hflip(img: Image.Image) -> Image.Image:
    return _pil(img, "hflip").transpose(Image.FLIP_LEFT_RIGHT)


def to_tensor(pic: Image.Image) -> torch.Tensor:
    """``C × H × W`` float32 in ``[0, 1]`` from an 8-bit PIL image."""
    pic = _pil(pic, "to_tensor")
    if pic.mode not in ("RGB", "L"):
        raise ValueError(f"the torchvision stub's to_tensor takes RGB or L images, got {pic.mode}")
    array = np.array(pic, dtype=np.uint8, copy=True)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous().float().div(255)


def normalize(tensor: torch.Tensor, mean, std) -> torch.Tensor:
    """``(x − mean) / std`` per channel (a one-element list applies to every channel)."""
    m = torch.as_tensor(mean, dtype=tensor.dtype).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=tensor.dtype).view(-1, 1, 1)
    return (tensor - m) / s
