"""innerloop: meta-learning ("learning to learn") on PyTorch, built on torch.func.

The public API is what this module exports; submodules hold the same names (and their helpers) by
layer: :mod:`innerloop.tasks`, :mod:`innerloop.adapt` (the one inner loop and its update rules),
:mod:`innerloop.execution` (how a meta-batch runs), :mod:`innerloop.data`, :mod:`innerloop.models`,
:mod:`innerloop.algorithms`, :mod:`innerloop.training`, :mod:`innerloop.rl`.
"""

import importlib.metadata

from innerloop.adapt import Adam, UpdateRule, adam, adapt, adapt_trajectory, model_loss, sgd, sgd_step, unroll
from innerloop.algorithms import (
    ALGORITHMS,
    ANIL,
    BOIL,
    IMAML,
    MAML,
    Algorithm,
    AlgorithmOptions,
    ANILOptions,
    Baseline,
    BaselineOptions,
    BaselinePP,
    BaselinePPOptions,
    Capabilities,
    GradientBased,
    GradientOptions,
    IMAMLOptions,
    InnerLR,
    InnerWeightDecay,
    MAMLOptions,
    MAMLPlusPlus,
    MAMLPlusPlusOptions,
    MatchingNet,
    MetaOptNet,
    MetaOptNetOptions,
    ObjectiveFns,
    Pretrain,
    PretrainOptions,
    ProtoNet,
    ProtoNetOptions,
    Reptile,
    ReptileOptions,
    custom_objective,
)
from innerloop.continual import ANML, OML, ANMLNet, ContinualOmniglot, OMLNet, stream_eval
from innerloop.data import (
    FewShotClassification,
    LinearRegression,
    MiniImageNet,
    Omniglot,
    Sinusoid,
    image_folder_dataset,
    make_family,
    task_family,
)
from innerloop.execution import Execution
from innerloop.models import MLP, WRN28_10, Conv4, ResNet12, load_pretrained
from innerloop.tasks import Task, TaskBatch, TaskFamily
from innerloop.training import (
    CheckpointError,
    Config,
    ConfigError,
    EvalResult,
    TrainConfig,
    TrainResult,
    config_from_dict,
    load_checkpoint,
    load_config,
    load_for_eval,
    meta_test,
    meta_train,
    run,
)
from innerloop.training.predict import Prediction, Predictor

try:
    __version__ = importlib.metadata.version("innerloop")
except importlib.metadata.PackageNotFoundError:  # on PYTHONPATH without being installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "ALGORITHMS", "ANIL", "ANML", "BOIL", "IMAML", "MAML", "MLP", "OML", "WRN28_10", "ANILOptions", "ANMLNet",
    "Adam", "Algorithm", "AlgorithmOptions", "Baseline", "BaselineOptions", "BaselinePP", "BaselinePPOptions",
    "Capabilities",
    "CheckpointError", "Config", "ConfigError", "ContinualOmniglot", "Conv4", "EvalResult", "Execution",
    "FewShotClassification",
    "GradientBased", "GradientOptions", "IMAMLOptions", "InnerLR", "InnerWeightDecay", "LinearRegression",
    "MAMLOptions", "MAMLPlusPlus", "MAMLPlusPlusOptions", "MatchingNet", "MetaOptNet", "MetaOptNetOptions",
    "MiniImageNet", "OMLNet", "ObjectiveFns", "Omniglot", "Prediction", "Predictor", "Pretrain", "PretrainOptions",
    "ProtoNet", "ProtoNetOptions", "Reptile",
    "ReptileOptions", "ResNet12", "Sinusoid",
    "Task", "TaskBatch", "TaskFamily", "TrainConfig", "TrainResult", "UpdateRule", "adam", "adapt",
    "adapt_trajectory", "config_from_dict", "custom_objective", "image_folder_dataset", "load_checkpoint",
    "load_config", "load_for_eval", "load_pretrained", "make_family", "meta_test", "meta_train", "model_loss",
    "run", "sgd", "sgd_step", "stream_eval", "task_family", "unroll",
]
