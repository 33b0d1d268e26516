"""Subspaces from exactly what a pipeline feeds its model (``ConceptSubspace.from_pipeline``).

On tiny SD, SDXL, SD3 and Flux pipelines (``tests/tiny_pipelines.py``): the states a
pipeline call hands its UNet/transformer as ``encoder_hidden_states`` are captured with
a forward pre-hook and shown to be ``encode_prompt``'s ``prompt_embeds`` bit for bit;
the subspace built by ``from_pipeline`` equals, bit for bit, the one built from those
captured states; and it has the width ``gradproj.diffusers.protect`` needs.
"""

from __future__ import annotations

import pytest
import torch

from gradproj import ConceptSubspace, cli
from gradproj import diffusers as gd

diffusers = pytest.importorskip("diffusers")
tiny = pytest.importorskip("tests.tiny_pipelines")

CONCEPT = ["a photo of sks dog", "sks dog on grass"]
NEUTRAL = ["a photo of a dog", "a dog on grass"]
WIDTH = {"sd": 32, "sdxl": 64, "sd3": 64, "flux": 32}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    built = {}

    def get(name):
        if name not in built:
            tiny.BUILDERS[name](root / name)
            built[name] = root / name
        return built[name]

    return get


def _model(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def _captured_states(pipe, prompt: str) -> torch.Tensor:
    """``encoder_hidden_states`` as the pipeline's own call passes them to its model."""
    seen = []

    def hook(module, args, kwargs):
        seen.append(kwargs["encoder_hidden_states"].detach().clone())

    handle = _model(pipe).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe(prompt, num_inference_steps=1, guidance_scale=1.0, height=32, width=32,
             output_type="latent")  # fmt: skip
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3", "flux"])
def test_from_pipeline_reads_what_the_model_reads(name, folders):
    pipe = diffusers.DiffusionPipeline.from_pretrained(folders(name))
    with torch.no_grad():
        seen = {p: _captured_states(pipe, p) for p in CONCEPT + NEUTRAL}
        for p, states in seen.items():
            kwargs = {"do_classifier_free_guidance": False} if name != "flux" else {}
            kwargs |= {"prompt_2": None, "prompt_3": None} if name == "sd3" else {}
            embeds = pipe.encode_prompt(prompt=[p], device="cpu", num_images_per_prompt=1, **kwargs)
            assert torch.equal(embeds[0], states), f"{name}: encode_prompt is not what {p!r} feeds"
    sub = ConceptSubspace.from_pipeline(pipe, CONCEPT, neutral_prompts=NEUTRAL, energy=1.0)
    rows = torch.cat(
        [
            (seen[c] - seen[n]).reshape(-1, seen[c].shape[-1])
            for c, n in zip(CONCEPT, NEUTRAL, strict=True)
        ]
    )
    want = ConceptSubspace.from_embeddings(rows, energy=1.0)
    assert sub.dim == WIDTH[name] and torch.equal(sub.basis, want.basis)
    assert sub.metadata["pipeline"] == type(pipe).__name__
    assert gd.protect(_model(pipe), sub)  # the width the protected layers read


def test_sd_from_prompts_matches_the_pipeline_bit_for_bit(folders):
    """The encoder-and-tokenizer path encodes as the SD pipeline does (no attention mask)."""
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folders("sd"))
    a = ConceptSubspace.from_pipeline(pipe, CONCEPT, neutral_prompts=NEUTRAL, k=3)
    b = ConceptSubspace.from_prompts(
        CONCEPT, pipe.text_encoder, pipe.tokenizer, neutral_prompts=NEUTRAL, k=3
    )
    assert torch.equal(a.basis, b.basis)


def test_from_pipeline_refuses_what_cannot_encode():
    with pytest.raises(TypeError, match="has no encode_prompt"):
        ConceptSubspace.from_pipeline(torch.nn.Linear(2, 2), CONCEPT)


@pytest.mark.parametrize("flag", ["--pipeline", "--text-encoder"])
def test_cli_builds_from_a_pipeline_folder(flag, folders, tmp_path, capsys):
    prompts = tmp_path / "p.tsv"
    prompts.write_text("".join(f"{c}\t{n}\n" for c, n in zip(CONCEPT, NEUTRAL, strict=True)))
    out = tmp_path / "s.safetensors"
    argv = ["subspace", flag, str(folders("sdxl")), "--prompts", str(prompts), "--out", str(out)]
    assert cli.main([*argv, "--k", "2"]) == 0, capsys.readouterr().err
    sub = ConceptSubspace.load(out)
    assert (sub.dim, sub.k) == (64, 2) and sub.metadata["pipeline"] == "StableDiffusionXLPipeline"
    status = cli.main([*argv, "--tokenizer", str(tmp_path)])
    assert status == 2 and "a pipeline has its own" in capsys.readouterr().err
