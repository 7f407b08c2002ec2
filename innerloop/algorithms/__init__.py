"""Meta-learning algorithms, one per file, behind :class:`Algorithm`; each declares its options
(a frozen dataclass) and capabilities, from which :data:`ALGORITHMS` is derived."""

from innerloop.algorithms.anil import ANIL, BOIL, ANILOptions
from innerloop.algorithms.base import (
    Algorithm,
    AlgorithmOptions,
    Capabilities,
    GradientBased,
    GradientOptions,
    ObjectiveFns,
    custom_objective,
)
from innerloop.algorithms.baseline import Baseline, BaselineOptions, BaselinePP, BaselinePPOptions
from innerloop.algorithms.imaml import IMAML, IMAMLOptions
from innerloop.algorithms.maml import MAML, MAMLOptions
from innerloop.algorithms.mamlpp import MAMLPlusPlus, MAMLPlusPlusOptions
from innerloop.algorithms.matchingnet import MatchingNet
from innerloop.algorithms.metaoptnet import MetaOptNet, MetaOptNetOptions
from innerloop.algorithms.pretrain import Pretrain, PretrainOptions
from innerloop.algorithms.protonet import ProtoNet, ProtoNetOptions
from innerloop.algorithms.rates import InnerLR, InnerWeightDecay
from innerloop.algorithms.registry import ALGORITHMS
from innerloop.algorithms.reptile import Reptile, ReptileOptions

__all__ = [
    "ALGORITHMS", "ANIL", "BOIL", "IMAML", "MAML", "ANILOptions", "Algorithm", "AlgorithmOptions", "Baseline",
    "BaselineOptions", "BaselinePP", "BaselinePPOptions", "Capabilities", "GradientBased", "GradientOptions",
    "IMAMLOptions", "InnerLR", "InnerWeightDecay", "MAMLOptions", "MAMLPlusPlus", "MAMLPlusPlusOptions",
    "MatchingNet", "MetaOptNet", "MetaOptNetOptions", "ObjectiveFns", "Pretrain", "PretrainOptions", "ProtoNet",
    "ProtoNetOptions",
    "Reptile", "ReptileOptions",
    "custom_objective",
]
