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
from innerloop.rl.workers import ParallelFamily
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


@dataclass(frozen=True)
class LearningCurve:
    """The test returns :func:`meta_train_rl` logs while it trains (``eval.curve_every`` of a config).

    Every ``every`` iterations (from iteration 0, before that iteration's update) the policy is
    adapted by 0..``steps`` policy-gradient steps of ``lr`` on ``rollouts`` episodes of each of the
    first ``tasks`` test tasks, and the mean returns are logged as ``test_return_0`` ..
    ``test_return_<steps>``. The rollouts draw the fixed noise of meta-testing, not the training's, so
    the run trains exactly as it would without the curve.
    """

    every: int
    tasks: int
    steps: int
    rollouts: int
    lr: float | Sequence[float] | None = None
    """The step size, or one per step (the last repeated)."""
    batch_steps: int | None = None
    """As in :func:`meta_test_rl`: each step's batch holds this many environment steps."""


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
    curve: LearningCurve | None = None,
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
        curve: a learning curve of test returns to log while training (:class:`LearningCurve`; the
            seconds it takes are logged as ``curve_s``, outside ``sample_s`` and ``update_s``).
    """
    place(algorithm, device)
    optimizer = torch.optim.Adam(algorithm.parameters(), lr=cfg.ppo_lr) if cfg.optimizer == "ppo" else None
    B = cfg.meta_batch_size

    def test_curve(step: int) -> dict[str, float]:
        if curve is None or step % curve.every:
            return {}
        t0 = time.perf_counter()
        scores = algorithm.evaluate_scores(family, "test", range(curve.tasks), curve.steps, curve.rollouts,
                                           curve.lr, batch_steps=curve.batch_steps)
        out = {f"test_return_{k}": r for k, r in enumerate(scores.returns.mean(0).tolist())}
        if scores.success is not None:  # Meta-World: the share of successful episodes too
            out.update({f"test_success_{k}": r for k, r in enumerate(scores.success.mean(0).tolist())})
        return {**out, "curve_s": time.perf_counter() - t0}

    def outer_step(step: int) -> dict[str, float]:
        tested = test_curve(step)
        t0 = time.perf_counter()
        batch = algorithm.sample(family, "train", range(step * B, (step + 1) * B), rollouts)
        returns = batch.returns.mean(0).tolist()
        success = {} if batch.success is None else {f"success_{k}": float(v)
                                                    for k, v in enumerate(batch.success.mean(0).tolist())}
        t1 = time.perf_counter()
        update = algorithm.outer_step(batch, optimizer, cfg)
        timing = {"sample_s": t1 - t0, "update_s": time.perf_counter() - t1}
        return {**{f"return_{k}": r for k, r in enumerate(returns)}, **success, **update, **timing, **tested}

    def postfix(means: Mapping[str, float]) -> dict[str, str]:
        returns = {f"ret{k[len('return_'):]}": f"{v:.1f}" for k, v in means.items() if k.startswith("return_")}
        returns.update({f"test{k[len('test_return_'):]}": f"{v:.1f}" for k, v in means.items()
                        if k.startswith("test_return_")})
        timing = {k[: -len("_s")]: f"{means[k]:.2f}s" for k in ("sample_s", "update_s") if k in means}
        return {**returns, **({"kl": f"{means['kl']:.4f}"} if "kl" in means else {}), **timing}

    if identity is None:  # the Python API: never resume silently into another set-up's folder
        # the family sampled in workers is the family: a run resumes with another number of workers
        own = family.family if isinstance(family, ParallelFamily) else family
        identity = plain_json({"algorithm": algorithm.name, "inner_lr": float(algorithm.inner_lr),
                           "inner_steps": int(algorithm.inner_steps), "rollouts": int(rollouts),
                           "parameters": {n: list(p.shape) for n, p in algorithm.named_parameters()},
                           "family": {"type": type(own).__name__, "seed": getattr(own, "seed", None)},
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


@dataclass(frozen=True)
class RLTestResult:
    """What :func:`meta_test_rl_scores` measured on the fixed test tasks."""

    returns: EvalResult
    """Mean return after 0..steps steps, mean ± 95% CI over tasks."""
    success: EvalResult | None
    """The share of successful episodes after 0..steps steps, mean ± 95% CI over tasks (``None`` for a
    family whose environments report no success)."""
    success_per_class: dict[str, list[float]] | None
    """Meta-World: the success rate after 0..steps steps averaged over the test tasks of each skill
    (ML10: each held-out skill; ML1: its one skill), by skill name; ``None`` otherwise."""

    def to_dict(self) -> dict[str, Any]:
        """The report's entries: ``test`` (returns), and ``test_success``, ``success_per_class`` where present."""
        out: dict[str, Any] = {"test": self.returns.to_dict()}
        if self.success is not None:
            out["test_success"] = self.success.to_dict()
        if self.success_per_class is not None:
            out["success_per_class"] = self.success_per_class
        return out


