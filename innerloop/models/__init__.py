"""Models used by the worked problems: an MLP (regression) and the conv-4 backbone (few-shot images)."""

from innerloop.models.conv4 import Conv4
from innerloop.models.layers import BatchNorm2d
from innerloop.models.mlp import MLP

__all__ = ["MLP", "BatchNorm2d", "Conv4"]
