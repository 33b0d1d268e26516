"""The official diffusers training scripts, patched by ``examples/diffusers/*.patch``, run.

Each script is read from a diffusers git checkout at :data:`TAG` (never copied into
this repo), patched with ``git apply``, and run as a subprocess for a few CPU steps
on tiny random models saved with ``save_pretrained`` (no hub, no network). The
test then loads what the script saved and measures the guarantee on the files:

- full fine-tune: ``‖(W_T − W₀) U‖ / ‖W₀‖`` for every cross-attention ``to_k`` / ``to_v``;
- LoRA: ``‖A U‖ / ‖A‖`` for every protected ``lora_A`` (then ``ΔW U = s·B (A U)``).

The scripts import torchvision, whose PyPI build does not import beside the
pinned CPU torch: ``tests/stubs/torchvision`` stands in, importable in the scripts'
subprocesses only (see ``_LAUNCH``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("datasets")

from gradproj import ConceptSubspace
from tests import tiny_pipelines as tiny

ROOT = Path(__file__).resolve().parents[1]
PATCHES = ROOT / "examples" / "diffusers"
STUBS = ROOT / "tests" / "stubs"
TAG = "v0.40.0"
REPO = Path(os.environ.get("GRADPROJ_DIFFUSERS_REPO", "/work/.mirror/huggingface+diffusers/repo"))
TIMEOUT_S = 240
# fp32 anchored projection leaves one step's rounding, ~1e-8 of ‖W₀‖ (gradproj.optim).
BOUND = 1e-6


# ---------------------------------------------------------------- the scripts


HOW = (
    "set GRADPROJ_DIFFUSERS_REPO to a clone of https://github.com/huggingface/diffusers "
    f"that has the tag {TAG}"
)
pytestmark = pytest.mark.slow  # about 25 s a script run, import-bound


@pytest.fixture(scope="session")
def diffusers_checkout() -> None:
    """Skip every test here, before any model is built, without a checkout that has :data:`TAG`."""
    if shutil.which("git") is None or not REPO.exists():
        pytest.skip(f"no diffusers checkout at {REPO}: {HOW}")
    tag = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", "--quiet", f"{TAG}^{{commit}}"],
        capture_output=True,
    )
    if tag.returncode != 0:
        pytest.skip(f"{REPO} has no tag {TAG}: {HOW}")


def _script_source(path: str) -> str:
    """``path`` at :data:`TAG` in :data:`REPO` (a bare git dir or a clone)."""
    shown = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{TAG}:{path}"], capture_output=True, text=True
    )
    if shown.returncode != 0:
        pytest.skip(f"{REPO} has no {TAG}:{path} ({shown.stderr.strip()}): {HOW}")
    return shown.stdout


def _patched(path: str, workdir: Path) -> Path:
    """The script at ``path``, written under ``workdir`` and patched with its patch file."""
    script = workdir / path
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(_script_source(path))
    patch = PATCHES / f"{Path(path).stem}.patch"
    # Inside a git work tree, `git apply` would resolve paths from its top and skip the
    # script; the ceiling keeps it from finding one above workdir.
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(workdir.parent)}
    applied = subprocess.run(
        ["git", "apply", str(patch)], cwd=workdir, env=env, capture_output=True, text=True
    )
    assert applied.returncode == 0, f"{patch.name} does not apply to {TAG}:{path}\n{applied.stderr}"
    assert "--protect_subspace" in script.read_text(), f"{patch.name} left {path} unchanged"
    return script


# Runs the script as `python script.py ...` would, with tests/stubs importable. transformers
# and diffusers decide once whether torchvision is installed, and transformers would take the
# stub for it and import torchvision.transforms.v2; so they are asked before the stub is on
# sys.path, and only the script's own `from torchvision import transforms` sees it.
_LAUNCH = """
import runpy, sys
from transformers.utils import import_utils
import diffusers.utils.import_utils
import_utils.is_torchvision_available()
stubs, script = sys.argv[1:3]
sys.argv = sys.argv[2:]
sys.path[:0] = [stubs, script.rpartition("/")[0]]
runpy.run_path(script, run_name="__main__")
"""


def _run(path: str, workdir: Path, args: list[str]) -> None:
    """Run the patched script with ``args``, offline, with the torchvision stub; fail with
    the tail of its output if it fails."""
    script = _patched(path, workdir)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),  # this checkout's gradproj, not an installed one
        "HF_HOME": str(workdir / "hf_home"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",  # two runs at a time share the two cores (script_runs)
    }
    try:
        done = subprocess.run(
            [sys.executable, "-c", _LAUNCH, str(STUBS), str(script), *args],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
        tail = (err or "")[-4000:]
        pytest.fail(f"{path} ran past {TIMEOUT_S} s; stderr tail:\n{tail}")
    if done.returncode != 0:
        pytest.fail(f"{path} exited {done.returncode}; stderr tail:\n{done.stderr[-6000:]}")


# ---------------------------------------------------------------- tiny models and data


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Builds each tiny pipeline folder on first use: ``models("sd")`` → its path."""
    root = tmp_path_factory.mktemp("tiny-models")

    def get(name: str) -> Path:
        folder = root / name
        if not folder.exists():
            tiny.BUILDERS[name](folder)
        return folder

    return get


