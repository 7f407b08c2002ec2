"""Prototypical Networks: prototypes and logits checked by hand."""

from __future__ import annotations

import torch
from torch import nn

from innerloop.algorithms.protonet import ProtoNet, proto_logits, prototypes
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
