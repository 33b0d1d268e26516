"""DeepSpeed ZeRO 1/2 through accelerate: ProjectedOptimizer refuses to step, loudly.

ZeRO replaces the client optimizer's parameters with flat fp32 partitions, so the
protected weights leave its ``param_groups`` and gradproj cannot project them by
rows. ``ProjectedOptimizer.step`` must raise instead of training them unprotected.

Runs on CPU with one process (DeepSpeed's CPU accelerator, gloo). Each stage runs
in a subprocess: accelerate's state, DeepSpeed's accelerator choice and the
process group are process-global and must not leak into the rest of the suite.
``deepspeed`` is pinned in ``requirements-ci.txt`` (a pure-Python install; its one
CPU op is JIT-compiled on first use), so this runs in CI (the subprocess fails if it is missing)
(measured with deepspeed 0.19.8, torch 2.13.0+cpu, accelerate 1.15.0; about 15 s
per stage on 2 cores.)
"""

import os
import socket
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import sys

    import torch
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    import gradproj

    stage = int(sys.argv[1])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    U, _ = torch.linalg.qr(torch.randn(8, 3))
    opt = gradproj.ProjectedOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-3), {model[0].weight: U}, named_parameters=model
    )
    plugin = DeepSpeedPlugin(zero_stage=stage, gradient_accumulation_steps=1)
    acc = Accelerator(deepspeed_plugin=plugin)
    acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 5
    model, opt = acc.prepare(model, opt)
    w0 = model.module[0].weight.detach().clone()
    loss = torch.nn.functional.mse_loss(model(torch.randn(5, 8)), torch.randn(5, 4))
    try:
        acc.backward(loss)  # with DeepSpeed, accelerate steps the engine inside backward
        opt.step()
    except RuntimeError as e:
        print("GRADPROJ-ERROR:", e)
        print("UNCHANGED:", torch.equal(w0, model.module[0].weight.detach()))
        sys.exit(0)
    print("STEPPED")
    sys.exit(0)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_stage_refuses_projected_optimizer(stage, tmp_path):
    script = tmp_path / "ds_step.py"
    script.write_text(SCRIPT)
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        DS_ACCELERATOR="cpu",
    )
    out = subprocess.run(
        [sys.executable, str(script), str(stage)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "GRADPROJ-ERROR:" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
    msg = out.stdout.split("GRADPROJ-ERROR:", 1)[1]
    assert "'0.weight'" in msg
    assert "no longer in the optimizer's param_groups" in msg
    assert "nothing was stepped" in msg
    assert "DeepSpeed ZeRO" in msg
    assert "UNCHANGED: True" in out.stdout
