"""The contract of ``ProjectedOptimizer`` (and ``ProjectedAdamW``) with every torch optimizer.

Part 1 is driven by torch's own registry of optimizers, ``optim_db``: for each
``OptimizerInfo`` and a few of its CPU constructor variants, the inner optimizer
is wrapped in update mode around a model with two protected same-shape weights
(``to_k``, ``to_v``: ``12 × 16`` sharing one basis ``U``, ``16 × 3``) and
unprotected ones (``out``: a weight and a bias), and after a few steps:

- the guarantee ``‖(W_T − W_0) U‖ ≤ 1e-6·‖W_0‖`` holds, and without the wrapper
  the same steps do move ``W`` along ``U`` (so the check is not vacuous);
- the unprotected parameters are bit-identical to the plain inner optimizer's
  (the loss is separable: their gradients never read the protected weights);
- ``state_dict`` → fresh model and optimizer → ``load_state_dict`` → continue
  equals the uninterrupted run bit for bit.

The rest covers the ``Optimizer`` protocol that trainers rely on (hooks,
closures, ``deepcopy``, ``pickle``) and the refusals: ``differentiable=True``
inner optimizers, ``param_groups`` rewritten behind the wrapper's back (ZeRO),
and state dicts that do not fit the parameters they are loaded into.
"""

from __future__ import annotations

import copy
import io
import pickle
import re

import pytest
import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

# torch's OptimizerInfo registry needs `expecttest` (a torch test dependency, pinned in
# requirements-ci.txt): without it this import fails the file rather than skip the suite.
from torch.testing._internal import common_optimizers

from gradproj import ProjectedAdamW, ProjectedOptimizer
from gradproj.drift import weight_drift

D, ROWS, K, OUT = 16, 12, 3, 5
STEPS = 6  # resumed after STEPS // 2
# fp32: the anchored projection leaves one rounding of W per step, ≈ 6e-8·‖W_0‖
# (tests/test_optim.py); a plain run of the same steps drifts ≥ 1e-3 here.
BOUND = 1e-6
# Variants per optimizer: every (optimizer, variant) pair is 3 short runs.
MAX_VARIANTS = 4


# ------------------------------------------------------------------ the models


