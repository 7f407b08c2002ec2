"""Models used by the worked problems: an MLP (regression) and the few-shot image backbones (conv-4,
ResNet-12, WRN-28-10), with :func:`load_pretrained` for a body trained elsewhere."""

from innerloop.models.conv4 import Conv4
from innerloop.models.layers import BatchNorm2d, DropBlock, Dropout
from innerloop.models.mlp import MLP
from innerloop.models.pretrained import LoadReport, load_pretrained
from innerloop.models.resnet import ResNet12
from innerloop.models.wrn import WRN28_10

__all__ = ["MLP", "WRN28_10", "BatchNorm2d", "Conv4", "DropBlock", "Dropout", "LoadReport", "ResNet12",
           "load_pretrained"]
