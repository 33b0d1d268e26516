"""gradproj.subspace_drift and `gradproj drift`: the guarantee measured on saved models.

Each verdict is shown both ways: a protected result passes, an unprotected one fails,
for full weights (fp32 and bf16 storage, pipeline/checkpoint/EMA folders) and for
LoRA files in diffusers', peft's and kohya-ss's key names.
"""

from __future__ import annotations

import math

import pytest
import torch

from gradproj import ConceptSubspace, ProjectedOptimizer, cli, subspace_drift
from gradproj.drift import COMPUTE_BOUND, bound
from tests.tiny_pipelines import tiny_unet

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

CROSS, K = 16, 3


def _unet():
    return tiny_unet(CROSS)


def _subspace(d=CROSS, k=K, ridge=None):
    g = torch.Generator().manual_seed(1)
    return ConceptSubspace.from_embeddings(torch.randn(8, d, generator=g), k=k, ridge=ridge)


def _kv(model):
    return {n: m for n, m in model.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))}


@torch.no_grad()
def _moved(unet, sub, *, protected: bool, scale=0.05):
    """Every attn2.to_k/to_v moved by a random ΔW, projected off U or not."""
    u = sub.basis.double()
    g = torch.Generator().manual_seed(2)
    for m in _kv(unet).values():
        delta = scale * torch.randn(m.weight.shape, generator=g, dtype=torch.float64)
        if protected:
            delta -= (delta @ u) @ u.T
        m.weight.copy_((m.weight.double() + delta).float())
    return unet


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    _unet().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sub_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sub") / "acme.safetensors"
    _subspace().save(path)
    return path


def test_full_weights_pass_when_protected_and_fail_when_not(base, sub_file, tmp_path):
    good = _moved(_unet(), _subspace(), protected=True)
    bad = _moved(_unet(), _subspace(), protected=False)
    good.save_pretrained(tmp_path / "good" / "unet")  # a pipeline/checkpoint folder
    bad.save_pretrained(tmp_path / "bad")
    r = subspace_drift(sub_file, base, tmp_path / "good")
    assert r.ok is True and not r.lora
    assert sorted(w.name for w in r.weights) == sorted(f"{n}.weight" for n in _kv(good))
    assert all(w.dtype == torch.float32 and w.bound == COMPUTE_BOUND for w in r.weights)
    assert r.worst.drift <= 1e-7
    r = subspace_drift(sub_file, base, tmp_path / "bad")
    assert r.ok is False and r.worst.drift > 1e-2
    assert r.summary().startswith("FAIL")
    # the same through a model object and a state dict
    assert subspace_drift(_subspace(), _unet(), good).ok is True
    assert subspace_drift(_subspace(), _unet(), bad.state_dict()).ok is False


def test_bf16_storage_is_held_to_its_own_bound(base, sub_file, tmp_path):
    good = _moved(_unet(), _subspace(), protected=True).to(torch.bfloat16)
    good.save_pretrained(tmp_path / "good")
    r = subspace_drift(sub_file, base, tmp_path / "good")
    assert all(w.dtype == torch.bfloat16 for w in r.weights)
    assert r.ok is True
    # rounding to bf16 is visible (so a float32 bound would fail it), and the bound is tight:
    # a modest unprotected change still fails at bf16
    assert r.worst.drift > COMPUTE_BOUND
    assert r.worst.bound < 0.02
    bad = _moved(_unet(), _subspace(), protected=False, scale=0.02).to(torch.bfloat16)
    bad.save_pretrained(tmp_path / "bad")
    assert subspace_drift(sub_file, base, tmp_path / "bad").ok is False


def test_bound_covers_bf16_rounding_with_headroom():
    """The storage term: rounding random weights to bf16, the error's part along U."""
    g = torch.Generator().manual_seed(3)
    for d, k in ((768, 8), (64, 32), (2048, 1)):
        u = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0]
        w = torch.randn(256, d, generator=g, dtype=torch.float64)
        err = w.to(torch.bfloat16).double() - w
        seen = ((err @ u).norm() / w.norm()).item()
        assert seen * 4 < bound(torch.bfloat16, k, d) - COMPUTE_BOUND, (d, k, seen)
    assert bound(torch.float32, 8, 768) == bound(torch.float64, 8, 768) == COMPUTE_BOUND


def _lora_unet(protect: bool, alpha=8, steps=2):
    import gradproj.diffusers as gd

    unet = _unet()
    unet.requires_grad_(False)
    unet.add_adapter(
        peft.LoraConfig(
            r=4, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=["to_k", "to_v"]
        )
    )
    bases = gd.protect(unet, _subspace()) if protect else {}
    trainable = [p for p in unet.parameters() if p.requires_grad]
    opt = ProjectedOptimizer(torch.optim.AdamW(trainable, lr=1e-2), bases)
    g = torch.Generator().manual_seed(4)
    for _ in range(steps):
        opt.zero_grad()
        out = unet(
            torch.randn(2, 3, 8, 8, generator=g),
            torch.randint(0, 1000, (2,), generator=g),
            encoder_hidden_states=torch.randn(2, 5, CROSS, generator=g),
        ).sample
        out.square().mean().backward()
        opt.step()
    return unet


