"""gradproj: fused gradient projection, g − U(Uᵀg), across whole buckets of parameters.

Public API; everything else in the package is private.
"""

from gradproj import backends, reference
from gradproj.adamw import ProjectedAdamW
from gradproj.lora import protect_lora_
from gradproj.ops import check_orthonormal_, project_, surgery_
from gradproj.optim import ProjectedOptimizer
from gradproj.subspace import ConceptSubspace
from gradproj.unlearn import surgery_backward

__all__ = [
    "ConceptSubspace",
    "ProjectedAdamW",
    "ProjectedOptimizer",
    "backends",
    "check_orthonormal_",
    "project_",
    "protect_lora_",
    "reference",
    "surgery_",
    "surgery_backward",
]
__version__ = "0.1.0"
