"""Meta-World families: the clear error without the extra, Meta-World's own splits, reused simulators
equal fresh ones bit for bit, the success metric end to end (rollout -> meta-batch -> meta-test -> results)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from innerloop.cli import main
from innerloop.rl import metaworld as rl_metaworld
from innerloop.rl.config import RLTrainConfig
from innerloop.rl.episodes import rollout, rollout_noise
from innerloop.rl.families import make_env_family
from innerloop.rl.maml import PolicyMAML
from innerloop.rl.policy import GaussianMLP
from innerloop.rl.train import LearningCurve, meta_test_rl, meta_test_rl_scores, meta_train_rl

HAVE_METAWORLD = importlib.util.find_spec("metaworld") is not None
ROOT = Path(__file__).resolve().parents[2]


def needs_metaworld() -> None:
    pytest.importorskip("metaworld", reason="needs Meta-World: pip install 'innerloop[metaworld]'")


@pytest.fixture
def no_metaworld(hide_modules):
    """Make ``metaworld`` fail to import, as on a machine without the extra."""
    hide_modules("metaworld")


@pytest.mark.usefixtures("no_metaworld")
@pytest.mark.parametrize(("name", "options"), [("metaworld-ml1", {"env_name": "reach-v3"}),
                                               ("metaworld-ml1", {}), ("metaworld-ml10", {})])
def test_missing_metaworld_names_the_extra_to_install(name, options):
    with pytest.raises(rl_metaworld.MissingMetaWorldError, match=r"pip install 'innerloop\[metaworld\]'"):
        make_env_family(name, **options)
    assert issubclass(rl_metaworld.MissingMetaWorldError, ImportError)


@pytest.mark.usefixtures("no_metaworld")
def test_cli_reports_missing_metaworld_before_any_work(tmp_path, capsys):
    config = tmp_path / "mw.toml"
    config.write_text(f'out_dir = "{tmp_path / "run"}"\n[env]\nname = "metaworld-ml10"\n')
    assert main(["rl", "train", "--config", str(config), "--no-progress"]) == 2
    assert "pip install 'innerloop[metaworld]'" in capsys.readouterr().err
    assert not (tmp_path / "run" / "last.pt").exists()


class SuccessEnv:
    """A 1-d environment whose step ``t`` of copy ``j`` succeeds where ``succeed[j, t]``, terminating
    copy ``j`` after step ``stop[j]`` (for the success bookkeeping of :func:`rollout`)."""

    def __init__(self, succeed, stop):
        self.succeed, self.stop, self.num_envs, self.t = succeed, stop, succeed.shape[0], 0

    def reset(self, seed=None):
        self.t = 0
        return torch.zeros(self.num_envs, 1), {}

    def step(self, action):
        t, self.t = self.t, self.t + 1
        n = self.num_envs
        return (torch.zeros(n, 1), torch.ones(n), torch.as_tensor(self.stop) <= t, torch.full((n,), t + 1 >= 4),
                {"success": self.succeed[:, t].float()})


class SuccessFamily:
    name, obs_dim, act_dim, task_dim, horizon, seed = "success", 1, 1, 1, 4, 0

    def __init__(self, succeed, stop):
        self.succeed, self.stop = succeed, stop

    def tasks(self, split, indices):
        return torch.zeros(len(indices), 1)

    def make(self, tasks):
        return SuccessEnv(self.succeed, self.stop)


def test_an_episode_succeeds_if_any_step_taken_succeeded():
    # 2 tasks x 2 rollouts, horizon 4: a success at step 2; none; a success only after the episode
    # ended (step 3, terminated after step 1: not counted); two successes
    succeed = torch.tensor([[0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1], [1, 0, 1, 0]], dtype=torch.bool)
    stop = [9, 9, 1, 9]
    family = SuccessFamily(succeed, stop)
    policy = GaussianMLP(1, 1, [4])
    noise = rollout_noise(0, "train", [0, 1], "t", 2, 4, 1)
    episodes = rollout(family, policy, dict(policy.named_parameters()), family.tasks("train", [0, 1]), noise)
    assert episodes.success.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert episodes.task(1).success.tolist() == [[0.0, 1.0]]
    maml = PolicyMAML(policy)
    batch = maml.sample(family, "train", [0, 1], 2)
    assert batch.success.shape == (2, 2) and batch.success[:, 0].tolist() == [0.5, 0.5]
    assert batch.subset(slice(0, 1)).success.shape == (1, 2)
    tested = meta_test_rl_scores(maml, family, 2, 1, 2, progress=False)
    assert tested.success.metric == "success rate" and tested.success.per_step[0].mean == 0.5
    assert tested.success_per_class is None  # this family names no skills
    assert tested.returns == meta_test_rl(maml, family, 2, 1, 2, progress=False)


def test_the_learning_curve_logs_the_success_rate(tmp_path):
    succeed = torch.tensor([[0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1], [1, 0, 1, 0]], dtype=torch.bool)
    family = SuccessFamily(succeed, [9, 9, 1, 9])
    maml = PolicyMAML(GaussianMLP(1, 1, [4]))
    cfg = RLTrainConfig(iterations=1, meta_batch_size=2)
    meta_train_rl(maml, family, cfg, 2, tmp_path, progress=False, curve=LearningCurve(1, 2, 1, 2))
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert row["test_success_0"] == 0.5 and "test_success_1" in row and "test_return_1" in row


def test_families_without_success_report_none():
    family = make_env_family("nav2d", horizon=5)
    maml = PolicyMAML(GaussianMLP(2, 2, [4]))
    assert maml.sample(family, "train", [0, 1], 2).success is None
    scores = maml.evaluate_scores(family, "test", [0, 1], 1, 2)
    assert scores.success is None and scores.returns.shape == (2, 2)
    tested = meta_test_rl_scores(maml, family, 2, 1, 2, progress=False)
    assert tested.success is None and set(tested.to_dict()) == {"test"}


@pytest.fixture(scope="module")
def push():
    needs_metaworld()
    return make_env_family("metaworld-ml1", seed=0, horizon=12, env_name="push-v3")


def run_episode(env, actions):
    obs, _ = env.reset(seed=list(range(env.num_envs)))
    out = [obs]
    for a in actions:
        obs, reward, terminated, truncated, info = env.step(a)
        out += [obs, reward[:, None], info["success"][:, None], terminated[:, None].float(),
                truncated[:, None].float()]
    return torch.cat([o.reshape(env.num_envs, -1) for o in out], 1)


def test_ml1_splits_are_metaworlds_own(push):
    import metaworld

    bench = metaworld.ML1("push-v3", seed=0)
    test = push.tasks("test", range(50))
    assert test.shape == (50, 3) and test[:, 0].eq(1).all() and test[:, 2].tolist() == list(range(50))
    assert [t.data for t in push._decode(test)[1]] == [t.data for t in bench.test_tasks]
    assert push.task_classes(test[:2]) == ["push-v3", "push-v3"]
    train = push.tasks("train", range(100))
    assert train[:, 0].eq(0).all()
    assert sorted(train[:50, 2].tolist()) == list(range(50)) == sorted(train[50:, 2].tolist())  # cycles over all
    assert not torch.equal(train[:50], train[50:])  # each pass in its own order
    assert torch.equal(push.tasks("train", [7, 63]), train[[7, 63]])  # a pure function of the index
    train_data = {t.data for t in bench.train_tasks}
    assert all(t.data in train_data for t in push._decode(train[:50])[1])
    with pytest.raises(ValueError, match="no validation split"):
        push.tasks("val", [0])
    with pytest.raises(ValueError, match=r"test task 50 does not exist: .* 50 test tasks"):
        push.tasks("test", [50])
    with pytest.raises(ValueError, match=r"not a Meta-World environment; choose one of .*'reach-v3'"):
        make_env_family("metaworld-ml1", env_name="reach")
    with pytest.raises(ValueError, match="takes one option, env_name"):
        make_env_family("metaworld-ml1")
    with pytest.raises(ValueError, match=r"horizon must lie in \[1, 500\]"):
        make_env_family("metaworld-ml1", horizon=501, env_name="reach-v3")


def test_vector_env_steps_metaworld_itself(push):
    """Observations, rewards and success equal Meta-World's own environment given the task and the
    clipped action; truncation at the horizon; a stale vector environment is refused."""
    import metaworld

    bench = metaworld.ML1("push-v3", seed=0)
    g = torch.Generator().manual_seed(0)
    actions = [1.5 * torch.randn(1, 4, generator=g) for _ in range(12)]
    env = push.make(push.tasks("test", [3]))
    got = run_episode(env, actions)
    ref = bench.train_classes["push-v3"]()
    ref.set_task(bench.test_tasks[3])
    obs, _ = ref.reset()
    rows = [torch.as_tensor(obs, dtype=torch.float32)]
    for t, a in enumerate(actions):
        o, r, _, _, info = ref.step(a[0].clamp(-1, 1).double().numpy())
        rows += [torch.as_tensor(o, dtype=torch.float32), torch.tensor([r, info["success"], 0.0, float(t == 11)])]
    assert torch.equal(got[0], torch.cat(rows).float())
    with pytest.raises(RuntimeError, match="reset"):
        env.step(actions[0])
    push.make(push.tasks("test", [0]))
    with pytest.raises(RuntimeError, match="lent to a later make"):
        env.reset()


def test_reused_simulators_equal_fresh_ones_bit_for_bit(push):
    """Simulators that ran other goals (and more copies) give exactly a fresh family's episodes."""
    g = torch.Generator().manual_seed(1)
    actions = [2 * torch.randn(2, 4, generator=g) for _ in range(12)]
    for rows in ([[1, 0, 5], [0, 0, 9]], [[0, 0, 2], [1, 0, 7], [1, 0, 1]]):  # use the pool first
        run_episode(push.make(torch.tensor(rows, dtype=torch.float32)), [torch.cat([a, a[:1]])[:len(rows)]
                                                                          for a in actions])
    tasks = torch.tensor([[1, 0, 7], [0, 0, 9]], dtype=torch.float32)
    reused = run_episode(push.make(tasks), actions)
    fresh = make_env_family("metaworld-ml1", seed=0, horizon=12, env_name="push-v3")
    assert torch.equal(reused, run_episode(fresh.make(tasks), actions))
    copy = pickle.loads(pickle.dumps(push))  # what a worker process gets: the tasks, no simulators
    assert copy._pool is None and torch.equal(copy.tasks("train", range(5)), push.tasks("train", range(5)))
    assert torch.equal(reused, run_episode(copy.make(tasks), actions))


