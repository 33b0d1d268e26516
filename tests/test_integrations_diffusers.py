"""gradproj.diffusers: the text-reading weights of each model class, found by name and class."""

import subprocess
import sys

import pytest
import torch

from gradproj import ConceptSubspace, ProjectedOptimizer
from gradproj import diffusers as gd
from tests.tiny_pipelines import tiny_unet

diffusers = pytest.importorskip("diffusers")


def _unet(cross_dim=16):
    return tiny_unet(cross_dim)


def _sd3():
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=4,
        num_attention_heads=2,
        joint_attention_dim=12,
        caption_projection_dim=8,
        pooled_projection_dim=6,
        out_channels=4,
        pos_embed_max_size=8,
    )


def _flux():
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=4,
        num_attention_heads=2,
        joint_attention_dim=12,
        pooled_projection_dim=6,
        axes_dims_rope=(2, 2, 0),
    )


def _subspace(d, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ConceptSubspace.from_embeddings(torch.randn(3, d, generator=g), k=k)


def test_import_gradproj_does_not_import_diffusers():
    code = "import sys, gradproj, gradproj.diffusers; print('diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_unet_protects_every_cross_attention_key_and_value():
    unet = _unet()
    names = set(gd.text_readers(unet))
    expected = {
        n.removesuffix(".weight")
        for n, _ in unet.named_parameters()
        if n.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))
    }
    assert names == expected and len(names) == 8  # 1 down + 1 mid + 2 up blocks, K and V
    bases = gd.protect(unet, _subspace(16))
    assert {id(p) for p in bases} == {id(unet.get_submodule(n).weight) for n in expected}
    assert not any(n.endswith(("attn1.to_k", "attn1.to_v")) for n in names)  # self-attention


def test_protect_carries_the_model_names_into_the_optimizer():
    # Tensor keys alone would give positional names (param_groups[0]['params'][20]).
    unet = _unet()
    bases = gd.protect(unet, _subspace(16))
    opt = ProjectedOptimizer(torch.optim.SGD(unet.parameters(), lr=0.1), bases)
    names = {e.name for e in opt.protection.entries}
    expected = {
        n
        for n, _ in unet.named_parameters()
        if n.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))
    }
    assert names == expected and len(names) == 8
    assert set(opt.state_dict()["gradproj"]["names"].values()) == names


def test_sd3_input_is_context_embedder_and_attention_is_the_text_stream():
    model = _sd3()
    assert list(gd.text_readers(model)) == ["context_embedder"]
    attn = gd.text_readers(model, target="attention")
    assert {n.rsplit(".", 1)[1] for n in attn} == {"add_q_proj", "add_k_proj", "add_v_proj"}
    assert {n.split(".")[1] for n in attn} == {"0", "1"}  # both joint blocks
    assert len(gd.protect(model, _subspace(12))) == 1
    assert len(gd.protect(model, _subspace(8), target="attention")) == len(attn)


def test_flux_attention_includes_the_single_stream_blocks():
    model = _flux()
    assert list(gd.text_readers(model)) == ["context_embedder"]
    attn = set(gd.text_readers(model, target="attention"))
    assert "transformer_blocks.0.attn.add_k_proj" in attn
    assert {"single_transformer_blocks.1.attn.to_v", "single_transformer_blocks.1.proj_mlp"} <= attn
    assert len(attn) == 3 + 2 * 4


def test_dimension_mismatch_names_the_layers():
    with pytest.raises(ValueError, match=r"d=10 .*attn2\.to_k reads 16"):
        gd.protect(_unet(), _subspace(10))


def test_unknown_model_and_bad_target_are_errors():
    with pytest.raises(TypeError, match="Linear"):
        gd.text_readers(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="target"):
        gd.text_readers(_unet(), target="everything")


def test_unet_without_cross_attention_is_an_error():
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type=None,
        cross_attention_dim=16,
        norm_num_groups=4,
    )
    with pytest.raises(ValueError, match="no text-reading layers"):
        gd.protect(unet, _subspace(16))


def test_protected_unet_keeps_the_guarantee_through_adamw():
    unet = _unet()
    sub = _subspace(16, k=3)
    bases = gd.protect(unet, sub)
    before = {p: p.detach().clone() for p in bases}
    opt = ProjectedOptimizer(torch.optim.AdamW(unet.parameters(), lr=1e-2), bases)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(2, 3, 8, 8, generator=g)
        ctx = torch.randn(2, 5, 16, generator=g)
        unet(x, torch.tensor([1, 500]), ctx).sample.square().mean().backward()
        opt.step()
        opt.zero_grad()
    for p, w0 in before.items():
        assert (p - w0).norm() > 1e-3  # it trained
        assert ((p - w0).double() @ sub.basis.double()).norm() <= 1e-6 * w0.norm()
