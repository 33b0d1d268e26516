"""Checkpoint and resume through real trainers: accelerate, Lightning, HF ``Trainer``.

Each test trains ``N`` steps, saves a checkpoint the trainer's own way, builds a
fresh model and optimizer (from another initialization, so only the checkpoint
can make them right), resumes for ``M`` more steps, and checks:

- the result equals an uninterrupted ``N + M`` run bit for bit (CPU, fp32, the
  same batches in the same order: nothing should differ);
- the guarantee ``‖(W_T − W_0) U‖ ≤ 1e-6·‖W_0‖`` against the *original* ``W_0``,
  so a resume that re-anchored on the checkpoint's weights would still pass only
  if those weights kept it, and one that lost the anchors is caught by the first
  check.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, SequentialSampler, TensorDataset

from gradproj import ProjectedAdamW, ProjectedOptimizer
from gradproj.drift import weight_drift

IN, HIDDEN, OUT, K = 16, 24, 4, 3
BATCH, N_BATCHES = 8, 4  # one epoch = 4 steps
BOUND = 1e-6
OPTIMIZERS = ["wrapper", "projected_adamw"]


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))


def make_basis() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.linalg.qr(torch.randn(IN, K, generator=gen, dtype=torch.float64))[0].float()


def make_data() -> TensorDataset:
    gen = torch.Generator().manual_seed(2)
    n = BATCH * N_BATCHES
    return TensorDataset(torch.randn(n, IN, generator=gen), torch.randn(n, OUT, generator=gen))


def make_optimizer(which: str, module: nn.Module, weight: nn.Parameter, basis: torch.Tensor):
    """AdamW wrapped in update mode, or ProjectedAdamW; names from ``module``."""
    if which == "projected_adamw":
        return ProjectedAdamW(
            module.parameters(), lr=1e-2, bases={weight: basis}, named_parameters=module
        )
    inner = torch.optim.AdamW(module.parameters(), lr=1e-2)
    return ProjectedOptimizer(inner, {weight: basis}, named_parameters=module)


def initial_weight() -> torch.Tensor:
    return make_model()[0].weight.detach().clone()


def assert_resumed(resumed: nn.Sequential, whole: nn.Sequential, basis: torch.Tensor) -> None:
    for (name, p), q in zip(resumed.named_parameters(), whole.parameters(), strict=True):
        assert torch.equal(p, q), f"{name}: the resumed run differs from the uninterrupted one"
    w, w0 = resumed[0].weight, initial_weight()
    assert not torch.equal(w, w0), "the protected weight did not move: the check is vacuous"
    drift = weight_drift(w, w0, basis)
    assert drift <= BOUND, f"‖(W_T − W_0) U‖/‖W_0‖ = {drift:.3g} against the original W_0"


# ------------------------------------------------------------------ accelerate


@pytest.mark.parametrize("which", OPTIMIZERS)
def test_accelerate_save_state_and_load_state(which, tmp_path):
    accelerate = pytest.importorskip("accelerate")
    basis = make_basis()
    batches = list(DataLoader(make_data(), batch_size=BATCH))
    n = 3

    def run(model: nn.Module, steps: list, load_from=None, save_to=None) -> nn.Module:
        opt = make_optimizer(which, model, model[0].weight, basis)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        accelerator = accelerate.Accelerator(cpu=True)
        model, opt, sched = accelerator.prepare(model, opt, sched)
        if load_from is not None:
            accelerator.load_state(load_from)
        for x, y in steps:
            opt.zero_grad()
            accelerator.backward(nn.functional.mse_loss(model(x), y))
            opt.step()
            sched.step()
        if save_to is not None:
            accelerator.save_state(save_to)
        return accelerator.unwrap_model(model)

    whole = run(make_model(), batches * 2)
    run(make_model(), (batches * 2)[:n], save_to=tmp_path / "ckpt")
    resumed = run(make_model(seed=7), (batches * 2)[n:], load_from=tmp_path / "ckpt")
    assert_resumed(resumed, whole, basis)


# ------------------------------------------------------------------- Lightning


@pytest.mark.parametrize("which", OPTIMIZERS)
def test_lightning_resume_from_ckpt_path(which, tmp_path):
    """1 epoch, checkpoint (``ModelCheckpoint(save_last=True)``), then ``fit(ckpt_path=…)``
    to epoch 2 from a fresh module, against 2 epochs in one go. The checkpoint is at an
    epoch boundary: a plain DataLoader cannot resume in the middle of an epoch."""
    lightning = pytest.importorskip("lightning")
    from lightning.pytorch.callbacks import ModelCheckpoint

    basis = make_basis()

    class Module(lightning.LightningModule):
        def __init__(self, seed: int = 0) -> None:
            super().__init__()
            self.net = make_model(seed)

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            opt = make_optimizer(which, self, self.net[0].weight, basis)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def fit(module, epochs, ckpt_path=None, callbacks=()):
        trainer = lightning.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=bool(callbacks),
            callbacks=list(callbacks),
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, DataLoader(make_data(), batch_size=BATCH), ckpt_path=ckpt_path)
        return trainer

    whole = Module()
    fit(whole, 2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit(Module(), 1, callbacks=[checkpoint])
    resumed = Module(seed=7)
    again = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = fit(resumed, 2, ckpt_path=tmp_path / "last.ckpt", callbacks=[again])
    assert trainer.global_step == 2 * N_BATCHES
    assert_resumed(resumed.net, whole.net, basis)


# ------------------------------------------------------------- HF transformers


class _Dicts(Dataset):
    """The dataset as the dicts of keyword arguments HF's Trainer feeds ``forward``."""

    def __init__(self) -> None:
        self.data = make_data()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, y = self.data[i]
        return {"x": x, "labels": y}


class _Regressor(nn.Module):
    """A plain module for HF's Trainer: ``forward(x, labels)`` returns ``{"loss": …}``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.net = make_model(seed)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": nn.functional.mse_loss(self.net(x), labels)}


@pytest.mark.parametrize("which", OPTIMIZERS)
def test_hf_trainer_resume_from_checkpoint(which, tmp_path):
    """``optimizers=(ours, scheduler)``; the checkpoint is written at step ``N``
    (``save_steps``) and ``train(resume_from_checkpoint=…)`` continues to ``N + M``.
    Batches in order (a sequential sampler), constant LR (HF's default schedule
    depends on ``max_steps``, which differs between the runs), no clipping noise."""
    transformers = pytest.importorskip("transformers")

    class InOrder(transformers.Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    basis = make_basis()
    n, total = 3, 2 * N_BATCHES

    def trainer_for(model: _Regressor, max_steps: int, out: str) -> transformers.Trainer:
        opt = make_optimizer(which, model, model.net[0].weight, basis)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / out),
            per_device_train_batch_size=BATCH,
            max_steps=max_steps,
            save_strategy="steps",
            save_steps=n,
            logging_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=True,
            max_grad_norm=0.0,
            dataloader_num_workers=0,
            seed=0,
        )
        return InOrder(model=model, args=args, train_dataset=_Dicts(), optimizers=(opt, sched))

    whole = _Regressor()
    trainer_for(whole, total, "whole").train()
    trainer_for(_Regressor(), n, "first").train()
    resumed = _Regressor(seed=7)
    trainer = trainer_for(resumed, total, "resumed")
    trainer.train(resume_from_checkpoint=str(tmp_path / "first" / f"checkpoint-{n}"))
    assert trainer.state.global_step == total
    assert_resumed(resumed.net, whole.net, basis)
