"""MAML (Finn et al. 2017), first-order MAML, and Meta-SGD (Li et al. 2017).

The meta-objective of a meta-batch of tasks ``i``::

    L(theta, alpha) = mean_i  L_query_i( adapt(theta, support_i; alpha) )

with ``adapt`` the inner loop of :mod:`innerloop.adapt`. Second order by default; with
``first_order=True`` the inner gradients are treated as constants (FOMAML). Learned inner
learning rates (``lr_mode`` other than ``fixed``) are meta-parameters too: ``per_element`` is
Meta-SGD. The inner update may carry a weight decay (``weight_decay``), fixed or learned by
hypergradient the same way (``wd_mode``).

The per-task loop (the default for conv nets) runs in the channels-last layout, spreads the
tasks over ``task_threads`` Python threads (one intra-op thread each) on CPU, and can checkpoint
the inner steps (``checkpoint=True``) so that second-order memory stays nearly flat in the number
of inner steps; ``benchmarks/speed`` measures each against learn2learn, higher and torchopt.
"""

from __future__ import annotations

import copy
import threading

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from innerloop.adapt import LRMode, Params, adapt, model_loss
from innerloop.algorithms.base import GradientBased, MemoryFormat, Vectorize
from innerloop.runtime import tune_malloc
from innerloop.tasks import Objective, TaskBatch


