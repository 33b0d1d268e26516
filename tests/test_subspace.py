"""ConceptSubspace: SVD selection, ridge weights, union, moves, safetensors, prompts."""

from __future__ import annotations

import pytest
import torch

import gradproj
from gradproj import reference as R
from gradproj.subspace import ConceptSubspace

from .test_project import orthonormal

F64 = torch.float64


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

    from safetensors.torch import save_file

    save_file({"other": torch.zeros(2)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="no 'basis' tensor"):
        ConceptSubspace.load(tmp_path / "bad.safetensors")


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
        with_mark, encoder, tokenizer, neutral_prompts=without, energy=1.0
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


def test_from_prompts_states_mode_and_errors():
    encoder, tokenizer = _tiny_text_model()
    sub = ConceptSubspace.from_prompts(["a mark mug", "mark"], encoder, tokenizer, k=2)
    assert sub.k == 2 and sub.metadata["mode"] == "states"
    with pytest.raises(ValueError, match="neutral_prompts has 1 entries, prompts 2"):
        ConceptSubspace.from_prompts(["a", "b"], encoder, tokenizer, neutral_prompts=["a"])
