"""The end-to-end cost of protection: one training step of a full-size SD 1.5 UNet, and the
optimizer step alone on the SDXL and Flux protected-weight sets (issue 21).

    python benchmarks/e2e_step.py --out benchmarks/results/e2e-cpu-<date>.json [--quick]

**SD 1.5, whole step.** A ``diffusers.UNet2DConditionModel`` built from ``SD15_UNET_CONFIG``
(random weights, nothing downloaded), fp32 on CPU, latents 4×32×32, batch 1, text states
(1, 77, 768). One step: forward, MSE loss against noise, backward, ``optimizer.step()``,
``zero_grad()``; the whole step and ``optimizer.step()`` alone are timed in the same step.
Every ``attn2.to_k`` / ``attn2.to_v`` is protected (``gradproj.diffusers.protect``: 32
tensors, 24 960 rows × 768) by a random orthonormal ``ConceptSubspace`` of d = 768.

**SDXL and Flux, optimizer step alone.** Their protected weights at full size as plain
``nn.Parameter`` s with fixed random grads (no model): SDXL's 140 ``attn2.to_k`` / ``to_v``
(20 at 640 × 2048, 120 at 1280 × 2048; one basis of d = 2048); Flux's ``context_embedder``
(3072 × 4096, basis of d = 4096) and the ``add_k_proj`` / ``add_v_proj`` of its 19 double
blocks (3072 × 3072, basis of d = 3072).

**Variants**, in one process and one run, interleaved round by round (A B C … A B C …) so
that drift of the (shared) machine hits all of them alike:

* ``AdamW``: ``torch.optim.AdamW(params)`` with torch's default implementation (on CPU
  ``foreach=None`` resolves to the per-tensor for-loop; the JSON records it);
* ``AdamW fused``: ``torch.optim.AdamW(fused=True)``, torch's fastest CPU AdamW;
* ``ProjectedAdamW k=…``: ``gradproj.ProjectedAdamW(params, bases=protect(unet, sub))``;
* ``AdamW fused+ProjectedOptimizer k=…``: ``gradproj.ProjectedOptimizer(torch.optim.AdamW(
  params, fused=True), protect(unet, sub))`` (the default AdamW where torch has no fused one),

with k = 8 and 32. All variants step the same parameters and share one set of Adam moments
(each keeps its own step count), so the run holds params + grads + 2 moments once, not once
per variant; timing does not depend on the moments' values. Ratios are to ``AdamW`` and to
``AdamW fused`` of the same run.

**Memory**, per variant, against ``AdamW``:

(a) persistent: every tensor the optimizer object holds (walked through its attributes,
    state and ``Protection``), less the parameters, grads and Adam moments: anchors
    (rows × k fp32 per protected weight), step counts, bases and anything else;
(b) temporaries: the peak, during one ``optimizer.step()`` after warm-up, of the running sum
    of the CPU allocator's +/- events recorded by ``torch.profiler(profile_memory=True)``
    (read in order from the kineto results), i.e. the peak over the memory live before the
    step. Checked at start-up on a known case (a 10 MiB temporary must read +10 MiB: the
    JSON's ``profiler_check``). The C++ kernels' ``std::vector`` work list and per-thread
    scratch (``csrc/cpu/dispatch.h``: 32 B per 16 rows, grown by doubling, and
    ``16·d + 17·k`` floats per thread) bypass the torch allocator and are not seen; by
    their sizes they peak near 0.2 MiB for SD 1.5 (0.27 % of its protected grads) and
    1.1 MiB for SDXL or Flux (< 0.1 %), and are not in ``goal_extra_pct``.

The issue's goal is extra memory ≤ 1 % of the protected weights' gradient bytes beyond the
anchors: ``goal_extra_pct`` = (persistent extra − anchors + extra temporary peak over
``AdamW``'s) / protected grad bytes, reported as measured.

``SD15_UNET_CONFIG`` is runwayml/stable-diffusion-v1-5's ``unet/config.json`` written out
field by field from what is known of that file (it is not downloaded here): in/out channels
4, 3 × CrossAttnDownBlock2D + DownBlock2D and UpBlock2D + 3 × CrossAttnUpBlock2D, channels
320/640/1280/1280, 2 layers per block, attention_head_dim 8, cross_attention_dim 768 (the
one field that differs from diffusers' defaults), 32 norm groups, eps 1e-5, silu,
sample_size 64, downsample_padding 1, mid_block_scale_factor 1, flip_sin_to_cos, freq_shift
0, no linear projection. Every field not listed is diffusers' default, which is SD 1.x's.
The script refuses a model without SD 1.5's 859 520 964 parameters. Its protected set is
32 tensors, 24 960 rows × 768: 73.1 MiB of fp32 grads (issue 21 says 82.5 MiB; the
count here is 10 × 320 + 10 × 640 + 12 × 1280 rows).

CPU figures are ratios on that machine within one run, not absolute performance.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import gradproj
from gradproj import ConceptSubspace, ProjectedAdamW, ProjectedOptimizer
from gradproj.bench import harness, suite
from gradproj.lab.report import cpu_model

MIB = 1 << 20
GIB = 1 << 30

SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "use_linear_projection": False,
}
SD15_UNET_PARAMS = 859_520_964
# A UNet of the same classes in a few MiB, for --quick and the smoke test.
QUICK_UNET_CONFIG: dict[str, Any] = {
    **SD15_UNET_CONFIG,
    "sample_size": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": 32,
}

# (name, out, in) of each protected weight; weights of one width share one basis.
SDXL_KV = tuple(  # the suite's SDXL bucket (to_k, to_v of each block, in order), named
    (f"attn2.{('to_k', 'to_v')[i % 2]}[{i // 2}]", out, d)
    for i, (out, d) in enumerate(suite.SDXL_KV)
)
FLUX_TEXT = (
    ("context_embedder", 3072, 4096),
    *(
        (f"transformer_blocks.{i}.attn.{kv}", 3072, 3072)
        for i in range(19)
        for kv in ("add_k_proj", "add_v_proj")
    ),
)
QUICK_SETS = {
    "sdxl_kv": tuple((f"kv[{i}]", out, 128) for i, out in enumerate((40,) * 2 + (80,) * 4)),
    "flux_text": (
        ("context_embedder", 192, 256),
        *((f"add_kv[{i}]", 192, 192) for i in range(4)),
    ),
}

KS = (8, 32)
QUICK_KS = (2, 4)


# -- environment ---------------------------------------------------------------------------


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _git_commit() -> str | None:
    try:
        root = os.path.join(os.path.dirname(__file__), "..")
        out = subprocess.run(
            ["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def environment() -> dict[str, Any]:
    import diffusers

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu",
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "gradproj": gradproj.__version__,
        "gradproj_commit": _git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "loadavg_start": os.getloadavg(),
        "note": (
            "machine shared with other jobs: compare ratios within this run, not absolute times"
        ),
    }


def default_adamw_impl(params: list[torch.Tensor]) -> str:
    """What ``torch.optim.AdamW(params)`` runs here (its defaults resolved as torch does)."""
    from torch.optim.optimizer import _default_to_fused_or_foreach

    fused, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
    return "fused" if fused else "foreach" if foreach else "for-loop (single tensor)"


# -- memory ----------------------------------------------------------------------------------


def _allocator_events(prof: torch.profiler.profile) -> list[tuple[float, int]]:
    # prof.events() folds allocations into the ops that made them and keeps only the
    # frees outside any op as "[memory]"; the kineto results keep every +/- event.
    events = prof.profiler.kineto_results.events()
    return [(e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"]


def allocation_profile(fn: Callable[[], Any]) -> dict[str, int]:
    """Run ``fn`` under the profiler: peak and net of the CPU allocator's running sum, bytes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    running = peak = 0
    for _, nbytes in sorted(_allocator_events(prof), key=lambda e: e[0]):
        running += nbytes
        peak = max(peak, running)
    return {"peak_bytes": peak, "net_bytes": running}


