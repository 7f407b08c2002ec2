"""innerloop: meta-learning ("learning to learn") on PyTorch, built on torch.func."""

from innerloop.adapt import adapt, adapt_trajectory, model_loss, sgd_step
from innerloop.algorithms import MAML, Algorithm, GradientBased, Pretrain
from innerloop.algorithms.rates import InnerLR, InnerWeightDecay
from innerloop.data import LinearRegression, Sinusoid, make_family
from innerloop.tasks import Task, TaskBatch, TaskFamily
from innerloop.training import Config, meta_test, meta_train

__version__ = "0.1.0"

__all__ = [
    "MAML", "Algorithm", "Config", "GradientBased", "InnerLR", "InnerWeightDecay", "LinearRegression", "Pretrain",
    "Sinusoid", "Task", "TaskBatch", "TaskFamily", "adapt", "adapt_trajectory", "make_family",
    "meta_test", "meta_train", "model_loss", "sgd_step",
]