class KV(nn.Module):
    """``to_k``, ``to_v`` (protected, ``12 × 16`` each) and an unprotected ``out``.

    The loss is separable: the ``(k·v)`` term reads only the protected weights and
    the ``out`` term only the unprotected ones, so an optimizer that treats every
    tensor on its own updates ``out`` identically with or without the wrapper.
    ``sparse=True`` makes the three layers ``nn.Embedding(sparse=True)`` with the
    same weight shapes (``SparseAdam`` takes only sparse gradients).
    """

    def __init__(self, seed: int = 0, sparse: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.sparse = sparse
        if sparse:
            self.to_k = nn.Embedding(ROWS, D, sparse=True)
            self.to_v = nn.Embedding(ROWS, D, sparse=True)
            self.out = nn.Embedding(ROWS, OUT, sparse=True)
        else:
            self.to_k = nn.Linear(D, ROWS, bias=False)
            self.to_v = nn.Linear(D, ROWS, bias=False)
            self.out = nn.Linear(D, OUT)

    def protected(self) -> list[nn.Parameter]:
        return [self.to_k.weight, self.to_v.weight]

    def unprotected(self) -> list[nn.Parameter]:
        return list(self.out.parameters())

    def loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, t, y = batch
        kv = (self.to_k(x) * self.to_v(x)).sum(-1)
        return (kv - t).pow(2).mean() + (self.out(x) - y).pow(2).mean()


def make_basis(seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(D, K, generator=gen, dtype=torch.float64))[0].float()


def make_data(
    n: int = STEPS, sparse: bool = False, seed: int = 2
) -> list[tuple[torch.Tensor, ...]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = (
            torch.randint(0, ROWS, (8,), generator=gen)
            if sparse
            else torch.randn(8, D, generator=gen)
        )
        out.append((x, torch.randn(8, generator=gen), torch.randn(8, OUT, generator=gen)))
    return out


def train(model: KV, opt: torch.optim.Optimizer, data, *, closure: bool = False) -> list:
    losses = []
    for batch in data:
        if closure:

            def step_closure(batch=batch):
                opt.zero_grad()
                loss = model.loss(batch)
                loss.backward()
                return loss

            losses.append(opt.step(step_closure))
        else:
            opt.zero_grad()
            model.loss(batch).backward()
            opt.step()
    return losses


def roundtrip(obj):
    """Through ``torch.save`` / ``torch.load(weights_only=True)``, as a checkpoint goes."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_same(a, b, where: str = "state_dict") -> None:
    """Nested dicts/lists of tensors and plain values are equal (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{where}: tensor vs {type(b).__name__}"
        assert a.shape == b.shape and a.dtype == b.dtype, f"{where}: {a.shape} vs {b.shape}"
        assert torch.equal(a, b), f"{where}: values differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {set(a)} vs {set(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def max_drift(model: KV, w0s: list[torch.Tensor], basis: torch.Tensor) -> float:
    return max(weight_drift(w, w0, basis) for w, w0 in zip(model.protected(), w0s, strict=True))


def assert_guarantee(model: KV, w0s: list[torch.Tensor], basis: torch.Tensor) -> None:
    for name, w, w0 in zip(("to_k", "to_v"), model.protected(), w0s, strict=True):
        assert not torch.equal(w, w0), f"{name} did not move: the check would be vacuous"
        drift = weight_drift(w, w0, basis)
        assert drift <= BOUND, f"{name}: ‖(W_T − W_0) U‖/‖W_0‖ = {drift:.3g}"


# ------------------------------------------------- part 1: every torch optimizer

OPTIM_INFOS = {info.optim_cls.__name__: info for info in common_optimizers.optim_db}


def _variants(info) -> list[tuple[str, dict]]:
    """At most ``MAX_VARIANTS`` CPU constructor variants, chosen deterministically.

    torch's own list (``optim_inputs_func``) plus its ``foreach``/``fused`` twins where
    they run on CPU; ``differentiable=True`` ones are left out (the wrapper refuses
    them: ``test_differentiable_inner_optimizer_is_refused``). The flag variants come
    first (one each), then the plain ones evenly spaced over torch's list.
    """
    inputs = common_optimizers._get_optim_inputs_including_global_cliquey_kwargs(
        "cpu", torch.float32, info, skip=("differentiable",)
    )
    variants = [(i.desc, i.kwargs) for i in inputs if not i.kwargs.get("capturable")]
    flagged = [v for v in variants if v[1].get("foreach") or v[1].get("fused")]
    plain = [v for v in variants if v not in flagged]
    picked = []
    for flag in ("fused", "foreach"):
        picked += [v for v in flagged if v[1].get(flag)][:1]
    n = MAX_VARIANTS - len(picked)
    if len(plain) <= n:
        picked += plain
    else:
        picked += [plain[round(i * (len(plain) - 1) / (n - 1))] for i in range(n)]
    return picked


def _case_id(name: str, desc: str) -> str:
    return f"{name}-" + re.sub(r"[^0-9A-Za-z]+", "_", desc).strip("_")


CASES = [
    pytest.param(name, desc, kwargs, id=_case_id(name, desc))
    for name, info in OPTIM_INFOS.items()
    for desc, kwargs in _variants(info)
]


def _is_sparse(name: str) -> bool:
    # SparseAdam takes only sparse gradients: the same model with nn.Embedding(sparse=True).
    return OPTIM_INFOS[name].only_supports_sparse_grads


def _needs_closure(name: str) -> bool:
    return OPTIM_INFOS[name].step_requires_closure


def _params(name: str, model: KV) -> list[nn.Parameter]:
    params = [*model.protected(), *model.unprotected()]
    if name == "Muon":  # Muon orthogonalizes matrices: 2-D parameters only
        params = [p for p in params if p.dim() == 2]
    return params


def _inner(name: str, model: KV, kwargs: dict) -> torch.optim.Optimizer:
    # deepcopy: a tensor lr must not be shared between the runs compared
    return OPTIM_INFOS[name].optim_cls(_params(name, model), **copy.deepcopy(kwargs))


def _wrapped(name: str, model: KV, kwargs: dict, basis: torch.Tensor) -> ProjectedOptimizer:
    bases = {w: basis for w in model.protected()}
    return ProjectedOptimizer(_inner(name, model, kwargs), bases, named_parameters=model)


def _data(name: str) -> list[tuple[torch.Tensor, ...]]:
    # LBFGS runs up to 20 closures per step over a growing history: 4 steps are plenty.
    return make_data(4 if name == "LBFGS" else STEPS, sparse=_is_sparse(name))


def _check_against_plain_run(name: str, kwargs: dict, closure: bool) -> None:
    sparse, basis = _is_sparse(name), make_basis()
    data = _data(name)
    plain = KV(sparse=sparse)
    w0s = [w.detach().clone() for w in plain.protected()]
    plain_losses = train(plain, _inner(name, plain, kwargs), data, closure=closure)
    along = [weight_drift(w, w0, basis) for w, w0 in zip(plain.protected(), w0s, strict=True)]
    assert min(along) > 10 * BOUND, f"the plain run hardly moves W along U ({along}): vacuous"

    model = KV(sparse=sparse)
    losses = train(model, _wrapped(name, model, kwargs, basis), data, closure=closure)
    assert_guarantee(model, w0s, basis)
    if closure:  # step(closure) returns the closure's loss, evaluated with grad
        assert all(isinstance(v, torch.Tensor) for v in losses)
        torch.testing.assert_close(losses[0], plain_losses[0], rtol=0, atol=0)
    if name == "LBFGS":
        # LBFGS steps along one direction over all parameters flattened together,
        # so projecting the protected part changes the rest's next steps too.
        return
    for i, (p, q) in enumerate(zip(model.unprotected(), plain.unprotected(), strict=True)):
        assert torch.equal(p, q), f"unprotected out parameter {i} differs from the plain run"


@pytest.mark.parametrize(("name", "desc", "kwargs"), CASES)
def test_update_mode_guarantee_and_unprotected_params_untouched(name, desc, kwargs):
    _check_against_plain_run(name, kwargs, closure=_needs_closure(name))


@pytest.mark.parametrize("name", list(OPTIM_INFOS))
def test_step_with_closure(name):
    """``step(closure)`` for every optimizer (its first variant): what Lightning calls."""
    _, kwargs = _variants(OPTIM_INFOS[name])[0]
    _check_against_plain_run(name, kwargs, closure=True)


@pytest.mark.parametrize(("name", "desc", "kwargs"), CASES)
def test_resume_is_exact(name, desc, kwargs):
    sparse, basis, closure = _is_sparse(name), make_basis(), _needs_closure(name)
    data = _data(name)
    at = len(data) // 2
    whole = KV(sparse=sparse)
    train(whole, _wrapped(name, whole, kwargs, basis), data, closure=closure)

    first = KV(sparse=sparse)
    opt = _wrapped(name, first, kwargs, basis)
    train(first, opt, data[:at], closure=closure)
    saved_model, saved_opt = roundtrip(first.state_dict()), roundtrip(opt.state_dict())

    resumed = KV(seed=99, sparse=sparse)  # other initial weights, replaced by the checkpoint
    resumed.load_state_dict(saved_model)
    opt2 = _wrapped(name, resumed, kwargs, basis.clone())
    opt2.load_state_dict(saved_opt)
    train(resumed, opt2, data[at:], closure=closure)
    for (n, p), q in zip(whole.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), f"{n}: the resumed run differs from the uninterrupted one"


def _differentiable_infos() -> list[str]:
    names = [n for n, info in OPTIM_INFOS.items() if "differentiable" in info.supported_impls]
    return names


@pytest.mark.parametrize("name", _differentiable_infos())
def test_differentiable_inner_optimizer_is_refused(name):
    """``differentiable=True`` inner steps build a graph through ``W``; the in-place
    projection after them would not be in it, so the wrapper refuses them."""
    model = KV()
    inner = OPTIM_INFOS[name].optim_cls(_params(name, model), differentiable=True)
    with pytest.raises(ValueError, match="differentiable"):
        ProjectedOptimizer(inner, {w: make_basis() for w in model.protected()})


def test_differentiable_sgd_is_refused():
    model = KV()
    inner = torch.optim.SGD(model.parameters(), lr=0.1, differentiable=True)
    with pytest.raises(ValueError, match="differentiable"):
        ProjectedOptimizer(inner, {model.to_k.weight: make_basis()})


# -------------------------------------------------------------- shared set-ups

OPTIMIZERS = ["wrapper", "projected_adamw"]


def make_optimizer(which: str, model: KV, basis: torch.Tensor, **kw) -> torch.optim.Optimizer:
    """AdamW inside the wrapper (update mode), or the fused ProjectedAdamW; names from model."""
    bases = {w: basis for w in model.protected()}
    if which == "projected_adamw":
        return ProjectedAdamW(
            kw.pop("params", model.parameters()),
            lr=1e-2,
            bases=bases,
            named_parameters=model,
        )
    inner = torch.optim.AdamW(kw.pop("params", model.parameters()), lr=1e-2)
    return ProjectedOptimizer(inner, bases, named_parameters=model, **kw)


def trained(which: str = "wrapper", steps: int = 3, seed: int = 0, **kw):
    """``(model, optimizer, W_0 of to_k and to_v, basis)`` after ``steps`` steps."""
    model, basis = KV(seed=seed), make_basis()
    w0s = [w.detach().clone() for w in model.protected()]
    opt = make_optimizer(which, model, basis, **kw)
    train(model, opt, make_data(steps))
    return model, opt, w0s, basis


# ------------------------------------------------------------------- 2: hooks


@pytest.mark.parametrize("which", OPTIMIZERS)
def test_state_dict_hooks_fire_once_and_post_hooks_can_edit(which):
    _, opt, _, _ = trained(which)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append(("pre", o)))

    def post_in_place(o, sd):
        calls.append(("post", o, "gradproj" in sd))
        sd["edited"] = 1

    opt.register_state_dict_post_hook(post_in_place)
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "replaced": 2})
    sd = opt.state_dict()
    assert calls == [("pre", opt), ("post", opt, True)]
    assert sd["edited"] == 1 and sd["replaced"] == 2 and "gradproj" in sd