def profiler_check() -> dict[str, int]:
    """The method on a known case: a 10 MiB temporary, then 3 MiB more while it lives."""

    def known() -> None:
        a = torch.empty(10 * MIB // 4).fill_(1.0)
        b = torch.empty(3 * MIB // 4).fill_(2.0)
        del a, b

    measured = allocation_profile(known)
    return {"expected_peak_bytes": 13 * MIB, **measured}


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def _walk(obj: Any, path: str, seen: set[int]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(path, tensor)`` for every tensor reachable from an optimizer through its own objects."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield path, obj
        return
    if isinstance(obj, nn.Module):
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            label = key if isinstance(key, (str, int)) else type(key).__name__
            yield from _walk(value, f"{path}[{label}]", seen)
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        for i, value in enumerate(obj):
            yield from _walk(value, f"{path}[{i}]", seen)
        return
    module = type(obj).__module__ or ""
    if not module.startswith(("gradproj", "torch.optim")):
        return
    names = list(getattr(obj, "__dict__", {}))
    for cls in type(obj).__mro__:
        names += [s for s in getattr(cls, "__slots__", ()) if s not in names]
    for name in names:
        if name.startswith("_optimizer_") and name.endswith("hooks"):
            continue
        try:
            value = getattr(obj, name)
        except AttributeError:
            continue
        yield from _walk(value, f"{path}.{name}", seen)


def _category(path: str) -> str:
    if path.endswith(".anchor"):
        return "anchors"
    if path.endswith("[step]"):
        return "steps"
    if ".subspace" in path or path.endswith((".basis", ".weights")):
        return "bases"
    return "other"


def held_bytes(opt: torch.optim.Optimizer, shared: set[tuple[int, int]]) -> dict[str, Any]:
    """Bytes of the tensors ``opt`` holds beyond the ``shared`` storages (params, grads,
    moments), by category; a storage reached twice is counted once."""
    out: dict[str, Any] = {"anchors": 0, "steps": 0, "bases": 0, "other": 0}
    counted: set[tuple[int, int]] = set()
    other_paths: list[str] = []
    for path, t in _walk(opt, "opt", set()):
        key = _storage_key(t)
        if key in shared or key in counted or key[1] == 0:
            continue
        counted.add(key)
        cat = _category(path)
        out[cat] += key[1]
        if cat == "other" and len(other_paths) < 5:
            other_paths.append(path)
    out["total"] = sum(out[c] for c in ("anchors", "steps", "bases", "other"))
    out["other_paths"] = other_paths
    return out


# -- variants --------------------------------------------------------------------------------


def random_subspace(d: int, k: int, seed: int) -> ConceptSubspace:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))
    return ConceptSubspace(q.to(torch.float32).contiguous(), precision=torch.float32)


def build_variants(
    params: list[nn.Parameter],
    bases_for_k: Callable[[int], dict],
    ks: tuple[int, ...],
    lr: float,
    fused: bool,
) -> dict[str, tuple[torch.optim.Optimizer, int | None]]:
    """``{name: (optimizer, k)}`` in the order they are interleaved."""
    variants: dict[str, tuple[torch.optim.Optimizer, int | None]] = {
        "AdamW": (torch.optim.AdamW(params, lr=lr), None)
    }
    if fused:
        variants["AdamW fused"] = (torch.optim.AdamW(params, lr=lr, fused=True), None)
    for k in ks:
        variants[f"ProjectedAdamW k={k}"] = (ProjectedAdamW(params, lr=lr, bases=bases_for_k(k)), k)
    # The wrapper around the strongest AdamW torch has here (fused where it exists).
    for k in ks:
        inner = torch.optim.AdamW(params, lr=lr, **({"fused": True} if fused else {}))
        name = f"{'AdamW fused' if fused else 'AdamW'}+ProjectedOptimizer k={k}"
        variants[name] = (ProjectedOptimizer(inner, bases_for_k(k)), k)
    return variants


def share_moments(
    variants: dict[str, tuple[torch.optim.Optimizer, int | None]], params: list[nn.Parameter]
) -> set[tuple[int, int]]:
    """Give every optimizer the same Adam moments (own step counts); the storages they share."""
    moments = {p: (torch.zeros_like(p), torch.zeros_like(p)) for p in params}
    for opt, _ in variants.values():
        for p in params:
            m, v = moments[p]
            step = torch.zeros((), dtype=torch.float32)
            opt.state[p] = {"step": step, "exp_avg": m, "exp_avg_sq": v}
    return {_storage_key(t) for pair in moments.values() for t in pair} | {
        _storage_key(p) for p in params
    }


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def summarize(
    variants: dict[str, tuple[torch.optim.Optimizer, int | None]],
    times: dict[str, dict[str, list[float]]],
    memory: dict[str, dict[str, Any]],
    protected_grad_bytes: int,
    adam_state_bytes: int,
) -> list[dict[str, Any]]:
    """One row per variant: medians, ratios to AdamW (and fused AdamW), memory and its %.

    Memory is counted over the strongest AdamW of the run (fused where torch has one,
    which allocates no temporaries), the one the projected optimizers build on."""
    baseline = "AdamW fused" if "AdamW fused" in memory else "AdamW"
    base = memory[baseline]
    rows = []
    for name, (_, k) in variants.items():
        row: dict[str, Any] = {"variant": name, "k": k}
        for what, samples in times[name].items():
            row[what] = {
                "median_ms": _median_ms(samples),
                "min_ms": min(samples) * 1e3,
                "samples": len(samples),
                "all_ms": [round(s * 1e3, 3) for s in samples],
            }
            for ref in ("AdamW", "AdamW fused"):
                if ref in times:
                    ratio = _median_ms(samples) / _median_ms(times[ref][what])
                    row[what][f"ratio_to_{ref.replace(' ', '_')}"] = round(ratio, 4)
        mem = memory[name]
        persistent_extra = mem["persistent"]["total"] - base["persistent"]["total"]
        temp_extra = mem["step_temporaries"]["peak_bytes"] - base["step_temporaries"]["peak_bytes"]
        anchors = mem["persistent"]["anchors"]
        beyond = persistent_extra - anchors + max(temp_extra, 0)
        row["memory"] = {
            **mem,
            "baseline": baseline,
            "persistent_extra_over_AdamW_bytes": persistent_extra,
            "temporary_peak_extra_over_AdamW_bytes": temp_extra,
            "extra_beyond_anchors_bytes": beyond,
            "pct_of_adam_states": {
                "anchors": 100 * anchors / adam_state_bytes,
                "persistent_extra": 100 * persistent_extra / adam_state_bytes,
                "temporary_peak_extra": 100 * temp_extra / adam_state_bytes,
            },
            "pct_of_protected_grads": {
                "anchors": 100 * anchors / protected_grad_bytes,
                "persistent_extra": 100 * persistent_extra / protected_grad_bytes,
                "temporary_peak_extra": 100 * temp_extra / protected_grad_bytes,
            },
            "goal_extra_pct": 100 * beyond / protected_grad_bytes,
            "goal_met": beyond <= 0.01 * protected_grad_bytes,
        }
        rows.append(row)
    return rows


def _fits(needed: int, what: str) -> str | None:
    avail = _mem_available()
    if avail is not None and needed > 0.9 * avail:
        return (
            f"{what} needs about {needed / GIB:.1f} GiB but {avail / GIB:.1f} GiB are available; "
            "skipped"
        )
    return None


# -- SD 1.5: the whole training step -----------------------------------------------------------


def run_unet(quick: bool, rounds: int, lr: float, fused: bool) -> dict[str, Any]:
    from diffusers import UNet2DConditionModel

    config = QUICK_UNET_CONFIG if quick else SD15_UNET_CONFIG
    ks = QUICK_KS if quick else KS
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).train()
    params = [p for p in unet.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    if not quick and n_params != SD15_UNET_PARAMS:
        raise RuntimeError(f"the UNet has {n_params} parameters, SD 1.5's has {SD15_UNET_PARAMS}")
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    result: dict[str, Any] = {
        "model": "UNet2DConditionModel (SD 1.5 config)" if not quick else "tiny UNet (--quick)",
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "params": n_params,
        "param_bytes": param_bytes,
    }
    # params, grads and the two shared moments, plus activations (measured ≈ 1 GiB here)
    skipped = _fits(4 * param_bytes + GIB, "the SD 1.5 step")
    if skipped:
        return {**result, "skipped": skipped}

    d = config["cross_attention_dim"]
    subs = {k: random_subspace(d, k, seed=k) for k in ks}
    bases = {k: gradproj.diffusers.protect(unet, subs[k]) for k in ks}
    protected = list(bases[ks[0]])
    protected_bytes = sum(p.numel() * p.element_size() for p in protected)
    result["protected"] = {
        "tensors": len(protected),
        "rows": sum(p.shape[0] for p in protected),
        "d": d,
        "grad_bytes": protected_bytes,
        "grad_MiB": protected_bytes / MIB,
    }
    result["adam_state_bytes"] = 2 * param_bytes
    variants = build_variants(params, lambda k: bases[k], ks, lr, fused)
    result["AdamW_impl"] = default_adamw_impl(params)
    shared = share_moments(variants, params)

    side = config["sample_size"] // 2
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, side, side, generator=gen)
    noise = torch.randn(1, 4, side, side, generator=gen)
    text = torch.randn(1, 77, d, generator=gen)
    timestep = torch.tensor([500])
    result["inputs"] = {"latents": [1, 4, side, side], "text_states": [1, 77, d]}

    def forward_backward() -> None:
        pred = unet(latents, timestep, encoder_hidden_states=text).sample
        F.mse_loss(pred, noise).backward()

    times: dict[str, dict[str, list[float]]] = {
        n: {"whole_step": [], "optimizer_step": []} for n in variants
    }
    memory: dict[str, dict[str, Any]] = {}
    # Warm-up: each variant's first step makes its anchors; profiled, its net shows them.
    for name, (opt, _) in variants.items():
        forward_backward()
        first = allocation_profile(opt.step)
        opt.zero_grad(set_to_none=True)
        memory[name] = {"first_step": first}
    for _ in range(rounds):
        for name, (opt, _) in variants.items():
            t0 = time.perf_counter()
            forward_backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
            times[name]["whole_step"].append(t3 - t0)
            times[name]["optimizer_step"].append(t2 - t1)
    for name, (opt, _) in variants.items():
        forward_backward()
        grads = {_storage_key(p.grad) for p in params}
        memory[name]["step_temporaries"] = allocation_profile(opt.step)
        memory[name]["persistent"] = held_bytes(opt, shared | grads)
        opt.zero_grad(set_to_none=True)
    result["rounds"] = rounds
    result["variants"] = summarize(variants, times, memory, protected_bytes, 2 * param_bytes)
    return result


