"""Reference MAML implementations ("anchors") for the distmeta benchmark.

Each anchor runs the same meta-training iteration on the same model with a
third-party meta-learning library, used the way that library's own MAML
documentation/examples use it:

* ``learn2learn`` -- ``l2l.algorithms.MAML(model, lr, first_order)``, then per
  task ``clone()`` / ``adapt()`` and ``backward()`` of the query loss.
* ``torchopt``    -- second order: ``torchopt.MetaSGD`` on the module with
  ``extract_state_dict`` / ``recover_state_dict`` around each task (its MAML
  example). ``MetaSGD.step`` always differentiates through the inner
  gradient, so first order uses torchopt's functional API instead
  (``torchopt.sgd`` + ``torchopt.apply_updates`` over a parameter tuple, with
  the inner gradient taken without ``create_graph``).
* ``higher``      -- ``higher.innerloop_ctx(model, torch.optim.SGD(...),
  copy_initial_weights=False)`` per task; first order passes a
  ``grad_callback`` that detaches the inner gradients.

All anchors average the meta-gradient over the tasks of the meta-batch (the
query loss of each task is a mean over its examples) and take one
``torch.optim.Adam(lr=1e-3)`` step on the meta-parameters.

The libraries are optional benchmark extras (install them with
``bench/install_anchors.sh``); nothing here is imported by distmeta, and
importing this module does not import any anchor.

Public API: ``ANCHORS``, ``available_anchors``, ``OmniglotConv4``,
``build_model``, ``make_anchor`` (returns an ``AnchorStep``),
``anchor_meta_gradient``.
Run ``python bench/anchors.py`` for a timing + gradient-agreement sanity check.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import statistics
import time
import warnings
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ANCHORS",
    "AnchorStep",
    "OmniglotConv4",
    "anchor_meta_gradient",
    "available_anchors",
    "build_model",
    "make_anchor",
]

ANCHORS: tuple[str, ...] = ("learn2learn", "torchopt", "higher")
META_LR = 1e-3


# --------------------------------------------------------------------------
# shared model
# --------------------------------------------------------------------------
class OmniglotConv4(nn.Module):
    """MAML's Omniglot conv4: 4 x [conv3x3 stride 2 (64), BN, ReLU], spatial
    mean, linear head. BatchNorm always normalises with the batch statistics
    (``track_running_stats=False``), as in MAML."""

    def __init__(self, n_way: int, in_channels: int = 1, hidden: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(4):
            layers += [
                nn.Conv2d(channels, hidden, 3, stride=2, padding=1),
                nn.BatchNorm2d(hidden, affine=True, track_running_stats=False),
                nn.ReLU(),
            ]
            channels = hidden
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(hidden, n_way)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


def build_model(
    n_way: int, seed: int = 0, params: Mapping[str, Tensor] | None = None
) -> OmniglotConv4:
    """The shared model with PyTorch's default init drawn after
    ``torch.manual_seed(seed)`` (the caller's RNG state is left untouched),
    or with ``params`` copied in (names as in ``named_parameters()``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = OmniglotConv4(n_way)
    if params is not None:
        missing = set(dict(model.named_parameters())) - set(params)
        if missing:
            raise KeyError(f"params lacks {sorted(missing)}")
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(params[name])
    return model


# --------------------------------------------------------------------------
# anchor libraries (optional imports)
# --------------------------------------------------------------------------
def _import_anchor(name: str):
    if name not in ANCHORS:
        raise ValueError(f"unknown anchor {name!r}; expected one of {ANCHORS}")
    # learn2learn imports gym, which prints an "unmaintained" notice on stderr
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        return importlib.import_module(name)


def _importable(name: str) -> bool:
    try:
        _import_anchor(name)
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        return False
    return True


def available_anchors() -> list[str]:
    """The anchors whose library imports in this environment."""
    return [name for name in ANCHORS if _importable(name)]


# --------------------------------------------------------------------------
# one meta-batch: accumulate the task-averaged meta-gradient into .grad
# --------------------------------------------------------------------------
# Each backward function takes (support_x, support_y, query_x, query_y), adds
# the meta-gradient averaged over the T tasks to the .grad of the model's
# meta-parameters, and returns the mean query loss (float).
_MetaBackward = Callable[[Tensor, Tensor, Tensor, Tensor], float]


def _learn2learn_backward(
    model: nn.Module, inner_lr: float, inner_steps: int, first_order: bool
) -> tuple[nn.Module, _MetaBackward]:
    l2l = _import_anchor("learn2learn")
    maml = l2l.algorithms.MAML(model, lr=inner_lr, first_order=first_order)

    def meta_backward(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> float:
        n_tasks = sx.shape[0]
        total = 0.0
        for t in range(n_tasks):
            learner = maml.clone()
            for _ in range(inner_steps):
                learner.adapt(F.cross_entropy(learner(sx[t]), sy[t]))
            query_loss = F.cross_entropy(learner(qx[t]), qy[t])
            query_loss.backward()
            total += query_loss.item()
        # learn2learn's examples average the summed gradients afterwards
        for p in maml.parameters():
            if p.grad is not None:
                p.grad.mul_(1.0 / n_tasks)
        return total / n_tasks

    # the meta-optimizer gets maml.parameters(), as in learn2learn's examples
    # (these are the very Parameters of `model`)
    return maml, meta_backward


def _torchopt_backward(
    model: nn.Module, inner_lr: float, inner_steps: int, first_order: bool
) -> tuple[nn.Module, _MetaBackward]:
    torchopt = _import_anchor("torchopt")

    if not first_order:
        # torchopt's MAML example: a differentiable MetaSGD stepping the module
        # in place; the module's (meta-)state is restored after each task.
        inner_opt = torchopt.MetaSGD(model, lr=inner_lr)
        net_state = torchopt.extract_state_dict(model, by="reference", detach_buffers=True)
        opt_state = torchopt.extract_state_dict(inner_opt, by="reference")

        def meta_backward(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> float:
            n_tasks = sx.shape[0]
            total = 0.0
            for t in range(n_tasks):
                for _ in range(inner_steps):
                    inner_opt.step(F.cross_entropy(model(sx[t]), sy[t]))
                query_loss = F.cross_entropy(model(qx[t]), qy[t])
                (query_loss / n_tasks).backward()
                total += query_loss.item()
                torchopt.recover_state_dict(model, net_state)
                torchopt.recover_state_dict(inner_opt, opt_state)
            return total / n_tasks

        return model, meta_backward

    # First order: torchopt's functional API. The inner gradient is taken
    # without create_graph, so the query loss reaches the meta-parameters only
    # through the identity path of apply_updates (FOMAML).
    from torch.func import functional_call

    inner = torchopt.sgd(lr=inner_lr)
    names = [n for n, _ in model.named_parameters()]

    def meta_backward(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> float:
        n_tasks = sx.shape[0]
        total = 0.0
        for t in range(n_tasks):
            params = tuple(p for _, p in model.named_parameters())
            state = inner.init(params)
            for _ in range(inner_steps):
                loss = F.cross_entropy(functional_call(model, dict(zip(names, params)), (sx[t],)), sy[t])
                grads = torch.autograd.grad(loss, params)
                updates, state = inner.update(grads, state, params=params, inplace=False)
                params = torchopt.apply_updates(params, updates, inplace=False)
            query_loss = F.cross_entropy(functional_call(model, dict(zip(names, params)), (qx[t],)), qy[t])
            (query_loss / n_tasks).backward()
            total += query_loss.item()
        return total / n_tasks

    return model, meta_backward


def _higher_backward(
    model: nn.Module, inner_lr: float, inner_steps: int, first_order: bool
) -> tuple[nn.Module, _MetaBackward]:
    higher = _import_anchor("higher")
    inner_opt = torch.optim.SGD(model.parameters(), lr=inner_lr)
    # higher's documented hook for gradient post-processing; detaching the
    # inner gradients gives first-order MAML (track_higher_grads=False would
    # instead cut the fast weights off the meta-parameters entirely).
    grad_callback = (lambda grads: [None if g is None else g.detach() for g in grads]) if first_order else None

    def meta_backward(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> float:
        n_tasks = sx.shape[0]
        total = 0.0
        for t in range(n_tasks):
            with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
                for _ in range(inner_steps):
                    diffopt.step(F.cross_entropy(fnet(sx[t]), sy[t]), grad_callback=grad_callback)
                query_loss = F.cross_entropy(fnet(qx[t]), qy[t])
                (query_loss / n_tasks).backward()
                total += query_loss.item()
        return total / n_tasks

    return model, meta_backward


_BACKWARDS = {
    "learn2learn": _learn2learn_backward,
    "torchopt": _torchopt_backward,
    "higher": _higher_backward,
}


# --------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------
class AnchorStep:
    """One full meta-training iteration with an anchor library. Call it with
    ``(support_x, support_y, query_x, query_y)``; returns the mean query loss.
    ``model`` holds the meta-parameters, ``optimizer`` is the Adam on them."""

    def __init__(self, name: str, model: nn.Module, meta_module: nn.Module, meta_backward: _MetaBackward) -> None:
        self.name = name
        self.model = model
        self._meta_backward = meta_backward
        self.optimizer = torch.optim.Adam(meta_module.parameters(), lr=META_LR)

    def __call__(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> float:
        self.optimizer.zero_grad()
        loss = self._meta_backward(support_x, support_y, query_x, query_y)
        self.optimizer.step()
        return loss

    def __repr__(self) -> str:
        return f"AnchorStep({self.name!r})"


def make_anchor(
    name: str,
    n_way: int,
    inner_lr: float,
    inner_steps: int,
    first_order: bool,
    seed: int = 0,
    params: Mapping[str, Tensor] | None = None,
) -> Callable[[Tensor, Tensor, Tensor, Tensor], float]:
    """A function running ONE meta-training iteration of MAML with anchor
    ``name`` on a fresh ``OmniglotConv4`` (seeded with ``seed``, or loaded
    from ``params``).

    Inputs: ``support_x (T, N*K, 1, 28, 28) float32``, ``support_y (T, N*K)
    int64``, ``query_x (T, N*Q, 1, 28, 28)``, ``query_y (T, N*Q)``. Adapts on
    each task's support set (``inner_steps`` SGD steps of ``inner_lr``),
    averages the query-loss meta-gradient over the T tasks, takes one
    ``Adam(lr=1e-3)`` step and returns the mean query loss. The returned object
    (an ``AnchorStep``) also exposes ``.model`` and ``.optimizer``.
    """
    if name not in _BACKWARDS:
        raise ValueError(f"unknown anchor {name!r}; expected one of {ANCHORS}")
    model = build_model(n_way, seed, params)
    meta_module, meta_backward = _BACKWARDS[name](model, inner_lr, inner_steps, first_order)
    return AnchorStep(name, model, meta_module, meta_backward)


def anchor_meta_gradient(
    name: str,
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
    n_way: int,
    inner_lr: float,
    inner_steps: int,
    first_order: bool,
    seed: int = 0,
    params: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """The task-averaged meta-gradient that anchor ``name`` computes at the
    first iteration (no optimizer step), keyed by ``OmniglotConv4``'s
    parameter names (``features.0.weight``, ..., ``classifier.bias``). The
    model is seeded with ``seed`` (same init as ``make_anchor``/``build_model``)
    or loaded from ``params``."""
    if name not in _BACKWARDS:
        raise ValueError(f"unknown anchor {name!r}; expected one of {ANCHORS}")
    model = build_model(n_way, seed, params)
    _, meta_backward = _BACKWARDS[name](model, inner_lr, inner_steps, first_order)
    model.zero_grad(set_to_none=True)
    meta_backward(support_x, support_y, query_x, query_y)
    return {
        n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in model.named_parameters()
    }


# --------------------------------------------------------------------------
# sanity check: timings + gradient agreement
# --------------------------------------------------------------------------
def _random_tasks(
    n_tasks: int, n_way: int, k_shot: int, n_query: int, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    support_x = torch.randn(n_tasks, n_way * k_shot, 1, 28, 28, generator=g)
    query_x = torch.randn(n_tasks, n_way * n_query, 1, 28, 28, generator=g)
    support_y = torch.arange(n_way).repeat_interleave(k_shot).expand(n_tasks, -1).contiguous()
    query_y = torch.arange(n_way).repeat_interleave(n_query).expand(n_tasks, -1).contiguous()
    return support_x, support_y, query_x, query_y


def _relative_error(grad: Mapping[str, Tensor], ref: Mapping[str, Tensor]) -> tuple[float, float, list[str]]:
    """(global, per-parameter, skipped): global = ||grad - ref|| / ||ref|| over
    all parameters; per-parameter = max over parameters of
    ||grad_p - ref_p|| / ||ref_p||, skipping parameters whose reference
    gradient is below 1e-6 of the total. Those are the conv biases: each conv
    is followed by BatchNorm, which cancels the bias, so their exact gradient
    is 0 and what is computed is rounding noise (~1e-7)."""
    total = torch.sqrt(sum(r.double().square().sum() for r in ref.values())).item()
    diff = torch.sqrt(sum((grad[n] - ref[n]).double().square().sum() for n in ref)).item()
    per_param, skipped = 0.0, []
    for n, r in ref.items():
        if r.norm().item() <= 1e-6 * total:
            skipped.append(n)
            continue
        per_param = max(per_param, (grad[n] - r).norm().item() / r.norm().item())
    return diff / max(total, 1e-30), per_param, skipped


def _time_anchors(names: list[str], n_tasks: int, queries: list[int], iters: int) -> None:
    """Print median meta-iterations/s per anchor, T tasks, 5-way 1-shot,
    second order, 1 inner step, inner_lr 0.4 (1 warm-up, ``iters`` timed)."""
    n_way, k_shot, inner_lr, inner_steps = 5, 1, 0.4, 1
    # the numbers mean little if something else is using the CPUs meanwhile
    print(f"load average before timing: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"meta-iterations/s (median of {iters} after 1 warm-up), T={n_tasks}, {n_way}-way "
          f"{k_shot}-shot, second order, {inner_steps} inner step, inner_lr {inner_lr}")
    print(f"{'anchor':12s}" + "".join(f"{f'Q={q}':>10s}" for q in queries))
    for name in names:
        row = f"{name:12s}"
        for q in queries:
            data = _random_tasks(n_tasks, n_way, k_shot, q, seed=1)
            step = make_anchor(name, n_way, inner_lr, inner_steps, first_order=False, seed=0)
            step(*data)  # warm-up
            times = []
            for _ in range(iters):
                t0 = time.perf_counter()
                step(*data)
                times.append(time.perf_counter() - t0)
            row += f"{1.0 / statistics.median(times):10.3f}"
        print(row, flush=True)


def _check_gradients(names: list[str]) -> bool:
    """All anchors must give the same first-iteration meta-gradient (same
    seed, same data) up to 1e-4 relative error; prints the comparison."""
    n_way, k_shot, inner_lr = 5, 1, 0.4
    data = _random_tasks(3, n_way, k_shot, 15, seed=2)
    ref_name, ok, skipped = names[0], True, []
    for first_order in (False, True):
        for steps in (1, 2):
            grads = {
                n: anchor_meta_gradient(n, *data, n_way=n_way, inner_lr=inner_lr,
                                        inner_steps=steps, first_order=first_order, seed=0)
                for n in names
            }
            ref = grads[ref_name]
            label = f"{'first' if first_order else 'second'} order, {steps} inner step{'s' * (steps > 1)}"
            for other in names[1:]:
                err, err_param, skipped = _relative_error(grads[other], ref)
                good = max(err, err_param) <= 1e-4
                ok &= good
                print(f"{label}: {other} vs {ref_name}: relative error {err:.1e} (whole gradient), "
                      f"{err_param:.1e} (worst parameter)  {'OK' if good else 'MISMATCH'}")
            if not first_order:
                # second order must differ from first order, else the
                # second-order terms were silently dropped
                fo = anchor_meta_gradient(ref_name, *data, n_way=n_way, inner_lr=inner_lr,
                                          inner_steps=steps, first_order=True, seed=0)
                print(f"{label}: ({ref_name}: second vs first order differ by "
                      f"{_relative_error(fo, ref)[0]:.1e})")
    if skipped:
        print(f"(worst-parameter errors skip {', '.join(skipped)}: exact gradient 0, "
              "conv bias before BatchNorm)")
    return ok


def _main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="anchor timings + gradient agreement check")
    parser.add_argument("--tasks", type=int, default=32, help="meta-batch size T for the timings")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations (after 1 warm-up)")
    parser.add_argument("--queries", type=int, nargs="+", default=[15, 1])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-timing", action="store_true", help="only the gradient check")
    parser.add_argument("--no-grad-check", action="store_true", help="only the timings")
    parser.add_argument("--anchors", nargs="+", choices=ANCHORS, default=list(ANCHORS))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    names = [n for n in available_anchors() if n in args.anchors]
    missing = [n for n in args.anchors if n not in names]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; anchors: {names}"
          + (f" (not importable: {missing})" if missing else ""))
    if not names:
        raise SystemExit("no anchor installed: run bench/install_anchors.sh")

    if not args.no_timing:
        print()
        _time_anchors(names, args.tasks, args.queries, args.iters)

    if args.no_grad_check:
        return
    print()
    if len(names) < 2:
        print("gradient agreement: needs at least two anchors")
        return
    ok = _check_gradients(names)
    print("gradient agreement:", "PASS" if ok else "FAIL")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    _main()