def meta_test_rl_scores(algorithm: PolicyMAML, family: EnvFamily, tasks: int, steps: int, rollouts: int,
                        lr: float | Sequence[float] | None = None, chunk: int = 20, split: str = "test", *,
                        device: str = "auto", progress: bool = True, desc: str | None = None,
                        batch_steps: int | None = None) -> RLTestResult:
    """Mean return, and success rate where the environments report success, after 0..``steps``
    policy-gradient steps on tasks ``0..tasks-1`` of ``split`` (fixed tasks and fixed rollout noise, the
    same for every policy), with 95% CIs over tasks; per skill too for a family that names its tasks'
    skills (``family.task_classes(rows)``, Meta-World). Computed on ``device`` (the policy moved there),
    the statistics on the CPU. ``progress``: a bar over the tasks (``desc`` its label) where stderr is a
    terminal. ``batch_steps``: each step's batch is the first episodes holding that many environment
    steps, at most ``rollouts`` of them (the MAML paper's test protocol; see
    :meth:`PolicyMAML.evaluate_scores`)."""
    place(algorithm, device)
    rows, success_rows = [], []
    with tqdm(total=tasks, desc=desc or f"meta-test {split}", unit="task", leave=False, dynamic_ncols=True,
              disable=None if progress else True) as bar:
        for begin in range(0, tasks, chunk):
            scores = algorithm.evaluate_scores(family, split, range(begin, min(tasks, begin + chunk)),  # type: ignore[arg-type]
                                               steps, rollouts, lr, batch_steps=batch_steps)
            rows.append(scores.returns.to("cpu", torch.float64))
            success_rows.append(None if scores.success is None else scores.success.to("cpu", torch.float64))
            bar.update(len(scores.returns))
    r = torch.cat(rows)
    per_step = [mean_ci95(r[:, k]) for k in range(steps + 1)]
    returns = EvalResult("return", tasks, per_step, per_step)
    if any(x is None for x in success_rows):
        return RLTestResult(returns, None, None)
    s = torch.cat([x for x in success_rows if x is not None])
    success_steps = [mean_ci95(s[:, k]) for k in range(steps + 1)]
    success = EvalResult("success rate", tasks, success_steps, success_steps)
    classes = getattr(family, "task_classes", None)
    per_class = None
    if classes is not None:
        names = classes(family.tasks(split, range(tasks)))  # type: ignore[arg-type]
        per_class = {n: s[[i for i, m in enumerate(names) if m == n]].mean(0).tolist()
                     for n in dict.fromkeys(names)}
    return RLTestResult(returns, success, per_class)


def meta_test_rl(algorithm: PolicyMAML, family: EnvFamily, tasks: int, steps: int, rollouts: int,
                 lr: float | Sequence[float] | None = None, chunk: int = 20, split: str = "test", *,
                 device: str = "auto", progress: bool = True, desc: str | None = None,
                 batch_steps: int | None = None) -> EvalResult:
    """Mean return after 0..``steps`` policy-gradient steps on tasks ``0..tasks-1`` of ``split``
    (fixed tasks and fixed rollout noise, the same for every policy), with 95% CIs over tasks: the
    ``returns`` of :func:`meta_test_rl_scores`, which also gives the success rates."""
    return meta_test_rl_scores(algorithm, family, tasks, steps, rollouts, lr, chunk, split, device=device,
                               progress=progress, desc=desc, batch_steps=batch_steps).returns


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


