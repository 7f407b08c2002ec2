"""MetaOptNet (Lee et al. 2019) and R2D2 (Bertinetto et al. 2019): a linear classifier fitted to each
task's support embeddings by a convex problem (solved in closed form, or as a QP to a tolerance),
differentiated through its solution.

An embedding network maps each example to a vector; per task a linear head is fitted to the support
embeddings ``X [n, d]`` with one-hot labels ``Y [n, ways]``, and a query's logits are its embedding
times the head's weights, times a learned scale. The SVM is solved in the dual, on the ``n x n``
support Gram matrix ``K = X X^T`` (its QP's size does not grow with the embedding size); the ridge
head solves whichever of its dual and primal systems is smaller:

* ``ridge`` (R2D2): ridge regression onto the one-hot labels in closed form,
  ``W = X^T (X X^T + lambda I)^{-1} Y`` (Woodbury's form of ``(X^T X + lambda I)^{-1} X^T Y``; the smaller
  of the two systems is solved). Logits ``scale * Xq W``. R2D2's logit bias is left out: a bias shared
  by every class does not change a softmax cross-entropy.
* ``svm`` (MetaOptNet-SVM): the multi-class (Crammer-Singer) linear SVM, as its dual QP over
  ``alpha [n, ways]``::

      minimise   1/2 sum_ij K_ij alpha_i . alpha_j + diagonal/2 ||alpha||^2 - sum_i alpha_i[y_i]
      subject to alpha_i[c] <= C [c = y_i],   sum_c alpha_i[c] = 0

  with ``W = X^T alpha``, solved by :func:`innerloop.qp.qp_solve` (an interior-point method in float64)
  and differentiated by implicit differentiation of its KKT conditions. ``diagonal`` (MetaOptNet's code
  adds 1.0) keeps the QP strictly convex when ``n * ways`` exceeds the rank of ``K``.

The embedding network is learned end to end by the query cross-entropy, as for ProtoNets: nothing
adapts by gradient steps, so the metric after k steps is the same for every k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from innerloop.adapt import Params
from innerloop.algorithms.base import AlgorithmOptions, Capabilities, ObjectiveFns, check
from innerloop.algorithms.protonet import ProtoNet
from innerloop.execution import Execution
from innerloop.qp import qp_solve
from innerloop.tasks import Objective

Head = Literal["svm", "ridge"]
HEADS: tuple[str, ...] = ("svm", "ridge")


def ridge_weights(support: Tensor, targets: Tensor, lam: Tensor | float) -> Tensor:
    """Ridge regression ``W = argmin ||X W - Y||^2 + lam ||W||^2``, in closed form.

    Args:
        support: ``X [n, d]`` support embeddings.
        targets: ``Y [n, ways]`` regression targets (one-hot labels).
        lam: ``lambda > 0`` (a float, or a 0-d tensor to differentiate).

    Returns:
        ``W [d, ways]``: ``X^T (X X^T + lam I_n)^{-1} Y`` when ``n <= d`` (Woodbury's dual form), else
        ``(X^T X + lam I_d)^{-1} X^T Y``; the two are equal.
    """
    n, d = support.shape
    if n <= d:
        gram = support @ support.T + lam * torch.eye(n, dtype=support.dtype, device=support.device)
        coef: Tensor = torch.linalg.solve(gram, targets)  # [n, ways]
        return support.T @ coef
    cov = support.T @ support + lam * torch.eye(d, dtype=support.dtype, device=support.device)
    weights: Tensor = torch.linalg.solve(cov, support.T @ targets)
    return weights


def svm_qp(support: Tensor, labels: Tensor, ways: int, c: float,
           diagonal: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The Crammer-Singer SVM dual of one task as ``qp_solve``'s ``(Q, p, G, h, A, b)``.

    Variables ``alpha`` flattened as ``[n * ways]`` (example-major: ``alpha[i * ways + c]``).

    Args:
        support: ``[n, d]`` support embeddings; labels: ``[n]`` in ``0..ways-1``.
        c: the SVM's ``C`` (> 0); diagonal: added to ``Q``'s diagonal (>= 0).

    Returns:
        ``Q [n*ways, n*ways] = K (x) I_ways + diagonal I``, ``p = -onehot [n*ways]``, ``G = I``,
        ``h = C onehot``, ``A [n, n*ways] = I_n (x) 1^T``, ``b = 0 [n]``.
    """
    n, dtype, device = support.shape[0], support.dtype, support.device
    onehot = F.one_hot(labels, ways).to(dtype).reshape(-1)
    eye_w = torch.eye(ways, dtype=dtype, device=device)
    gram = support @ support.T
    Q = torch.kron(gram, eye_w) + diagonal * torch.eye(n * ways, dtype=dtype, device=device)
    G = torch.eye(n * ways, dtype=dtype, device=device)
    A = torch.kron(torch.eye(n, dtype=dtype, device=device), torch.ones(1, ways, dtype=dtype, device=device))
    return Q, -onehot, G, c * onehot, A, torch.zeros(n, dtype=dtype, device=device)


def svm_dual(support: Tensor, labels: Tensor, ways: int, c: float, diagonal: float, *, tol: float = 1e-8,
             max_iter: int = 50) -> Tensor:
    """``alpha [n, ways]``: the solution of :func:`svm_qp`'s QP, differentiable w.r.t. ``support``."""
    Q, p, G, h, A, b = svm_qp(support, labels, ways, c, diagonal)
    z = qp_solve(Q, p, G.detach(), h.detach(), A.detach(), b.detach(), tol=tol, max_iter=max_iter).z
    return z.reshape(support.shape[0], ways)


@dataclass(frozen=True)
class MetaOptNetOptions(AlgorithmOptions):
    """Options of :class:`MetaOptNet` (and its variant ``r2d2``, which fixes ``head = "ridge"``)."""

    head: Head = "svm"
    """The per-task linear head: ``svm`` (Crammer-Singer SVM, a QP) or ``ridge`` (R2D2's closed form)."""
    svm_c: float = 0.1
    """The SVM's ``C``: the bound on each dual variable (larger: harder margins). MetaOptNet's default."""
    svm_diagonal: float = 1.0
    """Added to the diagonal of the SVM dual's ``Q`` (MetaOptNet's code adds 1.0; keeps it strictly convex)."""
    ridge_lambda: float = 50.0
    """The ridge penalty ``lambda`` (initial value where learned). MetaOptNet's R2D2 default."""
    learn_lambda: bool = False
    """Meta-learn ``lambda`` (through its logarithm), as R2D2's paper does."""
    logit_scale: float = 1.0
    """The factor on the query logits (initial value where learned)."""
    learn_scale: bool = True
    """Meta-learn the logit scale (MetaOptNet and R2D2 both do)."""
    qp_tol: float = 1e-8
    """The SVM QP's convergence tolerance (:func:`innerloop.qp.qp_solve`, relative). The gradient is the
    implicit one at the point reached: where constraints are nearly degenerate (a small multiplier and a
    small slack, as with large Gram matrices) it can differ from the exact one by 1e-2 (relative) or more
    at 1e-8; tighten it (1e-10 to 1e-12, 2-4 more iterations) where the gradient must be exact."""
    qp_max_iter: int = 50
    """Interior-point iterations of the SVM QP before it is refused as not converged."""

    def check(self) -> None:
        super().check()
        check(self.head in HEADS, "head", self.head, f"choose one of {list(HEADS)}")
        check(self.svm_c > 0, "svm_c", self.svm_c, "must be > 0")
        check(self.svm_diagonal >= 0, "svm_diagonal", self.svm_diagonal, "must be >= 0")
        check(self.ridge_lambda > 0, "ridge_lambda", self.ridge_lambda, "must be > 0")
        check(self.logit_scale != 0, "logit_scale", self.logit_scale, "must be non-zero (0 gives constant logits)")
        check(0 < self.qp_tol < 1, "qp_tol", self.qp_tol, "must be in (0, 1), e.g. 1e-8")
        check(self.qp_max_iter >= 1, "qp_max_iter", self.qp_max_iter, "must be an integer >= 1")


class MetaOptNet(ProtoNet):
    """MetaOptNet-SVM and R2D2: a differentiable convex head fitted to each task's support embeddings.

    Args:
        model: the embedding network, ``[batch, *input] -> [batch, d]`` (e.g. ``Conv4(ways=0)``).
        options: :class:`MetaOptNetOptions` (or its fields as keywords: ``head="ridge"``).

    Meta-parameters: the model's and ``scale`` (the logit scale), and ``log_lambda`` for the ridge head
    (frozen unless ``learn_lambda``).
    """

    name = "metaoptnet"
    Options: ClassVar[type[AlgorithmOptions]] = MetaOptNetOptions
    capabilities = Capabilities(objectives=("classification",), head="none", any_test_ways=True,
                                more_train_ways=True)
    variants: ClassVar[dict[str, dict[str, Any]]] = {"r2d2": {"head": "ridge"}}

    def __init__(self, model: nn.Module, objective: Objective | ObjectiveFns = "classification",
                 options: AlgorithmOptions | None = None, execution: Execution | None = None,
                 **overrides: Any) -> None:
        super().__init__(model, objective, options, execution, **overrides)
        o: MetaOptNetOptions = self.options
        like = next(model.parameters(), torch.empty(0))
        dtype = like.dtype if like.is_floating_point() else None
        self.scale = nn.Parameter(torch.tensor(o.logit_scale, dtype=dtype, device=like.device),
                                  requires_grad=o.learn_scale)
        self.log_lambda = nn.Parameter(torch.tensor(math.log(o.ridge_lambda), dtype=dtype, device=like.device),
                                       requires_grad=o.head == "ridge" and o.learn_lambda)

    def head_logits(self, zs: Tensor, sy: Tensor, zq: Tensor, ways: int) -> Tensor:
        """Unscaled logits ``[m, ways]`` of queries ``zq [m, d]`` from the head fitted to ``zs [n, d]``
        with labels ``sy [n]``."""
        o: MetaOptNetOptions = self.options
        if o.head == "ridge":
            onehot = F.one_hot(sy, ways).to(zs.dtype)
            return zq @ ridge_weights(zs, onehot, self.log_lambda.exp().to(zs.dtype))
        alpha = svm_dual(zs, sy, ways, o.svm_c, o.svm_diagonal, tol=o.qp_tol, max_iter=o.qp_max_iter)
        return (zq @ zs.T) @ alpha

    def task_logits(self, model: nn.Module, params: Params, support_x: Tensor, support_y: Tensor,
                    query_x: Tensor) -> Tensor:
        """Logits ``[query, ways]`` of one task; support and query are embedded in one pass (BatchNorm
        sees the whole episode, as for ProtoNets). The head runs in at least float32 (also under autocast)."""
        ways = int(support_y.max()) + 1
        z = self.embed(model, params, torch.cat([support_x, query_x]))
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        zs, zq = z[: len(support_x)], z[len(support_x) :]
        with torch.autocast(z.device.type, enabled=False):
            return self.scale.to(z.dtype) * self.head_logits(zs, support_y, zq, ways)


__all__ = ["HEADS", "MetaOptNet", "MetaOptNetOptions", "ridge_weights", "svm_dual", "svm_qp"]
