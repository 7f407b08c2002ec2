"""2D navigation matches its definition; rollouts, returns, the linear baseline and advantages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from innerloop.rl.envs import Navigation2D, Navigation2DEnv
from innerloop.rl.episodes import (
    Episodes,
    advantages,
    baseline_features,
    discounted_returns,
    fit_linear_baseline,
    rollout,
    rollout_noise,
)
from innerloop.rl.families import make_env_family
from innerloop.rl.maml import PolicyMAML
from innerloop.rl.policy import GaussianMLP


def test_navigation_dynamics_reward_clipping_and_reset():
    # the paper's code: a policy action in [-1, 1] is mapped onto the action box [-0.1, 0.1] (rllab's
    # normalize), then clipped
    env = Navigation2DEnv(torch.tensor([[0.3, -0.2], [-0.4, 0.4]]), horizon=3)
    obs, _ = env.reset()
    assert torch.equal(obs, torch.zeros(2, 2))  # both start at the origin
    action = torch.tensor([[0.5, -5.0], [-20.0, 0.7]])
    obs, reward, terminated, truncated, _ = env.step(action)
    expected = torch.tensor([[0.05, -0.1], [-0.1, 0.07]])  # 0.1 * action, clipped to [-0.1, 0.1]
    torch.testing.assert_close(obs, expected)
    torch.testing.assert_close(reward, -torch.linalg.vector_norm(expected - env.goals, dim=-1))
    assert not terminated.any() and not truncated.any()
    env.step(torch.zeros(2, 2))
    _, _, _, truncated, _ = env.step(torch.zeros(2, 2))
    assert truncated.all()  # the horizon
    obs, _ = env.reset()
    assert torch.equal(obs, torch.zeros(2, 2)) and env.t == 0


def test_navigation_with_unscaled_actions_takes_the_action_as_the_velocity():
    # action_scale = 1: the environment of innerloop 0.2.0 (the velocity is the policy's action)
    env = Navigation2DEnv(torch.tensor([[0.3, -0.2], [-0.4, 0.4]]), horizon=3, action_scale=1.0)
    env.reset()
    obs, *_ = env.step(torch.tensor([[0.05, -0.5], [-2.0, 0.07]]))
    torch.testing.assert_close(obs, torch.tensor([[0.05, -0.1], [-0.1, 0.07]]))


def test_navigation_terminates_at_the_goal_and_then_stays_with_zero_reward():
    env = Navigation2DEnv(torch.tensor([[0.1, 0.0], [0.5, 0.5]]), horizon=100)
    env.reset()
    _, reward, terminated, _, _ = env.step(torch.tensor([[0.95, 0.0], [1.0, 1.0]]))
    assert terminated.tolist() == [True, False]  # within 0.01 of the goal
    assert reward[0] == pytest.approx(-0.005, abs=1e-6)
    obs, reward, terminated, _, _ = env.step(torch.tensor([[1.0, 1.0], [1.0, 1.0]]))
    torch.testing.assert_close(obs[0], torch.tensor([0.095, 0.0]))  # a finished episode does not move
    assert reward[0] == 0 and terminated[0]


@pytest.mark.parametrize("termination, done", [("box", True), ("euclidean", False)])
def test_navigation_termination_box_tests_each_coordinate(termination, done):
    # (0.008, 0.008) from the goal: inside the paper's box |dx|, |dy| < 0.01, outside the 0.01 circle
    env = Navigation2DEnv(torch.tensor([[0.092, 0.092]]), termination=termination)
    env.reset()
    _, _, terminated, _, _ = env.step(torch.tensor([[1.0, 1.0]]))
    assert terminated.tolist() == [done]
    with pytest.raises(ValueError, match="termination must be one of"):
        Navigation2DEnv(torch.zeros(1, 2), termination="circle")


def test_tasks_are_fixed_per_index_and_lie_in_the_square():
    family = Navigation2D(seed=3)
    all_goals = family.tasks("test", range(50))
    torch.testing.assert_close(family.tasks("test", [7]), all_goals[7:8])
    assert (all_goals >= -0.5).all() and (all_goals <= 0.5).all()
    assert not torch.equal(family.tasks("train", range(5)), family.tasks("test", range(5)))
    assert not torch.equal(Navigation2D(seed=4).tasks("test", range(5)), all_goals[:5])
    with pytest.raises(ValueError, match="unknown split"):
        family.tasks("dev", [0])  # type: ignore[arg-type]


def test_unknown_family_and_bad_options_are_named():
    with pytest.raises(ValueError, match="unknown environment family 'ant'"):
        make_env_family("ant")
    with pytest.raises(ValueError, match="goal_low"):
        make_env_family("nav2d", goal_low=1.0, goal_high=0.0)


@pytest.mark.parametrize("per_task", [False, True])
def test_vectorised_rollouts_equal_looped_rollouts(per_task):
    torch.manual_seed(0)
    family = Navigation2D(seed=1, horizon=30)
    policy = GaussianMLP(2, 2, (16,), init_std=0.3)
    params = {k: v.detach() for k, v in policy.named_parameters()}
    indices = [4, 9, 2]
    if per_task:  # a different policy per task, as after adaptation
        params = {k: torch.stack([v + 0.1 * i for i in range(3)]) for k, v in params.items()}
    noise = rollout_noise(family.seed, "train", indices, "x", rollouts=4, horizon=30, act_dim=2)
    together = rollout(family, policy, params, family.tasks("train", indices), noise, per_task)
    for j, i in enumerate(indices):
        one_noise = rollout_noise(family.seed, "train", [i], "x", rollouts=4, horizon=30, act_dim=2)
        p = {k: v[j : j + 1] for k, v in params.items()} if per_task else params
        alone = rollout(family, policy, p, family.tasks("train", [i]), one_noise, per_task)
        for name in ("obs", "actions", "rewards", "mask"):
            torch.testing.assert_close(getattr(alone, name)[0], getattr(together, name)[j], rtol=0, atol=0)


def test_rollout_follows_the_policy_and_masks_finished_episodes():
    family = Navigation2D(seed=0, horizon=40, goal_radius=0.05)
    policy = GaussianMLP(2, 2, (), init_std=1e-3)
    goals = family.tasks("test", [0])
    with torch.no_grad():  # a linear policy that heads for the goal: velocity = 0.2 * (goal - position)
        policy.mean.head.weight.copy_(-2.0 * torch.eye(2))
        policy.mean.head.bias.copy_(2.0 * goals[0])
    noise = rollout_noise(0, "test", [0], "y", rollouts=2, horizon=40, act_dim=2)
    ep = rollout(family, policy, dict(policy.named_parameters()), goals, noise)
    assert ep.obs.shape == (1, 2, 40, 2) and ep.actions.shape == (1, 2, 40, 2) and ep.rewards.shape == (1, 2, 40)
    steps = ep.mask.sum(-1)
    assert (steps < 40).all()  # reached the goal and stopped
    move = (family.action_bound * ep.actions[0, :, :-1]).clamp(-0.1, 0.1)
    valid = ep.mask[0, :, 1:] > 0
    torch.testing.assert_close(ep.obs[0, :, 1:][valid], (ep.obs[0, :, :-1] + move)[valid])
    dist = torch.linalg.vector_norm(ep.obs[0, :, 1:] - goals[0], dim=-1)
    torch.testing.assert_close(ep.rewards[0, :, :-1] * ep.mask[0, :, 1:], -dist * ep.mask[0, :, 1:])
    assert (ep.rewards[ep.mask == 0] == 0).all()
    torch.testing.assert_close(ep.returns(), ep.rewards.sum(-1))


@pytest.mark.usefixtures("float64")
def test_discounted_returns_baseline_and_advantages_by_hand():
    g = torch.Generator().manual_seed(0)
    obs = torch.randn(2, 3, 6, 2, generator=g)
    rewards = torch.randn(2, 3, 6, generator=g)
    mask = torch.ones(2, 3, 6)
    mask[0, 1, 4:] = 0  # an episode that ended after 4 steps
    rewards = rewards * mask
    G = discounted_returns(rewards, mask, 0.9)
    for b in range(2):
        for r in range(3):
            for t in range(6):
                want = sum(0.9 ** (k - t) * float(rewards[b, r, k] * mask[b, r, k]) for k in range(t, 6))
                want *= float(mask[b, r, t])
                assert float(G[b, r, t]) == pytest.approx(float(want), abs=1e-12)
    values = fit_linear_baseline(obs, G, mask, reg=0.0)
    feats = baseline_features(obs)
    for b in range(2):  # ordinary least squares on the valid steps of each task
        keep = mask[b].reshape(-1) > 0
        x, y = feats[b].reshape(-1, feats.shape[-1])[keep].numpy(), G[b].reshape(-1)[keep].numpy()
        beta = np.linalg.lstsq(x, y, rcond=None)[0]
        np.testing.assert_allclose(values[b].reshape(-1)[keep].numpy(), x @ beta, atol=1e-8)
    assert (values[mask == 0] == 0).all()
    ep = Episodes(obs, torch.zeros(2, 3, 6, 1), rewards, mask)
    adv = advantages(ep, 0.9, gae_lambda=1.0, normalize=False)
    torch.testing.assert_close(adv, (G - fit_linear_baseline(obs, G, mask)) * mask)
    normed = advantages(ep, 0.9, gae_lambda=1.0, normalize=True)
    for b in range(2):
        valid = normed[b][mask[b] > 0]
        assert float(valid.mean()) == pytest.approx(0.0, abs=1e-9)
        assert float(valid.pow(2).mean()) == pytest.approx(1.0, abs=1e-6)


def test_meta_test_is_deterministic_and_adaptation_changes_the_policy():
    torch.manual_seed(0)
    family = Navigation2D(seed=0, horizon=20)
    algo = PolicyMAML(GaussianMLP(2, 2, (16,)), inner_lr=0.1)
    a, _ = algo.evaluate(family, "test", range(3), steps=2, rollouts=5)
    b, kept = algo.evaluate(family, "test", range(3), steps=2, rollouts=5, keep_episodes=True)
    assert a.shape == (3, 3) and torch.equal(a, b) and len(kept) == 3
    assert not torch.equal(kept[0].actions, kept[1].actions)


def test_first_steps_keeps_the_first_episodes_holding_the_batch():
    mask = torch.zeros(2, 4, 6)
    for task, lengths in enumerate([[3, 5, 2, 4], [6, 6, 6, 6]]):
        for r, n in enumerate(lengths):
            mask[task, r, :n] = 1
    ep = Episodes(torch.zeros(2, 4, 6, 2), torch.zeros(2, 4, 6, 2), torch.ones(2, 4, 6) * mask, mask,
                  torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]]))
    batch, kept = ep.first_steps(7)
    # task 0: 3 + 5 >= 7 after two episodes; task 1: 6 + 6 >= 7 after two as well
    assert kept.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]
    assert batch.returns().tolist() == [[3, 5, 0, 0], [6, 6, 0, 0]]
    assert batch.success.tolist() == [[1, 0, 0, 0], [0, 1, 0, 0]]
    assert ep.first_steps(100)[1].sum() == 8  # fewer steps than the batch: every episode
    with pytest.raises(ValueError, match="batch_steps must be >= 1"):
        ep.first_steps(0)


def test_a_batch_of_steps_scores_the_mean_over_its_episodes():
    family = Navigation2D(seed=0, horizon=10)
    alg = PolicyMAML(GaussianMLP(2, 2, (8,)), inner_lr=0.1)
    plain, _ = alg.evaluate(family, "test", range(3), 2, 4)
    everything, _ = alg.evaluate(family, "test", range(3), 2, 4, batch_steps=40)  # 4 x 10 steps: all of them
    torch.testing.assert_close(everything, plain, rtol=0, atol=0)
    one, episodes = alg.evaluate(family, "test", range(3), 0, 4, batch_steps=1, keep_episodes=True)
    torch.testing.assert_close(one[:, 0], episodes[0].returns()[:, 0])  # the first episode alone


def test_a_step_size_per_step_changes_only_the_later_steps():
    family = Navigation2D(seed=0, horizon=10)
    alg = PolicyMAML(GaussianMLP(2, 2, (8,)), inner_lr=0.1)
    single, _ = alg.evaluate(family, "test", range(3), 3, 4, 0.1)
    torch.testing.assert_close(alg.evaluate(family, "test", range(3), 3, 4, [0.1, 0.1])[0], single, rtol=0, atol=0)
    split, _ = alg.evaluate(family, "test", range(3), 3, 4, [0.1, 0.3])
    torch.testing.assert_close(split[:, :2], single[:, :2], rtol=0, atol=0)  # 0 steps, and the first at 0.1
    assert not torch.equal(split[:, 2:], single[:, 2:])
    assert alg.inner_lr == 0.1  # restored
    for bad in ([0.1, 0.0], float("nan"), [0.1, float("inf")], []):
        with pytest.raises(ValueError, match="step sizes must be finite and > 0"):
            alg.evaluate(family, "test", range(3), 1, 4, bad)