@pytest.mark.parametrize("which", OPTIMIZERS)
def test_load_state_dict_hooks_fire_once_and_pre_hooks_can_edit(which):
    _, opt, _, _ = trained(which)
    sd = roundtrip(opt.state_dict())
    calls = []

    def pre(o, state_dict):
        calls.append(("pre", o))
        groups = [dict(g, lr=0.123) for g in state_dict["param_groups"]]
        return {**state_dict, "param_groups": groups}

    opt.register_load_state_dict_pre_hook(pre)
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("post", o)))
    opt.load_state_dict(sd)
    assert calls == [("pre", opt), ("post", opt)]
    assert opt.param_groups[0]["lr"] == 0.123


@pytest.mark.parametrize("which", OPTIMIZERS)
def test_global_step_hooks_fire_once_per_step_after_the_projection(which):
    """torch's global hooks run around ``Optimizer.step``; the inner optimizer's own
    ``step`` must not fire them a second time, and the post hook sees projected W."""
    model, basis = KV(), make_basis()
    w0s = [w.detach().clone() for w in model.protected()]
    opt = make_optimizer(which, model, basis)
    pre, post, drifts = [], [], []

    def post_hook(o, args, kwargs):
        post.append(o)
        drifts.append(max_drift(model, w0s, basis))

    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: pre.append(o)),
        register_optimizer_step_post_hook(post_hook),
    ]
    try:
        train(model, opt, make_data(3))
    finally:
        for h in handles:
            h.remove()
    assert len(pre) == 3 and all(o is opt for o in pre), [type(o).__name__ for o in pre]
    assert len(post) == 3 and all(o is opt for o in post), [type(o).__name__ for o in post]
    assert max(drifts) <= BOUND, drifts
    assert_guarantee(model, w0s, basis)