def make_images(folder: Path) -> None:
    """``imagefolder/``: four 32×32 PNGs and a ``metadata.jsonl``; ``instance/``: the same PNGs
    alone (the DreamBooth scripts open every file of their folder as an image)."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    lines = []
    for sub in ("imagefolder", "instance"):
        (folder / sub).mkdir(parents=True)
    for i in range(4):
        pixels = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy()
        for sub in ("imagefolder", "instance"):
            Image.fromarray(pixels).save(folder / sub / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": tiny.PROMPT}))
    (folder / "imagefolder" / "metadata.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    make_images(folder)
    return folder


def _subspace_file(folder: Path, d: int, k: int = 4, seed: int = 0) -> Path:
    """A random orthonormal ``d × k`` basis saved as a ``ConceptSubspace``."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    path = folder / f"subspace-d{d}.safetensors"
    ConceptSubspace(basis.float().contiguous()).save(path)
    return path


# ---------------------------------------------------------------- the drift on saved files


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "diffusion_pytorch_model.safetensors")


def _full_drift(subspace: Path, base: Path, trained: Path) -> dict[str, float]:
    """``‖(W_T − W₀) U‖ / ‖W₀‖`` for every cross-attention ``to_k`` / ``to_v`` weight."""
    u = ConceptSubspace.load(subspace).basis.double()
    w0, wt = _weights(base), _weights(trained)
    keys = [k for k in w0 if ".attn2.to_k.weight" in k or ".attn2.to_v.weight" in k]
    assert keys, "the UNet has no cross-attention to_k/to_v"
    return {
        k: float(((wt[k].double() - w0[k].double()) @ u).norm() / w0[k].double().norm())
        for k in keys
    }


def _lora_drift(
    subspace: Path, base: Path, lora_file: Path, layers: list[str]
) -> dict[str, tuple[float, float]]:
    """``{layer: (‖A U‖ / ‖A‖, ‖s·B A U‖ / ‖W₀‖)}`` from a diffusers LoRA file.

    ``layers`` are the protected layers' names in the model (``…attn2.to_k``); the file
    names them with a component prefix (``unet.``, ``transformer.``) and either peft's
    ``lora_A`` / ``lora_B`` or diffusers' ``lora.down`` / ``lora.up``. Every protected
    layer must have its factors in the file (each run adapts all of them). ``s =
    lora_alpha / rank`` is 1 in every run here.
    """
    from safetensors.torch import load_file

    u = ConceptSubspace.load(subspace).basis.double()
    w0 = _weights(base)
    saved = load_file(lora_file)
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in saved.items():
        for a_or_b, suffixes in (("A", (".lora_A.weight", ".lora.down.weight")),
                                 ("B", (".lora_B.weight", ".lora.up.weight"))):  # fmt: skip
            for suffix in suffixes:
                if key.endswith(suffix):
                    layer = key.removesuffix(suffix).split(".", 1)[1]  # drop "unet." etc.
                    by_layer.setdefault(layer, {})[a_or_b] = t.double()
    missing = [n for n in layers if set(by_layer.get(n, {})) != {"A", "B"}]
    assert not missing, f"no LoRA factors saved for {missing} in {lora_file.name}"
    # B starts at zero (init "gaussian"), so a nonzero B shows the adapters were trained. Not
    # every one: SD3's last block drops the text tokens' outputs, so its add_q_proj gets no
    # gradient.
    assert any(by_layer[n]["B"].norm() > 0 for n in layers), "no protected adapter was trained"
    out = {}
    for n in layers:
        a, b = by_layer[n]["A"], by_layer[n]["B"]
        out[n] = (
            float((a @ u).norm() / a.norm()),
            float((b @ (a @ u)).norm() / w0[f"{n}.weight"].double().norm()),
        )
    return out


