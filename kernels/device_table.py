"""Small device tables (tensor addresses, sizes, strides, block maps) for the Triton kernels.

Every fused kernel of ``gradproj.kernels`` finds its tensors through an int64
table in device memory. Building and copying it is host work per launch, so
tables are cached by everything they encode.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Device tables keyed by everything they encode; grads that keep their storage
# between steps (zero_grad(set_to_none=False), DDP buckets) reuse the table and
# pay no host-to-device copy. Bounded so a training loop with fresh grads every
# step cannot grow it without limit.
_TABLES: dict[tuple, torch.Tensor] = {}
_TABLES_MAX = 256


def _to_device(rows: list[int], device: torch.device) -> torch.Tensor:
    """An int64 device tensor of ``rows``, copied without blocking the host."""
    host = torch.tensor(rows, dtype=torch.int64)
    if device.type != "cuda":
        return host.to(device)
    # Pinned + non_blocking: the copy is queued on the current stream; the
    # caching host allocator keeps the pinned buffer alive until it is done.
    return host.pin_memory().to(device, non_blocking=True)


def cached_table(key: tuple, build: Callable[[], list[int]]) -> torch.Tensor:
    """The device table for ``key``, built by ``build()`` (a list of ints) on a miss."""
    table = _TABLES.get(key)
    if table is None:
        if len(_TABLES) >= _TABLES_MAX:
            _TABLES.clear()
        table = _TABLES[key] = _to_device(build(), key[0])
    return table
