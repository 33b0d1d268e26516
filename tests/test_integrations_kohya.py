"""gradproj.integrations.kohya, loaded exactly as kohya-ss sd-scripts loads it.

kohya's code is not a dependency. The loading protocol is reproduced below from
sd-scripts 48d368f (``train_network.py``, ``library/train_util.py``), and
``networks.lora`` is a stand-in shaped like kohya's: ``LoRAModule`` adds
``m·s·lora_up(lora_down(x))`` to the layer it wraps and is named ``prefix`` + module
path with ``"."`` -> ``"_"``. When a copy of sd-scripts is at hand
(``$GRADPROJ_KOHYA_SD_SCRIPTS``: a checkout or a bare git dir), the last test runs
kohya's own ``networks/lora.py`` (its two ``library`` imports stubbed: they pull in
torchvision and OpenCV).
"""

from __future__ import annotations

import ast
import importlib
import math
import os
import re
import subprocess
import sys
import types
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

from gradproj import ConceptSubspace
from gradproj.integrations import kohya

CTX, DIM, INNER, RANK, K = 12, 16, 8, 4, 3
LR = 1e-2
NETWORK_MODULE = "gradproj.integrations.kohya"
OPTIMIZER = "gradproj.integrations.kohya.ProjectedAdamW"


# ---------------------------------------------------------------- a tiny SD-shaped model


class CrossAttention(nn.Module):
    def __init__(self, query_dim: int, context_dim: int) -> None:
        super().__init__()
        self.to_q = nn.Linear(query_dim, INNER, bias=False)
        self.to_k = nn.Linear(context_dim, INNER, bias=False)
        self.to_v = nn.Linear(context_dim, INNER, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(INNER, query_dim)])

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(INNER), dim=-1)
        return self.to_out[0](weights @ v)


class BasicTransformerBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn1 = CrossAttention(DIM, DIM)
        self.attn2 = CrossAttention(DIM, CTX)

    def forward(self, x, context):
        x = x + self.attn1(x)
        return x + self.attn2(x, context)


class Transformer2DModel(nn.Module):
    """The class name kohya's LoRA looks for in a UNet (``networks/lora.py:867``)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj_in = nn.Linear(DIM, DIM)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock()])

    def forward(self, x, context):
        return self.transformer_blocks[0](self.proj_in(x), context)


class Stage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([Transformer2DModel()])


class TinyUNet(nn.Module):
    """Two attention stages, named as in kohya's SD 1.x UNet (``down_blocks.0.attentions.0``)
    or its SDXL UNet (``input_blocks.1.1``, ``library/sdxl_original_unet.py:856``)."""

    def __init__(self, layout: str = "sd") -> None:
        super().__init__()
        self.layout = layout
        if layout == "sd":
            self.down_blocks = nn.ModuleList([Stage()])
            self.up_blocks = nn.ModuleList([Stage()])
        else:
            self.input_blocks = nn.ModuleList(
                [nn.ModuleList([nn.Identity(), Transformer2DModel()])]
            )
            self.middle_block = nn.ModuleList([nn.Identity(), Transformer2DModel()])

    def stages(self) -> list[nn.Module]:
        if self.layout == "sd":
            return [self.down_blocks[0].attentions[0], self.up_blocks[0].attentions[0]]
        return [self.input_blocks[0][1], self.middle_block[1]]

    def forward(self, x, context):
        for stage in self.stages():
            x = stage(x, context)
        return x


class CLIPAttention(nn.Module):
    """The class name kohya's LoRA looks for in a text encoder (``networks/lora.py:869``)."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(CTX, CTX), nn.Linear(CTX, CTX)
        self.v_proj, self.out_proj = nn.Linear(CTX, CTX), nn.Linear(CTX, CTX)

    def forward(self, h):
        w = torch.softmax(self.q_proj(h) @ self.k_proj(h).transpose(-1, -2), dim=-1)
        return h + self.out_proj(w @ self.v_proj(h))


class TinyTextEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, CTX)
        self.self_attn = CLIPAttention()

    def forward(self, ids):
        return self.self_attn(self.embed(ids))


# ---------------------------------------------------------------- a stand-in networks.lora


