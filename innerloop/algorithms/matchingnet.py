"""Matching Networks (Vinyals et al. 2016), without full-context embeddings.

An embedding network ``f`` maps every support and query example to a vector. A query ``q``
attends over the support set with a softmax over cosine similarities, and its predicted label
distribution is the attention-weighted sum of the one-hot support labels::

    a(q, s_i) = exp(cos(f(q), f(s_i))) / sum_j exp(cos(f(q), f(s_j)))
    p(c | q)  = sum_{i : y_i = c} a(q, s_i)

The "logits" are ``log p(c | q)`` (computed as a ``logsumexp`` of log-attention, so no ``log 0``
or underflow), and the loss is the negative log-likelihood of the query labels: since
``log p`` is normalised, ``cross_entropy(log p, y) = -log p(y | q)``.

What is left out, on purpose: the full-context embeddings of the paper (a bidirectional LSTM
over the support set and an attention LSTM for the query). The same embedding network embeds
support and query here, the variant most later work reports as "Matching Networks". As with
ProtoNets nothing adapts by gradient, so the metric after k steps is the same for every k.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from innerloop.adapt import Params
from innerloop.algorithms.base import AlgorithmOptions, NoOptions
from innerloop.algorithms.protonet import ProtoNet


def matching_logits(query: Tensor, support: Tensor, labels: Tensor, ways: int) -> Tensor:
    """``log p(c | q)`` of cosine-attention matching.

    Args:
        query: ``[m, d]`` query embeddings.
        support: ``[n, d]`` support embeddings.
        labels: ``[n]`` support labels in ``0..ways-1``; every class needs at least one example
            (a class without one gets ``-inf``).
        ways: number of classes.

    Returns:
        ``[m, ways]`` log-probabilities (each row's ``exp`` sums to 1).
    """
    cos = F.normalize(query, dim=-1) @ F.normalize(support, dim=-1).T  # [m, n]
    log_attention = cos.log_softmax(dim=-1)  # [m, n]
    member = F.one_hot(labels, ways).T.bool()  # [ways, n]: support example i is of class c
    masked = log_attention[:, None, :].masked_fill(~member[None], float("-inf"))  # [m, ways, n]
    return masked.logsumexp(dim=-1)


class MatchingNet(ProtoNet):
    """Matching Networks with cosine attention over the support set (no full-context embeddings).

    Args:
        model: the embedding network, ``[batch, *input] -> [batch, d]`` (e.g. ``Conv4(ways=0)``).
    """

    name = "matchingnet"
    Options: ClassVar[type[AlgorithmOptions]] = NoOptions  # not ProtoNets' (no prototypes to refine)

    def task_logits(self, model: nn.Module, params: Params, support_x: Tensor, support_y: Tensor,
                    query_x: Tensor) -> Tensor:
        """``[query, ways]`` log-probabilities of one task; support and query are embedded in one
        pass (BatchNorm sees the whole episode, as for ProtoNets)."""
        ways = int(support_y.max()) + 1
        z = self.embed(model, params, torch.cat([support_x, query_x]))
        return matching_logits(z[len(support_x) :], z[: len(support_x)], support_y, ways)