@pytest.mark.parametrize("which", OPTIMIZERS)
def test_instance_step_hooks_fire_once_per_step(which):
    model, basis = KV(), make_basis()
    w0s = [w.detach().clone() for w in model.protected()]
    opt = make_optimizer(which, model, basis)
    pre, post = [], []
    opt.register_step_pre_hook(lambda o, a, k: pre.append(o))
    opt.register_step_post_hook(lambda o, a, k: post.append(max_drift(model, w0s, basis)))
    train(model, opt, make_data(3))
    assert len(pre) == 3 and all(o is opt for o in pre)
    assert len(post) == 3 and max(post) <= BOUND, post


# ------------------------------------------------------------------- 3: LBFGS


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
@pytest.mark.parametrize("mode", ["update", "grad"])
def test_lbfgs_with_closure(mode, line_search_fn):
    """In grad mode every gradient LBFGS evaluates inside ``step`` must be projected
    (its direction is a combination of them); in update mode the step is."""
    model, basis = KV(), make_basis()
    w0s = [w.detach().clone() for w in model.protected()]
    inner = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5, line_search_fn=line_search_fn)
    opt = ProjectedOptimizer(inner, {w: basis for w in model.protected()}, mode=mode)
    losses = train(model, opt, make_data(4), closure=True)
    assert all(isinstance(v, torch.Tensor) and torch.isfinite(v) for v in losses)
    assert_guarantee(model, w0s, basis)