def test_meta_test_reports_success_per_skill(push):
    torch.manual_seed(0)
    maml = PolicyMAML(GaussianMLP(39, 4, [8], "tanh"))
    tested = meta_test_rl_scores(maml, push, 2, 1, 2, progress=False)
    assert set(tested.success_per_class) == {"push-v3"} and len(tested.success_per_class["push-v3"]) == 2
    assert tested.success_per_class["push-v3"][1] == pytest.approx(tested.success.per_step[1].mean)
    assert 0 <= tested.success.per_step[0].mean <= 1


@pytest.mark.slow  # building ML10's 750 tasks takes Meta-World seconds
def test_ml10_interleaves_held_out_skills():
    needs_metaworld()
    family = make_env_family("metaworld-ml10", seed=0, horizon=3)
    assert family.skills("test") == ["drawer-open-v3", "door-close-v3", "shelf-place-v3", "sweep-into-v3",
                                     "lever-pull-v3"]
    assert family.num_tasks("train") == 500 and family.num_tasks("test") == 250
    names = family.task_classes(family.tasks("test", range(40)))
    assert all(names.count(s) == 8 for s in family.skills("test"))
    assert names[:5] == family.skills("test")
    train = family.task_classes(family.tasks("train", range(500)))
    assert all(train.count(s) == 50 for s in family.skills("train"))
    env = family.make(family.tasks("test", range(5)))
    obs, _ = env.reset()
    assert obs.shape == (5, 39)
    assert env.step(torch.zeros(5, 4))[4]["success"].shape == (5,)
    with pytest.raises(ValueError, match="metaworld-ml10 takes no options"):
        make_env_family("metaworld-ml10", env_name="reach-v3")


