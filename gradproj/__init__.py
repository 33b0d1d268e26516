"""gradproj: fused gradient projection, g − U(Uᵀg), across whole buckets of parameters.

Public API; everything else in the package is private.
"""

from gradproj import backends, reference
from gradproj.adamw import ProjectedAdamW
from gradproj.adversarial import adversarial_finetune
from gradproj.attacks import dori_attack, embedding_search
from gradproj.eval import MemorizationDetector, noise_magnitude, roc_auc
from gradproj.guidance import AntiMemorizationGuidance, amg_pipeline, sample_with_guidance
from gradproj.lora import protect_lora_
from gradproj.ops import check_orthonormal_, project_, surgery_
from gradproj.optim import ProjectedOptimizer
from gradproj.subspace import ConceptSubspace
from gradproj.unlearn import surgery_backward, unlearn_concept

__all__ = [
    "AntiMemorizationGuidance",
    "ConceptSubspace",
    "MemorizationDetector",
    "ProjectedAdamW",
    "ProjectedOptimizer",
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
    "surgery_",
    "surgery_backward",
    "unlearn_concept",
]
__version__ = "0.1.0"
