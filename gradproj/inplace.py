"""In-place semantics shared by every entry point that writes into a caller's tensors.

gradproj's kernels write through raw pointers, which autograd and torch's alias
checks do not see. So that ``project_``, ``project_anchored_``, ``surgery_`` and
the optimizers behave like torch's own in-place ops (``x.sub_(…)``), every such
entry point, before its first write:

* refuses an inference tensor outside ``torch.inference_mode`` (torch's rule:
  "Inplace update to inference tensor outside InferenceMode is not allowed");
* refuses a written tensor whose elements may overlap each other (an
  ``expand``ed or ``as_strided`` view), and any written tensor whose memory
  range meets another input's (two slices of one buffer, a basis that aliases a
  grad): the kernels would read or write one element twice;

and after its last write bumps the version counter of every tensor it changed,
so a tensor saved for backward and changed since makes ``backward()`` raise
("modified by an inplace operation") instead of returning a wrong gradient.

Overlap is decided on address ranges (plus a stride test within one tensor), so
two views that interleave without sharing an element (``G[:, 0::2]`` and
``G[:, 1::2]``) are refused too: a clear error, never a wrong result.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


def tracing() -> bool:
    # Fake tensors under torch.compile have no addresses; functionalization
    # tracks their mutations itself.
    return torch.compiler.is_compiling()


def check_writable(t: torch.Tensor, where: object) -> None:
    """Raise ``RuntimeError`` if torch would refuse an in-place op on ``t``."""
    if tracing():  # dynamo cannot trace is_inference(); the traced op's own checks apply
        return
    check_writable_eager(t, where)


def check_writable_eager(t: torch.Tensor, where: object) -> None:
    """:func:`check_writable` for a caller that has found it is not tracing (once a call)."""
    if t.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{where} is an inference tensor (created under torch.inference_mode); an in-place "
            "update to it outside InferenceMode is not allowed, as for torch's in-place ops. "
            "Clone it outside inference mode first, or call this inside torch.inference_mode()"
        )


def may_overlap_internally(t: torch.Tensor) -> bool:
    """True unless the strides prove every element of ``t`` has its own address.

    Sorted by stride, each dimension's stride must exceed the farthest offset the
    smaller dimensions reach; that is sufficient for distinct offsets (and catches
    ``expand``, stride 0). Exotic interleavings it cannot prove count as overlapping.
    """
    if t.is_contiguous():  # every element at its own offset, nothing to sort
        return False
    reach = 0
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape, strict=True) if n > 1):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    if t.is_contiguous():
        return start, start + t.numel() * t.element_size()
    span = sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True)) + 1
    return start, start + span * t.element_size()


def check_no_overlap(
    written: Sequence[tuple[torch.Tensor, object]],
    read: Sequence[tuple[torch.Tensor, object]] = (),
) -> None:
    """Raise ``ValueError`` if a written tensor may share memory with itself or any other input.

    ``written``/``read`` are ``(tensor, name)`` pairs (a name is formatted only for the
    error). Read-only inputs may share memory with each other (one basis for many grads).
    One sweep over the address ranges sorted by start: O(n log n) for the hundreds of
    grads of a UNet.
    """
    if tracing():
        return
    spans: list[tuple[int, int, bool, object]] = []
    for t, where in written:
        if t.numel() == 0:
            continue
        if t.numel() > 1 and may_overlap_internally(t):
            raise ValueError(
                f"{where} has internally overlapping memory (shape {tuple(t.shape)}, strides "
                f"{t.stride()}: e.g. an expand()ed or as_strided view) and cannot be written in "
                "place; pass a tensor whose elements each have their own memory (.clone())"
            )
        spans.append((*_byte_range(t), True, where))
    for t, where in read:
        if t.numel():
            spans.append((*_byte_range(t), False, where))
    spans.sort(key=lambda s: s[0])
    end_all, who_all = -1, None
    end_written, who_written = -1, None
    for start, end, is_written, where in spans:
        other = who_all if is_written and start < end_all else None
        if other is None and start < end_written:
            other = who_written
        if other is not None:
            raise ValueError(
                f"{where} shares memory with {other} (their address ranges overlap); writing in "
                "place would read or write some elements twice. Pass separate tensors (or "
                "the one tensor they are views of)"
            )
        if end > end_all:
            end_all, who_all = end, where
        if is_written and end > end_written:
            end_written, who_written = end, where


def mark_written(tensors: Iterable[torch.Tensor]) -> None:
    """Bump the version counters of ``tensors``, as a torch in-place op on them would."""
    if tracing():
        return
    todo = [t for t in tensors if not t.is_inference()]  # inference tensors keep no version
    if todo:
        torch.autograd.graph.increment_version(todo)
