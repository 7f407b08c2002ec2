"""The one conjugate gradient (iMAML's implicit gradient, TRPO's natural gradient) and the dict helpers."""

from __future__ import annotations

import pytest
import torch
from torch.func import vmap

from innerloop.numerics import conjugate_gradient, dot, flatten, unflatten

SHAPES = {"w": (3, 2), "b": (6,)}  # 12 unknowns as a parameter dict


def spd(n: int, g: torch.Generator) -> torch.Tensor:
    m = torch.randn(n, n, generator=g)
    return m @ m.T + 0.5 * torch.eye(n)


def as_dict(vector: torch.Tensor) -> dict[str, torch.Tensor]:
    return unflatten(vector, {k: torch.empty(s) for k, s in SHAPES.items()})


def dict_matvec(a: torch.Tensor):
    return lambda v: as_dict(a @ flatten(v))


@pytest.mark.usefixtures("float64")
def test_conjugate_gradient_solves_a_positive_definite_system():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(12, 12, generator=g)
    a, b = m @ m.T + 0.5 * torch.eye(12), torch.randn(12, generator=g)
    x = conjugate_gradient(lambda v: a @ v, b, steps=40, tolerance=1e-28)
    torch.testing.assert_close(x, torch.linalg.solve(a, b), rtol=1e-9, atol=1e-9)


@pytest.mark.usefixtures("float64")
def test_on_dicts_it_solves_the_system_of_the_flattened_parameters():
    g = torch.Generator().manual_seed(1)
    a, b = spd(12, g), torch.randn(12, generator=g)
    x = conjugate_gradient(dict_matvec(a), as_dict(b), steps=40)
    assert set(x) == set(SHAPES) and all(x[k].shape == SHAPES[k] for k in SHAPES)
    torch.testing.assert_close(flatten(x), torch.linalg.solve(a, b), rtol=1e-9, atol=1e-9)
    # the flat form is the one-entry special case of the same iteration
    flat = conjugate_gradient(lambda v: a @ v, b, steps=40)
    torch.testing.assert_close(flat, flatten(x), rtol=1e-12, atol=1e-12)


@pytest.mark.usefixtures("float64")
def test_under_vmap_it_equals_the_per_system_loop():
    g = torch.Generator().manual_seed(2)
    a = torch.stack([spd(12, g) for _ in range(4)])
    b = torch.randn(4, 12, generator=g)
    b[2] = 0.0  # a zero right-hand side inside the batch: no branch, no NaN

    def solve(ai: torch.Tensor, bi: torch.Tensor) -> dict[str, torch.Tensor]:
        return conjugate_gradient(dict_matvec(ai), as_dict(bi), steps=30)

    batched = vmap(solve)(a, b)
    for i in range(4):
        one = solve(a[i], b[i])
        for k in SHAPES:
            torch.testing.assert_close(batched[k][i], one[k], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(flatten(one), torch.linalg.solve(a[i], b[i]), rtol=1e-9, atol=1e-9)
    assert all(not batched[k][2].any() for k in SHAPES)


@pytest.mark.parametrize("tolerance", [None, 1e-10])
def test_a_zero_right_hand_side_gives_zero(tolerance):
    a = spd(5, torch.Generator().manual_seed(3))
    x = conjugate_gradient(lambda v: a @ v, torch.zeros(5), steps=8, tolerance=tolerance)
    assert torch.equal(x, torch.zeros(5))
    d = conjugate_gradient(lambda v: {k: 2 * t for k, t in v.items()}, {"p": torch.zeros(2, 2)}, steps=3,
                           tolerance=tolerance)
    assert torch.equal(d["p"], torch.zeros(2, 2))


@pytest.mark.usefixtures("float64")
def test_tolerance_stops_early_and_fixed_steps_do_not():
    a = torch.diag(torch.tensor([1.0, 2.0, 3.0]))  # three distinct eigenvalues: exact after 3 iterations
    b = torch.ones(3)
    calls = []

    def matvec(v: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return a @ v

    x = conjugate_gradient(matvec, b, steps=10, tolerance=1e-20)
    torch.testing.assert_close(x, torch.tensor([1.0, 0.5, 1 / 3]), rtol=1e-12, atol=1e-12)
    assert len(calls) == 3
    calls.clear()
    conjugate_gradient(matvec, b, steps=10)
    assert len(calls) == 10


def test_dot_flatten_unflatten():
    g = torch.Generator().manual_seed(4)
    a = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    b = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    torch.testing.assert_close(dot(a, b), flatten(a) @ flatten(b))
    back = unflatten(flatten(a), a)
    assert list(back) == list(a) and all(torch.equal(back[k], a[k]) for k in a)
    assert torch.equal(flatten(list(a.values())), flatten(a))
    with pytest.raises(ValueError, match="cannot fill"):
        unflatten(torch.zeros(5), a)
    with pytest.raises(ValueError, match="steps >= 0"):
        conjugate_gradient(lambda v: v, torch.ones(2), steps=-1)


def test_student_t_quantiles():
    from innerloop.numerics import student_t_cdf, student_t_quantile

    # values of the t distribution's 0.975 quantile (tables; df = inf is the normal 1.959964)
    for df, want in ((1, 12.7062), (2, 4.3027), (5, 2.5706), (10, 2.2281), (39, 2.0227), (599, 1.9639),
                     (1e7, 1.95996)):
        assert abs(student_t_quantile(0.975, df) - want) < 1e-4, df
    assert abs(student_t_quantile(0.025, 7) + student_t_quantile(0.975, 7)) < 1e-10
    assert abs(student_t_cdf(0.0, 3) - 0.5) < 1e-12
    with pytest.raises(ValueError, match="need 0 < p < 1 and df > 0"):
        student_t_quantile(1.0, 3)


def test_intervals_use_student_t():
    from innerloop.training.evaluate import mean_ci95

    v = torch.tensor([0.0, 1.0] * 20)  # 40 tasks, s = 0.5064
    stats = mean_ci95(v)
    assert abs(stats.ci95 - 2.0227 * float(v.std()) / 40**0.5) < 1e-4
    assert mean_ci95(torch.tensor([3.0])).ci95 != mean_ci95(torch.tensor([3.0])).ci95  # NaN for one task
