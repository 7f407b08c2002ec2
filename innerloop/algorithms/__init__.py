"""Meta-learning algorithms, one per file, behind :class:`Algorithm`."""

from innerloop.algorithms.anil import ANIL, BOIL
from innerloop.algorithms.base import Algorithm, GradientBased
from innerloop.algorithms.baseline import Baseline, BaselinePP
from innerloop.algorithms.imaml import IMAML
from innerloop.algorithms.maml import MAML
from innerloop.algorithms.mamlpp import MAMLPlusPlus
from innerloop.algorithms.matchingnet import MatchingNet
from innerloop.algorithms.pretrain import Pretrain
from innerloop.algorithms.protonet import ProtoNet
from innerloop.algorithms.reptile import Reptile

__all__ = [
    "ANIL", "BOIL", "IMAML", "MAML", "Algorithm", "Baseline", "BaselinePP", "GradientBased", "MAMLPlusPlus",
    "MatchingNet", "Pretrain", "ProtoNet", "Reptile",
]
