"""Losses and metrics named by import path in the tests of ``[objective]`` (``custom_losses:l1``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

CALLS = {"l1": 0}
NOT_CALLABLE = 3.0


def l1(pred: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error (counts its calls, so a test can see it is the loss used)."""
    CALLS["l1"] += 1
    return F.l1_loss(pred, target)


def max_error(pred: Tensor, target: Tensor) -> Tensor:
    """The largest absolute error of a task's query set."""
    return (pred - target).abs().max()