def _public_verdict(subspace: Path, base: Path, trained: Path, local: dict, **kw) -> bool | None:
    """``gradproj.subspace_drift`` (what ``gradproj drift`` prints) on the same files: it
    must find the same weights and the same worst figure as the checker above."""
    from gradproj import subspace_drift

    report = subspace_drift(subspace, base, trained, **kw)
    assert len(report.weights) == len(local)
    worst_local = max(v if isinstance(v, float) else v[0] for v in local.values())
    assert abs(report.worst.checked - worst_local) <= 1e-6 * worst_local + 1e-15, report.table()
    return report.ok


def _text_readers(model_class: str, folder: Path, target: str = "input") -> list[str]:
    import diffusers

    from gradproj.diffusers import text_readers

    model = getattr(diffusers, model_class).from_pretrained(folder)
    return list(text_readers(model, target=target))


def _assert_lora_kept(drift: dict[str, tuple[float, float]], what: str) -> None:
    worst_a = max(a for a, _ in drift.values())
    worst_delta = max(d for _, d in drift.values())
    print(f"{what}: {len(drift)} protected layers, max ‖AU‖/‖A‖ {worst_a:.2e}, "
          f"max ‖s·BAU‖/‖W₀‖ {worst_delta:.2e}")  # fmt: skip
    assert worst_a <= BOUND, drift
    assert worst_delta <= BOUND, drift


# ---------------------------------------------------------------- the runs
# A script run takes 15–25 s here, most of it importing torch, transformers and diffusers in
# one thread. So the runs of every selected test start together when the first test needs
# them, two at a time, and each test waits for its own (``run``).

Argvs = Callable[[Path, Path, Path, Path], list[list[str]]]
SPECS: dict[str, tuple[str, str, int, Argvs]] = {}


@dataclass
class Job:
    """One test's script runs: ``argvs`` run in order in ``workdir``, writing to ``out``."""

    script: str  # its path in the diffusers repo
    model: Path  # the pipeline folder the runs start from
    subspace: Path
    workdir: Path
    argvs: list[list[str]]

    @property
    def out(self) -> Path:
        return self.workdir / "out"


def runs(script: str, model: str, d: int, argvs: Argvs):
    """Register the runs the decorated test reads: ``script`` on ``models(model)`` with a
    ``d``-dimensional subspace; ``argvs(model, images, subspace, out)`` gives their arguments."""

    def register(test):
        SPECS[test.__name__] = (script, model, d, argvs)
        return test

    return register


def _execute(job: Job) -> None:
    """Run ``job``'s argument lists in order; a saved UNet is kept as ``out/unet-run<i>``
    after run ``i`` (a later run in the same output folder replaces ``out/unet``)."""
    for i, argv in enumerate(job.argvs):
        _run(job.script, job.workdir, argv)
        if (job.out / "unet").is_dir():
            shutil.copytree(job.out / "unet", job.out / f"unet-run{i}")