class MAML(GradientBased):
    """Model-agnostic meta-learning.

    Args:
        model: the network; its parameters are the meta-learned initialisation.
        objective: ``regression`` or ``classification``.
        inner_lr: inner learning rate (initial value when ``lr_mode`` learns it).
        inner_steps: inner gradient steps per task.
        first_order: drop second-order terms (FOMAML).
        lr_mode: ``fixed``, ``scalar``, ``per_tensor`` or ``per_element`` (Meta-SGD).
        adapt: parameters that adapt: ``all`` or glob patterns.
        vectorize: ``auto``, ``vmap`` or ``loop`` (see :class:`GradientBased`).
        weight_decay: inner weight decay (initial value when ``wd_mode`` learns it); 0: none.
        wd_mode: ``fixed``, ``scalar``, ``per_tensor`` or ``per_element`` (learned weight decay).
        memory_format: ``auto``, ``channels_last`` or ``contiguous`` (see :class:`GradientBased`).
        checkpoint: recompute each inner step's support pass in the outer backward instead of
            storing it (second order; see :func:`innerloop.adapt.adapt_trajectory`): memory that
            grows by a set of parameters, not of activations, per inner step.
        task_threads: the per-task loop's tasks run in this many Python threads, each with one
            intra-op thread (small per-task tensors parallelise poorly inside an op; whole tasks
            do); ``None``: ``torch.get_num_threads()`` on CPU, 1 on other devices. The thread
            count of torch is set to 1 during the call and restored after it. Same meta-gradient
            (summed in another order). Memory: the graphs of ``task_threads`` tasks are alive at
            once instead of one; ``task_threads=1`` is the smallest.
    """

    name = "maml"

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        first_order: bool = False,
        lr_mode: LRMode = "fixed",
        adapt: str | list[str] = "all",
        vectorize: Vectorize = "auto",
        weight_decay: float = 0.0,
        wd_mode: LRMode = "fixed",
        memory_format: MemoryFormat = "auto",
        checkpoint: bool = False,
        task_threads: int | None = None,
    ) -> None:
        super().__init__(
            model, objective, inner_lr, inner_steps, lr_mode, adapt, vectorize, weight_decay, wd_mode,
            memory_format,
        )
        if task_threads is not None and (not isinstance(task_threads, int) or task_threads < 1):
            raise ValueError(f"task_threads must be None or an integer >= 1, got {task_threads!r}.")
        self.first_order = first_order
        self.checkpoint = checkpoint
        self.task_threads = task_threads

    def task_loss(
        self, params: Params, buffers: Params, rates: Params, task: tuple[Tensor, ...],
        module: nn.Module | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Query (loss, metric) of one task after adaptation; differentiable in params, rates.

        ``task`` is ``(support_x [s, ...], support_y [s, ...], query_x [q, ...], query_y [q, ...])``.
        ``module``: a copy of the model to call instead of it (one per thread; implies
        ``torch.autograd.grad`` in the inner loop, which, unlike torch.func, is thread-safe).
        """
        sx, sy, qx, qy = task
        adapted = adapt(
            self._loss if module is None else model_loss(module, self.fns.loss), params, buffers, sx, sy,
            steps=self.inner_steps, lr=self.inner_lr.as_dict(rates),
            adapt_names=self.adapt_names, first_order=self.first_order, weight_decay=self.inner_wd.as_dict(),
            checkpoint=self.checkpoint, use_autograd=module is not None,
        )
        pred = functional_call(self.model if module is None else module, (adapted, buffers), (qx,))
        return self.fns.loss(pred, qy), self.fns.metric(pred.detach(), qy)

    def threads_for(self, batch: TaskBatch) -> int:
        """How many threads the per-task loop uses for ``batch`` (see ``task_threads``)."""
        if self.task_threads is not None:
            wanted = self.task_threads
        else:
            wanted = torch.get_num_threads() if batch.support_x.device.type == "cpu" else 1
        return max(1, min(wanted, len(batch)))

    def meta_gradient(self, batch: TaskBatch) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Mean over tasks of the query loss after adaptation, differentiated w.r.t. every
        meta-parameter (initial weights and learned learning rates)."""
        targets = dict(self.named_parameters())
        params, rates, buffers = self.params(), dict(self.inner_lr.rates), self.buffers_dict()
        tensors = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        n = len(batch)
        if self.use_vmap(second_order=not self.first_order):
            def one(*task: Tensor) -> tuple[Tensor, Tensor]:
                return self.task_loss(params, buffers, rates, task)

            losses, metrics = vmap(one)(*tensors)
            loss, metric = losses.mean(), metrics.mean()
            grads = self._grads(loss, targets)
        else:
            if batch.support_x.device.type == "cpu":
                tune_malloc()  # see innerloop.runtime: reuse freed activation memory
            threads = self.threads_for(batch)
            if threads == 1:
                parts = [self._loop(targets, params, buffers, rates, tensors, range(n), n, module=None)]
            else:
                parts = self._threaded_loop(targets, params, buffers, rates, tensors, n, threads)
            grads = {k: sum((p[0][k] for p in parts[1:]), parts[0][0][k]) for k in targets}
            loss = torch.tensor(sum(p[1] for p in parts) / n)
            metric = torch.tensor(sum(p[2] for p in parts) / n)
        return grads, {"loss": float(loss.detach()), self.metric_name: float(metric)}

    def _loop(
        self, targets: dict[str, Tensor], params: Params, buffers: Params, rates: Params,
        tensors: tuple[Tensor, ...], indices: range, n: int, module: nn.Module | None,
    ) -> tuple[dict[str, Tensor], float, float]:
        """Sum over the tasks ``indices`` of the meta-gradient of ``task_loss / n``, one backward
        per task (memory stays that of a single task's graph); also the summed loss and metric."""
        grads = {k: torch.zeros_like(v) for k, v in targets.items()}
        loss_sum = metric_sum = 0.0
        laid = self.layout_params(params)
        for i in indices:
            task = self.layout_task(tuple(t[i] for t in tensors))
            task_loss, task_metric = self.task_loss(laid, buffers, rates, task, module)
            for k, g in self._grads(task_loss / n, targets).items():
                grads[k] += g
            loss_sum += float(task_loss.detach())
            metric_sum += float(task_metric)
        return grads, loss_sum, metric_sum

    def _threaded_loop(
        self, targets: dict[str, Tensor], params: Params, buffers: Params, rates: Params,
        tensors: tuple[Tensor, ...], n: int, threads: int,
    ) -> list[tuple[dict[str, Tensor], float, float]]:
        """:meth:`_loop` over ``threads`` interleaved shares of the tasks, one Python thread and
        one copy of the model (called through ``functional_call`` with ``params``) each. Grad
        mode and autocast are thread-local in torch, so each thread takes the caller's."""
        results: list[tuple[dict[str, Tensor], float, float] | None] = [None] * threads
        errors: list[BaseException] = []
        grad_enabled = torch.is_grad_enabled()
        device = tensors[0].device.type
        autocast = torch.is_autocast_enabled(device)
        autocast_dtype = torch.get_autocast_dtype(device)

        def work(j: int, module: nn.Module) -> None:
            try:
                torch.set_num_threads(1)
                with torch.set_grad_enabled(grad_enabled), \
                        torch.autocast(device, dtype=autocast_dtype, enabled=autocast):
                    share = range(j, n, threads)
                    results[j] = self._loop(targets, params, buffers, rates, tensors, share, n, module)
            except BaseException as e:  # re-raised in the caller's thread
                errors.append(e)

        before = torch.get_num_threads()
        workers = [threading.Thread(target=work, args=(j, copy.deepcopy(self.model))) for j in range(threads)]
        try:
            for w in workers:
                w.start()
            for w in workers:
                w.join()
        finally:
            torch.set_num_threads(before)
        if errors:
            raise errors[0]
        return [r for r in results if r is not None]
