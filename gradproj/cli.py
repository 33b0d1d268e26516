"""gradproj / python -m gradproj: the command-line entry points.

gradproj demo      train small text-to-image diffusion models with and without
                   projection and measure whether a prohibited mark can be extracted
gradproj subspace  build a concept subspace from a text encoder and a prompt file
gradproj unlearn   seed 001's unlearning recipe (with and without gradient surgery) next to
                   projection during training, on the demo's model: one table
gradproj evaluate  every defense (projection, unlearning ± surgery, AMG, adversarial
                   fine-tuning) against the same attacks and quality measures: one table
gradproj drift     measure the guarantee on a trained model (full weights, EMA, LoRA file)
                   against its base: pass/fail against the stored dtype's bound
gradproj bench     every gradproj backend against its strongest peers (eager in place,
                   torch.compile, grouped, copy roofline) and the optimizer step: JSON,
                   plot, summary table
gradproj check     one training step of a small UNet, projected by every backend
                   (a quick check that the kernels agree with the float64 reference)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from dataclasses import replace

DEMO_HELP = """\
Trains small pixel-space diffusion UNets from scratch on synthetic captioned images
(coloured shapes; 30% carry a yellow corner "mark" and their captions end in "acme"
instead of "plain"), with the same data and seeds in every arm, then measures: the mark
rate of samples for prompts with and without "acme" (same noise), the mark rate an
embedding-search adversary reaches, colour/shape accuracy and a Fréchet distance on the
"plain" samples (quality), and the guarantee ‖(W_T − W₀)U‖/‖W₀‖ on the protected weights.
Writes results.json, samples.png and bars.png into one run folder and prints a table.

Arms:
  plain               AdamW
  update              AdamW + ProjectedOptimizer(mode="update") on every attn2.to_k/to_v,
                      concept subspace in "difference" mode (acme minus plain captions)
  update-zero         the same, with the initial concept response removed: W₀ ← W₀(I − UUᵀ)
  grad                gradient projection (mode="grad"; does not keep the guarantee for AdamW)
  update-states       update mode with a "states"-mode subspace (all states of acme captions)
  update-states-zero  both of the above

The default (plain vs update, 3 seeds, 500 steps each) needs about 9 minutes of one CPU
core (it runs on one thread); --full (every arm, 5 seeds, 1000 steps) about 80 minutes.
"""

SUBSPACE_HELP = """\
Encodes the prompts exactly as a diffusers pipeline feeds its UNet or transformer
(--pipeline: the pipeline's own encode_prompt, for SD 1.x/2.x, SDXL, SD3 and Flux; only
its text encoders are loaded) or runs one transformers text encoder on them
(--text-encoder with --tokenizer), and keeps the directions the concept occupies in those
states (what the cross-attention K/V, or SD3's/Flux's context_embedder, read) as a
ConceptSubspace saved with safetensors. The prompts file has one prompt per line.
With a tab on a line, "concept prompt<TAB>neutral prompt", the subspace spans the
differences of the two prompts' states at every position ("difference" mode, the
default when every line has a tab); without tabs it spans all states of the prompts
("states" mode; also blocks the context words around the concept).

Example:
  printf 'a mug with the acme logo\\ta mug with a plain logo\\n' > prompts.tsv
  gradproj subspace --pipeline path/to/stable-diffusion-v1-5 --prompts prompts.tsv \\
      --out acme.safetensors