@pytest.fixture(scope="session")
def script_runs(request, diffusers_checkout, tmp_path_factory, models, images):
    """Starts the runs of the selected tests of this file; gives ``finished(test name)``."""
    mine = [
        getattr(i, "originalname", "")
        for i in request.session.items
        if getattr(getattr(i, "module", None), "__name__", "") == __name__
    ]
    root = tmp_path_factory.mktemp("runs")
    jobs = {}
    for name in dict.fromkeys(n for n in mine if n in SPECS):
        script, model, d, argvs = SPECS[name]
        folder, work = models(model), root / name
        work.mkdir()
        sub = _subspace_file(work, d)
        jobs[name] = Job(script, folder, sub, work, argvs(folder, images, sub, work / "out"))
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_execute, job) for name, job in jobs.items()}

        def finished(name: str) -> Job:
            futures[name].result()  # re-raises a run's failure (or skip) in its test
            return jobs[name]

        yield finished
        for future in futures.values():
            future.cancel()


@pytest.fixture
def run(request, script_runs) -> Job:
    """This test's finished runs (a failed run fails the test with the script's stderr)."""
    return script_runs(request.node.originalname)


COMMON = [
    "--resolution", "32", "--train_batch_size", "1", "--seed", "0", "--report_to", "tensorboard",
    "--dataloader_num_workers", "0", "--lr_scheduler", "constant", "--learning_rate", "1e-3",
]  # fmt: skip
TEXT_TO_IMAGE = "examples/text_to_image/train_text_to_image.py"


def _text_to_image(model: Path, images: Path, out: Path, *extra: str) -> list[str]:
    where = ["--train_data_dir", str(images / "imagefolder"), "--output_dir", str(out)]
    return [*COMMON, "--pretrained_model_name_or_path", str(model), *where, *extra]


def _full_runs(model: Path, images: Path, sub: Path, out: Path) -> list[list[str]]:
    protected = ["--protect_subspace", str(sub), "--checkpointing_steps", "2"]
    return [
        _text_to_image(model, images, out, *protected, "--max_train_steps", "2", "--use_ema"),
        _text_to_image(model, images, out, *protected, "--max_train_steps", "4",
                       "--resume_from_checkpoint", "latest"),
    ]  # fmt: skip


@runs(TEXT_TO_IMAGE, "sd", 32, _full_runs)
def test_full_finetune_keeps_the_subspace_through_ema_and_resume(run):
    base = run.model / "unet"
    first = _full_drift(run.subspace, base, run.out / "unet-run0")
    assert len(first) == 8  # to_k, to_v of 1 down, 1 mid and 2 up cross-attention blocks
    assert max(first.values()) <= BOUND, first
    # The checkpoint holds the optimizer's anchors C = W₀ U of the base weights, so resuming
    # projects against W₀, not against the checkpoint's weights.
    saved = torch.load(run.out / "checkpoint-2" / "optimizer.bin", weights_only=True)["gradproj"]
    w0, u = _weights(base), ConceptSubspace.load(run.subspace).basis.double()
    assert sorted(saved["names"].values()) == sorted(first)
    for i, name in saved["names"].items():
        want = w0[name].double() @ u
        assert (saved["anchors"][i].double() - want).norm() <= 1e-6 * want.norm(), name
    resumed = _full_drift(run.subspace, base, run.out / "unet")
    print(f"full fine-tune: 2 steps + EMA {max(first.values()):.2e}, "
          f"resumed to 4 steps {max(resumed.values()):.2e}")  # fmt: skip
    assert max(resumed.values()) <= BOUND, resumed
    assert _public_verdict(run.subspace, run.model, run.out / "unet", resumed) is True
    assert _public_verdict(run.subspace, run.model, run.out / "unet-run0", first) is True
    ema = run.out / "checkpoint-2" / "unet_ema"  # the EMA copy the checkpoint holds
    ema_drift = _full_drift(run.subspace, base, ema)
    assert max(ema_drift.values()) <= BOUND, ema_drift
    assert _public_verdict(run.subspace, run.model, ema, ema_drift) is True


def _unprotected_run(model: Path, images: Path, sub: Path, out: Path) -> list[list[str]]:
    return [_text_to_image(model, images, out, "--max_train_steps", "2")]