NAV2D_DYNAMICS = "maml-code"
"""The 2D navigation after innerloop 0.2.0 (actions scaled onto the velocity box, the episode ending in a box
around the goal), named in the identity of every nav2d run; a 0.2.0 checkpoint has no such entry."""

LEGACY_NAV2D_OPTIONS: dict[str, Any] = {"action_scale": 1.0, "termination": "euclidean"}
"""The options that rebuild the 2D navigation a 0.2.0 checkpoint was trained on."""


def rl_identity(cfg: RLConfig, name: str) -> dict[str, Any]:
    """The settings a checkpoint must share with a run to be resumed by it. A 2D-navigation run also
    names the environment's dynamics (:data:`NAV2D_DYNAMICS`), so a run of 0.2.0, trained on other
    dynamics under the same config, is not continued on these."""
    d = cfg.to_dict()
    train = {k: v for k, v in d["train"].items() if k not in ("iterations", "checkpoint_every", "loggers")}
    ident = {"algorithm": name, "env": d["env"], "policy": d["policy"], "algorithm_cfg": d["algorithm"],
             "train": train}
    if cfg.env.name == "nav2d":
        ident["nav2d_dynamics"] = NAV2D_DYNAMICS
    return ident


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
    sampler = sampling_family(cfg, family)
    try:
        return _train_and_test(cfg, out, device, loggers, sampler, family, progress=progress, overwrite=overwrite)
    finally:  # the worker processes stop when the run ends, also on an error
        if isinstance(sampler, ParallelFamily):
            sampler.close()


def sampling_family(cfg: RLConfig, family: EnvFamily) -> EnvFamily:
    """``family`` itself (``execution.workers = 0``) or a :class:`ParallelFamily` stepping its environments
    in ``execution.workers`` processes (started here; the caller closes it). The episodes are the same."""
    workers = cfg.execution.workers
    if not workers:
        return family
    try:
        return ParallelFamily(family, workers)
    except TypeError as err:  # a family that does not pickle
        raise ConfigError(f"execution.workers = {workers} cannot be used with env.name = {cfg.env.name!r}: {err}"
                          ) from err


