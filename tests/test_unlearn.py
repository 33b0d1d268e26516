"""surgery_backward: two losses, per-tensor surgery, combined into p.grad for any optimizer."""

from __future__ import annotations

import pytest
import torch

from gradproj import reference as R
from gradproj.unlearn import surgery_backward


def model_and_losses(seed: int = 1):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x_u, x_r = torch.randn(5, 6), torch.randn(5, 6)
    loss_u = model(x_u)[:, 0].mean()  # "unlearn": move output 0
    loss_r = (model(x_r)[:, :2] - 1).pow(2).mean()  # "retain": keep outputs 0, 1 near 1
    return model, loss_u, loss_r


@pytest.mark.parametrize("variant", ["projection", "cosine"])
def test_grad_is_surgery_of_unlearn_plus_weighted_retain(variant):
    model, loss_u, loss_r = model_and_losses()
    params = list(model.parameters())
    g_u = torch.autograd.grad(loss_u, params, retain_graph=True)
    g_r = torch.autograd.grad(loss_r, params, retain_graph=True)
    surgery_backward(loss_u, loss_r, params, strength=0.8, variant=variant, retain_weight=0.5)
    conflicts = 0
    for p, u, r in zip(params, g_u, g_r, strict=True):
        expected_u, _ = R.surgery(u.double(), r.double(), strength=0.8, variant=variant)
        conflicts += bool((u * r).sum() < 0)
        torch.testing.assert_close(
            p.grad.double(), expected_u + 0.5 * r.double(), rtol=1e-6, atol=1e-7
        )
    assert 0 < conflicts < len(params)  # the per-tensor decision is exercised both ways


def test_accumulates_and_handles_unused_params():
    model, loss_u, loss_r = model_and_losses()
    extra = torch.nn.Parameter(torch.ones(2))  # reached by neither loss
    params = [*model.parameters(), extra]
    for p in params:
        p.grad = torch.ones_like(p)
    surgery_backward(loss_u, loss_r, params)
    assert torch.equal(extra.grad, torch.ones(2))
    assert all(not torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())


def test_errors():
    model, loss_u, loss_r = model_and_losses()
    with pytest.raises(ValueError, match="loss_retain must be a scalar"):
        surgery_backward(loss_u, torch.ones(2, requires_grad=True), model.parameters())
    with pytest.raises(ValueError, match="no tensor that requires grad"):
        surgery_backward(loss_u, loss_r, [torch.zeros(2)])