# -- SDXL and Flux: the optimizer step alone ---------------------------------------------------


def run_weight_set(
    label: str, shapes: tuple[tuple[str, int, int], ...], quick: bool, rounds: int, lr: float,
    fused: bool,
) -> dict[str, Any]:  # fmt: skip
    ks = QUICK_KS if quick else KS
    param_bytes = sum(o * i * 4 for _, o, i in shapes)
    result: dict[str, Any] = {
        "weights": label,
        "shapes": [[n, o, i] for n, o, i in shapes],
        "tensors": len(shapes),
        "param_bytes": param_bytes,
        "grad_MiB": param_bytes / MIB,
        "adam_state_bytes": 2 * param_bytes,
    }
    skipped = _fits(4 * param_bytes, label)  # params, grads, the two shared moments
    if skipped:
        return {**result, "skipped": skipped}
    gen = torch.Generator().manual_seed(2)
    params = []
    for _, out, d in shapes:
        p = nn.Parameter(torch.randn(out, d, generator=gen).mul_(0.02))
        p.grad = torch.randn(out, d, generator=gen)
        params.append(p)
    widths = sorted({d for _, _, d in shapes})
    subs = {(d, k): random_subspace(d, k, seed=d + k) for d in widths for k in ks}
    bases = {k: {p: subs[(p.shape[1], k)] for p in params} for k in ks}
    variants = build_variants(params, lambda k: bases[k], ks, lr, fused)
    result["AdamW_impl"] = default_adamw_impl(params)
    result["bases"] = {"d": widths}
    shared = share_moments(variants, params) | {_storage_key(p.grad) for p in params}
    times: dict[str, dict[str, list[float]]] = {n: {"optimizer_step": []} for n in variants}
    memory: dict[str, dict[str, Any]] = {}
    for name, (opt, _) in variants.items():
        memory[name] = {"first_step": allocation_profile(opt.step)}
    for _ in range(rounds):
        for name, (opt, _) in variants.items():
            t0 = time.perf_counter()
            opt.step()
            times[name]["optimizer_step"].append(time.perf_counter() - t0)
    for name, (opt, _) in variants.items():
        memory[name]["step_temporaries"] = allocation_profile(opt.step)
        memory[name]["persistent"] = held_bytes(opt, shared)
    result["rounds"] = rounds
    result["variants"] = summarize(variants, times, memory, param_bytes, 2 * param_bytes)
    return result


