"""Regression task families: noisy linear regression and the sinusoids of the MAML paper.

Every family draws task ``i`` of a split from a generator seeded by (seed, split, i), so the
same index always gives the same support and query. The splits use independent seed streams,
so meta-train, meta-validation and meta-test functions are disjoint (with probability one for
continuous task parameters).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from innerloop.tasks import Objective, Split, Task, TaskBatch, TaskFamily, check_split, task_seed


def _check_counts(shots: int, queries: int) -> None:
    if not isinstance(shots, int) or shots < 1:
        raise ValueError(f"shots (K) must be an integer >= 1, got {shots!r}.")
    if not isinstance(queries, int) or queries < 1:
        raise ValueError(f"queries must be an integer >= 1, got {queries!r}.")


def _check_range(name: str, r: tuple[float, float]) -> tuple[float, float]:
    lo, hi = float(r[0]), float(r[1])
    if not lo <= hi:
        raise ValueError(f"{name} must be a (low, high) pair with low <= high, got {r!r}.")
    return lo, hi


def _scale(u: Tensor, r: tuple[float, float]) -> Tensor:
    """Map U[0, 1) draws to U[r]."""
    return r[0] + (r[1] - r[0]) * u


class _RegressionFamily:
    """Shared sampling: subclasses implement ``_draw(generator, n) -> (x, y)`` for one task."""

    objective: Objective = "regression"

    def __init__(self, shots: int, queries: int, seed: int) -> None:
        _check_counts(shots, queries)
        self.shots, self.queries, self.seed = shots, queries, int(seed)

    def _draw(self, g: torch.Generator, n: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _generator(self, split: Split, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(task_seed(self.seed, split, index, type(self).__name__))

    def _examples(self, split: Split, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        """x ``[tasks, shots + queries, in]`` and y ``[tasks, shots + queries, 1]`` (float32)."""
        check_split(split)
        pairs = [self._draw(self._generator(split, int(i)), self.shots + self.queries) for i in indices]
        return torch.stack([p[0] for p in pairs]).float(), torch.stack([p[1] for p in pairs]).float()

    def task(self, split: Split, index: int) -> Task:
        """Task ``index`` of ``split``: support ``[shots, in]``, query ``[queries, in]``, y ``[*, 1]``."""
        x, y = self._examples(split, [index])
        k = self.shots
        return Task(x[0, :k], y[0, :k], x[0, k:], y[0, k:])

    def batch(self, split: Split, indices: Sequence[int]) -> TaskBatch:
        """Tasks ``indices`` of ``split`` stacked: ``[len(indices), examples, ...]``."""
        if len(indices) == 0:
            raise ValueError("cannot make an empty meta-batch; pass at least one task index.")
        x, y = self._examples(split, indices)
        k = self.shots
        return TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])


class LinearRegression(_RegressionFamily):
    """y = w·x + b + noise, with per-task slope ``w`` and intercept ``b``.

    The textbook family: small enough that MAML's meta-gradient has a closed form.

    Args:
        shots: support points per task (K).
        queries: query points per task.
        dim: input dimension.
        slope_range: each slope component ~ U[slope_range].
        intercept_range: b ~ U[intercept_range].
        x_range: each input component ~ U[x_range].
        noise_std: standard deviation of the Gaussian noise on y.
        seed: the family seed.
    """

    def __init__(
        self,
        shots: int = 10,
        queries: int = 10,
        dim: int = 1,
        slope_range: tuple[float, float] = (-2.0, 2.0),
        intercept_range: tuple[float, float] = (-1.0, 1.0),
        x_range: tuple[float, float] = (-1.0, 1.0),
        noise_std: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__(shots, queries, seed)
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}.")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}.")
        self.dim, self.noise_std = dim, float(noise_std)
        self.slope_range = _check_range("slope_range", slope_range)
        self.intercept_range = _check_range("intercept_range", intercept_range)
        self.x_range = _check_range("x_range", x_range)

    def _draw(self, g: torch.Generator, n: int) -> tuple[Tensor, Tensor]:
        d = self.dim
        u = torch.rand(d + 1 + n * d, generator=g, dtype=torch.float64, device="cpu")
        w, b = _scale(u[:d], self.slope_range), _scale(u[d : d + 1], self.intercept_range)
        x = _scale(u[d + 1 :], self.x_range).view(n, d)
        noise = self.noise_std * torch.randn(n, 1, generator=g, dtype=torch.float64, device="cpu")
        return x, x @ w[:, None] + b + noise


class Sinusoid(_RegressionFamily):
    """y = A sin(x + phase): the regression family of the MAML paper (Finn et al. 2017, §5.1).

    Args:
        shots: support points per task (K).
        queries: query points per task.
        amplitude_range: A ~ U[amplitude_range]; the paper uses [0.1, 5.0].
        phase_range: phase ~ U[phase_range]; the paper uses [0, pi].
        x_range: x ~ U[x_range]; the paper uses [-5, 5].
        components: number of sinusoids summed (each with its own A and phase); 1 in the paper,
            2 gives a shifted domain to measure adaptation beyond the training distribution.
        seed: the family seed.
    """

    def __init__(
        self,
        shots: int = 10,
        queries: int = 10,
        amplitude_range: tuple[float, float] = (0.1, 5.0),
        phase_range: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
        components: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__(shots, queries, seed)
        if components < 1:
            raise ValueError(f"components must be >= 1, got {components}.")
        self.components = components
        self.amplitude_range = _check_range("amplitude_range", amplitude_range)
        self.phase_range = _check_range("phase_range", phase_range)
        self.x_range = _check_range("x_range", x_range)

    def parameters_of(self, split: Split, index: int) -> tuple[Tensor, Tensor]:
        """(amplitudes, phases) ``[components]`` of task ``index``, e.g. to plot the true curve."""
        check_split(split)
        g = torch.Generator().manual_seed(task_seed(self.seed, split, index, type(self).__name__))
        u = torch.rand(2 * self.components, generator=g, dtype=torch.float64, device="cpu")
        return self._params(u)

    def _params(self, u: Tensor) -> tuple[Tensor, Tensor]:
        c = self.components
        return _scale(u[:c], self.amplitude_range), _scale(u[c : 2 * c], self.phase_range)

    @staticmethod
    def curve(x: Tensor, amplitudes: Tensor, phases: Tensor) -> Tensor:
        """The true function: ``x [n, 1] -> y [n, 1]``."""
        return (amplitudes * torch.sin(x + phases)).sum(dim=-1, keepdim=True)

    def _draw(self, g: torch.Generator, n: int) -> tuple[Tensor, Tensor]:
        # one draw per task: the function's parameters first, so they do not depend on n
        u = torch.rand(2 * self.components + n, generator=g, dtype=torch.float64, device="cpu")
        amp, phase = self._params(u)
        x = _scale(u[2 * self.components :], self.x_range).unsqueeze(-1)
        return x, self.curve(x, amp, phase)


@dataclass(frozen=True)
class FamilySpec:
    """A named, documented preset of a regression family."""

    cls: type[_RegressionFamily]
    defaults: dict[str, Any]
    doc: str


FAMILIES: dict[str, FamilySpec] = {
    "sinusoid": FamilySpec(Sinusoid, {}, "A sin(x + phase), A~U[0.1,5], phase~U[0,pi] (MAML paper)"),
    "sinusoid-shifted": FamilySpec(
        Sinusoid,
        {"amplitude_range": (5.0, 7.5), "phase_range": (math.pi, 1.5 * math.pi)},
        "amplitudes U[5,7.5] and phases U[pi,1.5pi]: outside the training range",
    ),
    "sinusoid-sum": FamilySpec(
        Sinusoid, {"components": 2, "amplitude_range": (0.1, 2.5)}, "the sum of two sinusoids"
    ),
    "linear": FamilySpec(LinearRegression, {}, "y = w x + b + N(0, 0.1^2), w~U[-2,2], b~U[-1,1]"),
}


def make_family(name: str, **kwargs: Any) -> _RegressionFamily:
    """Build a regression family by name (``sinusoid``, ``sinusoid-shifted``, ``sinusoid-sum``,
    ``linear``); keyword arguments override the preset's defaults."""
    if name not in FAMILIES:
        raise ValueError(f"unknown task family {name!r}; choose one of {', '.join(FAMILIES)}.")
    spec = FAMILIES[name]
    return spec.cls(**{**spec.defaults, **kwargs})


if TYPE_CHECKING:  # static check (mypy): every regression family is a TaskFamily
    _FAMILY_TYPES: tuple[type[TaskFamily], ...] = (_RegressionFamily, LinearRegression, Sinusoid)
