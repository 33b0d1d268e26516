"""gradproj: fused gradient projection, g − U(Uᵀg), across whole buckets of parameters.

Public API; everything else in the package is private. The package has three floors,
and imports only go down (``tests/test_architecture.py`` checks it):

- the library (this package's modules, ``gradproj.integrations``) over the kernels
  (``gradproj.kernels``, ``gradproj._C``);
- ``gradproj.methods``: the seed methods that work on any diffusers model (guidance,
  memorization detectors, attacks, adversarial fine-tuning, unlearning);
- ``gradproj.lab``: the synthetic world and its experiments (``gradproj demo``,
  ``unlearn``, ``evaluate``).

The seed methods' names below are loaded on first use, so ``import gradproj`` stays
light and never imports diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

from gradproj import backends, reference
from gradproj.adamw import ProjectedAdamW
from gradproj.drift import subspace_drift
from gradproj.lora import protect_lora_
from gradproj.ops import check_orthonormal_, project_, surgery_
from gradproj.optim import ProjectedOptimizer
from gradproj.subspace import ConceptSubspace

# public name -> the module that defines it (imported when the name is first read)
_LAZY = {
    "AntiMemorizationGuidance": "gradproj.methods.guidance",
    "amg_pipeline": "gradproj.methods.guidance",
    "OfficialSchedule": "gradproj.methods.guidance",
    "sample_with_guidance": "gradproj.methods.guidance",
    "MemorizationDetector": "gradproj.methods.detectors",
    "RescaledDetector": "gradproj.methods.detectors",
    "noise_magnitude": "gradproj.methods.detectors",
    "roc_auc": "gradproj.methods.detectors",
    "dori_attack": "gradproj.methods.attacks",
    "embedding_search": "gradproj.methods.attacks",
    "adversarial_finetune": "gradproj.methods.adversarial",
    "surgery_backward": "gradproj.methods.unlearn",
    "unlearn_concept": "gradproj.methods.unlearn",
}
_SUBMODULES = ("diffusers", "integrations", "methods", "lab", "bench", "distributed", "check")

__all__ = [
    "AntiMemorizationGuidance",
    "ConceptSubspace",
    "MemorizationDetector",
    "OfficialSchedule",
    "ProjectedAdamW",
    "ProjectedOptimizer",
    "RescaledDetector",
    "adversarial_finetune",
    "amg_pipeline",
    "backends",
    "check_orthonormal_",
    "dori_attack",
    "embedding_search",
    "noise_magnitude",
    "project_",
    "protect_lora_",
    "reference",
    "roc_auc",
    "sample_with_guidance",
    "subspace_drift",
    "surgery_",
    "surgery_backward",
    "unlearn_concept",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"gradproj.{name}")
    raise AttributeError(f"module 'gradproj' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBMODULES})