@pytest.mark.slow  # a whole command-line run
def test_cli_trains_ml1_reach_end_to_end(tmp_path, capsys):
    needs_metaworld()
    out = tmp_path / "run"
    tiny = ["train.iterations=1", "train.meta_batch_size=2", "algorithm.rollouts=2", "env.horizon=20",
            "eval.test_tasks=2", "eval.rollouts=2", "eval.pretrain_iterations=1", "policy.hidden=[16]"]
    args = ["rl", "train", "--config", str(ROOT / "configs" / "rl_metaworld_ml1_reach.toml"), "--out", str(out),
            "--no-progress"]
    assert main(args + [a for s in tiny for a in ("--set", s)]) == 0
    printed = capsys.readouterr().out
    assert "success rate after 1 step" in printed and "| maml |" in printed
    report = json.loads((out / "results.json").read_text())
    for run in report["runs"].values():
        assert len(run["test_success"]["per_step"]) == 2 and set(run["success_per_class"]) == {"reach-v3"}
    assert "success rate" in (out / "results.md").read_text()
    assert (out / "success.png").exists() and (out / "adaptation.png").exists()
    logged = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"success_0", "success_1", "return_0"} <= set(logged)
    assert main(["rl", "eval", str(out / "last.pt"), "--tasks", "2", "--steps", "1", "--rollouts", "2"]) == 0
    assert "success rate after 1 step" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["ml1_reach", "ml1_push", "ml1_pick_place", "ml10"])
def test_configs_load(name):
    from innerloop.rl.config import load_rl_config

    cfg = load_rl_config(ROOT / "configs" / f"rl_metaworld_{name}.toml")
    assert cfg.env.name.startswith("metaworld-") and cfg.algorithm.rollouts == 10
    assert np.isclose(cfg.train.max_kl, 0.01)
