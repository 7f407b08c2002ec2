"""Online / continual meta-learning of representations: OML and ANML on continual Omniglot.

:class:`OML` (Javed & White 2019) and :class:`ANML` (Beaulieu et al. 2020) meta-learn a network so
that a head trained online, one pass, one image at a time, over a long stream of classes does not
forget. :class:`ContinualOmniglot` gives the meta-training tasks (a trajectory and a remember batch,
by index); :func:`stream_eval` is the meta-test protocol; :func:`meta_train_continual` and
:func:`pretrain_continual` (the non-meta-learned baseline) train through the one run skeleton
(:func:`innerloop.training.loop.run_loop`). Results: ``benchmarks/results/continual_omniglot.md``.
"""

from innerloop.continual.family import ContinualClasses, ContinualOmniglot, seeded
from innerloop.continual.learners import (
    ANML,
    OML,
    ContinualLearner,
    ContinualOptions,
    StreamResult,
    reset_rows,
    stream_eval,
    stream_split,
    streams,
)
from innerloop.continual.nets import ANMLNet, OMLNet, conv_stack
from innerloop.continual.train import meta_train_continual, pretrain_continual

__all__ = [
    "ANML", "OML", "ANMLNet", "ContinualClasses", "ContinualLearner", "ContinualOmniglot", "ContinualOptions",
    "OMLNet", "StreamResult", "conv_stack", "meta_train_continual", "pretrain_continual", "reset_rows", "seeded",
    "stream_eval", "stream_split", "streams",
]
