"""Meta-training and meta-testing of policies, and a whole run from an :class:`RLConfig`.

Meta-training is the library's one run skeleton (:func:`innerloop.training.loop.run_loop`: resume,
atomic checkpoints, the JSON-lines log, the progress bar) around :meth:`PolicyMAML.outer_step`.
Meta-iteration ``t`` uses tasks ``t*B .. t*B+B-1`` of the ``train`` split, and every rollout's
randomness is a function of (family seed, split, task index, phase), so a run needs no sampler
state to resume: ``last.pt`` holds the policy, the PPO optimiser's state and the iteration, and a
resumed run continues exactly as the uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from innerloop.rl.config import RLConfig, RLEvalConfig, RLTrainConfig, rl_config_from_dict
from innerloop.rl.envs import EnvFamily
from innerloop.rl.families import make_env_family
from innerloop.rl.maml import PolicyMAML
from innerloop.rl.policy import GaussianMLP
from innerloop.training.checkpoint import CheckpointError, load_checkpoint, load_state
from innerloop.training.config import ConfigError, apply_overrides
from innerloop.training.device import place, run_device
from innerloop.training.evaluate import (
    EvalResult,
    RunResult,
    format_table,
    machine,
    mean_ci95,
    run_note,
    write_results,
)
from innerloop.training.loggers import Logger, check_loggers
from innerloop.training.loop import Schedule, clear_run, plain_json, run_loop


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
    device: str = "auto",
    loggers: Sequence[str | Logger] = ("jsonl",),
    run_config: Mapping[str, Any] | None = None,
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
        progress: a progress bar with the returns before and after adaptation, the seconds of the
            iteration spent sampling (rollouts and inner adaptation, ``sample_s``) and updating (the outer
            TRPO / PPO step, ``update_s``; both also logged) and the speed.
        device: where the policy computes (``execution.device``), resolved before any work; the policy
            is moved there before the optimiser is built.
        loggers: where the metrics go (names from :data:`~innerloop.training.loggers.LOGGER_NAMES` and
            :class:`~innerloop.training.loggers.Logger` objects; see :func:`~innerloop.training.loop.run_loop`).
        run_config: the run's whole config as plain data (``RLConfig.to_dict()``), stored in every
            checkpoint beside (not in) the identity, so ``innerloop rl eval`` tests as the run did.
    """
    place(algorithm, device)
    optimizer = torch.optim.Adam(algorithm.parameters(), lr=cfg.ppo_lr) if cfg.optimizer == "ppo" else None
    B = cfg.meta_batch_size

    def outer_step(step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        batch = algorithm.sample(family, "train", range(step * B, (step + 1) * B), rollouts)
        returns = batch.returns.mean(0).tolist()
        t1 = time.perf_counter()
        update = algorithm.outer_step(batch, optimizer, cfg)
        timing = {"sample_s": t1 - t0, "update_s": time.perf_counter() - t1}
        return {**{f"return_{k}": r for k, r in enumerate(returns)}, **update, **timing}

    def postfix(means: Mapping[str, float]) -> dict[str, str]:
        returns = {f"ret{k[len('return_'):]}": f"{v:.1f}" for k, v in means.items() if k.startswith("return_")}
        timing = {k[: -len("_s")]: f"{means[k]:.2f}s" for k in ("sample_s", "update_s") if k in means}
        return {**returns, **({"kl": f"{means['kl']:.4f}"} if "kl" in means else {}), **timing}

    if identity is None:  # the Python API: never resume silently into another set-up's folder
        identity = plain_json({"algorithm": algorithm.name, "inner_lr": float(algorithm.inner_lr),
                           "inner_steps": int(algorithm.inner_steps), "rollouts": int(rollouts),
                           "parameters": {n: list(p.shape) for n, p in algorithm.named_parameters()},
                           "family": {"type": type(family).__name__, "seed": getattr(family, "seed", None)},
                           "train": {k: v for k, v in dataclasses.asdict(cfg).items()
                                     if k not in ("iterations", "checkpoint_every")}})
    schedule = Schedule(cfg.iterations, log_every=1, checkpoint_every=cfg.checkpoint_every)
    tr = run_loop(algorithm, outer_step, schedule, run_dir, name=algorithm.name, optimizer=optimizer,
                  identity=identity, tasks_per_step=B, resume=resume, progress=progress, desc=desc,
                  postfix=postfix, loggers=loggers, run_config=run_config,
                  divergence_cause=f"learning rates too large: algorithm.inner_lr = {algorithm.inner_lr}"
                                   + (f", train.ppo_lr = {cfg.ppo_lr}" if cfg.optimizer == "ppo" else
                                      f", train.max_kl = {cfg.max_kl}"))
    returns = [v for k, v in tr.final_metrics.items() if k.startswith("return_")]
    return RLTrainResult(tr.steps, tr.wall_time_s, returns)


def meta_test_rl(algorithm: PolicyMAML, family: EnvFamily, tasks: int, steps: int, rollouts: int,
                 lr: float | None = None, chunk: int = 20, split: str = "test", *,
                 device: str = "auto", progress: bool = True, desc: str | None = None) -> EvalResult:
    """Mean return after 0..``steps`` policy-gradient steps on tasks ``0..tasks-1`` of ``split``
    (fixed tasks and fixed rollout noise, the same for every policy), with 95% CIs over tasks; computed
    on ``device`` (the policy moved there), the statistics on the CPU. ``progress``: a bar over the
    tasks (``desc`` its label) where stderr is a terminal."""
    place(algorithm, device)
    rows = []
    with tqdm(total=tasks, desc=desc or f"meta-test {split}", unit="task", leave=False, dynamic_ncols=True,
              disable=None if progress else True) as bar:
        for begin in range(0, tasks, chunk):
            scores, _ = algorithm.evaluate(family, split, range(begin, min(tasks, begin + chunk)),  # type: ignore[arg-type]
                                           steps, rollouts, lr)
            rows.append(scores.to("cpu", torch.float64))
            bar.update(len(scores))
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
    train = {k: v for k, v in d["train"].items() if k not in ("iterations", "checkpoint_every", "loggers")}
    return {"algorithm": name, "env": d["env"], "policy": d["policy"], "algorithm_cfg": d["algorithm"],
            "train": train}


def run_rl(cfg: RLConfig, *, progress: bool = True, overwrite: bool = False,
           loggers: Sequence[str | Logger] | None = None) -> RunResult[PolicyMAML, EnvFamily]:
    """Meta-train MAML (and the pre-trained baseline), meta-test them beside the random
    initialisation, and write ``results.json`` and ``results.md`` into ``cfg.out_dir``.

    ``loggers``: where the training metrics go (see :func:`meta_train_rl`; default: the config's
    ``train.loggers``); an unknown name or a logger's missing package is refused before anything is
    touched (before ``overwrite`` deletes the old checkpoints).

    Returns:
        the report (as a mapping: ``result["table"]``, ``result["runs"]``), with the policies and
        the family for the plots (:func:`innerloop.rl.plots.plot_rl_run`).
    """
    out = Path(cfg.out_dir)
    if loggers is None:
        loggers = tuple(cfg.train.loggers)
    check_loggers(loggers)  # an unknown name or a missing package: before --overwrite deletes anything
    try:  # a device this machine lacks fails here, before anything is touched
        device = run_device(cfg.execution.device)
    except ValueError as err:
        raise ConfigError(f"execution.{err}") from err
    family = build_env_family(cfg)
    runs = [("maml", out, cfg.algorithm.inner_steps, cfg.train.iterations)]
    if cfg.eval.pretrain:
        runs.append(("pretrained", out / "pretrain", 0, cfg.eval.pretrain_iterations or cfg.train.iterations))
    if overwrite:
        for _, folder, _, _ in runs:
            clear_run(folder)
    out.mkdir(parents=True, exist_ok=True)
    e = cfg.eval
    lr = e.inner_lr or cfg.algorithm.inner_lr
    report: dict[str, Any] = {"config": cfg.to_dict(), "machine": machine(device), "runs": {},
                              "execution": {"device": str(device), "precision": "fp32", "batch_norm": "none"}}
    trained: dict[str, PolicyMAML] = {}
    results: dict[str, EvalResult] = {}
    for name, folder, inner_steps, iterations in runs:
        algorithm = build_algorithm(cfg, family, inner_steps)
        train_cfg = dataclasses.replace(cfg.train, iterations=iterations)
        tr = meta_train_rl(algorithm, family, train_cfg, cfg.algorithm.rollouts, folder,
                           identity=rl_identity(cfg, name), progress=progress, desc=name, device=str(device),
                           loggers=loggers, run_config=plain_json(cfg.to_dict()))
        t0 = time.perf_counter()
        res = meta_test_rl(algorithm, family, e.test_tasks, e.steps, e.rollouts, lr, device=str(device),
                           progress=progress, desc=f"meta-test {name}")
        trained[name], results[name] = algorithm, res
        report["runs"][name] = {"iterations": iterations, "train_wall_s": tr.wall_time_s,
                                "eval_wall_s": time.perf_counter() - t0, "test": res.to_dict()}
    if e.random_init:
        algorithm = build_algorithm(cfg, family)
        t0 = time.perf_counter()
        res = meta_test_rl(algorithm, family, e.test_tasks, e.steps, e.rollouts, lr, device=str(device),
                           progress=progress, desc="meta-test random init")
        trained["random init"], results["random init"] = algorithm, res
        report["runs"]["random init"] = {"iterations": 0, "train_wall_s": 0.0,
                                         "eval_wall_s": time.perf_counter() - t0, "test": res.to_dict()}
    title = (f"{cfg.env.name}: return after 0..{e.steps} policy-gradient steps (lr {lr}, {e.rollouts} episodes "
             f"per step), {e.test_tasks} fixed test tasks (mean ± 95% CI)")
    report["table"] = format_table(results, list(range(e.steps + 1)), title,
                                   run_note(device, "fp32", "none (MLP policy)"))
    result = RunResult(report, results, trained, family, title, out)
    write_results(result)
    return result


STORED_CONFIG_SOURCE = "the checkpoint's own config"
"""How ``innerloop rl eval`` names the config a checkpoint stores as its settings' source."""


def _stored_rl_config(payload: Mapping[str, Any], source: str) -> dict[str, Any] | None:
    """The whole config a checkpoint of :func:`run_rl` stores (``payload["config"]``), None for an older one;
    :class:`CheckpointError` for an entry that is not a table of settings."""
    data = payload.get("config")
    if data is None:
        return None
    bad = not isinstance(data, dict) or any(not isinstance(data.get(k, {}), dict) for k in ("eval", "execution"))
    if bad:
        shown = repr(data) if len(repr(data)) <= 80 else repr(data)[:77] + "..."
        raise CheckpointError(f"{source} stores a config that is not a table of settings ({shown}); the file is "
                              "damaged or was not written by `innerloop rl train`. Train again, or evaluate "
                              "another checkpoint of the run.")
    return data


def load_rl_checkpoint(checkpoint: str | Path, overrides: Mapping[str, Any] | None = None,
                       payload: Mapping[str, Any] | None = None) -> tuple[RLConfig, PolicyMAML, EnvFamily]:
    """Rebuild the policy a checkpoint of :func:`run_rl` holds (written on any device; built on the CPU),
    with its config and family. ``overrides``: dotted config keys to change (``{"execution.device": "cuda"}``);
    ``payload``: the checkpoint already read. The env, policy, algorithm and training keys come from the
    identity; the ``[eval]`` section from the config the checkpoint stores (the defaults for an older
    checkpoint without one: see :func:`rl_eval_settings`); ``execution.device`` stays ``auto``."""
    if payload is None:
        payload = load_checkpoint(checkpoint)
    ident = payload.get("identity")
    if not ident or "env" not in ident:
        raise CheckpointError(f"{checkpoint} is not a checkpoint of `innerloop rl train`.")
    d = RLConfig().to_dict()
    own = _stored_rl_config(payload, str(checkpoint))
    if own is not None:
        d["eval"] = {**d["eval"], **own.get("eval", {})}
    d.update(env=ident["env"], policy=ident["policy"], algorithm=ident["algorithm_cfg"])
    d["train"].update(ident["train"])
    if own is not None:
        try:
            rl_config_from_dict(d)
        except ConfigError as err:
            raise CheckpointError(f"the config stored in {checkpoint} is invalid: {err} The file is damaged or "
                                  "was written by another version of innerloop; train again, or evaluate "
                                  "another checkpoint of the run.") from None
    cfg = rl_config_from_dict(apply_overrides(d, dict(overrides or {})))
    family = build_env_family(cfg)
    algorithm = build_algorithm(cfg, family, 0 if ident["algorithm"] == "pretrained" else None)
    load_state(algorithm, payload["state"], str(checkpoint))
    return cfg, algorithm, family


def rl_eval_settings(checkpoint: str | Path, payload: Mapping[str, Any],
                     cfg: RLConfig) -> tuple[RLEvalConfig, str]:
    """``(eval section, where it comes from)`` of the run that wrote ``checkpoint``: the config the
    checkpoint stores (``cfg.eval``, see :func:`load_rl_checkpoint`); for an older checkpoint without one
    the ``results.json`` beside it (or one folder up, for ``pretrain/``) when that report's config has the
    checkpoint's identity; else the defaults of :class:`RLEvalConfig`."""
    if _stored_rl_config(payload, str(checkpoint)) is not None:
        return cfg.eval, STORED_CONFIG_SOURCE
    ident = payload.get("identity")
    here = Path(checkpoint).parent
    for report_path in (here / "results.json", here.parent / "results.json"):
        try:
            saved = rl_config_from_dict(json.loads(report_path.read_text())["config"])
        except (OSError, ValueError, KeyError, TypeError):  # absent, unreadable, or of another version
            continue
        if any(plain_json(rl_identity(saved, n)) == plain_json(ident) for n in ("maml", "pretrained")):
            return saved.eval, str(report_path)
    return RLEvalConfig(), "the defaults"
