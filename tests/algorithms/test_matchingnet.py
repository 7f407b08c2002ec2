"""Matching Networks: logits by hand on a tiny example, loss and gradient against a hand-written
per-example computation, and the configuration."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from innerloop.algorithms.matchingnet import MatchingNet, matching_logits
from innerloop.tasks import TaskBatch
from innerloop.training.config import ConfigError, config_from_dict

pytestmark = pytest.mark.usefixtures("float64")


SUPPORT = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
LABELS = [0, 1, 1]
QUERY = [[1.0, 0.0], [0.0, 2.0]]


def test_logits_by_hand():
    """Cosines of q1 = (1, 0) with the support: 1, 0, 1/sqrt(2); of q2 = (0, 2): 0, 1, 1/sqrt(2).
    Attention is the softmax of the cosines; p(0) is the weight of s1, p(1) that of s2 and s3."""
    r = 1 / math.sqrt(2)
    z1 = math.e + 1 + math.exp(r)
    z2 = 1 + math.e + math.exp(r)
    expected = torch.tensor([[math.log(math.e / z1), math.log((1 + math.exp(r)) / z1)],
                             [math.log(1 / z2), math.log((math.e + math.exp(r)) / z2)]])
    got = matching_logits(torch.tensor(QUERY), torch.tensor(SUPPORT), torch.tensor(LABELS), 2)
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(got.exp().sum(-1), torch.ones(2), rtol=1e-14, atol=1e-14)


def test_a_class_without_support_examples_gets_minus_infinity():
    got = matching_logits(torch.tensor(QUERY), torch.tensor(SUPPORT), torch.tensor(LABELS), 3)
    assert bool(torch.isneginf(got[:, 2]).all()) and bool(torch.isfinite(got[:, :2]).all())


def _hand_loss(weight, support, labels, query, query_labels):
    """The paper's formula one example at a time: embed, cosine, softmax, sum over the class."""
    total = 0.0
    zs = [weight @ s for s in support]
    for q, y in zip(query, query_labels, strict=True):
        zq = weight @ q
        cos = [torch.dot(zq, s) / (zq.norm() * s.norm()) for s in zs]
        norm = sum(torch.exp(c) for c in cos)
        p_y = sum(torch.exp(c) for c, lab in zip(cos, labels, strict=True) if lab == y) / norm
        total = total - torch.log(p_y)
    return total / len(query)


def test_loss_and_gradient_by_hand():
    torch.manual_seed(0)
    embed = nn.Linear(2, 3, bias=False)
    net = MatchingNet(embed)
    support, query = torch.tensor(SUPPORT), torch.tensor(QUERY)
    labels, query_labels = torch.tensor(LABELS), torch.tensor([0, 1])
    batch = TaskBatch(support[None], labels[None], query[None], query_labels[None])
    grads, metrics = net.meta_gradient(batch)
    weight = embed.weight.detach().clone().requires_grad_()
    loss = _hand_loss(weight, support, LABELS, query, [0, 1])
    (expected,) = torch.autograd.grad(loss, weight)
    assert metrics["loss"] == pytest.approx(float(loss.detach()), rel=1e-12)
    torch.testing.assert_close(grads["model.weight"], expected, rtol=1e-12, atol=1e-13)
    scores = net.evaluate(batch, steps=2)
    assert scores["loss"].shape == (1, 3) and torch.equal(scores["loss"][:, 0], scores["loss"][:, 2])
    assert float(scores["loss"][0, 0]) == pytest.approx(float(loss.detach()), rel=1e-12)


def test_config_builds_an_embedding_network(tmp_path):
    from innerloop.data.images import ImageClassDataset
    from innerloop.data.sampling import FewShotClassification
    from innerloop.training.run import build_algorithm

    with pytest.raises(ConfigError, match="matchingnet needs a classification family"):
        config_from_dict({"algorithm": {"name": "matchingnet"}})
    cfg = config_from_dict({"task": {"family": "image-folder", "data_root": str(tmp_path), "ways": 2,
                                     "train_ways": 3, "shots": 1, "queries": 1},
                            "model": {"name": "conv4", "filters": 2}, "algorithm": {"name": "matchingnet"},
                            "eval": {"baseline": False, "ways": 2}})
    g = torch.Generator().manual_seed(0)
    images = {f"c{i}": torch.rand(2, 1, 16, 16, generator=g) for i in range(3)}
    family = FewShotClassification({"train": ImageClassDataset.from_dict(images)}, ways=3, shots=1, queries=1)
    algo = build_algorithm(cfg, family)
    assert isinstance(algo, MatchingNet) and algo.model.head is None
    grads, metrics = algo.meta_gradient(family.batch("train", range(2)).to(dtype=torch.float64))
    assert set(metrics) == {"loss", "accuracy"} and all(bool(torch.isfinite(v).all()) for v in grads.values())
