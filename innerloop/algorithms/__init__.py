"""Meta-learning algorithms, one per file, behind :class:`Algorithm`."""

from innerloop.algorithms.anil import ANIL, BOIL
from innerloop.algorithms.base import Algorithm, GradientBased
from innerloop.algorithms.maml import MAML
from innerloop.algorithms.pretrain import Pretrain

__all__ = ["ANIL", "BOIL", "MAML", "Algorithm", "GradientBased", "Pretrain"]