class LoRAModule(nn.Module):
    """Shaped like kohya's (``networks/lora.py:25-121``), without dropout."""

    def __init__(self, lora_name: str, org_module: nn.Linear, multiplier, lora_dim, alpha):
        super().__init__()
        self.lora_name = lora_name
        self.lora_down = nn.Linear(org_module.in_features, lora_dim, bias=False)
        self.lora_up = nn.Linear(lora_dim, org_module.out_features, bias=False)
        self.scale = alpha / lora_dim
        self.register_buffer("alpha", torch.tensor(alpha))
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.multiplier = multiplier
        self.org_module = org_module

    def apply_to(self) -> None:
        self.org_forward = self.org_module.forward
        self.org_module.forward = self.forward
        del self.org_module

    def forward(self, x):
        return self.org_forward(x) + self.lora_up(self.lora_down(x)) * self.multiplier * self.scale


def _loras(root: nn.Module, prefix: str, targets: tuple[str, ...], multiplier, dim, alpha):
    return [
        LoRAModule(f"{prefix}.{name}.{child_name}".replace(".", "_"), child, multiplier, dim, alpha)
        for name, module in root.named_modules()
        if type(module).__name__ in targets
        for child_name, child in module.named_modules()
        if type(child).__name__ == "Linear"
    ]


class LoRANetwork(nn.Module):
    def __init__(self, text_encoder, unet, multiplier=1.0, lora_dim=4, alpha=1.0) -> None:
        super().__init__()
        args = (multiplier, lora_dim, alpha)
        self.text_encoder_loras = _loras(text_encoder, "lora_te", ("CLIPAttention",), *args)
        self.unet_loras = _loras(unet, "lora_unet", ("Transformer2DModel",), *args)

    def apply_to(self, text_encoder, unet, apply_text_encoder=True, apply_unet=True) -> None:
        if not apply_text_encoder:
            self.text_encoder_loras = []
        if not apply_unet:
            self.unet_loras = []
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.apply_to()
            self.add_module(lora.lora_name, lora)

    def load_weights(self, file):
        from safetensors.torch import load_file

        return self.load_state_dict(load_file(file), strict=False)

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr):
        # As kohya's (networks/lora.py:1148-1240): one group per part, its params a
        # dict.values() view.
        self.requires_grad_(True)
        groups = []
        for loras, lr in ((self.text_encoder_loras, text_encoder_lr), (self.unet_loras, unet_lr)):
            named = {f"{m.lora_name}.{n}": p for m in loras for n, p in m.named_parameters()}
            if named:
                groups.append({"params": named.values(), "lr": lr or default_lr})
        return groups, [""] * len(groups)


def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, **kwargs):
    return LoRANetwork(text_encoder, unet, multiplier, network_dim, network_alpha)


def create_network_from_weights(multiplier, file, vae, text_encoder, unet, **kwargs):
    from safetensors.torch import load_file

    weights_sd = load_file(file)
    dim = next(v.shape[0] for k, v in weights_sd.items() if "lora_down" in k)
    return LoRANetwork(text_encoder, unet, multiplier, dim, dim), weights_sd


@pytest.fixture
def kohya_networks(monkeypatch):
    """The stand-in as ``networks.lora``, where kohya's scripts find their own."""
    package = types.ModuleType("networks")
    module = types.ModuleType("networks.lora")
    module.create_network = create_network
    module.create_network_from_weights = create_network_from_weights
    package.lora = module
    monkeypatch.setitem(sys.modules, "networks", package)
    monkeypatch.setitem(sys.modules, "networks.lora", module)
    return module


# ---------------------------------------------------------------- kohya's loading protocol


def kohya_network(network_module: str, text_encoder, unet, *, train_text_encoder=False,
                  train_unet=True, network_args=()):  # fmt: skip
    """What ``train_network.py`` does from the module name to the param groups.

    ``:644`` import by name; ``:663-667`` ``--network_args`` split once on "=",
    values kept as strings; ``:675-687`` ``create_network(1.0, dim, alpha, vae,
    text_encoder, unet, neuron_dropout=..., **net_kwargs)``; ``:709`` ``apply_to``;
    ``:744-752`` ``prepare_optimizer_params(te_lr, unet_lr, lr)`` -> (groups, descriptions).
    """
    module = importlib.import_module(network_module)
    net_kwargs = dict(arg.split("=", 1) for arg in network_args)
    net_kwargs.setdefault("dropout", None)
    network = module.create_network(1.0, RANK, 1.0, None, text_encoder, unet,
                                    neuron_dropout=None, **net_kwargs)  # fmt: skip
    network.apply_to(text_encoder, unet, train_text_encoder, train_unet)
    results = network.prepare_optimizer_params(None, None, LR)
    return network, results[0] if isinstance(results, tuple) else results


