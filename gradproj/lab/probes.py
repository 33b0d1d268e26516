"""Measuring instruments for the demo: a mark detector and a small CNN that reads colour and shape.

The **mark detector** is a fixed rule, not a network: the stamp is yellow and
sits where no shape reaches, so its *yellowness* ``mean over the stamp's
pixels of min(R, G) − B`` (about 1.9 on a stamp, 0 on every background and
shape, in ``[-1, 1]`` pixel units) above a threshold of 1.0 says "mark". A
learned mark head was tried first: trained on clean renders it fired on about
20% of blurry early samples that showed no stamp at all (looked at by eye), so
its rate measured noise, not extraction. The rule is validated like the CNN:
precision and recall on held-out real images, reported by the demo.

The **probe** CNN (trunk + colour and shape heads) is trained on real images
only and validated on held-out real images before it measures anything
generated. Its 32-d trunk features define the space of the Fréchet distance.
"""

from __future__ import annotations

import torch
from torch import nn

from gradproj.lab import shapes


class Probe(nn.Module):
    """``images (n, 3, s, s)`` → ``(colour, shape, mark) logits``; ``.features`` too."""

    def __init__(self, width: int = 16, features: int = 32) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * width, features),
            nn.SiLU(),
        )
        self.colour = nn.Linear(features, len(shapes.COLOURS))
        self.shape = nn.Linear(features, len(shapes.SHAPES))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.trunk(x)
        return self.colour(f), self.shape(f)


MARK_THRESHOLD = 1.0


def yellowness(images: torch.Tensor) -> torch.Tensor:
    """``mean over the stamp region of min(R, G) − B`` per image (``images`` in ``[-1, 1]``)."""
    patch = images[:, :, shapes.MARK_ROWS, shapes.MARK_COLS].clamp(-1, 1)
    return (torch.minimum(patch[:, 0], patch[:, 1]) - patch[:, 2]).flatten(1).mean(1)


def detect_mark(images: torch.Tensor) -> torch.Tensor:
    """``True`` where the prohibited mark is drawn (yellowness above ``MARK_THRESHOLD``)."""
    return yellowness(images) > MARK_THRESHOLD


def train_probe(
    data: shapes.Batch,
    *,
    steps: int = 300,
    batch_size: int = 64,
    noise: float = 0.15,
    seed: int = 0,
) -> Probe:
    """Fit a :class:`Probe` on real images, with Gaussian pixel noise of std ``noise``
    (generated samples are noisier than the renders; the noise keeps the probe
    from relying on exact pixel values)."""
    torch.manual_seed(seed)
    probe = Probe()
    opt = torch.optim.Adam(probe.parameters(), lr=3e-3)
    ce = nn.functional.cross_entropy
    for _ in range(steps):
        i = torch.randint(data.images.shape[0], (batch_size,))
        x = data.images[i] + noise * torch.randn_like(data.images[i])
        c, s = probe(x)
        loss = ce(c, data.colour[i]) + ce(s, data.shape[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return probe.eval().requires_grad_(False)


@torch.no_grad()
def read(probe: Probe, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Predicted colour and shape, the mark detector's verdict, and trunk features of ``images``."""
    c, s = probe(images.clamp(-1, 1))
    return {
        "colour": c.argmax(1),
        "shape": s.argmax(1),
        "marked": detect_mark(images),
        "features": probe.features(images.clamp(-1, 1)),
    }


def validate(probe: Probe, data: shapes.Batch) -> dict[str, float]:
    """Probe accuracy (colour, shape) and mark-detector precision and recall on real ``data``."""
    out = read(probe, data.images)
    tp = float((out["marked"] & data.marked).sum())
    return {
        "colour_accuracy": float((out["colour"] == data.colour).float().mean()),
        "shape_accuracy": float((out["shape"] == data.shape).float().mean()),
        "mark_precision": tp / max(float(out["marked"].sum()), 1.0),
        "mark_recall": tp / max(float(data.marked.sum()), 1.0),
    }


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a^½ Σ_b Σ_a^½)^½)`` of two feature sets ``(n, f)``.

    The FID formula, in the probe's feature space; float64, with the matrix square
    roots from symmetric eigendecompositions (negative rounding eigenvalues clipped).
    """
    a, b = a.double(), b.double()
    mu = a.mean(0) - b.mean(0)
    ca, cb = torch.cov(a.T), torch.cov(b.T)

    def sqrtm(m: torch.Tensor) -> torch.Tensor:
        w, v = torch.linalg.eigh((m + m.T) / 2)
        return (v * w.clamp_min(0).sqrt()) @ v.T

    ra = sqrtm(ca)
    cross = sqrtm(ra @ cb @ ra)
    return float(mu @ mu + torch.trace(ca + cb - 2 * cross))
