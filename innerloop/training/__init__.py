"""The one run skeleton (meta-training loop), evaluation, checkpoints and configuration."""

from innerloop.training.checkpoint import CheckpointError, load_checkpoint
from innerloop.training.config import Config, ConfigError, TrainConfig, config_from_dict, load_config
from innerloop.training.evaluate import EvalResult, meta_test
from innerloop.training.lock import RunLockedError, run_lock
from innerloop.training.loop import DivergenceError, MissingSplitError, TrainResult, meta_train, run_loop
from innerloop.training.run import load_for_eval, run

__all__ = [
    "CheckpointError", "Config", "ConfigError", "DivergenceError", "EvalResult", "MissingSplitError",
    "RunLockedError", "TrainConfig", "TrainResult", "config_from_dict", "load_checkpoint", "load_config",
    "load_for_eval", "meta_test", "meta_train", "run", "run_lock", "run_loop",
]
