"""``ConceptSubspace``: the directions a prohibited concept occupies, as a projection basis.

Built from embeddings ``E (n × d)`` (rows: what the protected layers read, e.g.
text-encoder hidden states that the cross-attention K/V weights see). With the
thin SVD ``E = A S Bᵀ`` the concept spans the right singular vectors ``B``; the
subspace keeps ``k`` of them, chosen by a fixed ``k`` or by the share of energy
``Σᵢ≤ₖ sᵢ² / Σ sᵢ²`` they carry.

Hard subspace: ``weights = None``, projector ``I − U Uᵀ``. Soft (ridge ``λ``):
``weights = s² / (s² + λ)``, projector ``I − U diag(w) Uᵀ``, which equals the
ridge projector ``I − C (CᵀC + λI)⁻¹ Cᵀ`` of ``C = Eᵀ`` when every direction is
kept. A ``ConceptSubspace`` is accepted wherever a basis is (``project_``,
``project_anchored_``, the optimizers): it exposes ``.basis`` and ``.weights``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch

from gradproj.ops import ORTHONORMAL_TOL, check_orthonormal_

# The dtypes a basis may be made in, by the names ``save`` writes
# ("float32", not "torch.float32"), and the safetensors header's dtype codes.
_PRECISIONS: dict[str, torch.dtype] = {str(t).removeprefix("torch."): t for t in ORTHONORMAL_TOL}
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
# Safetensors metadata keys: user metadata (JSON) and the basis precision. Files
# written before the precision key existed lack it; their precision is the dtype.
_META_KEY, _PRECISION_KEY = "gradproj", "gradproj.precision"


def _coarser(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The less precise of two floating dtypes (bfloat16 is coarser than float16)."""
    return a if torch.finfo(a).eps >= torch.finfo(b).eps else b


def _check_parts(
    basis: tuple[tuple[int, ...], torch.dtype],
    weights: tuple[tuple[int, ...], torch.dtype] | None,
    singular_values: tuple[tuple[int, ...], torch.dtype] | None,
) -> None:
    """Check the ``(shape, dtype)`` of each part; reads no values, so a bad size costs nothing.

    Shared by the constructor (tensors) and :meth:`ConceptSubspace.load` (the
    safetensors header, before any tensor is read).
    """
    shape, dtype = basis
    if len(shape) != 2:
        raise ValueError(f"basis must be a 2-D (d × k) tensor, got shape {tuple(shape)}")
    if not dtype.is_floating_point:
        raise TypeError(f"basis must be floating-point, got {dtype}")
    d, k = shape
    if k > d:
        raise ValueError(
            f"basis has shape {tuple(shape)}: k={k} columns > d={d} rows, so it cannot be "
            "orthonormal (a basis is d × k with k ≤ d; is it transposed?)"
        )
    for name, part in (("weights", weights), ("singular_values", singular_values)):
        if part is None:
            continue
        shape, dtype = part
        if tuple(shape) != (k,):
            raise ValueError(
                f"{name} must have shape ({k},) to match the basis (d × k = {(d, k)}), "
                f"got {tuple(shape)}"
            )
        if not dtype.is_floating_point:
            raise TypeError(f"{name} must be floating-point, got {dtype}")