def _train_and_test(cfg: RLConfig, out: Path, device: torch.device, loggers: Sequence[str | Logger],
                    family: EnvFamily, test_family: EnvFamily, *, progress: bool,
                    overwrite: bool) -> RunResult[PolicyMAML, EnvFamily]:
    """The body of :func:`run_rl`: ``family`` samples (in process or in workers), ``test_family`` (the
    family in process) goes into the result for the plots."""
    runs = [("maml", out, cfg.algorithm.inner_steps, cfg.train.iterations)]
    if cfg.eval.pretrain:
        runs.append(("pretrained", out / "pretrain", 0, cfg.eval.pretrain_iterations or cfg.train.iterations))
    if overwrite:
        for _, folder, _, _ in runs:
            clear_run(folder)
    out.mkdir(parents=True, exist_ok=True)
    e = cfg.eval
    lr = meta_test_lr(cfg)
    report: dict[str, Any] = {"config": cfg.to_dict(), "machine": machine(device), "runs": {},
                              "execution": {"device": str(device), "precision": "fp32", "batch_norm": "none",
                                            "workers": cfg.execution.workers}}
    trained: dict[str, PolicyMAML] = {}
    results: dict[str, EvalResult] = {}
    success: dict[str, EvalResult] = {}

    def test(name: str, algorithm: PolicyMAML, iterations: int, train_wall_s: float) -> None:
        t0 = time.perf_counter()
        tested = meta_test_rl_scores(algorithm, family, e.test_tasks, e.steps, e.rollouts, lr, device=str(device),
                                     progress=progress, desc=f"meta-test {name}", batch_steps=e.batch_steps)
        trained[name], results[name] = algorithm, tested.returns
        if tested.success is not None:
            success[name] = tested.success
        report["runs"][name] = {"iterations": iterations, "train_wall_s": train_wall_s,
                                "eval_wall_s": time.perf_counter() - t0, **tested.to_dict()}

    curve = None if e.curve_every is None else LearningCurve(e.curve_every, min(e.curve_tasks, e.test_tasks),
                                                              e.steps, e.rollouts, lr, e.batch_steps)
    for name, folder, inner_steps, iterations in runs:
        algorithm = build_algorithm(cfg, family, inner_steps)
        train_cfg = dataclasses.replace(cfg.train, iterations=iterations)
        tr = meta_train_rl(algorithm, family, train_cfg, cfg.algorithm.rollouts, folder,
                           identity=rl_identity(cfg, name), progress=progress, desc=name, device=str(device),
                           loggers=loggers, run_config=plain_json(cfg.to_dict()), curve=curve)
        test(name, algorithm, iterations, tr.wall_time_s)
    if e.random_init:
        test("random init", build_algorithm(cfg, family), 0, 0.0)
    title = (f"{cfg.env.name}: return after 0..{e.steps} policy-gradient steps ({lr_text(lr)}, "
             f"{batch_text(e)} per step), {e.test_tasks} fixed test tasks (mean ± 95% CI)")
    report["table"] = format_table(results, list(range(e.steps + 1)), title,
                                   run_note(device, "fp32", "none (MLP policy)"))
    if success:  # Meta-World: the share of episodes in which any step succeeded, beside the returns
        report["table"] += "\n\n" + format_table(
            success, list(range(e.steps + 1)),
            f"{cfg.env.name}: success rate (share of episodes with any successful step) after 0..{e.steps} "
            f"policy-gradient steps, the same {e.test_tasks} test tasks and episodes (mean ± 95% CI)")
    result = RunResult(report, results, trained, test_family, title, out)
    write_results(result)
    return result


def meta_test_lr(cfg: RLConfig) -> float | list[float]:
    """The step size of test-time adaptation: ``eval.inner_lr`` (else ``algorithm.inner_lr``), and
    ``[first, later]`` when ``eval.later_lr`` sets the steps after the first apart."""
    first = cfg.eval.inner_lr or cfg.algorithm.inner_lr
    return first if cfg.eval.later_lr is None else [first, cfg.eval.later_lr]


def lr_text(lr: float | Sequence[float]) -> str:
    """``lr 0.1``, or ``lr 0.5 then 0.25`` for a step size per step."""
    if isinstance(lr, (int, float)):
        return f"lr {lr}"
    return "lr " + " then ".join(str(x) for x in lr)


def batch_text(e: RLEvalConfig) -> str:
    """What a meta-test step samples, in words: ``20 episodes`` or ``the first episodes holding 4000
    steps (at most 400)``."""
    if e.batch_steps is None:
        return f"{e.rollouts} episodes"
    return f"the first episodes holding {e.batch_steps} steps (at most {e.rollouts})"


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
    if ident["env"].get("name", "nav2d") == "nav2d" and "nav2d_dynamics" not in ident:
        # a 0.2.0 checkpoint: rebuild the 2D navigation it was trained on
        d["env"] = {**d["env"], "options": {**LEGACY_NAV2D_OPTIONS, **(d["env"].get("options") or {})}}
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


def _same_identity(ours: Mapping[str, Any], theirs: Any) -> bool:
    """Whether a checkpoint's identity ``theirs`` is ``ours``; a 0.2.0 checkpoint names no 2D-navigation
    dynamics, which is then left out of the comparison."""
    if isinstance(theirs, Mapping) and "nav2d_dynamics" not in theirs:
        ours = {k: v for k, v in ours.items() if k != "nav2d_dynamics"}
    return bool(plain_json(dict(ours)) == plain_json(theirs))


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
        if any(_same_identity(rl_identity(saved, n), ident) for n in ("maml", "pretrained")):
            return saved.eval, str(report_path)
    return RLEvalConfig(), "the defaults"
