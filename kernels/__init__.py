"""Triton kernels of gradproj, installed as ``gradproj.kernels``.

One kernel family per file, its host launcher beside it. Nothing here knows
about optimizers; everything here takes already-validated buckets.
"""
