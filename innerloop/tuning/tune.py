"""``tune``: gradient descent on the hyperparameters of a training run, on the run skeleton.

Each outer step trains (:class:`~innerloop.tuning.hypergradient.TrainingRun`), takes the
hypergradient of the validation loss (:func:`~innerloop.tuning.hypergradient.unrolled` or
:func:`~innerloop.tuning.hypergradient.implicit`) and moves the raw hyperparameters with Adam. The
outer loop is :func:`innerloop.training.loop.run_loop`: resume from ``last.pt`` (the hyperparameters,
Adam's state, the warm-start weights and the validation history are the checkpointed module's
state), atomic checkpoints, the loggers and the progress bar. :class:`TuneConfig` is ``innerloop tune
--config F``'s config; :func:`run_tune` runs one and writes ``results.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from innerloop.io import atomic_write_text
from innerloop.training.config import ConfigError, apply_overrides, from_dict, read_config_file
from innerloop.training.loggers import LOGGER_NAMES, Logger
from innerloop.training.loop import Schedule, run_loop
from innerloop.tuning.hypergradient import (
    GRANULARITIES,
    Hyper,
    Hypergradient,
    TrainingRun,
    implicit,
    mean_loss,
    unrolled,
)

METHODS = ("unrolled", "implicit")
PROBLEMS = ("ridge", "groups", "noisy_labels")


class _State(nn.Module):
    """What a tuning run checkpoints: the raw hyperparameters (parameters), the warm-start weights
    and the validation loss of every outer step so far (buffers)."""

    history: Tensor
    warm: Tensor

    def __init__(self, hyper: Hyper, init: Mapping[str, Tensor], outer_steps: int) -> None:
        super().__init__()
        self.keys, self.names = list(hyper.tensors), list(init)
        self.raw = nn.ParameterList([nn.Parameter(t.detach().clone()) for t in hyper.tensors.values()])
        for i, t in enumerate(init.values()):
            self.register_buffer(f"w{i}", t.detach().clone())
        ref = next(iter(init.values()))
        history = torch.full((outer_steps,), math.nan, dtype=torch.float64, device=ref.device)
        self.register_buffer("history", history)
        self.register_buffer("warm", torch.zeros((), dtype=torch.bool, device=ref.device))

    def tensors(self) -> dict[str, Tensor]:
        return dict(zip(self.keys, [p for p in self.raw], strict=True))

    def weights(self) -> dict[str, Tensor]:
        return {n: getattr(self, f"w{i}") for i, n in enumerate(self.names)}

    def set_weights(self, params: Mapping[str, Tensor]) -> None:
        for i, n in enumerate(self.names):
            getattr(self, f"w{i}").copy_(params[n])
        self.warm.fill_(True)


@dataclass(frozen=True)
class TuneResult:
    """What :func:`tune` ends with.

    Attributes:
        hyper: the tuned hyperparameters.
        history: the validation loss at every outer step (at the run's end point, before that step's
            update), ``[outer_steps]``.
        inner_steps, hvps: compute per outer step (SGD steps; Hessian-vector products).
        compute: inner-step equivalents of the whole tuning, ``outer_steps * (inner_steps + 2 hvps)``
            (a Hessian-vector product by reverse over reverse costs about two gradients).
        wall_time_s: the outer loop's wall time (summed over resumes).
    """

    hyper: Hyper
    history: list[float]
    inner_steps: int
    hvps: int
    compute: float
    wall_time_s: float


def step_compute(inner_steps: int, hvps: int) -> float:
    """Inner-step equivalents of one outer step: a Hessian-vector product counts as two gradients."""
    return float(inner_steps + 2 * hvps)


def tune(
    run: TrainingRun, val_x: Tensor, val_y: Tensor, hyper: Hyper, *, method: str = "implicit",
    outer_steps: int = 50, outer_lr: float = 0.05, truncate: int | None = None, solver: str = "cg",
    terms: int = 20, alpha: float | None = None, warm_start: bool | None = None,
    run_dir: str | Path | None = None, resume: bool = True, progress: bool = True,
    loggers: Sequence[str | Logger] = ("jsonl",), identity: dict[str, Any] | None = None,
    run_config: Mapping[str, Any] | None = None, log_every: int = 1, checkpoint_every: int | None = None,
) -> TuneResult:
    """Tune ``hyper`` by Adam (``outer_lr``) on its hypergradient for ``outer_steps`` outer steps.

    Args:
        run: the training run (model, initial parameters, training set ``[n_train, ...]``, steps, batches).
        val_x: the validation inputs ``[n_val, ...]``: the outer objective is the mean loss on them.
        val_y: the validation targets ``[n_val, ...]``.
        hyper: the starting hyperparameters (:meth:`Hyper.create`).
        method: ``unrolled`` (``truncate``: the steps differentiated, None: all) or ``implicit``
            (``solver`` ``cg`` / ``neumann`` with ``terms`` Hessian-vector products and Neumann step
            ``alpha``).
        warm_start: each outer step's run starts where the previous one ended (the online scheme of
            Lorraine et al. 2020; default: on for ``implicit``, off for ``unrolled``, whose runs then
            all start from ``run.init``).
        run_dir: as :func:`innerloop.training.loop.run_loop` (``last.pt``, ``metrics.jsonl`` in it).
        resume: as :func:`~innerloop.training.loop.run_loop`.
        progress: as :func:`~innerloop.training.loop.run_loop`.
        loggers: as :func:`~innerloop.training.loop.run_loop`.
        run_config: as :func:`~innerloop.training.loop.run_loop`.
        log_every: as :func:`~innerloop.training.loop.run_loop`.
        checkpoint_every: as :func:`~innerloop.training.loop.run_loop`.
        identity: what a resumed checkpoint must match (default: the method's settings).

    Refused before any work: an unknown method or solver, ``outer_steps < 1``, ``outer_lr <= 0``,
    and what :func:`unrolled` / :func:`implicit` refuse (a learning rate with ``implicit``).
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is unknown: choose one of {list(METHODS)}.")
    if outer_steps < 1:
        raise ValueError(f"outer_steps must be >= 1, got {outer_steps}.")
    if not outer_lr > 0:
        raise ValueError(f"outer_lr must be > 0, got {outer_lr}.")
    warm = method == "implicit" if warm_start is None else warm_start

    def hypergradient(h: Hyper, start: dict[str, Tensor] | None) -> Hypergradient:
        if method == "unrolled":
            return unrolled(run, h, val_x, val_y, truncate=truncate, start=start)
        return implicit(run, h, val_x, val_y, method=solver, terms=terms, alpha=alpha,  # type: ignore[arg-type]
                        start=start)

    # the refusals of the methods, before any work: one cheap check on a one-step run
    check = dataclasses.replace(run, steps=1)
    if method == "unrolled":
        if truncate is not None and not 1 <= truncate <= run.steps:  # before the one-step check, which has 1 step
            raise ValueError(f"truncate must be in 1..{run.steps} (the run's steps), got {truncate}.")
        unrolled(check, hyper, val_x[:1], val_y[:1], truncate=None if truncate is None else 1)
    else:
        implicit(check, hyper, val_x[:1], val_y[:1], method=solver, terms=1, alpha=alpha,  # type: ignore[arg-type]
                 params=run.init)
    state = _State(hyper, run.init, outer_steps)
    optimizer = torch.optim.Adam(state.raw.parameters(), lr=outer_lr)

    def outer_step(step: int) -> dict[str, float]:
        h = hyper.with_tensors({k: t.detach() for k, t in state.tensors().items()})
        start = state.weights() if warm and bool(state.warm) else None
        hg = hypergradient(h, start)
        for p, key in zip(state.raw, state.keys, strict=True):
            p.grad = hg.grads[key].to(p.dtype)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            state.history[step] = hg.val_loss
            if warm:
                state.set_weights(hg.params)
        cost = step_compute(hg.inner_steps, hg.hvps)
        return {"val_loss": hg.val_loss, "inner_steps": float((step + 1) * hg.inner_steps),
                "hvps": float((step + 1) * hg.hvps), "compute": (step + 1) * cost}

    settings = {"method": method, "truncate": truncate, "solver": solver, "terms": terms, "alpha": alpha,
                "warm_start": warm, "outer_steps": outer_steps, "outer_lr": outer_lr, "steps": run.steps,
                "batch_size": run.batch_size, "seed": run.seed, "keys": list(hyper.tensors)}
    result = run_loop(
        state, outer_step, Schedule(outer_steps, log_every=log_every, checkpoint_every=checkpoint_every), run_dir,
        name=f"tune-{method}", optimizer=optimizer, identity=identity if identity is not None else settings,
        resume=resume, progress=progress, desc=f"tune ({method})", loggers=loggers, run_config=run_config,
        divergence_cause="the outer learning rate (outer_lr) or the inner learning rate may be too large",
        postfix=lambda m: {"val": f"{m.get('val_loss', math.nan):.4f}"})
    inner = run.steps
    hvps = (run.steps if truncate is None else truncate) if method == "unrolled" else terms + 1
    tuned = hyper.with_tensors({k: t.detach().clone() for k, t in state.tensors().items()})
    return TuneResult(tuned, [float(v) for v in state.history], inner, hvps,
                      outer_steps * step_compute(inner, hvps), result.wall_time_s)


# -- built-in problems ------------------------------------------------------------------------------------
class GroupedLinear(nn.Module):
    """``y = sum_g x_g W_g + b``: a linear model on feature groups, one weight tensor per group (so
    a per-tensor weight decay is one per group). ``x``: ``[n, groups * width]``; output ``[n, out]``."""

    def __init__(self, groups: int, width: int, out: int = 1) -> None:
        super().__init__()
        self.groups, self.width = groups, width
        self.parts = nn.ModuleList([nn.Linear(width, out, bias=False) for _ in range(groups)])

    def forward(self, x: Tensor) -> Tensor:
        chunks = x.reshape(x.shape[0], self.groups, self.width).unbind(1)
        return torch.stack([part(c) for part, c in zip(self.parts, chunks, strict=True)]).sum(0)


@dataclass(frozen=True)
class Problem:
    """A model and its training, validation and held-out test sets (``x [n, ...]``, ``y [n, ...]``)."""

    model: nn.Module
    loss: str
    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    corrupted: Tensor | None = None
    """Indices of training examples whose labels were corrupted (``noisy_labels``)."""


@dataclass(frozen=True)
class ProblemConfig:
    """A built-in problem (synthetic data, fixed by ``seed``)."""

    name: str = "ridge"
    """``ridge`` (linear regression, one weight vector), ``groups`` (linear regression on ``groups``
    feature groups of ``dim`` features each, with signal strengths falling by group), or
    ``noisy_labels`` (linear ``classes``-way classification with ``corrupt`` of the labels wrong)."""
    n_train: int = 50
    n_val: int = 50
    n_test: int = 1000
    dim: int = 10
    """Features (per group for ``groups``)."""
    groups: int = 4
    classes: int = 3
    noise: float = 1.0
    """Label noise (standard deviation) of the regression problems."""
    corrupt: float = 0.25
    """Fraction of corrupted training labels (``noisy_labels``)."""
    seed: int = 0


def make_problem(cfg: ProblemConfig, dtype: torch.dtype = torch.float64) -> Problem:
    """Build the problem ``cfg`` names (data and an untrained model in ``dtype``)."""
    g = torch.Generator().manual_seed(cfg.seed)
    sizes = (cfg.n_train, cfg.n_val, cfg.n_test)

    def draw(d: int) -> list[Tensor]:
        return [torch.randn(n, d, generator=g, dtype=dtype) for n in sizes]

    if cfg.name in ("ridge", "groups"):
        groups = cfg.groups if cfg.name == "groups" else 1
        d = groups * cfg.dim
        scale = torch.cat([torch.full((cfg.dim,), 2.0 ** -(2 * k), dtype=dtype) for k in range(groups)])
        w = torch.randn(d, 1, generator=g, dtype=dtype) * scale[:, None]
        xs = draw(d)
        ys = [x @ w + cfg.noise * torch.randn(x.shape[0], 1, generator=g, dtype=dtype) for x in xs]
        model: nn.Module = GroupedLinear(groups, cfg.dim) if cfg.name == "groups" else nn.Linear(d, 1, bias=False)
        return Problem(model.to(dtype), "squared", (xs[0], ys[0]), (xs[1], ys[1]), (xs[2], ys[2]))
    if cfg.name == "noisy_labels":
        w = torch.randn(cfg.dim, cfg.classes, generator=g, dtype=dtype)
        xs = draw(cfg.dim)
        labels = [(x @ w).argmax(1) for x in xs]
        bad = torch.randperm(cfg.n_train, generator=g)[: round(cfg.corrupt * cfg.n_train)].sort().values
        shift = torch.randint(1, cfg.classes, (len(bad),), generator=g)
        labels[0] = labels[0].clone()
        labels[0][bad] = (labels[0][bad] + shift) % cfg.classes
        model = nn.Linear(cfg.dim, cfg.classes).to(dtype)
        return Problem(model, "cross_entropy", (xs[0], labels[0]), (xs[1], labels[1]), (xs[2], labels[2]), bad)
    raise ValueError(f"problem {cfg.name!r} is unknown: choose one of {list(PROBLEMS)}.")


# -- the config and the command ---------------------------------------------------------------------------
@dataclass(frozen=True)
class InnerConfig:
    """The training run being tuned (plain SGD from zero weights)."""

    steps: int = 200
    """SGD steps of the run."""
    lr: float = 0.1
    """The learning rate (the start, when tuned)."""
    weight_decay: float | None = 0.01
    """The weight decay (the start, when tuned; None: none)."""
    batch_size: int | None = None
    """Examples per step (None: the whole training set)."""
    seed: int = 0
    """Fixes the mini-batches."""


@dataclass(frozen=True)
class HyperConfig:
    """Which hyperparameters are tuned."""

    lr: str | None = None
    """Tune the learning rate: ``scalar``, ``tensor`` (per layer) or ``element`` (None: fixed)."""
    weight_decay: str | None = None
    """Tune the weight decay: ``scalar``, ``tensor`` (per layer) or ``element`` (None: fixed)."""
    data_weights: bool = False
    """Tune one weight per training example (``sigmoid`` of a logit)."""
    init_data_weight: float = 0.5
    """Every data weight's start, in (0, 1)."""


@dataclass(frozen=True)
class MethodConfig:
    """How the hypergradient is taken."""

    name: str = "implicit"
    """``implicit`` (weight decay, data weights) or ``unrolled`` (any)."""
    truncate: int | None = None
    """Unrolled: differentiate the last this many steps (None: all)."""
    solver: str = "cg"
    """Implicit: ``cg`` or ``neumann``."""
    terms: int = 20
    """Implicit: Hessian-vector products of the solver."""
    alpha: float | None = None
    """Implicit Neumann step (None: the inner learning rate)."""
    warm_start: bool | None = None
    """Each run starts where the last ended (None: on for implicit, off for unrolled)."""


@dataclass(frozen=True)
class OuterConfig:
    """The outer loop: Adam on the raw (log / logit) hyperparameters."""

    steps: int = 50
    lr: float = 0.05
    log_every: int = 1
    checkpoint_every: int | None = 10
    loggers: list[str] = field(default_factory=lambda: ["jsonl"])


@dataclass(frozen=True)
class TuneConfig:
    """A whole ``innerloop tune`` run."""

    problem: ProblemConfig = field(default_factory=ProblemConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    hyper: HyperConfig = field(default_factory=lambda: HyperConfig(weight_decay="scalar"))
    method: MethodConfig = field(default_factory=MethodConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    out_dir: str = "runs/tune"
    dtype: str = "float64"
    """``float64`` or ``float32``."""

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, value: Any, rule: str) -> None:
            if not ok:
                raise ConfigError(f"{key} = {value!r} is invalid: {rule}.")

        p, i, h, m, o = self.problem, self.inner, self.hyper, self.method, self.outer
        need(p.name in PROBLEMS, "problem.name", p.name, f"choose one of {list(PROBLEMS)}")
        for key in ("n_train", "n_val", "n_test", "dim", "groups"):
            need(getattr(p, key) >= 1, f"problem.{key}", getattr(p, key), "it must be >= 1")
        need(p.classes >= 2, "problem.classes", p.classes, "it must be >= 2")
        need(0 <= p.corrupt < 1, "problem.corrupt", p.corrupt, "a fraction in [0, 1)")
        need(p.noise >= 0, "problem.noise", p.noise, "it must be >= 0")
        need(i.steps >= 1, "inner.steps", i.steps, "it must be >= 1")
        need(i.lr > 0, "inner.lr", i.lr, "it must be > 0")
        need(i.weight_decay is None or i.weight_decay >= 0, "inner.weight_decay", i.weight_decay, ">= 0")
        need(i.batch_size is None or i.batch_size >= 1, "inner.batch_size", i.batch_size, ">= 1 (or null)")
        for key in ("lr", "weight_decay"):
            value = getattr(h, key)
            need(value is None or value in GRANULARITIES, f"hyper.{key}", value,
                 f"choose one of {list(GRANULARITIES)} (or leave it out: fixed)")
        need(h.weight_decay is None or (i.weight_decay or 0) > 0, "inner.weight_decay", i.weight_decay,
             "a tuned weight decay needs a start > 0 (it is tuned in log space)")
        need(bool(h.lr or h.weight_decay or h.data_weights), "hyper", dataclasses.asdict(h),
             "tune at least one of lr, weight_decay, data_weights")
        need(0 < h.init_data_weight < 1, "hyper.init_data_weight", h.init_data_weight, "it must be in (0, 1)")
        need(m.name in METHODS, "method.name", m.name, f"choose one of {list(METHODS)}")
        need(m.solver in ("cg", "neumann"), "method.solver", m.solver, "choose 'cg' or 'neumann'")
        need(m.terms >= 1, "method.terms", m.terms, "it must be >= 1")
        need(m.truncate is None or 1 <= m.truncate <= i.steps, "method.truncate", m.truncate,
             f"it must be in 1..inner.steps ({i.steps}) or null (all)")
        need(not (m.name == "implicit" and h.lr is not None), "hyper.lr", h.lr,
             "the implicit method cannot tune a learning rate (it does not move the minimiser); use "
             "method.name = 'unrolled' or leave hyper.lr out")
        need(m.alpha is None or m.alpha > 0, "method.alpha", m.alpha, "it must be > 0")
        need(o.steps >= 1, "outer.steps", o.steps, "it must be >= 1")
        need(o.lr > 0, "outer.lr", o.lr, "it must be > 0")
        need(o.log_every >= 1, "outer.log_every", o.log_every, "it must be >= 1")
        need(o.checkpoint_every is None or o.checkpoint_every >= 1, "outer.checkpoint_every", o.checkpoint_every,
             "it must be >= 1 (or null)")
        bad = [x for x in o.loggers if x not in LOGGER_NAMES]
        need(not bad, "outer.loggers", o.loggers, f"choose from {list(LOGGER_NAMES)}")
        need(self.dtype in ("float64", "float32"), "dtype", self.dtype, "choose 'float64' or 'float32'")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def override(self, changes: Mapping[str, Any]) -> TuneConfig:
        """A new config with the dotted keys of ``changes`` set (``"outer.steps"``), checked."""
        return tune_config_from_dict(apply_overrides(self.to_dict(), changes))


def tune_config_from_dict(data: Mapping[str, Any]) -> TuneConfig:
    """Build and check a :class:`TuneConfig`; unknown keys and wrong types raise :class:`ConfigError`."""
    cfg: TuneConfig = from_dict(TuneConfig, data)
    return cfg


def load_tune_config(path: str | Path) -> TuneConfig:
    """Read a ``.toml`` / ``.json`` tuning config; what it omits keeps its default."""
    return tune_config_from_dict(read_config_file(path))


@dataclass(frozen=True)
class TuneRun:
    """What :func:`run_tune` returns: the tuning and the retrained run's losses."""

    result: TuneResult
    val_loss: float
    """Validation loss of a fresh run (from the initial weights) with the tuned hyperparameters."""
    test_loss: float
    """Held-out test loss of that run."""
    start_val_loss: float
    """Validation loss of a run with the starting hyperparameters."""
    results: dict[str, Any]


def run_tune(cfg: TuneConfig, *, progress: bool = True, overwrite: bool = False,
             command: str | None = None) -> TuneRun:
    """Run the config: tune, retrain from the initial weights with the tuned hyperparameters, and
    write ``out_dir/results.json`` (the tuned values, the history, the validation and test losses
    and the command)."""
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    problem = make_problem(cfg.problem, dtype)
    init = {n: torch.zeros_like(p) for n, p in problem.model.named_parameters()}
    i, h, m, o = cfg.inner, cfg.hyper, cfg.method, cfg.outer
    run = TrainingRun(problem.model, init, *problem.train, steps=i.steps, batch_size=i.batch_size,
                      loss=problem.loss, seed=i.seed)
    try:
        hyper = Hyper.create(init, lr=i.lr, weight_decay=i.weight_decay,
                             tune_lr=h.lr, tune_weight_decay=h.weight_decay,  # type: ignore[arg-type]
                             data_weights=run.n_train if h.data_weights else None,
                             init_data_weight=h.init_data_weight)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    out = Path(cfg.out_dir)
    result = tune(run, *problem.val, hyper, method=m.name, outer_steps=o.steps, outer_lr=o.lr,
                  truncate=m.truncate, solver=m.solver, terms=m.terms, alpha=m.alpha, warm_start=m.warm_start,
                  run_dir=out, resume=not overwrite, progress=progress, loggers=o.loggers,
                  identity={k: v for k, v in cfg.to_dict().items() if k not in ("outer", "out_dir")} | {
                      "outer": {"steps": o.steps, "lr": o.lr}},
                  run_config=cfg.to_dict(), log_every=o.log_every, checkpoint_every=o.checkpoint_every)

    def losses(hp: Hyper) -> tuple[float, float]:
        end = run.train(hp)
        return float(mean_loss(run, end, *problem.val)), float(mean_loss(run, end, *problem.test))

    val, test = losses(result.hyper)
    start_val, start_test = losses(hyper)
    values = {k: v.tolist() for k, v in result.hyper.values().items()}
    results: dict[str, Any] = {
        "command": command or " ".join(sys.argv), "config": cfg.to_dict(), "tuned": values,
        "history": result.history, "inner_steps_per_outer_step": result.inner_steps,
        "hvps_per_outer_step": result.hvps, "compute_inner_step_equivalents": result.compute,
        "val_loss": val, "test_loss": test, "start_val_loss": start_val, "start_test_loss": start_test,
    }
    if problem.corrupted is not None and "data_weights" in values:
        w = torch.tensor(values["data_weights"])
        bad = torch.zeros(len(w), dtype=torch.bool)
        bad[problem.corrupted] = True
        results["mean_weight_corrupted"] = float(w[bad].mean())
        results["mean_weight_clean"] = float(w[~bad].mean())
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    return TuneRun(result, val, test, start_val, results)


__all__ = [
    "METHODS", "PROBLEMS", "GroupedLinear", "HyperConfig", "InnerConfig", "MethodConfig", "OuterConfig",
    "Problem", "ProblemConfig", "TuneConfig", "TuneResult", "TuneRun", "load_tune_config", "make_problem",
    "run_tune", "step_compute", "tune", "tune_config_from_dict",
]
