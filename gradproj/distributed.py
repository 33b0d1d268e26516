"""Projection inside DDP's gradient buckets.

DDP all-reduces gradients in flat buckets and then copies each bucket back into
the parameters' ``.grad``. :func:`projection_hook` is a DDP communication hook
that runs the usual all-reduce (or any other hook, e.g. the fp16/bf16
compression hooks) and, in the future's ``then`` callback, projects the reduced
bucket in place with one fused ``project_`` call — so the projection costs no
extra pass over memory and no communication::

    state = gradproj.distributed.ProjectionHookState(bases)   # {param: basis}
    ddp_model.register_comm_hook(state, gradproj.distributed.projection_hook)

When this is the right place: it projects the *gradient* (grad mode), which
keeps ``ΔW U = 0`` only for optimizers whose update is a linear function of
past gradients with no per-element scaling — SGD, SGD with momentum/Nesterov,
no weight decay. For Adam-family optimizers, Adagrad, RMSprop or any weight
decay, project the *update* with ``ProjectedOptimizer(mode="update")`` (or use
``ProjectedAdamW``) instead; the hook is then unnecessary.

Parameters are matched to bases by identity through ``bucket.parameters()``:
DDP rebuilds its buckets after the first iterations and their indices and order
change, so nothing here is keyed by ``bucket.index()`` or position. Because the
projection is linear, it commutes with the mean over ranks and with
``no_sync()`` accumulation (the hook then runs once, on the accumulated sum).
"""

# No ``from __future__ import annotations`` here: DDP's register_comm_hook compares
# the hook's annotations with dist.GradBucket / Future[Tensor] objects, not strings.
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from gradproj.ops import project_

Hook = Callable[[Any, dist.GradBucket], torch.futures.Future[torch.Tensor]]


class ProjectionHookState:
    """State of :func:`projection_hook`.

    Args:
        bases: ``{parameter: basis}`` (a tensor or a ``ConceptSubspace``), keyed by
            the parameter objects of the wrapped module (DDP does not copy them).
        side: the projection side, as in ``gradproj.project_``.
        process_group: the group to all-reduce over (default: the world).
        inner_hook, inner_state: another communication hook to run instead of the
            plain all-reduce, e.g. ``default_hooks.fp16_compress_hook`` with the
            process group as its state.
        backend: force a gradproj backend (default: chosen per device and dtype).
    """

    def __init__(
        self,
        bases: Mapping[torch.nn.Parameter, Any],
        *,
        side: str = "input",
        process_group: dist.ProcessGroup | None = None,
        inner_hook: Hook | None = None,
        inner_state: Any = None,
        backend: str | None = None,
    ) -> None:
        for p in bases:
            if not isinstance(p, torch.Tensor):
                raise TypeError(
                    f"bases must be keyed by parameters (tensors), got a key of type "
                    f"{type(p).__name__}; map names to parameters with named_parameters() first"
                )
        self.bases = {id(p): b for p, b in bases.items()}
        self._keep_alive = list(bases)  # ids stay valid while the state lives
        self.side = side
        self.process_group = process_group
        self.inner_hook = inner_hook
        self.inner_state = inner_state
        self.backend = backend


def projection_hook(
    state: ProjectionHookState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """All-reduce ``bucket`` (or run ``state.inner_hook``), then project its gradients in place."""
    if state.inner_hook is not None:
        fut = state.inner_hook(state.inner_state, bucket)
    else:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        fut = allreduce_hook(state.process_group, bucket)

    params = bucket.parameters()
    bases = [state.bases.get(id(p)) for p in params]
    if all(b is None for b in bases):
        return fut
    # Where each gradient sits in the flat bucket: the reduced tensor has the
    # bucket buffer's layout, and DDP copies it back into the grads afterwards.
    base_offset = bucket.buffer().storage_offset()
    layout = [(g.storage_offset() - base_offset, g.shape) for g in bucket.gradients()]

    def project(fut: torch.futures.Future) -> torch.Tensor:
        value = fut.value()
        reduced = value[0] if isinstance(value, (list, tuple)) else value
        views = [reduced[off : off + shape.numel()].view(shape) for off, shape in layout]
        project_(views, bases, side=state.side, backend=state.backend)
        return reduced

    return fut.then(project)
