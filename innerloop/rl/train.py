"""Meta-training and meta-testing of policies, and a whole run from an :class:`RLConfig`.

Meta-iteration ``t`` uses tasks ``t*B .. t*B+B-1`` of the ``train`` split, and every rollout's
randomness is a function of (family seed, split, task index, phase), so a run needs no sampler or
RNG state to resume: ``last.pt`` (written atomically) holds the policy, the PPO optimiser's state
and the iteration, and a resumed run continues exactly as the uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from innerloop.rl.config import RLConfig, RLTrainConfig
from innerloop.rl.envs import EnvFamily, make_env_family
from innerloop.rl.maml import PolicyMAML
from innerloop.rl.policy import GaussianMLP
from innerloop.rl.trpo import trpo_step
from innerloop.training.checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    check_state_compatible,
    load_checkpoint,
    resume_into,
    save_checkpoint,
)
from innerloop.training.config import ConfigError
from innerloop.training.evaluate import EvalResult, mean_ci95
from innerloop.training.loop import LAST, METRICS, _truncate_metrics
from innerloop.training.run import format_table, machine


@dataclass(frozen=True)
class RLTrainResult:
    """What a meta-RL training run ended with."""

    iterations: int
    wall_time_s: float
    """Training wall time in total, summed over the runs a resumed run continued."""
    final_returns: list[float]
    """Mean return after 0..inner_steps steps over the last logged meta-batch."""


def meta_train_rl(
    algorithm: PolicyMAML,
    family: EnvFamily,
    cfg: RLTrainConfig,
    rollouts: int,
    run_dir: str | Path | None = None,
    *,
    identity: dict[str, Any] | None = None,
    resume: bool = True,
    progress: bool = True,
    desc: str = "meta-train",
) -> RLTrainResult:
    """Meta-train ``algorithm`` on ``family``'s train split with TRPO (or PPO) in the outer loop.

    Args:
        algorithm: the :class:`PolicyMAML` to train (``inner_steps = 0`` trains the pre-trained
            baseline: one policy for all tasks).
        family: the environment family.
        cfg: iterations, meta-batch size, outer optimiser and its settings.
        rollouts: episodes per task per step.
        run_dir: where ``last.pt`` and ``metrics.jsonl`` go (None: nothing saved).
        identity: what must match for a checkpoint to be resumed; stored and compared.
        resume: continue from ``run_dir/last.pt`` when it exists.
        progress: a progress bar with the returns before and after adaptation and the speed.
    """
    run_dir = Path(run_dir) if run_dir is not None else None
    optimizer = torch.optim.Adam(algorithm.parameters(), lr=cfg.ppo_lr) if cfg.optimizer == "ppo" else None
    start, elapsed_before = 0, 0.0
    if run_dir is not None and resume and (run_dir / LAST).exists():
        payload = resume_into(algorithm, run_dir / LAST, identity)
        if optimizer is not None and payload.get("optimizer"):
            optimizer.load_state_dict(payload["optimizer"])
        start, elapsed_before = payload["step"], payload.get("wall_s", 0.0)
        _truncate_metrics(run_dir / METRICS, start)
    t0 = time.perf_counter()

    def checkpoint(step: int) -> None:
        assert run_dir is not None
        save_checkpoint(run_dir / LAST, {
            "algorithm": "maml-rl" if algorithm.inner_steps else "pretrain-rl", "identity": identity,
            "step": step, "state": algorithm.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "wall_s": elapsed_before + time.perf_counter() - t0,
        })

    log = None
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        log = (run_dir / METRICS).open("a")
    B = cfg.meta_batch_size
    fisher_tasks = max(1, round(B * cfg.fisher_subsample))
    bar = tqdm(total=cfg.iterations, initial=start, desc=desc, disable=not progress, dynamic_ncols=True)
    returns: list[float] = []
    try:
        for step in range(start, cfg.iterations):
            batch = algorithm.sample(family, "train", range(step * B, (step + 1) * B), rollouts)
            params = algorithm.params()
            if optimizer is None:
                sub = batch.subset(slice(0, fisher_tasks)) if fisher_tasks < B else None
                stats = trpo_step(
                    params, lambda p, b=batch: algorithm.surrogate(p, b), cfg.max_kl, cfg.cg_iterations,
                    cfg.cg_damping, cfg.backtracks,
                    fisher_kl=None if sub is None else (lambda p, b=sub: algorithm.surrogate(p, b)[1]),
                )
                outer = {"surrogate_before": stats.loss_before, "surrogate_after": stats.loss_after,
                         "kl": stats.kl, "step_fraction": stats.step_fraction}
            else:
                for _ in range(cfg.ppo_epochs):
                    loss, kl = algorithm.clipped_surrogate(params, batch, cfg.ppo_clip)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                outer = {"surrogate_after": float(loss.detach()), "kl": float(kl.detach())}
            done = step + 1
            returns = batch.returns.mean(0).tolist()
            wall = elapsed_before + time.perf_counter() - t0
            record = {"step": done, **{f"return_{k}": r for k, r in enumerate(returns)}, **outer, "wall_s": wall}
            bar.update(1)
            speed = (done - start) / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(**{f"ret{k}": f"{r:.1f}" for k, r in enumerate(returns)}, kl=f"{outer['kl']:.4f}",
                            it_s=f"{speed:.2f}")
            if log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()
            if run_dir is not None and (done % cfg.checkpoint_every == 0 or done == cfg.iterations):
                checkpoint(done)
    finally:
        bar.close()
        if log is not None:
            log.close()
    return RLTrainResult(cfg.iterations, elapsed_before + time.perf_counter() - t0, returns)


def meta_test_rl(algorithm: PolicyMAML, family: EnvFamily, tasks: int, steps: int, rollouts: int,
                 lr: float | None = None, chunk: int = 20, split: str = "test") -> EvalResult:
    """Mean return after 0..``steps`` policy-gradient steps on tasks ``0..tasks-1`` of ``split``
    (fixed tasks and fixed rollout noise, the same for every policy), with 95% CIs over tasks."""
    rows = []
    for begin in range(0, tasks, chunk):
        scores, _ = algorithm.evaluate(family, split, range(begin, min(tasks, begin + chunk)), steps,  # type: ignore[arg-type]
                                       rollouts, lr)
        rows.append(scores)
    r = torch.cat(rows)
    per_step = [mean_ci95(r[:, k]) for k in range(steps + 1)]
    return EvalResult("return", tasks, per_step, per_step)


def build_policy(cfg: RLConfig, family: EnvFamily) -> GaussianMLP:
    """The Gaussian MLP for ``family``, initialised from ``train.seed``."""
    torch.manual_seed(cfg.train.seed)
    p = cfg.policy
    return GaussianMLP(family.obs_dim, family.act_dim, p.hidden, p.activation, p.init_std)


def build_algorithm(cfg: RLConfig, family: EnvFamily, inner_steps: int | None = None) -> PolicyMAML:
    """A fresh policy wrapped in :class:`PolicyMAML` (``inner_steps = 0``: the pre-trained baseline)."""
    a = cfg.algorithm
    return PolicyMAML(build_policy(cfg, family), a.inner_lr, a.inner_steps if inner_steps is None else inner_steps,
                      a.first_order, a.estimator, a.discount, a.gae_lambda, a.normalize_advantages)


def build_env_family(cfg: RLConfig) -> EnvFamily:
    """The configured environment family; bad options become a :class:`ConfigError`."""
    try:
        return make_env_family(cfg.env.name, cfg.env.seed, cfg.env.horizon, **cfg.env.options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"env.options = {cfg.env.options!r} do not fit env.name = {cfg.env.name!r}: "
                          f"{err}") from err


def rl_identity(cfg: RLConfig, name: str) -> dict[str, Any]:
    """The settings a checkpoint must share with a run to be resumed by it."""
    d = cfg.to_dict()
    train = {k: v for k, v in d["train"].items() if k not in ("iterations", "checkpoint_every")}
    return {"algorithm": name, "env": d["env"], "policy": d["policy"], "algorithm_cfg": d["algorithm"],
            "train": train}


def run_rl(cfg: RLConfig, *, progress: bool = True, overwrite: bool = False, plot: bool = True) -> dict[str, Any]:
    """Meta-train MAML (and the pre-trained baseline), meta-test them beside the random
    initialisation, and write ``results.json``, ``results.md`` and plots into ``cfg.out_dir``."""
    cfg.validate()
    out = Path(cfg.out_dir)
    family = build_env_family(cfg)
    runs = [("maml", out, cfg.algorithm.inner_steps, cfg.train.iterations)]
    if cfg.eval.pretrain:
        runs.append(("pretrained", out / "pretrain", 0, cfg.eval.pretrain_iterations or cfg.train.iterations))
    if overwrite:
        for _, folder, _, _ in runs:
            for name in (LAST, METRICS):
                (folder / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    e = cfg.eval
    lr = e.inner_lr or cfg.algorithm.inner_lr
    report: dict[str, Any] = {"config": cfg.to_dict(), "machine": machine(), "runs": {}}
    trained: dict[str, PolicyMAML] = {}
    results: dict[str, EvalResult] = {}
    for name, folder, inner_steps, iterations in runs:
        algorithm = build_algorithm(cfg, family, inner_steps)
        train_cfg = dataclasses.replace(cfg.train, iterations=iterations)
        tr = meta_train_rl(algorithm, family, train_cfg, cfg.algorithm.rollouts, folder,
                           identity=rl_identity(cfg, name), progress=progress, desc=name)
        t0 = time.perf_counter()
        res = meta_test_rl(algorithm, family, e.test_tasks, e.steps, e.rollouts, lr)
        trained[name], results[name] = algorithm, res
        report["runs"][name] = {"iterations": iterations, "train_wall_s": tr.wall_time_s,
                                "eval_wall_s": time.perf_counter() - t0, "test": res.to_dict()}
    if e.random_init:
        algorithm = build_algorithm(cfg, family)
        t0 = time.perf_counter()
        res = meta_test_rl(algorithm, family, e.test_tasks, e.steps, e.rollouts, lr)
        trained["random init"], results["random init"] = algorithm, res
        report["runs"]["random init"] = {"iterations": 0, "train_wall_s": 0.0,
                                         "eval_wall_s": time.perf_counter() - t0, "test": res.to_dict()}
    title = (f"{cfg.env.name}: return after 0..{e.steps} policy-gradient steps (lr {lr}, {e.rollouts} episodes "
             f"per step), {e.test_tasks} fixed test tasks (mean ± 95% CI)")
    table = format_table(results, list(range(e.steps + 1)), title)
    report["table"] = table
    atomic_write_bytes(out / "results.json", lambda f: f.write(json.dumps(report, indent=2).encode()))
    atomic_write_bytes(out / "results.md", lambda f: f.write((table + "\n").encode()))
    if plot:
        from innerloop.plotting import plot_adaptation_curves
        from innerloop.rl.plots import plot_navigation

        plot_adaptation_curves(results, out / "adaptation.png", title)
        if cfg.env.name == "nav2d" and e.plot_tasks > 0:
            plot_navigation(trained, family, out / "trajectories.png", min(e.plot_tasks, e.test_tasks),
                            max(1, e.steps), e.rollouts, lr)
    return report


def load_rl_checkpoint(checkpoint: str | Path) -> tuple[RLConfig, PolicyMAML, EnvFamily]:
    """Rebuild the policy a checkpoint of :func:`run_rl` holds, with its config and family."""
    from innerloop.rl.config import rl_config_from_dict

    payload = load_checkpoint(checkpoint)
    ident = payload.get("identity")
    if not ident or "env" not in ident:
        raise CheckpointError(f"{checkpoint} is not a checkpoint of `innerloop rl train`.")
    d = RLConfig().to_dict()
    d.update(env=ident["env"], policy=ident["policy"], algorithm=ident["algorithm_cfg"])
    d["train"].update(ident["train"])
    cfg = rl_config_from_dict(d)
    family = build_env_family(cfg)
    algorithm = build_algorithm(cfg, family, 0 if ident["algorithm"] == "pretrained" else None)
    check_state_compatible(algorithm, payload["state"], str(checkpoint))
    algorithm.load_state_dict(payload["state"])
    return cfg, algorithm, family