# -------------------------------------------------------- 4: deepcopy, pickle


@pytest.mark.parametrize("which", OPTIMIZERS)
def test_deepcopy_keeps_the_protection(which):
    model, opt, w0s, basis = trained(which)
    anchors = copy.deepcopy(opt.state_dict()["gradproj"]["anchors"])
    assert anchors, "no anchors after 3 steps"
    model2, opt2 = copy.deepcopy((model, opt))
    assert opt2.param_groups[0]["params"][0] is model2.to_k.weight  # the pair mapped together
    assert_same(opt2.state_dict()["gradproj"]["anchors"], anchors, "copy's anchors")

    before = [p.detach().clone() for p in model.parameters()]
    train(model2, opt2, make_data(4, seed=5))
    assert_guarantee(model2, w0s, basis)
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b), "stepping the copy moved the original"
    train(model, opt, make_data(2, seed=6))
    assert_guarantee(model, w0s, basis)


@pytest.mark.parametrize("which", OPTIMIZERS)
def test_pickle_drops_hooks_and_keeps_the_protection(which):
    model, opt, w0s, basis = trained(which)
    fired = []
    opt.register_step_post_hook(lambda o, a, k: fired.append("step"))
    opt.register_state_dict_pre_hook(lambda o: fired.append("state_dict"))
    opt.register_load_state_dict_post_hook(lambda o: fired.append("load"))
    anchors = copy.deepcopy(opt.state_dict()["gradproj"]["anchors"])
    fired.clear()

    model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert type(opt2) is type(opt)
    assert_same(opt2.state_dict()["gradproj"]["anchors"], anchors, "unpickled anchors")
    train(model2, opt2, make_data(3, seed=5))
    assert_guarantee(model2, w0s, basis)
    assert fired == [], "hooks of the pickled optimizer fired on the unpickled one"


# --------------------------------------------- 6: param_groups rewritten (ZeRO)


def _flatten_groups(opt: torch.optim.Optimizer, model: KV) -> None:
    """What ZeRO stage 1/2 does: one flat fp32 tensor in place of the parameters."""
    flat = torch.cat([p.detach().flatten() for p in model.parameters()]).requires_grad_()
    flat.grad = torch.randn_like(flat)
    opt.param_groups[0]["params"] = [flat]


def _clone_groups(opt: torch.optim.Optimizer, model: KV) -> None:
    """Another framework's copies of the parameters, in the inner optimizer's groups."""
    inner = getattr(opt, "optimizer", opt)
    groups = []
    for g in inner.param_groups:
        params = [p.detach().clone().requires_grad_() for p in g["params"]]
        for p in params:
            p.grad = torch.randn_like(p)
        groups.append({**g, "params": params})
    inner.param_groups = groups