"""


UNLEARN_HELP = """\
Seed 001 (DoCo) on the demo's model: unlearning after training, with and without surgery.
Per seed, trains the demo's plain and projected (update-mode) models, then unlearns the
mark from the plain one as DoCo's code does: a PatchGAN critic learns to tell the model's
predicted clean image for "... acme" from the frozen model's for "... plain" (150
critic-only steps), then 150 AdamW steps on every attn2.to_k/to_v make the two alike;
retain loss: the diffusion loss on the unmarked data. Twice: gradients summed, and with
DoCo's step (both gradients clipped to norm 1, the unlearning one loses λ·cos·ĝ_r where
they conflict, and only it is stepped). --settings previous: the recipe of the tables
before issue 16 (concept-ablation loss, retain gradient added). Measures every model with
the demo's instruments and the DoRI attack and writes one table (rows: baseline,
projection, unlearning, unlearning+surgery). Default: 3 seeds, ~25 minutes on 2 cores.
"""

EVALUATE_HELP = """\
Every defense of seeds 000-003 on the demo's model, against the same attacks.
Rows: baseline (plain training), projection (seed 000), unlearning and
unlearning+surgery (seed 001), adversarial-ft (seed 003's adversarial fine-tuning),
amg (seed 002's anti-memorization guidance at sampling) and projection+amg. Columns:
mark rate for "... acme" prompts and its lift over "... plain", mark rate under the DoRI
embedding attack, colour/shape accuracy and Fréchet distance of "plain" samples (probe
space), sampling time per image relative to plain sampling. 3 seeds, mean ± std;
results.json, table.md and bars.png. --settings official (default: DoCo, DoRI and AMG as
their authors ran them) or previous (before issue 16). Default: ~12 minutes on 2 cores
with the unlearn run's models (--models), ~35 without.
"""

DRIFT_HELP = """\
Measures what protection guarantees on saved models: for every protected weight (the
layers gradproj.diffusers.protect selects) the drift ‖(W_T − W₀)U‖/‖W₀‖ between the base
model and the trained one, or for a LoRA file ‖A U‖/‖A‖ of every adapter on a protected
layer (ΔW = s·B A, so A U = 0 is what keeps ΔW U = 0), and checks it against the bound of
the dtype the trained tensors are stored in (float32: 8ε ≈ 9.5e-7; bf16/fp16 add their
rounding along U). Exit status 0: every weight within its bound; 1: some weight is not
(the run was not protected, or not with this subspace); 2: a mistake in the arguments.

--base and --trained take a diffusers model folder, a pipeline folder (its unet/ or
transformer/), a checkpoint folder (checkpoint-N/unet), an EMA folder (unet_ema), and
--trained also a LoRA file (pytorch_lora_weights.safetensors, or its folder).

Example:
  gradproj drift --subspace acme.safetensors --base path/to/sd-v1-5 --trained out/
"""

BENCH_HELP = """\
Times gradproj.project_ on every runnable backend against its peers, each at its
strongest, in one process and one run: per-tensor eager in place (one addmm_ per
tensor), torch.compile of it (default and max-autotune-no-cudagraphs), the grouped
flat-bucket version, and a copy of the same bytes (the roofline); gradient surgery
against DoCo's loop and a sync-free loop; one AdamW step on the SD 1.5 K/V bucket
against torch's fused AdamW and AdamW + an eager anchored projection. Writes the JSON
and its plot and prints the summary table (ratios within this run). GPU: do_bench
(median, L2 flushed); CPU: median of --reps runs, for ratios on that machine only.

The full suite on a CPU takes ~15 minutes (torch.compile compiles every case);
--quick (the SD 1.5 K/V bucket, k = 8, fp32) about a minute.
"""

DEBUG_HELP = "on an error in the arguments, raise it with its full traceback"


class UsageError(Exception):
    """A mistake in the command line or in a file it names.

    :func:`main` reports it as one line, ``gradproj <command>: error: <message>``, and
    returns exit status 2 (argparse's convention); ``--debug`` re-raises it instead.
    """


# ------------------------------------------------------------------ argument checks
# Every command checks all of its arguments before it loads a model or trains one, so
# that a typo costs a second, not the minutes of work that precede its first use.


def _at_least(flag: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        raise UsageError(f"{flag} must be at least {low}, got {value}")


def _names(flag: str, value: str, valid, what: str) -> tuple[str, ...]:
    """``value`` split at commas; every name must be one of ``valid``, each at most once."""
    names = tuple(name.strip() for name in value.split(","))
    for name in names:
        if name not in valid:
            shown = f"unknown {what} {name!r}" if name else f"an empty {what} name"
            raise UsageError(f"{flag} {value}: {shown}; choose from {', '.join(valid)}")
    for name in names:
        if names.count(name) > 1:
            raise UsageError(f"{flag} {value}: {what} {name!r} is listed twice")
    return names


def _writable_file(flag: str, path: str) -> None:
    """``path`` can be created or overwritten: its folder exists and is writable."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a folder; give a file name")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UsageError(f"{flag} {path}: the file exists and is not writable")
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        kind = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise UsageError(f"{flag} {path}: {folder} {kind}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: the folder {folder} is not writable")


def _writable_folder(flag: str, path: str) -> None:
    """``path`` is a writable folder, or can be made one (``mkdir -p``)."""
    existing = path
    while not os.path.exists(existing):
        parent = os.path.dirname(os.path.normpath(existing)) or "."
        if parent == existing:
            break
        existing = parent
    if not os.path.isdir(existing):
        raise UsageError(f"{flag} {path}: {existing} exists and is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: the folder {existing} is not writable")


def _read_text(flag: str, path: str) -> str:
    """The file's text (UTF-8, a leading byte-order mark dropped)."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a folder; give a file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise UsageError(f"{flag} {path}: {err.strerror or err}") from err
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UsageError(
            f"{flag} {path}: not UTF-8 text (line {line}: byte 0x{data[err.start]:02x}); "
            "save the file as UTF-8"
        ) from err


def _read_prompts(path: str) -> tuple[list[str], list[str] | None]:
    """The prompts file: one prompt a line, or 'concept<TAB>neutral' on every line."""
    numbered = [
        (n, line.rstrip("\r"))
        for n, line in enumerate(_read_text("--prompts", path).split("\n"), start=1)
        if line.strip()
    ]
    if not numbered:
        raise UsageError(f"--prompts {path}: no prompts in the file")
    for n, line in numbered:
        tabs = line.count("\t")
        if tabs > 1:
            raise UsageError(
                f"--prompts {path}: line {n} has {tabs} tabs; a line is a prompt, or "
                "'concept<TAB>neutral' with one tab"
            )
        if tabs == 1 and not all(half.strip() for half in line.split("\t")):
            raise UsageError(f"--prompts {path}: line {n} has an empty prompt beside its tab")
    tabbed = [n for n, line in numbered if "\t" in line]
    if tabbed and len(tabbed) != len(numbered):
        first = next(n for n, line in numbered if "\t" not in line)
        raise UsageError(
            f"--prompts {path}: {len(tabbed)} of {len(numbered)} lines have a tab (line {first} "
            "has none); either every line is 'concept<TAB>neutral' or none is"
        )
    if not tabbed:
        return [line for _, line in numbered], None
    pairs = [line.split("\t") for _, line in numbered]
    return [p[0] for p in pairs], [p[1] for p in pairs]


# What a subspace needs of a pipeline: its text encoders and tokenizers. The model,
# the VAE and the rest are not loaded (for SD 1.5 that saves ~3 GB and most of the time).
_NOT_NEEDED = (
    "unet", "transformer", "vae", "safety_checker", "feature_extractor", "image_encoder",
)  # fmt: skip


def _is_pipeline(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "model_index.json"))


def _load_pipeline(path: str):
    """The diffusers pipeline in ``path`` with only what ``encode_prompt`` uses."""
    from diffusers import DiffusionPipeline

    with _loading("--pipeline", path):  # a model_index.json that is not JSON: one line
        parts = json.loads(_read_text("--pipeline", os.path.join(path, "model_index.json")))
    skip = {name: None for name in _NOT_NEEDED if name in parts}
    with _loading("--pipeline", path):
        try:
            return DiffusionPipeline.from_pretrained(path, local_files_only=True, **skip)
        except (ImportError, TypeError, AttributeError, KeyError) as err:
            raise UsageError(f"--pipeline {path}: cannot load it ({err})") from err


def _check_text_encoder(path: str, tokenizer: str | None) -> int | None:
    """``--text-encoder`` is a local model folder or a config.json; ``--tokenizer`` a folder.

    Returns the width of the encoder's states as its config.json gives it (None if it doesn't).
    """
    if path.endswith(".json"):
        if not os.path.isfile(path):
            raise UsageError(f"--text-encoder {path}: no such file")
    elif not os.path.isdir(path):
        kind = "is a file, not a folder" if os.path.exists(path) else "no such folder"
        raise UsageError(
            f"--text-encoder {path}: {kind}; give the local folder of a transformers model "
            "(e.g. <stable-diffusion folder>/text_encoder), a pipeline folder or a config.json"
        )
    elif not os.path.isfile(os.path.join(path, "config.json")):
        raise UsageError(
            f"--text-encoder {path}: no config.json in the folder; give the local folder of "
            "a transformers model (e.g. <stable-diffusion folder>/text_encoder), a pipeline "
            "folder or a config.json"
        )
    if tokenizer is not None and not os.path.isdir(tokenizer):
        kind = "is a file, not a folder" if os.path.exists(tokenizer) else "no such folder"
        raise UsageError(f"--tokenizer {tokenizer}: {kind}")
    config = path if path.endswith(".json") else os.path.join(path, "config.json")
    try:
        fields = json.loads(_read_text("--text-encoder", config))
    except ValueError as err:
        raise UsageError(f"--text-encoder {config}: not a JSON file ({err})") from err
    if not isinstance(fields, dict):
        raise UsageError(f"--text-encoder {config}: not a model config (a JSON object)")
    width = fields.get("hidden_size", fields.get("d_model"))
    return width if isinstance(width, int) else None


# ---------------------------------------------------------------------- commands


def _subspace(args: argparse.Namespace) -> int:
    from gradproj.subspace import ConceptSubspace

    # Every check first: the encoder is the slow part.
    _at_least("--k", args.k, 1)
    if args.k is not None and args.energy is not None:
        raise UsageError("give --k or --energy, not both")
    energy = None if args.k is not None else 0.99 if args.energy is None else args.energy
    if energy is not None and not 0.0 < energy <= 1.0:
        raise UsageError(f"--energy must lie in (0, 1], got {args.energy}")
    if args.ridge is not None and not 0.0 <= args.ridge < math.inf:
        raise UsageError(f"--ridge must be a finite number ≥ 0, got {args.ridge}")
    if (
        args.pipeline is None
        and os.path.isdir(args.text_encoder)
        and _is_pipeline(args.text_encoder)
    ):
        args.pipeline, args.text_encoder = args.text_encoder, None  # a pipeline folder
    if args.pipeline is not None:
        if not os.path.isdir(args.pipeline) or not _is_pipeline(args.pipeline):
            raise UsageError(
                f"--pipeline {args.pipeline}: not a diffusers pipeline folder (no model_index.json)"
            )
        if args.tokenizer is not None:
            raise UsageError("--tokenizer goes with --text-encoder; a pipeline has its own")
    else:
        width = _check_text_encoder(args.text_encoder, args.tokenizer)
        if args.k is not None and width is not None and args.k > width:
            raise UsageError(f"--k {args.k}: the encoder's states have only {width} dimensions")
    prompts, neutral = _read_prompts(args.prompts)
    _writable_file("--out", args.out)

    # ridge 0 weighs every kept direction s²/(s²+0) = 1: the hard subspace.
    options = {
        "neutral_prompts": neutral,
        "k": args.k,
        "energy": energy,
        "ridge": args.ridge or None,
    }
    try:
        if args.pipeline is not None:
            pipeline = _load_pipeline(args.pipeline)
            sub = ConceptSubspace.from_pipeline(pipeline, prompts, **options)
        else:
            encoder, tok = _load_text_encoder(args.text_encoder, args.tokenizer)
            sub = ConceptSubspace.from_prompts(prompts, encoder, tok, **options)
    except ValueError as err:  # k above the rank of the prompts' states
        raise UsageError(f"cannot build the subspace from {args.prompts}: {err}") from err
    sub.metadata["source_model"] = str(args.pipeline or args.text_encoder)
    with _loading("--out", args.out):
        sub.save(args.out)
    print(
        f"{sub!r} from {len(prompts)} prompts ({sub.metadata['mode']} mode) -> {args.out}",
        file=sys.stderr,
    )
    return 0


@contextlib.contextmanager
def _loading(flag: str, path: str):
    """OSError/ValueError while reading or writing a file the user named: a UsageError."""
    try:
        yield
    except (OSError, ValueError) as err:
        raise UsageError(f"{flag} {path}: {err}") from err


def _load_text_encoder(path_or_config: str, tokenizer_path: str | None):
    """A transformers text encoder (folder with weights, or a config.json: random weights)
    and its tokenizer (``--tokenizer``, else the same folder; none there is an error).

    The tokenizer loads first: it is fast, and a missing one must not cost the encoder's load.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    is_config = path_or_config.endswith(".json")
    folder = (os.path.dirname(path_or_config) or ".") if is_config else path_or_config
    source = tokenizer_path or folder
    flag = "--tokenizer" if tokenizer_path else "--text-encoder"
    try:
        tok = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as err:
        # Never a stand-in: another tokenizer gives other token ids, so other states and a
        # subspace of something else, which protection would then enforce without a word.
        why = " ".join(str(err).split())[:200]
        raise UsageError(
            f"{flag} {source}: cannot load a tokenizer there ({why}); give --tokenizer "
            "<folder> with the tokenizer this encoder is used with (e.g. <pipeline>/tokenizer)"
        ) from err
    with _loading("--text-encoder", path_or_config):
        if is_config:
            encoder = AutoModel.from_config(AutoConfig.from_pretrained(path_or_config))
        else:
            encoder = AutoModel.from_pretrained(path_or_config, local_files_only=True)
    return encoder.eval(), tok


def _check_run_args(args: argparse.Namespace) -> None:
    """What demo, unlearn and evaluate share: --seeds, --steps and a writable run folder."""
    _at_least("--seeds", args.seeds, 1)
    _at_least("--steps", args.steps, 1)
    if args.out is not None:
        _writable_folder("--out", args.out)
    else:
        _writable_folder("the run folder", "runs")


def _demo(args: argparse.Namespace) -> int:
    from gradproj.lab import demo

    _check_run_args(args)
    arms = _names("--arms", args.arms, tuple(demo.ARMS), "arm") if args.arms else None

    cfg = demo.FULL if args.full else demo.DEFAULT
    if args.seeds is not None:
        cfg = replace(cfg, seeds=tuple(range(args.seeds)))
    if args.steps is not None:
        cfg = replace(cfg, steps=args.steps)
    if arms:
        cfg = replace(cfg, arms=arms)
    demo.run(cfg, out=args.out, save_models=args.save_models)
    return 0


def _comparison(args: argparse.Namespace) -> int:
    from gradproj.lab import evaluate
    from gradproj.lab.defenses import DEFENSES

    _check_run_args(args)
    rows = _names("--rows", args.rows, tuple(DEFENSES), "row") if args.rows else None
    if args.models is not None:
        _writable_folder("--models", args.models)

    cfg = evaluate.UNLEARN if args.command == "unlearn" else evaluate.ComparisonConfig()
    if args.settings == "previous":
        cfg = replace(cfg, **evaluate.PREVIOUS_SETTINGS)
    if args.seeds is not None:
        cfg = replace(cfg, seeds=tuple(range(args.seeds)))
    if rows:
        cfg = replace(cfg, rows=rows)
    if args.steps is not None:
        cfg = replace(cfg, model=replace(cfg.model, steps=args.steps))
    evaluate.run(cfg, out=args.out, models=args.models)
    return 0


def _drift(args: argparse.Namespace) -> int:
    from gradproj.drift import subspace_drift

    for flag, path in (
        ("--subspace", args.subspace),
        ("--base", args.base),
        ("--trained", args.trained),
    ):
        if not os.path.exists(path):
            raise UsageError(f"{flag} {path}: no such file or folder")
    if args.lora_scale is not None and not 0 < args.lora_scale < math.inf:
        raise UsageError(f"--lora-scale must be a finite number > 0, got {args.lora_scale}")
    try:
        report = subspace_drift(
            args.subspace,
            args.base,
            args.trained,
            target=args.target,
            lora=True if args.lora else None,
            lora_scale=args.lora_scale,
        )
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise UsageError(str(err)) from err
    print(report.table())
    print(report.summary())
    return 1 if report.ok is False else 0


def _progress(i: int, n: int, label: str, start: list[float]) -> None:
    """One line per part on stderr: a bar, the count, the part and the time so far."""
    import time

    if not start:
        start.append(time.perf_counter())
    done = int(20 * i / max(n, 1))
    elapsed = time.perf_counter() - start[0]
    print(f"[{'#' * done}{'.' * (20 - done)}] {i}/{n} {elapsed:5.0f} s  {label}", file=sys.stderr)


def _bench(args: argparse.Namespace) -> int:
    import datetime

    _at_least("--reps", args.reps, 1)
    out = args.out or os.path.join(
        "benchmarks", "results", f"bench-{datetime.datetime.now():%Y-%m-%d-%H%M%S}.json"
    )
    if not out.endswith(".json"):
        raise UsageError(f"--out {out}: the results are JSON; give a path ending in .json")
    _writable_file("--out", out)
    if args.device is not None:
        import torch

        try:
            dev = torch.device(args.device)
        except RuntimeError as err:
            raise UsageError(f"--device {args.device}: {err}") from err
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: no CUDA device here")
    from gradproj.bench import plot, suite

    start: list[float] = []
    result = suite.run(
        quick=args.quick,
        reps=args.reps,
        device=args.device,
        compile_peers=not args.no_compile,
        progress=lambda i, n, label: _progress(i, n, label, start),
    )
    suite.write(result, out)
    try:
        png = plot.main([out])
    except ImportError:  # matplotlib is optional for the package
        png = "(no plot: matplotlib is not installed)"
    env = result["environment"]
    print(f"{env['device']} ({env['device_type']}), torch {env['torch']}, {env['threads']} threads")
    print(suite.summary_table(result))
    print(f"\n{out}\n{png}")
    return 0


def _check(args: argparse.Namespace) -> int:
    # Without a GPU, Triton kernels can still be shown working through the
    # interpreter; the flag must be set before triton is imported.
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from gradproj import check

    if not 0 <= args.seed < 2**64:
        raise UsageError(f"--seed must lie in [0, 2**64), got {args.seed}")
    if not 1 <= args.k <= check.MAX_K:
        raise UsageError(
            f"--k must lie in [1, {check.MAX_K}] (the check's concept prompt has "
            f"{check.MAX_K} tokens), got {args.k}"
        )
    results = check.run(seed=args.seed, k=args.k)
    # fp32 kernels agree with float64 to ~1e-9 here (|G| ~ 1e-2); 1e-6 would be a bug.
    return 0 if all(err < 1e-6 for err, _ in results.values()) else 1


def main(argv: list[str] | None = None) -> int:
    """Run one command; 0 on success, 2 for a mistake in the arguments (one line on stderr)."""
    parser = argparse.ArgumentParser(
        prog="gradproj", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    # Also accepted after the command; SUPPRESS keeps a subcommand's default from
    # overwriting "gradproj --debug <command>".
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    sub = parser.add_subparsers(
        dest="command", metavar="{demo,unlearn,evaluate,subspace,drift,bench,check}"
    )

    from gradproj.lab.defenses import ARMS

    demo = sub.add_parser(
        "demo",
        help="selective-learning demo: can a projected model be made to draw the mark?",
        description=DEMO_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[debug],
    )
    demo.add_argument(
        "--full",
        action="store_true",
        help="the longer study (every arm, 5 seeds, 1000 steps: ~80 min)",
    )
    demo.add_argument("--out", default=None, help="run folder (default: runs/demo-<UTC date-time>)")
    demo.add_argument("--seeds", type=int, default=None, help="number of seeds per arm, ≥ 1")
    demo.add_argument("--steps", type=int, default=None, help="training steps per model, ≥ 1")
    demo.add_argument("--arms", default=None, help=f"comma-separated arms, from: {', '.join(ARMS)}")
    demo.add_argument(
        "--save-models",
        action="store_true",
        help="also write every trained UNet to <out>/models/<arm>-seed<seed>.pt "
        "(gradproj evaluate --models takes that folder)",
    )
    demo.set_defaults(func=_demo)

    from gradproj.lab.defenses import DEFENSES
    from gradproj.lab.evaluate import UNLEARN_ROWS

    for name, rows, text in (
        ("unlearn", UNLEARN_ROWS, UNLEARN_HELP),
        ("evaluate", tuple(DEFENSES), EVALUATE_HELP),
    ):
        cmd = sub.add_parser(
            name,
            help=text.splitlines()[0],
            description=text,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=[debug],
        )
        cmd.add_argument("--out", default=None, help=f"run folder (default: runs/{name}-<time>)")
        cmd.add_argument(
            "--models",
            default=None,
            help="folder of <arm>-seed<seed>.pt models (gradproj demo --save-models); missing "
            "ones are trained and written there (default: <out>/models)",
        )
        cmd.add_argument("--seeds", type=int, default=None, help="number of seeds, ≥ 1 (default 3)")
        cmd.add_argument("--steps", type=int, default=None, help="training steps per model, ≥ 1")
        cmd.add_argument(
            "--rows",
            default=None,
            help=f"comma-separated rows, from: {', '.join(DEFENSES)} (default: {','.join(rows)})",
        )
        cmd.add_argument(
            "--settings",
            choices=("official", "previous"),
            default="official",
            help="the seed methods as their authors ran them (official, default: DoCo's "
            "PatchGAN objective and step, DoRI from the concept prompt with 8 noise/timestep "
            "pairs per image, AMG's official schedule) or the settings of the tables before "
            "issue 16 (previous: concept-ablation loss with the retain gradient added, DoRI "
            "from the null prompt with 1 pair, AMG with constant coefficients)",
        )
        cmd.set_defaults(func=_comparison)

    subspace = sub.add_parser(
        "subspace",
        help="build a concept subspace (.safetensors) from a text encoder and prompts",
        description=SUBSPACE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[debug],
    )
    source = subspace.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--pipeline",
        metavar="FOLDER",
        help="a local diffusers pipeline folder (SD 1.x/2.x, SDXL, SD3, Flux): the subspace is "
        "built from the states its own encode_prompt gives its UNet/transformer",
    )
    source.add_argument(
        "--text-encoder",
        metavar="PATH_OR_CONFIG",
        help="a local transformers model folder (e.g. a Stable Diffusion text_encoder/), "
        "or a config.json to build one with random weights (a pipeline folder here is "
        "taken as --pipeline)",
    )
    subspace.add_argument(
        "--tokenizer",
        default=None,
        help="with --text-encoder: tokenizer folder (default: the encoder's folder; none there "
        "is an error)",
    )
    subspace.add_argument("--prompts", required=True, metavar="FILE", help="one prompt a line")
    subspace.add_argument("--out", required=True, metavar="FILE.safetensors")
    subspace.add_argument(
        "--energy",
        type=float,
        default=None,
        help="keep the fewest directions carrying this share (0 < energy ≤ 1) of the energy "
        "(default 0.99 unless --k is given)",
    )
    subspace.add_argument(
        "--k", type=int, default=None, help="keep exactly k ≥ 1 directions (instead of --energy)"
    )
    subspace.add_argument(
        "--ridge",
        type=float,
        default=None,
        help="soft subspace, weights s²/(s²+ridge) (ridge ≥ 0; 0 or absent: the hard subspace)",
    )
    subspace.set_defaults(func=_subspace)

    drift = sub.add_parser(
        "drift",
        help="measure the guarantee on a trained model against its base (pass/fail)",
        description=DRIFT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[debug],
    )
    drift.add_argument("--subspace", required=True, metavar="FILE.safetensors")
    drift.add_argument("--base", required=True, metavar="MODEL", help="the model training began at")
    drift.add_argument(
        "--trained", required=True, metavar="OUTPUT", help="the trained model or LoRA file"
    )
    drift.add_argument(
        "--lora", action="store_true", help="--trained must be a LoRA file (default: detected)"
    )
    drift.add_argument(
        "--target",
        choices=("input", "attention"),
        default="input",
        help="the protected layers, as gradproj.diffusers.protect (default input)",
    )
    drift.add_argument(
        "--lora-scale",
        type=float,
        default=None,
        help="s in ΔW = s·B A when the file does not record lora_alpha (reporting only)",
    )
    drift.set_defaults(func=_drift)

    bench = sub.add_parser(
        "bench",
        help="the benchmark suite: every backend against its strongest peers",
        description=BENCH_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[debug],
    )
    bench.add_argument("--quick", action="store_true", help="one case, about a minute")
    bench.add_argument(
        "--out",
        default=None,
        metavar="FILE.json",
        help="results (default: benchmarks/results/bench-<time>.json); the plot goes beside it",
    )
    bench.add_argument("--reps", type=int, default=10, help="CPU timing repetitions (default 10)")
    bench.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    bench.add_argument(
        "--no-compile", action="store_true", help="skip the torch.compile peers (minutes on CPU)"
    )
    bench.set_defaults(func=_bench)

    check = sub.add_parser(
        "check",
        help="one UNet training step projected by every backend, against float64",
        parents=[debug],
    )
    check.add_argument("--seed", type=int, default=0, help="random seed, ≥ 0 (default 0)")
    check.add_argument(
        "--k", type=int, default=4, help="concept subspace dimension, 1 to 16 (default 4)"
    )
    check.set_defaults(func=_check)

    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except UsageError as err:
        if args.debug:
            raise
        message = " ".join(str(err).split())  # one line, whatever the message held
        print(f"gradproj {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
