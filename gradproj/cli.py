"""gradproj / python -m gradproj: the command-line entry points.

gradproj demo      train small text-to-image diffusion models with and without
                   projection and measure whether a prohibited mark can be extracted
gradproj subspace  build a concept subspace from a text encoder and a prompt file
gradproj unlearn   seed 001's unlearning recipe (with and without gradient surgery) next to
                   projection during training, on the demo's model: one table
gradproj evaluate  every defense (projection, unlearning ± surgery, AMG, adversarial
                   fine-tuning) against the same attacks and quality measures: one table
gradproj check     one training step of a small UNet, projected by every backend
                   (a quick check that the kernels agree with the float64 reference)
"""

from __future__ import annotations

import argparse
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
Runs a transformers text encoder on the prompts and keeps the directions the concept
occupies in its last hidden states (what a UNet's cross-attention K/V read) as a
ConceptSubspace saved with safetensors. The prompts file has one prompt per line.
With a tab on a line, "concept prompt<TAB>neutral prompt", the subspace spans the
differences of the two prompts' states at every position ("difference" mode, the
default when every line has a tab); without tabs it spans all states of the prompts
("states" mode; also blocks the context words around the concept).

Example:
  printf 'a mug with the acme logo\\ta mug with a plain logo\\n' > prompts.tsv
  gradproj subspace --text-encoder path/to/sd/text_encoder --tokenizer path/to/sd/tokenizer \\
      --prompts prompts.tsv --out acme.safetensors