class ConceptSubspace:
    """An orthonormal basis ``U (d × k)``, optional weights ``w (k,)`` in [0, 1], and provenance.

    Args:
        basis: ``(d × k)``, ``k ≤ d``, with orthonormal columns: ``max |UᵀU − I| ≤
            orthonormal_tol`` (checked unless ``check=False``).
        weights: ``None`` (hard projector) or ``(k,)`` values in ``[0, 1]``, on the
            basis's device.
        singular_values: the ``s`` the directions came with, if known (kept for
            inspection and saved).
        metadata: free-form provenance (source model, prompts, threshold, ...);
            values must be JSON-serializable.
        precision: the dtype the basis was computed (orthonormalized) in; ``None``:
            ``basis.dtype``. A float32 basis cast to float64 is orthonormal only to
            float32 accuracy: give ``precision=torch.float32`` (``.to`` does). It
            may not be finer than ``basis.dtype``.
        check: check the values (finite basis, orthonormal columns, weights in
            ``[0, 1]``); reads them back, so it synchronizes with the device. Shapes
            and dtypes are always checked, before any arithmetic.

    Attributes:
        precision: as above; ``orthonormal_tol`` follows it.
    """

    def __init__(
        self,
        basis: torch.Tensor,
        weights: torch.Tensor | None = None,
        *,
        singular_values: torch.Tensor | None = None,
        metadata: dict | None = None,
        precision: torch.dtype | None = None,
        check: bool = True,
    ) -> None:
        # Shapes and dtypes first: a (2 × 60000) basis must not reach UᵀU (60000²).
        if not isinstance(basis, torch.Tensor):
            raise ValueError(f"basis must be a 2-D (d × k) tensor, got {type(basis).__name__}")
        for name, t in (("weights", weights), ("singular_values", singular_values)):
            if t is not None and not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a tensor or None, got {type(t).__name__}")
        _check_parts(
            (tuple(basis.shape), basis.dtype),
            None if weights is None else (tuple(weights.shape), weights.dtype),
            None
            if singular_values is None
            else (tuple(singular_values.shape), singular_values.dtype),
        )
        if basis.layout != torch.strided:
            raise TypeError(f"basis must be a dense (strided) tensor, got layout {basis.layout}")
        if weights is not None and weights.device != basis.device:
            raise ValueError(f"weights are on {weights.device}, but the basis is on {basis.device}")
        precision = basis.dtype if precision is None else precision
        if precision not in ORTHONORMAL_TOL:
            raise TypeError(
                f"precision must be one of {', '.join(_PRECISIONS)} (the dtypes with an "
                f"orthonormality tolerance), got {precision}"
            )
        if _coarser(precision, basis.dtype) != precision:
            raise ValueError(
                f"precision {precision} is finer than the basis dtype {basis.dtype}: a basis "
                "cannot be more accurate than the numbers that hold it"
            )
        self.basis = basis
        self.weights = weights
        self.singular_values = singular_values
        self.metadata = dict(metadata or {})
        self.precision = precision
        if check:
            self._check_values()

    def _check_values(self) -> None:
        """Finite basis, orthonormal to ``orthonormal_tol``; weights finite, in ``[0, 1]``."""
        u, w = self.basis, self.weights
        if u.numel() and not bool(torch.isfinite(u).all()):
            bad = int((~torch.isfinite(u)).sum())
            raise ValueError(f"basis {tuple(u.shape)} holds {bad} NaN/inf values")
        check_orthonormal_(u, "ConceptSubspace basis", tol=self.orthonormal_tol)
        if w is not None and w.numel():
            lo, hi = w.min().item(), w.max().item()
            if not (lo >= 0.0 and hi <= 1.0):  # False for NaN too
                raise ValueError(f"weights must lie in [0, 1], got values in [{lo:g}, {hi:g}]")

    @property
    def orthonormal_tol(self) -> float:
        """Largest ``max |UᵀU − I|`` the basis may have: ``ORTHONORMAL_TOL[precision]``."""
        return ORTHONORMAL_TOL[self.precision]

    # ---------------------------------------------------------------- builders

    @classmethod
    def from_embeddings(
        cls,
        embeddings: torch.Tensor,
        *,
        k: int | None = None,
        energy: float | None = None,
        ridge: float | None = None,
        dtype: torch.dtype = torch.float32,
        metadata: dict | None = None,
    ) -> ConceptSubspace:
        """The top right singular directions of ``embeddings (n × d)``.

        ``k``: keep exactly ``k`` directions; ``energy``: keep the fewest that carry
        at least that share of ``Σ s²`` (0 < energy ≤ 1); neither: keep every
        direction with ``s > 0`` (numerically: ``s > max(s)·d·eps``). ``ridge``
        (λ > 0) makes the subspace soft with ``w = s²/(s²+λ)``. The SVD runs in
        float64; the basis is returned in ``dtype``.
        """
        if embeddings.dim() != 2:
            raise ValueError(f"embeddings must be 2-D (n × d), got {tuple(embeddings.shape)}")
        if k is not None and energy is not None:
            raise ValueError("give k or energy, not both")
        if energy is not None and not 0.0 < energy <= 1.0:
            raise ValueError(f"energy must lie in (0, 1], got {energy}")
        if ridge is not None and not ridge > 0:
            raise ValueError(f"ridge must be > 0, got {ridge}")
        e = embeddings.detach().to(torch.float64)
        _, s, vh = torch.linalg.svd(e, full_matrices=False)
        rank = (
            int((s > s.max() * max(e.shape) * torch.finfo(torch.float64).eps).sum())
            if s.numel()
            else 0
        )
        if k is not None:
            if not 0 <= k <= rank:
                raise ValueError(f"k must lie in [0, {rank}] (the rank of the embeddings), got {k}")
            keep = k
        elif energy is not None:
            share = torch.cumsum(s * s, 0) / (s * s).sum()
            keep = min(int((share < energy - 1e-12).sum()) + 1, rank)
        else:
            keep = rank
        s, u = s[:keep], vh[:keep].T
        weights = None if ridge is None else (s * s / (s * s + ridge)).to(dtype)
        meta = {"k": keep, "energy": energy, "ridge": ridge, **(metadata or {})}
        return cls(u.to(dtype), weights, singular_values=s.to(dtype), metadata=meta)

    @classmethod
    @torch.no_grad()
    def from_prompts(
        cls,
        prompts: Sequence[str],
        text_encoder: torch.nn.Module,
        tokenizer,
        *,
        neutral_prompts: Sequence[str] | None = None,
        k: int | None = None,
        energy: float | None = 0.99,
        ridge: float | None = None,
        batch_size: int = 32,
        attention_mask: bool | None = None,
    ) -> ConceptSubspace:
        """Directions that a concept adds to the text encoder's output (what K/V read).

        With ``neutral_prompts`` (same length as ``prompts``, each the same prompt
        with the concept removed or replaced, e.g. "a photo of a <mark> mug" / "a
        photo of a mug"): the rows are the differences of the last hidden states at
        every position of the padded sequence — in a transformer the concept also
        changes the states of the other tokens, shifts the later ones when it adds
        tokens, and reaches the padding positions, and a Stable-Diffusion UNet's
        cross-attention reads all ``model_max_length`` positions, padding included.
        Without neutral prompts: every hidden state of the concept prompts at every
        position (this also spans generic context, "a photo of", so it blocks more
        than the concept; measured in the demo: the "acme" lift was 0.24 with it
        against 0.01 with the difference subspace).

        ``attention_mask``: whether the encoder sees the tokenizer's mask. The
        states must be the ones the model is trained and sampled with, padding
        positions included, and those differ with and without the mask. ``None``
        (default) does what diffusers' pipelines and training scripts do: the mask
        only when the encoder's config sets ``use_attention_mask`` (CLIP's does not:
        SD 1.x/2.x, the official scripts and kohya encode without it). Pass ``True``
        for a model conditioned on masked states (gradproj's lab does).
        """
        device = next(text_encoder.parameters()).device
        use_mask = (
            bool(getattr(getattr(text_encoder, "config", None), "use_attention_mask", False))
            if attention_mask is None
            else attention_mask
        )

        def states(batch: Sequence[str]) -> torch.Tensor:
            # Padded to max_length exactly as a diffusers pipeline encodes prompts;
            # every position is kept (see above).
            tok = tokenizer(
                list(batch),
                padding="max_length",
                truncation=True,
                max_length=getattr(tokenizer, "model_max_length", 77),
                return_tensors="pt",
            )
            ids = tok["input_ids"].to(device)
            mask = tok.get("attention_mask") if use_mask else None
            mask = None if mask is None else mask.to(device)
            h = text_encoder(ids, attention_mask=mask).last_hidden_state
            return h.reshape(-1, h.shape[-1])

        name = (
            getattr(getattr(text_encoder, "config", None), "_name_or_path", "")
            or type(text_encoder).__name__
        )
        sub = cls._from_states(
            states, prompts, neutral_prompts, k, energy, ridge, batch_size,
            {"source_model": name, "attention_mask": use_mask},
        )  # fmt: skip
        return sub.to(device)

    @classmethod
    @torch.no_grad()
    def from_pipeline(
        cls,
        pipeline,
        prompts: Sequence[str],
        *,
        neutral_prompts: Sequence[str] | None = None,
        k: int | None = None,
        energy: float | None = 0.99,
        ridge: float | None = None,
        batch_size: int = 32,
        **encode_kwargs,
    ) -> ConceptSubspace:
        """As :meth:`from_prompts`, from the states a diffusers pipeline itself feeds its model.

        The rows are ``pipeline.encode_prompt(...)``'s ``prompt_embeds`` — exactly the
        tensor the pipeline hands its UNet or transformer as
        ``encoder_hidden_states``: SD 1.x/2.x (one CLIP), SDXL (two CLIP encoders'
        penultimate states, concatenated: d = 2048), SD3 (both CLIPs padded to
        T5's width, then T5, along the sequence: d = 4096) and Flux (T5: d = 4096),
        every position of the padded sequence. So the subspace lives in the space
        :func:`gradproj.diffusers.protect`'s default ``target="input"`` layers read.
        ``encode_kwargs`` go to ``encode_prompt`` (e.g. ``max_sequence_length``;
        ``clip_skip``, if the model is trained and sampled with it).
        """
        import inspect

        encode = getattr(pipeline, "encode_prompt", None)
        if not callable(encode):
            raise TypeError(
                f"{type(pipeline).__name__} has no encode_prompt: give a diffusers text-to-image "
                "pipeline (StableDiffusion, StableDiffusionXL, StableDiffusion3, Flux)"
            )
        params = inspect.signature(encode).parameters
        device = getattr(pipeline, "_execution_device", None) or torch.device("cpu")
        # prompt_2 / prompt_3 None: the same prompt for every encoder, as a pipeline call does.
        fixed = {"device": device, "num_images_per_prompt": 1, "prompt_2": None, "prompt_3": None}
        if "do_classifier_free_guidance" in params:
            fixed["do_classifier_free_guidance"] = False  # no negative prompt is needed
        fixed = {key: v for key, v in fixed.items() if key in params}

        def states(batch: Sequence[str]) -> torch.Tensor:
            h = encode(prompt=list(batch), **fixed, **encode_kwargs)[0]
            return h.reshape(-1, h.shape[-1])

        name = (
            getattr(getattr(pipeline, "config", None), "_name_or_path", "")
            or type(pipeline).__name__
        )
        return cls._from_states(
            states, prompts, neutral_prompts, k, energy, ridge, batch_size,
            {"source_model": name, "pipeline": type(pipeline).__name__},
        )  # fmt: skip

    @classmethod
    def _from_states(
        cls, states, prompts, neutral_prompts, k, energy, ridge, batch_size, meta
    ) -> ConceptSubspace:
        """Rows = states of the prompts (minus those of their neutral twins); then the SVD."""
        if neutral_prompts is not None and len(neutral_prompts) != len(prompts):
            raise ValueError(
                f"neutral_prompts has {len(neutral_prompts)} entries, prompts {len(prompts)}"
            )
        rows = []
        for i in range(0, len(prompts), batch_size):
            h = states(prompts[i : i + batch_size])
            if neutral_prompts is not None:
                h = h - states(neutral_prompts[i : i + batch_size])
            rows.append(h)
        e = torch.cat(rows).to(torch.float64).cpu()
        meta = {
            **meta,
            "prompts": list(prompts),
            "neutral_prompts": None if neutral_prompts is None else list(neutral_prompts),
            "mode": "difference" if neutral_prompts is not None else "states",
        }
        return cls.from_embeddings(e, k=k, energy=None if k else energy, ridge=ridge, metadata=meta)

    # ---------------------------------------------------------------- algebra

    @property
    def dim(self) -> int:
        """``d``: the length of the vectors this subspace lives among."""
        return self.basis.shape[0]

    @property
    def k(self) -> int:
        """Number of directions."""
        return self.basis.shape[1]

    def union(self, other: ConceptSubspace, *, rtol: float = 1e-6) -> ConceptSubspace:
        """The hard subspace spanning both (dependent directions dropped: ``s ≤ rtol·max s``)."""
        if self.weights is not None or other.weights is not None:
            raise ValueError(
                "union of soft subspaces is not defined by their bases alone; build one soft "
                "subspace from the concatenated embeddings with ConceptSubspace.from_embeddings"
            )
        if other.dim != self.dim:
            raise ValueError(f"cannot unite subspaces of dimension {self.dim} and {other.dim}")
        both = torch.cat([self.basis, other.basis.to(self.basis)], dim=1).to(torch.float64)
        u, s, _ = torch.linalg.svd(both, full_matrices=False)
        keep = int((s > rtol * s.max()).sum()) if s.numel() else 0
        meta = {"union_of": [self.metadata, other.metadata], "k": keep}
        return ConceptSubspace(u[:, :keep].to(self.basis.dtype), metadata=meta)

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> ConceptSubspace:
        """A copy on ``device`` and/or in ``dtype`` (weights and singular values follow).

        ``precision`` becomes the coarser of the old precision and ``dtype``: a
        float32-made basis cast to float64 keeps float32's tolerance; a float64
        one cast to bfloat16 gets bfloat16's.
        """

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        return ConceptSubspace(
            move(self.basis),
            move(self.weights),
            singular_values=move(self.singular_values),
            metadata=self.metadata,
            precision=self.precision if dtype is None else _coarser(self.precision, dtype),
            check=False,
        )

    # ---------------------------------------------------------------- storage

    def save(self, path: str | os.PathLike) -> None:
        """Write tensors, metadata (as JSON) and ``precision`` to a ``.safetensors`` file."""
        from safetensors.torch import save_file

        tensors = {"basis": self.basis.detach().cpu().contiguous()}
        if self.weights is not None:
            tensors["weights"] = self.weights.detach().cpu().contiguous()
        if self.singular_values is not None:
            tensors["singular_values"] = self.singular_values.detach().cpu().contiguous()
        meta = {
            _META_KEY: json.dumps(self.metadata),
            _PRECISION_KEY: str(self.precision).removeprefix("torch."),
        }
        save_file(tensors, os.fspath(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> ConceptSubspace:
        """Read a subspace written by :meth:`save` (values re-checked).

        The header (tensor names, dtypes, shapes, metadata) is checked before any
        tensor is read, so a corrupt or hostile file costs no more than its size.
        Files without a precision (written before it existed) get ``basis.dtype``.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: anything wrong with the file; the message starts with ``path``.
        """
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such ConceptSubspace file")
        try:
            f = safe_open(path, framework="pt", device=str(device))
        except Exception as e:  # safetensors raises its own SafetensorError and OSErrors
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
        with f:
            names = set(f.keys())
            if "basis" not in names:
                raise ValueError(
                    f"{path}: holds no 'basis' tensor (found {sorted(names)}); "
                    "not a ConceptSubspace file"
                )
            parts = {}
            for name in ("basis", "weights", "singular_values"):
                if name not in names:
                    continue
                header = f.get_slice(name)
                code = header.get_dtype()
                if code not in _SAFETENSORS_DTYPES:
                    raise ValueError(
                        f"{path}: tensor {name!r} has dtype {code}; a ConceptSubspace "
                        f"stores floating point ({', '.join(_SAFETENSORS_DTYPES)})"
                    )
                parts[name] = (tuple(header.get_shape()), _SAFETENSORS_DTYPES[code])
            header_meta = f.metadata() or {}
            try:
                _check_parts(parts["basis"], parts.get("weights"), parts.get("singular_values"))
                meta = json.loads(header_meta.get(_META_KEY, "{}"))
                if not isinstance(meta, dict):
                    raise ValueError(f"metadata must be a JSON object, got {type(meta).__name__}")
                precision = header_meta.get(_PRECISION_KEY)
                if precision is not None and precision not in _PRECISIONS:
                    raise ValueError(
                        f"precision must be one of {', '.join(_PRECISIONS)}, got {precision!r}"
                    )
                return cls(
                    f.get_tensor("basis"),
                    f.get_tensor("weights") if "weights" in parts else None,
                    singular_values=f.get_tensor("singular_values")
                    if "singular_values" in parts
                    else None,
                    metadata=meta,
                    precision=None if precision is None else _PRECISIONS[precision],
                )
            except (TypeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
                raise ValueError(f"{path}: {e}") from e

    def __repr__(self) -> str:
        kind = "hard" if self.weights is None else "soft"
        made = "" if self.precision == self.basis.dtype else f", precision={self.precision}"
        return (
            f"ConceptSubspace(d={self.dim}, k={self.k}, {kind}, {self.basis.dtype}, "
            f"{self.basis.device}{made})"
        )
