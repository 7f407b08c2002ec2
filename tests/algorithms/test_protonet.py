"""Prototypical Networks: prototypes and logits checked by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from innerloop.algorithms.protonet import ProtoNet, proto_logits, prototypes, refine_prototypes
from innerloop.tasks import TaskBatch


def test_prototypes_and_logits_by_hand():
    support = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [0.0, 2.0]])
    labels = torch.tensor([0, 0, 1, 1])
    protos = prototypes(support, labels, 2)
    assert torch.equal(protos, torch.tensor([[1.0, 0.0], [0.0, 3.0]]))
    query = torch.tensor([[1.0, 1.0]])
    # squared distances: to (1,0): 1; to (0,3): 1 + 4 = 5
    torch.testing.assert_close(proto_logits(query, protos), torch.tensor([[-1.0, -5.0]]))


def test_protonet_loss_and_gradient_on_identity_embedding():
    emb = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        emb.weight.copy_(torch.eye(2))
    net = ProtoNet(emb)
    batch = TaskBatch(
        torch.tensor([[[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [0.0, 2.0]]]),
        torch.tensor([[0, 0, 1, 1]]),
        torch.tensor([[[1.0, 1.0]]]),
        torch.tensor([[0]]),
    )
    grads, metrics = net.meta_gradient(batch)
    expected = torch.nn.functional.cross_entropy(torch.tensor([[-1.0, -5.0]]), torch.tensor([0]))
    assert abs(metrics["loss"] - expected.item()) < 1e-6 and metrics["accuracy"] == 1.0
    assert grads["model.weight"].shape == (2, 2)
    scores = net.evaluate(batch, steps=3)
    assert scores["accuracy"].shape == (1, 4) and bool((scores["accuracy"] == 1.0).all())


def test_refine_prototypes_one_step_by_hand():
    support = torch.tensor([[0.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    protos = prototypes(support, labels, 2)
    query = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    # logits -1 (to (0,0)) and -9 (to (0,4)): w = softmax([-1, -9]) = [1, e^-8] / (1 + e^-8)
    w0 = 1 / (1 + math.exp(-8.0))
    w1 = 1 - w0
    expected = torch.tensor([[0.0, w0 / (1 + w0)], [0.0, (4.0 + w1) / (1 + w1)]], dtype=torch.float64)
    torch.testing.assert_close(refine_prototypes(protos, support, labels, query, 1), expected)
    assert torch.equal(refine_prototypes(protos, support, labels, query, 0), protos)


def test_refine_prototypes_steps_iterate_the_rule():
    g = torch.Generator().manual_seed(0)
    support, labels = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.tensor([0, 0, 1, 1, 2, 2])
    query = torch.randn(9, 3, generator=g, dtype=torch.float64)
    protos = prototypes(support, labels, 3)
    once = refine_prototypes(protos, support, labels, query, 1)
    torch.testing.assert_close(refine_prototypes(protos, support, labels, query, 3),
                               refine_prototypes(refine_prototypes(once, support, labels, query, 1),
                                                 support, labels, query, 1))


def test_transductive_steps_change_evaluation_only():
    torch.manual_seed(0)
    emb = nn.Linear(4, 3)
    batch = TaskBatch(torch.randn(2, 6, 4), torch.tensor([[0, 0, 1, 1, 2, 2]] * 2),
                      torch.randn(2, 12, 4), torch.randint(3, (2, 12)))
    plain, refined = ProtoNet(emb), ProtoNet(emb, transductive_steps=2)
    g0, m0 = plain.meta_gradient(batch)
    g1, m1 = refined.meta_gradient(batch)
    assert m0 == m1 and all(torch.equal(g0[k], g1[k]) for k in g0)  # meta-training: the plain prototypes
    # evaluation: the logits of the refined prototypes (by hand, through the same embedding)
    for t in range(2):
        z = emb(torch.cat([batch.support_x[t], batch.query_x[t]]))
        zs, zq = z[:6], z[6:]
        protos = refine_prototypes(prototypes(zs, batch.support_y[t], 3), zs, batch.support_y[t], zq, 2)
        expected = (proto_logits(zq, protos).argmax(-1) == batch.query_y[t]).float().mean()
        torch.testing.assert_close(refined.evaluate(batch, steps=0)["accuracy"][t, 0], expected)


def test_transductive_steps_refused_when_negative():
    with pytest.raises(ValueError, match="transductive_steps"):
        ProtoNet(nn.Linear(2, 2), transductive_steps=-1)


def test_tables_say_the_prototypes_were_refined():
    from innerloop.training.config import Config
    from innerloop.training.evaluate import run_note
    from innerloop.training.run import refine_steps_of

    cfg = Config().override({"task.family": "omniglot", "model.name": "conv4", "eval.baseline": False,
                             "algorithm.name": "protonet", "algorithm.transductive_steps": 3})
    assert refine_steps_of(cfg) == 3 and refine_steps_of(Config()) == 0
    assert run_note("cpu", "fp32", "none", "none", 3).endswith(
        "prototypes refined by 3 soft k-means steps on the queries (transductive)")
    assert "refined" not in run_note("cpu", "fp32", "none", "none")
