"""The training loop, evaluation, checkpoints and configuration."""

from innerloop.training.checkpoint import CheckpointError
from innerloop.training.config import Config, ConfigError, config_from_dict, load_config
from innerloop.training.evaluate import EvalResult, meta_test
from innerloop.training.loop import TrainResult, meta_train

__all__ = [
    "CheckpointError", "Config", "ConfigError", "EvalResult", "TrainResult", "config_from_dict",
    "load_config", "meta_test", "meta_train",
]
