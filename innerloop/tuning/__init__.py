"""Hypergradient tuning of an ordinary training run: learning rates, weight decay, data weights.

:mod:`innerloop.tuning.hypergradient` holds the hyperparameters (:class:`Hyper`), the training run
as an inner loop (:class:`TrainingRun`) and the two hypergradients (:func:`unrolled`,
:func:`implicit`); :mod:`innerloop.tuning.tune` the outer loop on the run skeleton (:func:`tune`)
and ``innerloop tune --config F`` (:class:`TuneConfig`, :func:`run_tune`).
"""

from innerloop.tuning.hypergradient import (
    Hyper,
    Hypergradient,
    TrainingRun,
    implicit,
    mean_loss,
    per_example_loss,
    unrolled,
)
from innerloop.tuning.tune import (
    TuneConfig,
    TuneResult,
    TuneRun,
    load_tune_config,
    make_problem,
    run_tune,
    tune,
    tune_config_from_dict,
)

__all__ = [
    "Hyper", "Hypergradient", "TrainingRun", "TuneConfig", "TuneResult", "TuneRun", "implicit", "load_tune_config",
    "make_problem", "mean_loss", "per_example_loss", "run_tune", "tune", "tune_config_from_dict", "unrolled",
]