@pytest.mark.parametrize("rewrite", [_flatten_groups, _clone_groups], ids=["flat", "clones"])
@pytest.mark.parametrize("which", OPTIMIZERS)
def test_param_groups_rewritten_after_wrapping_is_an_error(which, rewrite):
    model, opt, _, _ = trained(which)
    model.loss(make_data(1)[0]).backward()
    rewrite(opt, model)
    groups_before = [[p.detach().clone() for p in g["params"]] for g in opt.param_groups]
    model_before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"param_groups") as info:
        opt.step()
    assert "to_k.weight" in str(info.value), str(info.value)
    for p, b in zip(model.parameters(), model_before, strict=True):
        assert torch.equal(p, b), "the failed step moved a model parameter"
    for g, before in zip(opt.param_groups, groups_before, strict=True):
        for p, b in zip(g["params"], before, strict=True):
            assert torch.equal(p, b), "the failed step moved a tensor of param_groups"
    # Saving would silently leave the lost weights' anchors out; loading would drop them.
    with pytest.raises(RuntimeError, match=r"to_k\.weight.*no state dict was made"):
        opt.state_dict()
    with pytest.raises(RuntimeError, match=r"to_k\.weight.*nothing was loaded"):
        opt.load_state_dict(_checkpoint(which)[1])


# ---------------------------------------------- 7: loading what does not fit


def _checkpoint(which: str = "wrapper"):
    """``(model state, optimizer state)`` after 3 steps, through torch.save/load."""
    model, opt, _, _ = trained(which)
    return roundtrip(model.state_dict()), roundtrip(opt.state_dict())


def _resumed(which: str, saved_model, saved_opt, **kw):
    """A fresh model with the checkpoint's weights and an optimizer that loaded its state."""
    model = KV(seed=99)
    model.load_state_dict(saved_model)
    opt = make_optimizer(which, model, make_basis(), **kw)
    opt.load_state_dict(saved_opt)
    return model, opt


def _index_of(sd: dict, name: str) -> int:
    return {n: i for i, n in sd["gradproj"]["names"].items()}[name]


@pytest.mark.parametrize("which", OPTIMIZERS)
def test_resume_with_parameters_in_another_order_is_an_error(which):
    saved_model, saved_opt = _checkpoint(which)
    model = KV(seed=99)
    model.load_state_dict(saved_model)
    swapped = [model.to_v.weight, model.to_k.weight, *model.unprotected()]
    opt = make_optimizer(which, model, make_basis(), params=swapped)
    train(model, opt, make_data(2, seed=7))  # some state and anchors of its own
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError) as info:
        opt.load_state_dict(saved_opt)
    message = str(info.value)
    assert "to_k.weight" in message and "to_v.weight" in message, message
    assert_same(opt.state_dict(), before, "after the failed load")


@pytest.mark.parametrize("which", OPTIMIZERS)
def test_state_dict_without_gradproj_section_warns(which):
    saved_model, saved_opt = _checkpoint(which)
    del saved_opt["gradproj"]
    with pytest.warns(UserWarning, match="gradproj"):
        _resumed(which, saved_model, saved_opt)


def _swap(sd):
    anchors = sd["gradproj"]["anchors"]
    k, v = _index_of(sd, "to_k.weight"), _index_of(sd, "to_v.weight")
    anchors[k], anchors[v] = anchors[v], anchors[k]


def _zero(sd):
    c = sd["gradproj"]["anchors"][_index_of(sd, "to_v.weight")]
    c.zero_()


def _nan(sd):
    c = sd["gradproj"]["anchors"][_index_of(sd, "to_v.weight")]
    c[1, 0] = float("nan")


def _shape(sd):
    i = _index_of(sd, "to_v.weight")
    sd["gradproj"]["anchors"][i] = sd["gradproj"]["anchors"][i][:-1]


