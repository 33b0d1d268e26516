"""``torchvision.transforms`` stand-in (see the package docstring: not torchvision).

The transform classes the official diffusers scripts build; randomness comes from
torch's global generator, as in torchvision, so ``set_seed`` makes them repeatable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from torchvision.transforms import functional
from torchvision.transforms._mode import InterpolationMode

__all__ = [
    "CenterCrop",
    "Compose",
    "InterpolationMode",
    "Lambda",
    "Normalize",
    "RandomCrop",
    "RandomHorizontalFlip",
    "Resize",
    "ToTensor",
    "functional",
]


def _side(size: int | Sequence[int]) -> int:
    # The scripts pass one int (square crops); a (h, w) pair is accepted only when square.
    if isinstance(size, int):
        return size
    if len(size) == 2 and size[0] == size[1]:
        return int(size[0])
    raise ValueError(f"the torchvision stub takes a square size, got {size!r}")


class Compose:
    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms = list(transforms)

    def __call__(self, img):
        for t in self.transforms:
            img = t(img)
        return img


class Lambda:
    def __init__(self, lambd: Callable) -> None:
        self.lambd = lambd

    def __call__(self, img):
        return self.lambd(img)


class Resize:
    def __init__(self, size: int, interpolation=InterpolationMode.BILINEAR) -> None:
        if not isinstance(size, int):
            raise TypeError(f"the torchvision stub's Resize takes an int size, got {size!r}")
        self.size, self.interpolation = size, interpolation

    def __call__(self, img):
        return functional.resize(img, self.size, self.interpolation)


class CenterCrop:
    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = _side(size)

    def __call__(self, img):
        return functional.center_crop(img, self.size)


class RandomCrop:
    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = _side(size)

    @staticmethod
    def get_params(img, output_size: tuple[int, int]) -> tuple[int, int, int, int]:
        """``(top, left, height, width)`` of a uniformly random window, as torchvision draws it."""
        w, h = img.size
        th, tw = output_size
        if h < th or w < tw:
            raise ValueError(f"crop size {(th, tw)} is larger than the input image size {(h, w)}")
        if (h, w) == (th, tw):
            return 0, 0, h, w
        i = torch.randint(0, h - th + 1, size=(1,)).item()
        j = torch.randint(0, w - tw + 1, size=(1,)).item()
        return i, j, th, tw

    def __call__(self, img):
        return functional.crop(img, *self.get_params(img, (self.size, self.size)))


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, img):
        return functional.hflip(img) if torch.rand(1) < self.p else img


class ToTensor:
    def __call__(self, pic):
        return functional.to_tensor(pic)


class Normalize:
    def __init__(self, mean, std) -> None:
        self.mean, self.std = mean, std

    def __call__(self, tensor):
        return functional.normalize(tensor, self.mean, self.std)