# -- report ----------------------------------------------------------------------------------


def table(result: dict[str, Any]) -> str:
    """The summary as Markdown: one block per section."""
    lines = []
    for key, title in (
        ("sd15_unet", "SD 1.5 UNet, whole training step"),
        ("sdxl_kv", "SDXL attn2 K/V, optimizer step alone"),
        ("flux_text", "Flux context_embedder + add_k/v_proj, optimizer step alone"),
    ):
        sec = result[key]
        if "skipped" in sec:
            lines += [f"### {title}", "", f"skipped: {sec['skipped']}", ""]
            continue
        grad_mib = sec["protected"]["grad_MiB"] if key == "sd15_unet" else sec["grad_MiB"]
        lines += [
            f"### {title} (protected grads {grad_mib:.1f} MiB, {sec['rounds']} rounds, "
            f"AdamW = {sec['AdamW_impl']})",
            "",
            "| variant | whole step ms (×AdamW) | opt.step ms (×AdamW, ×fused) | anchors % grads "
            "| extra beyond anchors % grads | temp peak MiB | goal ≤ 1 % |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in sec["variants"]:
            whole = row.get("whole_step")
            step = row["optimizer_step"]
            mem = row["memory"]
            whole_s = f"{whole['median_ms']:.0f} ({whole['ratio_to_AdamW']:.3f})" if whole else "—"
            fused_s = (
                f", {step['ratio_to_AdamW_fused']:.2f}" if "ratio_to_AdamW_fused" in step else ""
            )
            goal = "—" if row["k"] is None else ("pass" if mem["goal_met"] else "FAIL")
            lines.append(
                f"| {row['variant']} | {whole_s} | {step['median_ms']:.1f} "
                f"({step['ratio_to_AdamW']:.3f}{fused_s}) "
                f"| {mem['pct_of_protected_grads']['anchors']:.2f} "
                f"| {mem['goal_extra_pct']:.3f} "
                f"| {mem['step_temporaries']['peak_bytes'] / MIB:.1f} | {goal} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--quick", action="store_true", help="tiny UNet and weight sets")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (UNet)")
    parser.add_argument("--set-rounds", type=int, default=None, help="timed rounds (SDXL, Flux)")
    parser.add_argument("--lr", type=float, default=1e-5)
    args = parser.parse_args(argv)
    rounds = args.rounds or 3
    set_rounds = args.set_rounds or (3 if args.quick else 5)
    started = time.perf_counter()
    fused = harness.fused_adamw_supported(torch.device("cpu"))
    result: dict[str, Any] = {
        "environment": environment(),
        "settings": {
            "quick": args.quick,
            "lr": args.lr,
            "ks": list(QUICK_KS if args.quick else KS),
            "fused_adamw": fused,
            "timer": "time.perf_counter, median over interleaved rounds after 1 warm-up step",
        },
        "profiler_check": profiler_check(),
    }
    result["sd15_unet"] = run_unet(args.quick, rounds, args.lr, fused)
    gc.collect()  # the UNet and its optimizers, before the next set is allocated
    for key, shapes in (("sdxl_kv", SDXL_KV), ("flux_text", FLUX_TEXT)):
        if args.quick:
            shapes = QUICK_SETS[key]
        result[key] = run_weight_set(key, shapes, args.quick, set_rounds, args.lr, fused)
        gc.collect()
    result["environment"]["loadavg_end"] = os.getloadavg()
    result["wall_s"] = round(time.perf_counter() - started, 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=float)
    print(table(result))
    print(f"wrote {args.out} in {result['wall_s']} s")
    return result


if __name__ == "__main__":
    main()