def kohya_optimizer_kwargs(optimizer_args: list[str]) -> dict:
    """``library/train_util.py:4858-4875``: ``key, value = arg.split("=")``, then
    ``ast.literal_eval(value)``."""
    kwargs = {}
    for arg in optimizer_args:
        key, value = arg.split("=")
        kwargs[key] = ast.literal_eval(value)
    return kwargs


def kohya_optimizer(optimizer_type: str, optimizer_args: list[str], trainable_params, lr=LR):
    """``get_optimizer``'s branches for ``AdamW`` (``:5095-5098``) and for a dotted class
    name (``:5121-5134``): import the module, ``cls(trainable_params, lr=lr, **kwargs)``."""
    kwargs = kohya_optimizer_kwargs(optimizer_args)
    if optimizer_type == "AdamW":
        return torch.optim.AdamW(trainable_params, lr=lr, **kwargs)
    module, name = optimizer_type.rsplit(".", 1)
    optimizer = getattr(importlib.import_module(module), name)(trainable_params, lr=lr, **kwargs)
    if hasattr(optimizer, "train") and callable(optimizer.train):  # :5221-5223
        optimizer.train()
    return optimizer


# ---------------------------------------------------------------- helpers


def models(layout="sd", seed=0):
    torch.manual_seed(seed)
    text_encoder, unet = TinyTextEncoder(), TinyUNet(layout)
    # kohya freezes both (train_network.py:849-853)
    text_encoder.requires_grad_(False)
    unet.requires_grad_(False)
    return text_encoder, unet


@pytest.fixture
def subspace_file(tmp_path) -> Path:
    torch.manual_seed(123)
    basis = torch.linalg.qr(torch.randn(CTX, K, dtype=torch.float64))[0].float()
    path = tmp_path / "acme.safetensors"
    ConceptSubspace(basis).save(path)
    return path


def subspace_arg(path: Path) -> str:
    return f"subspace={str(path)!r}"  # the inner quotes kohya's literal_eval needs


def train(text_encoder, unet, optimizer, steps=6, dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 20, (3, 5), generator=g)
    x = torch.randn(3, 6, DIM, generator=g, dtype=dtype)
    target = torch.randn(3, 6, DIM, generator=g, dtype=dtype)
    for _ in range(steps):
        loss = (unet(x, text_encoder(ids)) - target).float().pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def protected_modules(network) -> list[nn.Module]:
    return [m for m in network.unet_loras if kohya.PROTECTED_NAME.match(m.lora_name)]


def worst(network, path: Path) -> tuple[float, float]:
    """Largest ``‖A U‖/‖A‖`` and ``‖ΔW U‖/‖ΔW‖`` (``ΔW = m·s·B A``) over the protected modules."""
    u = ConceptSubspace.load(path).basis.double()
    worst_a = worst_dw = 0.0
    for m in protected_modules(network):
        a, b = m.lora_down.weight.detach().double(), m.lora_up.weight.detach().double()
        dw = m.multiplier * m.scale * b @ a
        assert dw.norm() > 0, f"{m.lora_name}: B never moved, the check would be vacuous"
        worst_a = max(worst_a, float((a @ u).norm() / a.norm()))
        worst_dw = max(worst_dw, float((dw @ u).norm() / dw.norm()))
    return worst_a, worst_dw


# ---------------------------------------------------------------- the protocol, end to end


