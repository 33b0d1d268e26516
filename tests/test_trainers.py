"""The wrapper in real training loops: plain PyTorch, accelerate, Lightning, torch.compile.

Each test trains a small model on CPU for a few dozen steps and asserts the
guarantee at the end, ``‖(W_T − W_0) U‖ ≤ 1e-6·‖W_0‖`` (fp32; measured ≈ 5e-8),
and that the protected weights did move.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradproj import ProjectedAdamW, ProjectedOptimizer
from gradproj.drift import weight_drift

IN, HIDDEN, OUT, K = 32, 48, 8, 4
BOUND = 1e-6


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT))


def make_basis() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.linalg.qr(torch.randn(IN, K, generator=gen, dtype=torch.float64))[0].float()


def make_data(n: int = 128) -> TensorDataset:
    gen = torch.Generator().manual_seed(2)
    return TensorDataset(torch.randn(n, IN, generator=gen), torch.randn(n, OUT, generator=gen))


def assert_guarantee(weight: torch.Tensor, w0: torch.Tensor, basis: torch.Tensor) -> None:
    moved = ((weight.detach() - w0).norm() / w0.norm()).item()
    assert moved > 1e-3, "the protected weight did not move: the test would be vacuous"
    drift = weight_drift(weight, w0, basis)
    assert drift <= BOUND, f"‖ΔW U‖/‖W_0‖ = {drift:.3g}"


def test_plain_pytorch_loop():
    model, basis = make_model(), make_basis()
    w0 = model[0].weight.detach().clone()
    opt = ProjectedOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2), {"0.weight": basis}, named_parameters=model
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=16)
    for _ in range(2):
        for x, y in DataLoader(make_data(), batch_size=16, shuffle=True):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            sched.step()
    assert_guarantee(model[0].weight, w0, basis)


def test_accelerate_prepare_with_scheduler_and_accumulation(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    model, basis = make_model(), make_basis()
    w0 = model[0].weight.detach().clone()
    opt = ProjectedOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2), {model[0].weight: basis}
    )
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.1, total_iters=8)
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    loader = DataLoader(make_data(), batch_size=8)
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    for x, y in loader:
        with accelerator.accumulate(model):
            accelerator.backward(nn.functional.mse_loss(model(x), y))
            opt.step()
            sched.step()
            opt.zero_grad()
    assert opt.optimizer.param_groups[0]["lr"] < 1e-2  # the scheduler drove our wrapper
    assert_guarantee(accelerator.unwrap_model(model)[0].weight, w0, basis)
    # accelerate's checkpoints carry the wrapper's state dict: anchors and bases
    accelerator.save_state(tmp_path)
    entries = opt.optimizer.protection.entries
    anchors = [e.anchor.clone() for e in entries]
    for e in entries:
        e.anchor = None
    accelerator.load_state(tmp_path)
    assert anchors and all(torch.equal(c, e.anchor) for c, e in zip(anchors, entries, strict=True))


def test_lightning_trainer_configure_optimizers_returns_the_wrapper():
    lightning = pytest.importorskip("lightning")
    basis = make_basis()

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_model()

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            opt = ProjectedOptimizer(
                torch.optim.AdamW(self.parameters(), lr=1e-2),
                {"net.0.weight": basis},
                named_parameters=self,
            )
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4)
            return {"optimizer": opt, "lr_scheduler": sched}

    module = Module()
    w0 = module.net[0].weight.detach().clone()
    trainer = lightning.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(make_data(), batch_size=8))
    assert trainer.global_step == 16
    assert_guarantee(module.net[0].weight, w0, basis)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compiled_model(backend):
    """The inductor case compiles C++ on first use (~30 s cold here, ~3 s with the cache)."""
    model, basis = make_model(), make_basis()
    w0 = model[0].weight.detach().clone()
    compiled = torch.compile(model, backend=backend)
    opt = ProjectedAdamW(compiled.parameters(), lr=1e-2, bases={model[0].weight: basis})
    for x, y in DataLoader(make_data(), batch_size=16):
        opt.zero_grad()
        nn.functional.mse_loss(compiled(x), y).backward()
        opt.step()
    assert_guarantee(model[0].weight, w0, basis)
