"""HalfCheetah goal velocity / direction: the clear error without MuJoCo, and (with it) rewards by definition."""

from __future__ import annotations

import importlib
import importlib.util

import numpy as np
import pytest
import torch

from innerloop.cli import main
from innerloop.rl import mujoco as rl_mujoco
from innerloop.rl.families import make_env_family

pytestmark = pytest.mark.slow  # several processes, real data or whole runs: skipped by `make test-quick`

HAVE_MUJOCO = importlib.util.find_spec("mujoco") is not None and importlib.util.find_spec("gymnasium") is not None
needs_mujoco = pytest.mark.skipif(not HAVE_MUJOCO, reason="needs MuJoCo: pip install 'innerloop[rl]'")


@pytest.fixture
def no_mujoco(hide_modules):
    """Make ``mujoco`` (and gymnasium's MuJoCo envs) fail to import, as on a machine without the extra."""
    hide_modules("mujoco", "gymnasium.envs.mujoco")


@pytest.mark.usefixtures("no_mujoco")
@pytest.mark.parametrize("name", ["cheetah-vel", "cheetah-dir"])
def test_missing_mujoco_names_the_extra_to_install(name):
    with pytest.raises(rl_mujoco.MissingMuJoCoError, match=r"pip install 'innerloop\[rl\]'"):
        make_env_family(name)
    assert issubclass(rl_mujoco.MissingMuJoCoError, ImportError)


