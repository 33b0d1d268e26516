"""gradproj: fused gradient projection, g − U(Uᵀg), across whole buckets of parameters.

Public API; everything else in the package is private.
"""

from gradproj import backends, reference
from gradproj.ops import check_orthonormal_, project_

__all__ = ["backends", "check_orthonormal_", "project_", "reference"]
__version__ = "0.1.0"
