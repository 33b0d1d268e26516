"""ConceptSubspace: SVD selection, ridge weights, union, moves, precision, safetensors, prompts."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

import gradproj
from gradproj import reference as R
from gradproj.ops import ORTHONORMAL_TOL
from gradproj.subspace import ConceptSubspace

from .test_project import orthonormal

F64 = torch.float64
F32 = torch.float32


def embeddings_with_spectrum(s: list[float], d: int = 32, n: int = 50, seed: int = 0):
    """``E = A diag(s) Bᵀ`` with known singular values and right singular vectors ``B``."""
    gen = torch.Generator().manual_seed(seed)
    a, _ = torch.linalg.qr(torch.randn(n, len(s), generator=gen, dtype=F64))
    b, _ = torch.linalg.qr(torch.randn(d, len(s), generator=gen, dtype=F64))
    return a @ torch.diag(torch.tensor(s, dtype=F64)) @ b.T, b


def same_span(u: torch.Tensor, v: torch.Tensor, atol: float) -> bool:
    u, v = u.double(), v.double()
    return u.shape == v.shape and bool(((u @ u.T - v @ v.T).abs() <= atol).all())


def test_fixed_k_keeps_the_top_singular_directions():
    e, b = embeddings_with_spectrum([10.0, 5.0, 1.0, 0.1])
    sub = ConceptSubspace.from_embeddings(e, k=2)
    assert sub.k == 2 and sub.dim == 32 and sub.weights is None
    assert same_span(sub.basis, b[:, :2], 1e-6)
    torch.testing.assert_close(sub.singular_values, torch.tensor([10.0, 5.0]))


def test_energy_threshold_picks_the_fewest_directions():
    e, _ = embeddings_with_spectrum([10.0, 5.0, 1.0, 0.1])  # energies 100, 25, 1, 0.01
    total = 126.01
    assert ConceptSubspace.from_embeddings(e, energy=100 / total).k == 1
    assert ConceptSubspace.from_embeddings(e, energy=0.9).k == 2
    assert ConceptSubspace.from_embeddings(e, energy=0.999).k == 3
    assert ConceptSubspace.from_embeddings(e, energy=1.0).k == 4
    assert ConceptSubspace.from_embeddings(e).k == 4  # default: every nonzero direction


def test_ridge_weights_reproduce_the_ridge_projector():
    e, _ = embeddings_with_spectrum([3.0, 1.0, 0.3], d=20)
    lam = 0.5
    sub = ConceptSubspace.from_embeddings(e, ridge=lam, dtype=F64)
    torch.testing.assert_close(sub.weights, sub.singular_values**2 / (sub.singular_values**2 + lam))
    g = torch.randn(7, 20, dtype=F64)
    out = g.clone()
    gradproj.project_(out, sub)  # a ConceptSubspace is a basis, weights included
    torch.testing.assert_close(out, g @ R.ridge_projector(e.T, lam), rtol=0, atol=1e-12)


def test_argument_errors():
    e, _ = embeddings_with_spectrum([2.0, 1.0])
    with pytest.raises(ValueError, match=r"k must lie in \[0, 2\]"):
        ConceptSubspace.from_embeddings(e, k=3)
    with pytest.raises(ValueError, match="k or energy, not both"):
        ConceptSubspace.from_embeddings(e, k=1, energy=0.5)
    with pytest.raises(ValueError, match="energy must lie in"):
        ConceptSubspace.from_embeddings(e, energy=0.0)
    with pytest.raises(ValueError, match="ridge must be > 0"):
        ConceptSubspace.from_embeddings(e, ridge=-1.0)
    with pytest.raises(ValueError, match="embeddings must be 2-D"):
        ConceptSubspace.from_embeddings(torch.randn(3))
    with pytest.raises(ValueError, match="not orthonormal"):
        ConceptSubspace(torch.randn(8, 3))
    with pytest.raises(ValueError, match="weights must lie in"):
        ConceptSubspace(orthonormal(8, 2), torch.tensor([0.5, 2.0]))
    with pytest.raises(ValueError, match=r"weights must have shape \(2,\)"):
        ConceptSubspace(orthonormal(8, 2), torch.tensor([0.5]))


def test_shapes_are_checked_before_any_arithmetic():
    """A (2 × 10⁶) basis would make a 10⁶ × 10⁶ UᵀU. On the meta device any value read
    (UᵀU's max, isfinite) raises RuntimeError, so a ValueError here proves the shape
    check ran first."""
    with pytest.raises(ValueError, match=r"k=1000000 columns > d=2 rows"):
        ConceptSubspace(torch.empty(2, 10**6, device="meta"))
    u = orthonormal(8, 2)
    with pytest.raises(ValueError, match=r"2-D \(d × k\) tensor, got shape \(8,\)"):
        ConceptSubspace(u[:, 0])
    with pytest.raises(TypeError, match=r"basis must be floating-point, got torch\.int64"):
        ConceptSubspace(torch.zeros(8, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"weights must be floating-point, got torch\.int64"):
        ConceptSubspace(u, torch.ones(2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"singular_values must have shape \(2,\)"):
        ConceptSubspace(u, singular_values=torch.ones(3))
    with pytest.raises(ValueError, match="weights are on meta, but the basis is on cpu"):
        ConceptSubspace(u, torch.ones(2, device="meta"))
    with pytest.raises(TypeError, match="dense"):
        ConceptSubspace(u.to_sparse())


def test_non_finite_values_are_named():
    u = orthonormal(8, 2)
    u[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"basis \(8, 2\) holds 1 NaN/inf values"):
        ConceptSubspace(u)
    with pytest.raises(ValueError, match=r"weights must lie in \[0, 1\], got values in \[nan"):
        ConceptSubspace(orthonormal(8, 2), torch.tensor([float("nan"), 0.5]))
    with pytest.raises(ValueError, match=r"weights must lie in \[0, 1\]"):
        ConceptSubspace(orthonormal(8, 2), torch.tensor([float("inf"), 0.5]))


def test_precision_sets_the_orthonormality_tolerance():
    """A float32-made basis cast to float64 is float32-accurate: max |UᵀU − I| ~ 1e-7,
    far above float64's 1e-10, and is accepted with float32's tolerance."""
    u32 = torch.linalg.qr(torch.randn(256, 16, generator=torch.Generator().manual_seed(0)))[0]
    err = (u32.double().T @ u32.double() - torch.eye(16, dtype=F64)).abs().max().item()
    assert ORTHONORMAL_TOL[F64] < err <= ORTHONORMAL_TOL[F32]
    with pytest.raises(ValueError, match="not orthonormal"):
        ConceptSubspace(u32.double())  # the repro: precision defaults to the dtype
    sub = ConceptSubspace(u32).to(dtype=F64)
    assert sub.basis.dtype == F64 and sub.precision == F32
    assert sub.orthonormal_tol == ORTHONORMAL_TOL[F32]
    again = ConceptSubspace(sub.basis, precision=sub.precision)  # re-checked, accepted
    assert again.orthonormal_tol == ORTHONORMAL_TOL[F32]
    assert repr(again).endswith("torch.float64, cpu, precision=torch.float32)")
    # A cast down takes the coarser precision; casting back up keeps it.
    sub64 = ConceptSubspace(orthonormal(16, 4, dtype=F64))
    assert sub64.precision == F64 and sub64.orthonormal_tol == ORTHONORMAL_TOL[F64]
    bf = sub64.to(dtype=torch.bfloat16)
    assert bf.precision == torch.bfloat16 and bf.to(dtype=F64).precision == torch.bfloat16
    assert bf.to(dtype=torch.float16).precision == torch.bfloat16  # bf16 is the coarser
    assert sub64.to(dtype=torch.float16).to(dtype=F32).precision == torch.float16
    assert sub64.to("cpu").precision == F64
    with pytest.raises(ValueError, match=r"precision torch\.float64 is finer than the basis dtype"):
        ConceptSubspace(u32, precision=F64)
    with pytest.raises(TypeError, match="precision must be one of float64, float32"):
        ConceptSubspace(u32, precision=torch.int32)


def test_a_non_orthonormal_float64_basis_is_still_rejected():
    u = orthonormal(32, 4, dtype=F64)
    off = u.clone()
    off[:, 0] *= 1 + 1e-8  # UᵀU off by 2e-8: beyond float64's tolerance only
    with pytest.raises(ValueError, match="not orthonormal"):
        ConceptSubspace(off)
    ConceptSubspace(off, precision=F32)
    off[:, 0] *= 1 + 1e-3  # beyond float32's tolerance too
    with pytest.raises(ValueError, match=r"not orthonormal: max \|UᵀU − I\| = 0.002 > 1e-05"):
        ConceptSubspace(off, precision=F32)
    with pytest.raises(ValueError, match="not orthonormal"):
        ConceptSubspace(off.float()).to(dtype=F64)  # made in float32, never accepted


def test_union_spans_both_and_drops_dependent_directions():
    u = orthonormal(16, 4, dtype=F64)
    a = ConceptSubspace(u[:, :3])
    b = ConceptSubspace(u[:, 2:])  # shares one direction with a
    both = a.union(b)
    assert both.k == 4
    assert same_span(both.basis, u, 1e-10)
    with pytest.raises(ValueError, match="union of soft subspaces"):
        a.union(ConceptSubspace(u[:, :1], torch.tensor([0.5], dtype=F64)))
    with pytest.raises(ValueError, match="dimension 16 and 8"):
        a.union(ConceptSubspace(orthonormal(8, 1)))


def test_to_moves_everything():
    e, _ = embeddings_with_spectrum([2.0, 1.0])
    sub = ConceptSubspace.from_embeddings(e, ridge=1.0, dtype=F64).to(dtype=torch.bfloat16)
    assert sub.basis.dtype == sub.weights.dtype == sub.singular_values.dtype == torch.bfloat16


def test_safetensors_round_trip(tmp_path):
    e, _ = embeddings_with_spectrum([2.0, 1.0, 0.5])
    sub = ConceptSubspace.from_embeddings(
        e, ridge=0.3, metadata={"source_model": "tiny-clip", "prompts": ["a <mark> mug"]}
    )
    path = tmp_path / "mark.safetensors"
    sub.save(path)
    back = ConceptSubspace.load(path)
    assert torch.equal(back.basis, sub.basis) and torch.equal(back.weights, sub.weights)
    assert torch.equal(back.singular_values, sub.singular_values)
    assert back.metadata == sub.metadata
    assert back.metadata["prompts"] == ["a <mark> mug"] and back.metadata["ridge"] == 0.3

    assert back.precision == sub.precision == F32


def test_precision_survives_save_and_load(tmp_path):
    path = tmp_path / "up.safetensors"
    sub = ConceptSubspace(orthonormal(64, 8)).to(dtype=F64)
    sub.save(path)
    back = ConceptSubspace.load(path)
    assert back.basis.dtype == F64 and back.precision == F32
    assert back.orthonormal_tol == ORTHONORMAL_TOL[F32]
    # A file written before the precision was saved: precision = the basis dtype.
    save_file(
        {"basis": orthonormal(64, 8, dtype=F64).contiguous()},
        str(path),
        metadata={"gradproj": "{}"},
    )
    old = ConceptSubspace.load(path)
    assert old.precision == F64 and old.metadata == {}


def _with_inf(u: torch.Tensor) -> torch.Tensor:
    u = u.clone()
    u[0, 0] = float("inf")
    return u


# (tensors, safetensors metadata, what the error says after the path)
BAD_FILES = {
    # the repro: 480 KB that would ask for a 60000² UᵀU (14.4 GB)
    "k_above_d": ({"basis": torch.zeros(2, 60000)}, None, r"k=60000 columns > d=2 rows"),
    "int_basis": (
        {"basis": torch.zeros(8, 2, dtype=torch.int64)},
        None,
        r"tensor 'basis' has dtype I64; a ConceptSubspace stores floating point",
    ),
    "int_weights": (
        {"basis": orthonormal(8, 2), "weights": torch.ones(2, dtype=torch.int32)},
        None,
        r"tensor 'weights' has dtype I32",
    ),
    "1d_basis": ({"basis": torch.zeros(8)}, None, r"2-D \(d × k\) tensor, got shape \(8,\)"),
    "3d_basis": ({"basis": torch.zeros(8, 2, 1)}, None, r"2-D \(d × k\) tensor"),
    "weights_rank": (
        {"basis": orthonormal(8, 2), "weights": torch.ones(2, 1)},
        None,
        r"weights must have shape \(2,\)",
    ),
    "singular_values_length": (
        {"basis": orthonormal(8, 2), "singular_values": torch.ones(3)},
        None,
        r"singular_values must have shape \(2,\)",
    ),
    "inf_basis": ({"basis": _with_inf(orthonormal(8, 2))}, None, r"holds 1 NaN/inf values"),
    "weights_above_1": (
        {"basis": orthonormal(8, 2), "weights": torch.tensor([0.5, 2.0])},
        None,
        r"weights must lie in \[0, 1\], got values in \[0.5, 2\]",
    ),
    "nan_weights": (
        {"basis": orthonormal(8, 2), "weights": torch.tensor([0.5, float("nan")])},
        None,
        r"weights must lie in \[0, 1\]",
    ),
    "no_basis": ({"other": torch.zeros(2)}, None, r"holds no 'basis' tensor \(found \['other'\]\)"),
    "not_orthonormal": ({"basis": torch.ones(8, 2)}, None, r"is not orthonormal"),
    "metadata_not_json": (
        {"basis": orthonormal(8, 2)},
        {"gradproj": "{not json"},
        r"Expecting property name",
    ),
    "metadata_not_an_object": (
        {"basis": orthonormal(8, 2)},
        {"gradproj": json.dumps([1, 2])},
        r"metadata must be a JSON object, got list",
    ),
    "unknown_precision": (
        {"basis": orthonormal(8, 2)},
        {"gradproj.precision": "float128"},
        r"precision must be one of .*, got 'float128'",
    ),
    "precision_finer_than_dtype": (
        {"basis": orthonormal(8, 2)},
        {"gradproj.precision": "float64"},
        r"precision torch.float64 is finer than the basis dtype torch.float32",
    ),
    "f32_accurate_basis_saved_as_f64": (
        {"basis": orthonormal(64, 8).double()},
        None,
        r"not orthonormal",
    ),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_load_rejects_a_bad_file_naming_it(tmp_path, case):
    tensors, metadata, says = BAD_FILES[case]
    path = tmp_path / f"{case}.safetensors"
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(path), metadata=metadata)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: .*{says}"):
        ConceptSubspace.load(path)


def test_load_rejects_a_missing_or_foreign_file(tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(
        FileNotFoundError, match=rf"^{re.escape(str(missing))}: no such ConceptSubspace file"
    ):
        ConceptSubspace.load(missing)
    for name, content in [("text.safetensors", b"hello, world\n"), ("empty.safetensors", b"")]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(
            ValueError, match=rf"^{re.escape(str(path))}: not a readable safetensors file"
        ):
            ConceptSubspace.load(path)
    with pytest.raises(
        ValueError, match=rf"^{re.escape(str(tmp_path))}: not a readable safetensors file"
    ):
        ConceptSubspace.load(tmp_path)  # a directory


def _tiny_text_model():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

    words = ["<pad>", "<bos>", "<eos>", "<unk>", "a", "photo", "of", "mug", "cat", "mark", "red"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", model_max_length=8
    )
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=len(words),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=8,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return CLIPTextModel(config).eval(), tokenizer


def test_from_prompts_difference_mode_blocks_the_concept_response():
    """With every direction kept, a projected K/V weight ignores what the concept adds."""
    encoder, tokenizer = _tiny_text_model()
    with_mark = ["a photo of a mark mug", "a red mark cat", "a mark"]
    without = ["a photo of a mug", "a red cat", "a"]
    sub = ConceptSubspace.from_prompts(
        with_mark, encoder, tokenizer, neutral_prompts=without, energy=1.0, attention_mask=True
    )
    assert sub.dim == 32 and 0 < sub.k <= 32
    assert sub.metadata["mode"] == "difference" and sub.metadata["prompts"] == with_mark

    w = torch.randn(16, 32)
    gradproj.project_(w, sub)  # treat W itself as the update: ΔW = P(W)
    tok_a = tokenizer(with_mark, padding="max_length", max_length=8, return_tensors="pt")
    tok_b = tokenizer(without, padding="max_length", max_length=8, return_tensors="pt")
    with torch.no_grad():
        h_a = encoder(tok_a["input_ids"], attention_mask=tok_a["attention_mask"]).last_hidden_state
        h_b = encoder(tok_b["input_ids"], attention_mask=tok_b["attention_mask"]).last_hidden_state
    # Every position a UNet reads, including the concept token itself (the neutral
    # prompts are shorter, so it sits where they have padding) and the padding.
    diff = (h_a - h_b).reshape(-1, 32)
    assert ((diff @ w.T).norm() / diff.norm() / w.norm()).item() < 1e-5
    mark_position = (tok_a["input_ids"][0] == tokenizer.convert_tokens_to_ids("mark")).nonzero()
    concept_state = h_a[0, mark_position[0, 0]] - h_b[0, mark_position[0, 0]]
    assert ((w @ concept_state).norm() / concept_state.norm() / w.norm()).item() < 1e-5


def test_from_prompts_encodes_as_diffusers_pipelines_do():
    """No mask for CLIP (what SD pipelines, the official scripts and kohya feed the UNet):
    the padding states differ with the mask, so a masked subspace would miss them."""
    encoder, tokenizer = _tiny_text_model()
    with_mark, without = ["a photo of a mark mug", "a mark"], ["a photo of a mug", "a"]
    tok_a = tokenizer(with_mark, padding="max_length", max_length=8, return_tensors="pt")
    tok_b = tokenizer(without, padding="max_length", max_length=8, return_tensors="pt")
    with torch.no_grad():
        diff = encoder(tok_a["input_ids"]).last_hidden_state
        diff = (diff - encoder(tok_b["input_ids"]).last_hidden_state).reshape(-1, 32)
        masked = encoder(tok_a["input_ids"], attention_mask=tok_a["attention_mask"])
        assert not torch.allclose(masked.last_hidden_state, encoder(tok_a["input_ids"])[0])
    for mask, expect_fit in ((None, True), (True, False)):
        sub = ConceptSubspace.from_prompts(
            with_mark, encoder, tokenizer, neutral_prompts=without, energy=1.0,
            attention_mask=mask,
        )  # fmt: skip
        assert sub.metadata["attention_mask"] is bool(mask)
        u = sub.basis.double()
        left = (diff.double() - diff.double() @ u @ u.T).norm() / diff.double().norm()
        assert (left.item() < 1e-5) is expect_fit, (mask, left.item())


def test_from_prompts_states_mode_and_errors():
    encoder, tokenizer = _tiny_text_model()
    sub = ConceptSubspace.from_prompts(["a mark mug", "mark"], encoder, tokenizer, k=2)
    assert sub.k == 2 and sub.metadata["mode"] == "states"
    with pytest.raises(ValueError, match="neutral_prompts has 1 entries, prompts 2"):
        ConceptSubspace.from_prompts(["a", "b"], encoder, tokenizer, neutral_prompts=["a"])