@pytest.mark.parametrize("layout", ["sd", "sdxl"])
def test_kohya_protocol_keeps_the_lora_off_the_subspace(kohya_networks, subspace_file, layout):
    text_encoder, unet = models(layout)
    network, params = kohya_network(NETWORK_MODULE, text_encoder, unet)
    assert len(protected_modules(network)) == 4  # to_k, to_v of two cross-attentions
    opt = kohya_optimizer(OPTIMIZER, [subspace_arg(subspace_file), "weight_decay=0.01",
                                      "betas=(0.9,0.99)"], params)  # fmt: skip
    assert isinstance(opt, kohya.ProjectedAdamW) and opt.defaults["betas"] == (0.9, 0.99)
    train(text_encoder, unet, opt)

    worst_a, worst_dw = worst(network, subspace_file)
    assert worst_a <= 1e-6 and worst_dw <= 1e-6, (worst_a, worst_dw)
    # What the UNet computes from a context along U is the base layer's, LoRA included.
    u = ConceptSubspace.load(subspace_file).basis
    context = torch.randn(5, K) @ u.T
    for name, layer in unet.named_modules():
        if name.endswith(("attn2.to_k", "attn2.to_v")):
            assert layer.forward.__self__ in protected_modules(network)  # the LoRA runs
            torch.testing.assert_close(layer(context), context @ layer.weight.T)
    # Saved state names each A as kohya's LoRA files do.
    names = set(opt.state_dict()["gradproj"]["names"].values())
    stage = {"sd": "down_blocks_0_attentions_0", "sdxl": "input_blocks_0_1"}[layout]
    assert f"lora_unet_{stage}_transformer_blocks_0_attn2_to_k.lora_down.weight" in names, names


def test_without_the_gradproj_optimizer_the_lora_reads_the_concept(kohya_networks, subspace_file):
    text_encoder, unet = models()
    network, params = kohya_network(NETWORK_MODULE, text_encoder, unet)
    train(text_encoder, unet, kohya_optimizer("AdamW", ["weight_decay=0.01"], params))
    worst_a, worst_dw = worst(network, subspace_file)
    assert worst_a > 1e-2 and worst_dw > 1e-2, (worst_a, worst_dw)


def test_any_inner_optimizer_through_projected_optimizer(kohya_networks, subspace_file):
    text_encoder, unet = models()
    network, params = kohya_network(NETWORK_MODULE, text_encoder, unet)
    args = [subspace_arg(subspace_file), "inner='torch.optim.Adagrad'", "lr_decay=0.0"]
    opt = kohya_optimizer("gradproj.integrations.kohya.ProjectedOptimizer", args, params)
    assert isinstance(opt.optimizer, torch.optim.Adagrad)
    train(text_encoder, unet, opt)
    worst_a, worst_dw = worst(network, subspace_file)
    assert worst_a <= 1e-6 and worst_dw <= 1e-6, (worst_a, worst_dw)


def test_dim_from_weights_network_is_found(kohya_networks, subspace_file, tmp_path):
    """``--dim_from_weights``: kohya builds the network with ``create_network_from_weights``
    (``train_network.py:672``) and loads the file (``:711-713``) before the optimizer."""
    from safetensors.torch import save_file

    text_encoder, unet = models()
    first, _ = kohya_network(NETWORK_MODULE, text_encoder, unet)
    for m in first.unet_loras:  # a LoRA that does read the concept
        nn.init.normal_(m.lora_up.weight)
    file = tmp_path / "start.safetensors"
    save_file({k: v.contiguous() for k, v in first.state_dict().items()}, file)

    text_encoder, unet = models()
    network, _ = kohya.create_network_from_weights(1, str(file), None, text_encoder, unet)
    network.apply_to(text_encoder, unet, False, True)
    network.load_weights(str(file))
    params, _ = network.prepare_optimizer_params(None, None, LR)
    assert worst(network, subspace_file)[0] > 1e-2
    opt = kohya_optimizer(OPTIMIZER, [subspace_arg(subspace_file)], params)
    assert worst(network, subspace_file)[0] <= 1e-6  # the loaded A, projected at once
    train(text_encoder, unet, opt)
    assert max(worst(network, subspace_file)) <= 1e-6


def test_resume_loads_the_anchors(kohya_networks, subspace_file):
    """``--resume``: kohya rebuilds network and optimizer, then ``accelerator.load_state``
    loads the network's weights and the optimizer's state dict (``train_network.py:975``,
    ``library/train_util.py:4778``); the gradproj section's anchors come back with it."""
    text_encoder, unet = models()
    network, params = kohya_network(NETWORK_MODULE, text_encoder, unet)
    opt = kohya_optimizer(OPTIMIZER, [subspace_arg(subspace_file)], params)
    train(text_encoder, unet, opt, steps=3)
    saved_network, saved_opt = network.state_dict(), opt.state_dict()

    text_encoder, unet = models()
    network, params = kohya_network(NETWORK_MODULE, text_encoder, unet)
    opt = kohya_optimizer(OPTIMIZER, [subspace_arg(subspace_file)], params)
    network.load_state_dict(saved_network)
    opt.load_state_dict(saved_opt)
    assert all(e.anchor is not None for e in opt.protection.entries)
    train(text_encoder, unet, opt, steps=3)
    worst_a, worst_dw = worst(network, subspace_file)
    assert worst_a <= 1e-6 and worst_dw <= 1e-6, (worst_a, worst_dw)