TAMPER = {"swapped": (_swap, r"to_[kv]\.weight"), "zeroed": (_zero, r"to_v\.weight")}
TAMPER |= {"nan": (_nan, r"to_v\.weight"), "shape": (_shape, r"to_v\.weight")}


def _no_bases(sd):
    del sd["gradproj"]["bases"]


def _anchors_as_lists(sd):
    sd["gradproj"]["anchors"] = {i: c.tolist() for i, c in sd["gradproj"]["anchors"].items()}


def _section_as_list(sd):
    sd["gradproj"] = list(sd["gradproj"].items())


# The campaign's repros: `KeyError: 'bases'`, `AttributeError: 'list' object has no attribute 'to'`.
TAMPER |= {
    "no-bases": (_no_bases, "no 'bases' entry"),
    "anchor-list": (_anchors_as_lists, r"to_[kv]\.weight.* must be a floating-point tensor"),
    "section-list": (_section_as_list, "section must be a dict"),
}


@pytest.mark.parametrize("how", list(TAMPER))
@pytest.mark.parametrize("which", OPTIMIZERS)
def test_tampered_or_malformed_sections_are_refused_and_nothing_changes(which, how):
    tamper, name = TAMPER[how]
    saved_model, saved_opt = _checkpoint(which)
    _, opt = _resumed(which, saved_model, saved_opt)  # the untouched state dict loads
    before = copy.deepcopy(opt.state_dict())
    bad = copy.deepcopy(saved_opt)
    tamper(bad)
    with pytest.raises(ValueError, match=name):
        opt.load_state_dict(bad)
    assert_same(opt.state_dict(), before, "after the failed load")


@pytest.mark.parametrize("which", OPTIMIZERS)
def test_optimizer_state_loaded_into_other_weights_is_refused(which):
    """The anchor says ``rows(W) U`` at save time; a model whose weights are not the
    checkpoint's (here: another initialization) does not match it."""
    _, saved_opt = _checkpoint(which)
    model = KV(seed=123)
    opt = make_optimizer(which, model, make_basis())
    with pytest.raises(ValueError, match="anchor"):
        opt.load_state_dict(saved_opt)


# ------------------------------------------------------------------- 8: names


class Named(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pre = nn.Linear(D, D)
        self.lin = nn.Linear(D, ROWS)


@pytest.mark.parametrize("named", [False, True], ids=["positional", "named"])
def test_messages_and_state_dict_name_the_parameter(named):
    model = Named()
    expected = "lin.weight" if named else r"param_groups[0]['params'][2]"
    extra = {"named_parameters": model} if named else {}

    def opt_for(basis):
        inner = torch.optim.SGD(model.parameters(), lr=0.1)
        return ProjectedOptimizer(inner, {model.lin.weight: basis}, **extra)

    sd = opt_for(make_basis()).state_dict()
    assert list(sd["gradproj"]["names"].values()) == [expected]
    with pytest.raises(ValueError) as info:
        opt_for(make_basis(seed=7)).load_state_dict(sd)
    assert expected in str(info.value), str(info.value)


def test_diffusers_protect_carries_the_module_names():
    """``gradproj.diffusers.protect`` returns a mapping that knows the names, so no
    ``named_parameters=`` is needed for messages to name e.g. ``…attn2.to_k.weight``."""
    pytest.importorskip("diffusers")
    from gradproj import diffusers as gd

    from .test_integrations_diffusers import _subspace, _unet

    unet = _unet()
    expected = {
        n
        for n, _ in unet.named_parameters()
        if n.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))
    }
    bases = gd.protect(unet, _subspace(16))
    sd = ProjectedOptimizer(torch.optim.SGD(unet.parameters(), lr=0.1), bases).state_dict()
    assert set(sd["gradproj"]["names"].values()) == expected
    other = gd.protect(unet, _subspace(16, seed=1))
    with pytest.raises(ValueError, match=r"attn2\.to_[kv]\.weight") as info:
        ProjectedOptimizer(torch.optim.SGD(unet.parameters(), lr=0.1), other).load_state_dict(sd)
    assert any(n in str(info.value) for n in expected), str(info.value)