@runs(TEXT_TO_IMAGE, "sd", 32, _unprotected_run)
def test_full_finetune_without_the_flag_drifts(run):
    # The control that shows the measurement can fail.
    drift = _full_drift(run.subspace, run.model / "unet", run.out / "unet")
    print(f"full fine-tune, unprotected: {max(drift.values()):.2e}")
    assert max(drift.values()) > 1e-4, drift
    assert _public_verdict(run.subspace, run.model, run.out, drift) is False


@runs("examples/text_to_image/train_text_to_image_lora.py", "sd", 32,
      lambda model, images, sub, out: [_text_to_image(
          model, images, out, "--max_train_steps", "3", "--mixed_precision", "bf16",
          "--protect_subspace", str(sub))])  # fmt: skip
def test_unet_lora_under_bf16_keeps_the_fp32_bound(run):
    # The script keeps the LoRA factors in bf16 under --mixed_precision bf16; protect()
    # stores the protected ones in fp32, so A U stays at fp32 rounding, not bf16's ~4e-3.
    layers = _text_readers("UNet2DConditionModel", run.model / "unet")
    lora_file = run.out / "pytorch_lora_weights.safetensors"
    drift = _lora_drift(run.subspace, run.model / "unet", lora_file, layers)
    _assert_lora_kept(drift, "UNet LoRA, bf16")
    assert _public_verdict(run.subspace, run.model, run.out, drift, lora=True) is True


def _dreambooth(*extra: str) -> Argvs:
    return lambda model, images, sub, out: [[
        *COMMON, "--instance_prompt", tiny.PROMPT, "--max_train_steps", "3", "--rank", "4",
        "--pretrained_model_name_or_path", str(model), "--instance_data_dir",
        str(images / "instance"), "--output_dir", str(out), "--protect_subspace", str(sub), *extra,
    ]]  # fmt: skip


@runs("examples/dreambooth/train_dreambooth_lora_sdxl.py", "sdxl", 64, _dreambooth())
def test_sdxl_lora(run):
    layers = _text_readers("UNet2DConditionModel", run.model / "unet")
    lora_file = run.out / "pytorch_lora_weights.safetensors"
    drift = _lora_drift(run.subspace, run.model / "unet", lora_file, layers)
    _assert_lora_kept(drift, "SDXL UNet LoRA")
    assert _public_verdict(run.subspace, run.model, run.out, drift) is True


# target "input" is context_embedder, which the script's default --lora_layers leave out.
@runs("examples/dreambooth/train_dreambooth_lora_flux.py", "flux", 32, _dreambooth(
    "--lora_alpha", "4", "--max_sequence_length", "16", "--protect_target", "input",
    "--lora_layers", "attn.to_k,attn.to_q,attn.to_v,attn.to_out.0,context_embedder",
))  # fmt: skip
def test_flux_lora_on_the_context_embedder(run):
    layers = _text_readers("FluxTransformer2DModel", run.model / "transformer", "input")
    assert layers == ["context_embedder"]
    lora_file = run.out / "pytorch_lora_weights.safetensors"
    drift = _lora_drift(run.subspace, run.model / "transformer", lora_file, layers)
    _assert_lora_kept(drift, "Flux LoRA, target input")
    assert _public_verdict(run.subspace, run.model, run.out, drift) is True


# target "attention": the text stream's add_q/k/v projections, in the default --lora_layers.
@runs("examples/dreambooth/train_dreambooth_lora_sd3.py", "sd3", 32,
      _dreambooth("--protect_target", "attention"))  # fmt: skip
def test_sd3_lora_on_the_text_stream(run):
    layers = _text_readers("SD3Transformer2DModel", run.model / "transformer", "attention")
    lora_file = run.out / "pytorch_lora_weights.safetensors"
    drift = _lora_drift(run.subspace, run.model / "transformer", lora_file, layers)
    _assert_lora_kept(drift, "SD3 LoRA, target attention")
    assert _public_verdict(run.subspace, run.model, run.out, drift, target="attention") is True