def test_full_bf16_warns_and_holds_at_bfloat16_rounding(kohya_networks, subspace_file):
    """``--full_bf16`` casts the network after the optimizer is built (``train_network.py:825``)."""
    text_encoder, unet = models()
    network, params = kohya_network(NETWORK_MODULE, text_encoder, unet)
    opt = kohya_optimizer(OPTIMIZER, [subspace_arg(subspace_file)], params)
    for module in (network, text_encoder, unet):
        module.to(torch.bfloat16)
    with pytest.warns(UserWarning, match="bfloat16.*2⁻⁸"):
        train(text_encoder, unet, opt, dtype=torch.bfloat16)
    # bfloat16 stores 8 significant bits: ‖A U‖ ≤ 2⁻⁹‖A‖ per stored row, measured
    # against ≈ 0.5 for the unprotected kaiming-initialised A (√(k/d)).
    assert worst(network, subspace_file)[0] <= 2.0**-8


# ---------------------------------------------------------------- refusals


def test_refuses_without_a_subspace(kohya_networks):
    _, params = kohya_network(NETWORK_MODULE, *models())
    with pytest.raises(ValueError, match=r"subspace is missing.*--optimizer_args"):
        kohya_optimizer(OPTIMIZER, [], params)


def test_refuses_a_missing_subspace_file(kohya_networks, tmp_path):
    _, params = kohya_network(NETWORK_MODULE, *models())
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ValueError, match=f"subspace file '{missing}' does not exist"):
        kohya_optimizer(OPTIMIZER, [subspace_arg(missing)], params)


def test_an_unquoted_path_fails_in_kohyas_parser_before_gradproj():
    """What docs/kohya.md warns about: the value goes through ast.literal_eval."""
    with pytest.raises((ValueError, SyntaxError)):
        kohya_optimizer_kwargs(["subspace=acme.safetensors"])
    assert kohya_optimizer_kwargs(["subspace='acme.safetensors'"]) == {
        "subspace": "acme.safetensors"
    }


def test_refuses_when_no_network_was_built_here(kohya_networks, subspace_file, monkeypatch):
    _, params = kohya_network("networks.lora", *models())  # kohya's own module, not ours
    monkeypatch.setattr(kohya, "_NETWORKS", weakref.WeakSet())
    with pytest.raises(ValueError, match=re.escape(kohya._FLAG)):
        kohya_optimizer(OPTIMIZER, [subspace_arg(subspace_file)], params)


def test_refuses_parameters_of_another_network(kohya_networks, subspace_file):
    other, _ = kohya_network(NETWORK_MODULE, *models())  # registered, but not the trained one
    _, params = kohya_network("networks.lora", *models())
    with pytest.raises(ValueError, match=r"none of the optimizer's .* --network_module"):
        kohya_optimizer(OPTIMIZER, [subspace_arg(subspace_file)], params)
    assert other in kohya._NETWORKS  # so the refusal is not the no-network one


def test_refuses_when_no_cross_attention_lora_is_trained(kohya_networks, subspace_file):
    """``--network_train_text_encoder_only``: only ``lora_te_*`` modules."""
    _, params = kohya_network(NETWORK_MODULE, *models(), train_text_encoder=True,
                              train_unet=False)  # fmt: skip
    with pytest.raises(ValueError, match="no trained LoRA module is on a UNet cross-attention"):
        kohya_optimizer(OPTIMIZER, [subspace_arg(subspace_file), "allow_text_encoder=True"], params)


def test_refuses_a_trained_text_encoder_unless_allowed(kohya_networks, subspace_file):
    network, params = kohya_network(NETWORK_MODULE, *models(), train_text_encoder=True)
    before = [m.lora_down.weight.clone() for m in protected_modules(network)]
    with pytest.raises(ValueError, match=r"lora_te_self_attn_k_proj.*--network_train_unet_only"):
        kohya_optimizer(OPTIMIZER, [subspace_arg(subspace_file)], params)
    # refused before anything was written
    for a, m in zip(before, protected_modules(network), strict=True):
        assert torch.equal(a, m.lora_down.weight)
    opt = kohya_optimizer(OPTIMIZER, [subspace_arg(subspace_file), "allow_text_encoder=True"],
                          params)  # fmt: skip
    assert len(opt.protection.entries) == 4