def _save_lora(unet, folder, metadata: bool):
    from diffusers import StableDiffusionPipeline
    from diffusers.training_utils import _collate_lora_metadata
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    extra = _collate_lora_metadata({"unet": unet}) if metadata else {}
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, **extra)
    return layers


def test_lora_file_passes_when_protected_and_fails_when_not(base, sub_file, tmp_path):
    _save_lora(_lora_unet(protect=True), tmp_path / "good", metadata=True)
    _save_lora(_lora_unet(protect=False), tmp_path / "bad", metadata=True)
    r = subspace_drift(sub_file, base, tmp_path / "good")
    assert r.lora and r.ok is True
    assert len(r.weights) == len(_kv(_unet()))
    assert max(w.lora_a for w in r.weights) <= 1e-6
    r = subspace_drift(sub_file, base, tmp_path / "good" / "pytorch_lora_weights.safetensors")
    assert r.ok is True
    r = subspace_drift(sub_file, base, tmp_path / "bad", lora=True)
    assert r.ok is False and max(w.lora_a for w in r.weights) > 1e-2


def test_lora_scale_comes_from_the_files_metadata(base, tmp_path):
    unet = _lora_unet(protect=False, alpha=8)  # r = 4: s = 2
    _save_lora(unet, tmp_path / "meta", metadata=True)
    _save_lora(unet, tmp_path / "bare", metadata=False)
    sub = _subspace()
    u = sub.basis.double()
    name, layer = next(iter(_kv(unet).items()))
    a = layer.lora_A["default"].weight.double()
    b = layer.lora_B["default"].weight.double()
    w0 = layer.get_base_layer().weight.double()
    want = (2.0 * b @ a @ u).norm().item() / w0.norm().item()
    got = {w.name: w.drift for w in subspace_drift(sub, base, tmp_path / "meta").weights}
    assert math.isclose(got[f"{name}.weight"], want, rel_tol=1e-6)
    bare = subspace_drift(sub, base, tmp_path / "bare")
    assert any("assumed 1" in n for n in bare.notes)
    got = {w.name: w.drift for w in bare.weights}
    assert math.isclose(got[f"{name}.weight"], want / 2, rel_tol=1e-6)
    got = {
        w.name: w.drift
        for w in subspace_drift(sub, base, tmp_path / "bare", lora_scale=2.0).weights
    }
    assert math.isclose(got[f"{name}.weight"], want, rel_tol=1e-6)


def test_kohya_key_names_are_read(base, sub_file, tmp_path):
    sub = _subspace()
    u = sub.basis
    tensors = {}
    g = torch.Generator().manual_seed(5)
    for n, m in _kv(_unet()).items():
        a = torch.randn(4, CROSS, generator=g)
        a -= (a @ u) @ u.T
        key = "lora_unet_" + n.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = a
        tensors[f"{key}.lora_up.weight"] = torch.randn(m.out_features, 4, generator=g)
        tensors[f"{key}.alpha"] = torch.tensor(2.0)
    safetensors_torch.save_file(tensors, tmp_path / "kohya.safetensors")
    r = subspace_drift(sub_file, base, tmp_path / "kohya.safetensors")
    assert r.lora and r.ok is True and len(r.weights) == len(_kv(_unet()))


def test_soft_subspace_is_reported_without_a_bound(base, tmp_path):
    soft = _subspace(ridge=1.0)
    _moved(_unet(), soft, protected=True).save_pretrained(tmp_path / "t")
    r = subspace_drift(soft, base, tmp_path / "t")
    assert r.ok is None and all(w.bound is None for w in r.weights)
    assert "soft subspace" in r.summary()


def test_the_cli_exit_status_is_the_verdict(base, sub_file, tmp_path, capsys):
    _moved(_unet(), _subspace(), protected=True).save_pretrained(tmp_path / "good")
    _moved(_unet(), _subspace(), protected=False).save_pretrained(tmp_path / "bad")
    args = ["drift", "--subspace", str(sub_file), "--base", str(base), "--trained"]
    assert cli.main([*args, str(tmp_path / "good")]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "attn2.to_k.weight" in out
    assert cli.main([*args, str(tmp_path / "bad")]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "--trained"),
        ("lora-flag", "no LoRA file"),
        ("other-d", "the subspace has d=12"),
        ("not-a-model", "neither a diffusers model folder"),
        ("no-adapter", "no adapter on any protected layer"),
    ],
)
def test_cli_errors_are_one_line(case, message, base, sub_file, tmp_path, capsys):
    sub, trained = str(sub_file), str(base)
    if case == "missing":
        trained = str(tmp_path / "nothing")
    elif case == "lora-flag":
        trained = str(base)
    elif case == "other-d":
        sub = str(tmp_path / "d12.safetensors")
        _subspace(d=12).save(sub)
    elif case == "not-a-model":
        (tmp_path / "empty").mkdir()
        trained = str(tmp_path / "empty")
    elif case == "no-adapter":
        trained = str(tmp_path / "other.safetensors")
        safetensors_torch.save_file({"unet.conv_in.lora.down.weight": torch.zeros(2, 2)}, trained)
    extra = ["--lora"] if case == "lora-flag" else []
    status = cli.main(
        ["drift", "--subspace", sub, "--base", str(base), "--trained", trained, *extra]
    )
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith("gradproj drift: error:") and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