"""


UNLEARN_HELP = """\
Seed 001 (DoCo) on the demo's model: unlearning after training, with and without surgery.
Per seed, trains the demo's plain and projected (update-mode) models, then unlearns the
mark from the plain one (concept-ablation loss mapping "... acme" onto "... plain"; retain
loss: the model's own earlier predictions on the unmarked data; 150 Adam steps on every
attn2.to_k/to_v) twice: gradients summed, and
with gradproj.surgery_backward (the unlearning gradient loses its component along the
retain gradient where they conflict). Measures every model with the demo's instruments
and the DoRI attack and writes one table (rows: baseline, projection, unlearning,
unlearning+surgery). Default: 3 seeds, ~6 minutes on 2 cores.
"""

EVALUATE_HELP = """\
Every defense of seeds 000-003 on the demo's model, against the same attacks.
Rows: baseline (plain training), projection (seed 000), unlearning and
unlearning+surgery (seed 001), adversarial-ft (seed 003's adversarial fine-tuning),
amg (seed 002's anti-memorization guidance at sampling) and projection+amg. Columns:
mark rate for "... acme" prompts and its lift over "... plain", mark rate under the DoRI
embedding attack, colour/shape accuracy and Fréchet distance of "plain" samples (probe
space), sampling time per image relative to plain sampling. 3 seeds, mean ± std;
results.json, table.md and bars.png. Default: ~9 minutes on 2 cores.
"""


def _subspace(args: argparse.Namespace) -> int:
    from gradproj.subspace import ConceptSubspace

    lines = [line.rstrip("\n") for line in open(args.prompts, encoding="utf-8") if line.strip()]
    if not lines:
        raise SystemExit(f"--prompts {args.prompts}: no prompts in the file")
    pairs = [line.split("\t") for line in lines]
    with_tab = sum(len(p) == 2 for p in pairs)
    if with_tab not in (0, len(pairs)):
        raise SystemExit(
            f"--prompts {args.prompts}: {with_tab} of {len(pairs)} lines have a tab; either every "
            "line is 'concept<TAB>neutral' or none is"
        )
    prompts = [p[0] for p in pairs]
    neutral = [p[1] for p in pairs] if with_tab else None
    encoder, tok = _load_text_encoder(args.text_encoder, args.tokenizer)
    sub = ConceptSubspace.from_prompts(
        prompts,
        encoder,
        tok,
        neutral_prompts=neutral,
        k=args.k,
        energy=None if args.k else args.energy,
        ridge=args.ridge,
    )
    sub.metadata["source_model"] = str(args.text_encoder)
    sub.save(args.out)
    print(
        f"{sub!r} from {len(prompts)} prompts ({sub.metadata['mode']} mode) -> {args.out}",
        file=sys.stderr,
    )
    return 0


def _load_text_encoder(path_or_config: str, tokenizer_path: str | None):
    """A transformers text encoder (folder with weights, or a config.json: random weights)
    and its tokenizer (``--tokenizer``, else the same folder, else gradproj's toy one)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    if path_or_config.endswith(".json"):
        config = AutoConfig.from_pretrained(path_or_config)
        encoder = AutoModel.from_config(config)
        folder = os.path.dirname(path_or_config) or "."
    else:
        encoder = AutoModel.from_pretrained(path_or_config, local_files_only=True)
        folder = path_or_config
    source = tokenizer_path or folder
    try:
        tok = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as err:
        if tokenizer_path:
            raise SystemExit(
                f"--tokenizer {tokenizer_path}: cannot load a tokenizer ({err})"
            ) from err
        from gradproj import shapes

        print(
            f"no tokenizer in {source}; using gradproj's word-level demo tokenizer",
            file=sys.stderr,
        )
        tok = shapes.tokenizer()
    return encoder.eval(), tok


def _demo(args: argparse.Namespace) -> int:
    from gradproj import demo

    cfg = demo.FULL if args.full else demo.DEFAULT
    if args.seeds is not None:
        cfg = replace(cfg, seeds=tuple(range(args.seeds)))
    if args.steps is not None:
        cfg = replace(cfg, steps=args.steps)
    if args.arms:
        cfg = replace(cfg, arms=tuple(args.arms.split(",")))
    demo.run(cfg, out=args.out, save_models=args.save_models)
    return 0


def _comparison(args: argparse.Namespace) -> int:
    from gradproj import comparison

    cfg = comparison.UNLEARN if args.command == "unlearn" else comparison.ComparisonConfig()
    if args.seeds is not None:
        cfg = replace(cfg, seeds=tuple(range(args.seeds)))
    if args.rows:
        cfg = replace(cfg, rows=tuple(args.rows.split(",")))
    if args.steps is not None:
        cfg = replace(cfg, model=replace(cfg.model, steps=args.steps))
    comparison.run(cfg, out=args.out, models=args.models)
    return 0


def _check(args: argparse.Namespace) -> int:
    # Without a GPU, Triton kernels can still be shown working through the
    # interpreter; the flag must be set before triton is imported.
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from gradproj import check

    results = check.run(seed=args.seed, k=args.k)
    # fp32 kernels agree with float64 to ~1e-9 here (|G| ~ 1e-2); 1e-6 would be a bug.
    return 0 if all(err < 1e-6 for err, _ in results.values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gradproj", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="{demo,unlearn,evaluate,subspace,check}")

    from gradproj.demo import ARMS

    demo = sub.add_parser(
        "demo",
        help="selective-learning demo: can a projected model be made to draw the mark?",
        description=DEMO_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--full",
        action="store_true",
        help="the longer study (every arm, 5 seeds, 1000 steps: ~80 min)",
    )
    demo.add_argument("--out", default=None, help="run folder (default: runs/demo-<UTC date-time>)")
    demo.add_argument("--seeds", type=int, default=None, help="number of seeds per arm")
    demo.add_argument("--steps", type=int, default=None, help="training steps per model")
    demo.add_argument("--arms", default=None, help=f"comma-separated arms, from: {', '.join(ARMS)}")
    demo.add_argument(
        "--save-models",
        action="store_true",
        help="also write every trained UNet to <out>/models/<arm>-seed<seed>.pt "
        "(gradproj evaluate --models takes that folder)",
    )
    demo.set_defaults(func=_demo)

    from gradproj.comparison import ROWS, UNLEARN_ROWS

    for name, rows, text in (
        ("unlearn", UNLEARN_ROWS, UNLEARN_HELP),
        ("evaluate", tuple(ROWS), EVALUATE_HELP),
    ):
        cmd = sub.add_parser(
            name,
            help=text.splitlines()[0],
            description=text,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        cmd.add_argument("--out", default=None, help=f"run folder (default: runs/{name}-<time>)")
        cmd.add_argument(
            "--models",
            default=None,
            help="folder of <arm>-seed<seed>.pt models (gradproj demo --save-models); missing "
            "ones are trained and written there (default: <out>/models)",
        )
        cmd.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3)")
        cmd.add_argument("--steps", type=int, default=None, help="training steps per model")
        cmd.add_argument(
            "--rows", default=None, help=f"comma-separated rows (default: {','.join(rows)})"
        )
        cmd.set_defaults(func=_comparison)

    subspace = sub.add_parser(
        "subspace",
        help="build a concept subspace (.safetensors) from a text encoder and prompts",
        description=SUBSPACE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subspace.add_argument(
        "--text-encoder",
        required=True,
        metavar="PATH_OR_CONFIG",
        help="a local transformers model folder (e.g. a Stable Diffusion text_encoder/), "
        "or a config.json to build one with random weights",
    )
    subspace.add_argument(
        "--tokenizer", default=None, help="tokenizer folder (default: the encoder's folder)"
    )
    subspace.add_argument("--prompts", required=True, metavar="FILE", help="one prompt a line")
    subspace.add_argument("--out", required=True, metavar="FILE.safetensors")
    subspace.add_argument(
        "--energy",
        type=float,
        default=0.99,
        help="keep the fewest directions carrying this share of the energy (default 0.99)",
    )
    subspace.add_argument("--k", type=int, default=None, help="keep exactly k directions")
    subspace.add_argument(
        "--ridge", type=float, default=None, help="soft subspace, weights s²/(s²+ridge)"
    )
    subspace.set_defaults(func=_subspace)

    check = sub.add_parser(
        "check",
        help="one UNet training step projected by every backend, against float64",
    )
    check.add_argument("--seed", type=int, default=0)
    check.add_argument("--k", type=int, default=4, help="concept subspace dimension")
    check.set_defaults(func=_check)

    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