@pytest.mark.usefixtures("no_mujoco")
def test_cli_reports_missing_mujoco_before_any_work(tmp_path, capsys):
    config = tmp_path / "cheetah.toml"
    config.write_text(f'out_dir = "{tmp_path / "run"}"\n[env]\nname = "cheetah-vel"\n')
    assert main(["rl", "train", "--config", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'innerloop[rl]'" in err and "HalfCheetah" in err
    assert not (tmp_path / "run" / "last.pt").exists()


@needs_mujoco
def test_cheetah_rewards_match_their_definitions():
    import gymnasium

    vel = make_env_family("cheetah-vel", seed=0)
    goals = vel.tasks("test", range(30))
    assert (goals >= 0).all() and (goals <= 2).all() and goals.shape == (30, 1)
    directions = make_env_family("cheetah-dir", seed=0).tasks("test", range(30))
    assert set(directions[:, 0].tolist()) == {-1.0, 1.0}

    tasks = torch.tensor([[1.3], [-1.0]])
    g = torch.Generator().manual_seed(0)
    for mode, task in (("velocity", tasks[:1]), ("direction", tasks[1:])):
        env = rl_mujoco.HalfCheetahVectorEnv(task, mode, horizon=5)
        reference = gymnasium.make("HalfCheetah-v5").unwrapped  # gymnasium's own step, for x_velocity
        obs, _ = env.reset(seed=[11])
        ref_obs, _ = reference.reset(seed=11)
        np.testing.assert_allclose(obs[0].numpy(), ref_obs, rtol=1e-6, atol=1e-6)
        for t in range(5):
            action = 1.5 * torch.randn(1, 6, generator=g)  # partly outside [-1, 1]: clipped
            obs, reward, terminated, truncated, info = env.step(action)
            clipped = action.clamp(-1, 1).double().numpy()[0]
            ref_obs, _, _, _, ref_info = reference.step(clipped)
            np.testing.assert_allclose(obs[0].numpy(), ref_obs, rtol=1e-5, atol=1e-5)
            v = ref_info["x_velocity"]
            assert float(info["x_velocity"][0]) == pytest.approx(v, rel=1e-6, abs=1e-9)
            forward = -abs(v - 1.3) if mode == "velocity" else -1.0 * v
            assert float(reward[0]) == pytest.approx(forward - 0.05 * float(np.square(clipped).sum()), rel=1e-5)
            assert not terminated[0] and bool(truncated[0]) == (t == 4)


@needs_mujoco
def test_cheetah_rollouts_vectorised_equal_looped():
    from innerloop.rl.episodes import rollout, rollout_noise
    from innerloop.rl.policy import GaussianMLP

    torch.manual_seed(0)
    family = make_env_family("cheetah-vel", seed=0, horizon=6)
    policy = GaussianMLP(17, 6, (8,))
    params = {k: v.detach() for k, v in policy.named_parameters()}
    noise = rollout_noise(0, "train", [0, 1], "t", rollouts=2, horizon=6, act_dim=6)
    both = rollout(family, policy, params, family.tasks("train", [0, 1]), noise)
    one = rollout(family, policy, params, family.tasks("train", [1]),
                  rollout_noise(0, "train", [1], "t", rollouts=2, horizon=6, act_dim=6))
    # equal up to the rounding of a policy forward on 2 rows instead of 4, carried through the physics
    torch.testing.assert_close(one.rewards[0], both.rewards[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(one.obs[0], both.obs[1], rtol=1e-4, atol=1e-4)


def cheetah_episodes(family, indices, tag, rollouts=2):
    from innerloop.rl.episodes import rollout, rollout_noise
    from innerloop.rl.policy import GaussianMLP

    torch.manual_seed(0)
    policy = GaussianMLP(17, 6, (8,))
    params = {k: v.detach() for k, v in policy.named_parameters()}
    noise = rollout_noise(family.seed, "train", indices, tag, rollouts, family.horizon, 6)
    return rollout(family, policy, params, family.tasks("train", indices), noise)


@needs_mujoco
@pytest.mark.parametrize("name", ["cheetah-vel", "cheetah-dir"])
def test_reused_simulators_give_the_episodes_of_fresh_ones(name):
    reused = make_env_family(name, seed=0, horizon=8)
    fresh = make_env_family(name, seed=0, horizon=8, reuse_simulators=False)
    assert fresh._pool is None
    cheetah_episodes(reused, [0, 1, 2], "before", rollouts=3)  # 9 simulators, stepped
    cheetah_episodes(reused, [5], "smaller")  # the first 2 of them again
    for indices in ([1, 3], [4, 0, 2]):
        a, b = cheetah_episodes(reused, indices, "t"), cheetah_episodes(fresh, indices, "t")
        for k in ("obs", "actions", "rewards", "mask"):
            assert torch.equal(getattr(a, k), getattr(b, k)), k
    assert len(reused._pool.simulators[rl_mujoco.SIMULATOR]) == 9  # grown to the largest rollout, never rebuilt


@needs_mujoco
def test_an_env_superseded_by_a_later_make_refuses_to_step():
    family = make_env_family("cheetah-vel", seed=0, horizon=4)
    first = family.make(family.tasks("train", [0, 1]))
    first.reset(seed=[0, 1])
    second = family.make(family.tasks("train", [2]))
    stale = r"a later make\(\) now reuses its simulators.*reuse_simulators=False"
    for call in (lambda: first.step(torch.zeros(2, 6)), lambda: first.reset(seed=[0, 1])):
        with pytest.raises(RuntimeError, match=stale):
            call()
    second.reset(seed=[3])
    assert second.step(torch.zeros(1, 6))[0].shape == (1, 17)
    own = make_env_family("cheetah-vel", seed=0, horizon=4, reuse_simulators=False)
    a, b = own.make(own.tasks("train", [0])), own.make(own.tasks("train", [1]))
    a.reset(seed=[0])
    b.reset(seed=[0])
    assert torch.equal(a.step(torch.ones(1, 6))[0], b.step(torch.ones(1, 6))[0])  # both alive, separate


@needs_mujoco
def test_a_family_pickles_without_its_simulators():
    import pickle

    family = make_env_family("cheetah-vel", seed=0, horizon=5)
    expected = cheetah_episodes(family, [0, 1], "t")
    copy = pickle.loads(pickle.dumps(family))
    assert len(family._pool.simulators[rl_mujoco.SIMULATOR]) == 4 and copy._pool is not None
    assert copy._pool.simulators == {}
    got = cheetah_episodes(copy, [0, 1], "t")
    assert torch.equal(got.obs, expected.obs) and torch.equal(got.rewards, expected.rewards)
    off = pickle.loads(pickle.dumps(make_env_family("cheetah-vel", reuse_simulators=False)))
    assert off._pool is None