def test_refuses_a_subspace_of_another_width(kohya_networks, tmp_path):
    network, params = kohya_network(NETWORK_MODULE, *models())
    path = tmp_path / "wide.safetensors"
    ConceptSubspace(torch.eye(CTX + 1)[:, :K]).save(path)
    before = [m.lora_down.weight.clone() for m in protected_modules(network)]
    with pytest.raises(ValueError, match=rf"d={CTX + 1}, but 4 of 4 .*attn2_to_k reads {CTX}"):
        kohya_optimizer(OPTIMIZER, [subspace_arg(path)], params)
    for a, m in zip(before, protected_modules(network), strict=True):
        assert torch.equal(a, m.lora_down.weight)


class _ScheduleFree(torch.optim.SGD):
    def train(self) -> None:
        pass


def test_projected_optimizer_refuses_bad_inner_optimizers(kohya_networks, subspace_file):
    _, params = kohya_network(NETWORK_MODULE, *models())
    with pytest.raises(ValueError, match=r"inner='torch\.optim\.Nope': no such optimizer"):
        kohya.ProjectedOptimizer(params, subspace=subspace_file, inner="torch.optim.Nope")
    with pytest.raises(ValueError, match="schedule-free"):
        kohya.ProjectedOptimizer(params, subspace=subspace_file, inner=_ScheduleFree)


def test_importing_the_module_does_not_need_kohya():
    code = "import gradproj.integrations.kohya as k, sys; assert 'networks' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(ImportError, match="run from the sd-scripts folder"):
        kohya.create_network(1.0, RANK, 1.0, None, *models())


# ---------------------------------------------------------------- kohya's own networks/lora.py


def _kohya_lora_source() -> str | None:
    where = Path(
        os.environ.get("GRADPROJ_KOHYA_SD_SCRIPTS", "/work/.mirror/kohya-ss+sd-scripts/repo")
    )
    if (where / "networks" / "lora.py").is_file():
        return (where / "networks" / "lora.py").read_text()
    if (where / "HEAD").is_file():  # a bare git dir
        out = subprocess.run(["git", f"--git-dir={where}", "show", "HEAD:networks/lora.py"],
                             capture_output=True, text=True)  # fmt: skip
        return out.stdout if out.returncode == 0 else None
    return None


@pytest.fixture
def real_kohya_networks(tmp_path, monkeypatch):
    source = _kohya_lora_source()
    if source is None:
        pytest.skip("no copy of kohya-ss sd-scripts (set GRADPROJ_KOHYA_SD_SCRIPTS)")
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    (tmp_path / "networks").mkdir()
    (tmp_path / "networks" / "lora.py").write_text(source)
    # kohya's library/utils.py imports torchvision and cv2; lora.py needs only these two names.
    (tmp_path / "library").mkdir()
    (tmp_path / "library" / "__init__.py").write_text("")
    (tmp_path / "library" / "utils.py").write_text("def setup_logging(*a, **k):\n    pass\n")
    (tmp_path / "library" / "sdxl_original_unet.py").write_text(
        "import torch\n\n\nclass SdxlUNet2DConditionModel(torch.nn.Module):\n    pass\n"
    )
    for name in [n for n in sys.modules if n.split(".")[0] in ("networks", "library")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield importlib.import_module("networks.lora")
    for name in [n for n in sys.modules if n.split(".")[0] in ("networks", "library")]:
        del sys.modules[name]


def test_kohyas_own_lora_network(real_kohya_networks, subspace_file):
    text_encoder, unet = models()
    network, params = kohya_network(NETWORK_MODULE, text_encoder, unet)
    assert isinstance(network, real_kohya_networks.LoRANetwork)
    assert len(protected_modules(network)) == 4
    opt = kohya_optimizer(OPTIMIZER, [subspace_arg(subspace_file)], params)
    train(text_encoder, unet, opt)
    worst_a, worst_dw = worst(network, subspace_file)
    assert worst_a <= 1e-6 and worst_dw <= 1e-6, (worst_a, worst_dw)
