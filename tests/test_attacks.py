"""embedding_search: it lowers the model's diffusion loss and leaves the model as it was."""

import pytest
import torch

from gradproj.attacks import embedding_search

diffusers = pytest.importorskip("diffusers")


def _loss(unet, scheduler, images, ctx, seed=3):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=g)
    t = torch.randint(1000, (images.shape[0],), generator=g)
    with torch.no_grad():
        pred = unet(scheduler.add_noise(images, noise, t), t, ctx.expand(images.shape[0], -1, -1))
    return float(torch.nn.functional.mse_loss(pred.sample, noise))


def test_search_lowers_the_loss_and_does_not_touch_the_model():
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    images = torch.rand(6, 3, 8, 8) * 2 - 1
    init = torch.zeros(3, 8)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    found = embedding_search(
        unet, scheduler, images, init, steps=30, lr=0.3, generator=torch.Generator().manual_seed(1)
    )
    assert found.shape == init.shape and not found.requires_grad
    assert _loss(unet, scheduler, images, found) < _loss(unet, scheduler, images, init)
    for n, p in unet.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad and p.grad is None, n


def test_bad_images_are_rejected():
    with pytest.raises(ValueError, match=r"images must be \(n, C, H, W\)"):
        embedding_search(torch.nn.Identity(), None, torch.zeros(3, 8, 8), torch.zeros(2, 4))
