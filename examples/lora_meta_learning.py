"""Meta-learn LoRA adapters of a frozen transformer: only the adapters and the head adapt and learn.

A transformer classifier of a few million parameters (written out in plain PyTorch: token and
position embeddings, pre-LayerNorm blocks of multi-head self-attention and a GELU MLP, mean pooling,
a linear head; 3.3M parameters by default) is frozen (``requires_grad_(False)``); low-rank adapters
(LoRA, Hu et al. 2021: ``W x + (alpha / r) B A x`` with ``A [r, in]``, ``B [out, r]``, ``B`` zero at
the start) on the attention's q, k and v projections and the classification head are the only
trainable parameters (1.5% of them). MAML meta-learns their initial values (second order) and adapts
only them in the inner loop (``adapt=["*.lora_*", "head.*"]``); the frozen base gets no gradient, so
neither its fast weights nor its weight gradients are ever formed. ``benchmarks/lora.py`` measures
what that saves per meta-iteration against adapting the whole model (``benchmarks/results/lora.md``).

The task family (:class:`PatternTokens`) is synthetic N-way K-shot sequence classification: each
class of a task is a random set of "pattern" tokens, and a sequence of that class is uniform noise
tokens with a share of its positions replaced by tokens of the class's pattern. Which tokens make
which class changes from task to task (the learner finds it from the support set); that only a few
tokens of the vocabulary ever carry a class is what the tasks share, and what the adapters learn.

Attention is written out with matmul and softmax: ``F.scaled_dot_product_attention`` runs a fused
kernel on CPU whose backward has no derivative in torch 2.13, so second-order MAML through it fails
("derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented";
``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`` around the meta-gradient is the other way out).

    python examples/lora_meta_learning.py        # 1-2 minutes on 2 CPU cores
    python examples/lora_meta_learning.py --iterations 300 --layers 6 --test-tasks 600

The model code (:class:`LoRALinear`, :func:`add_lora`, :func:`freeze_base`, :class:`TokenTransformer`,
:func:`lora_transformer`) and the family are importable from this file (``tests/test_examples_lora.py``
and ``benchmarks/lora.py`` load it).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from fnmatch import fnmatchcase

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from innerloop import MAML, TrainConfig, meta_test, meta_train
from innerloop.tasks import Objective, Split, Task, TaskBatch, check_split, task_seed

LORA_ADAPT: tuple[str, ...] = ("*.lora_*", "head.*")
"""The ``adapt`` patterns of the trainable parameters: the adapters and the head."""


# -- LoRA ------------------------------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update: ``base(x) + (alpha / r) x A^T B^T``.

    Args:
        base: the linear layer to adapt (frozen here: ``requires_grad_(False)``).
        rank: ``r``, the rank of the update.
        alpha: the update's scale is ``alpha / r`` (LoRA's convention: changing ``r`` keeps the
            size of the initial update steps).

    Parameters: ``base.weight [out, in]``, ``base.bias [out]`` (frozen), ``lora_a [r, in]``
    (Kaiming-uniform, as in LoRA), ``lora_b [out, r]`` (zeros, so the layer starts as ``base``).
    """

    def __init__(self, base: nn.Linear, rank: int = 4, alpha: float = 8.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}.")
        self.base = base.requires_grad_(False)
        self.rank, self.scale = rank, alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., in] -> [..., out]``."""
        out: Tensor = self.base(x) + self.scale * F.linear(F.linear(x, self.lora_a), self.lora_b)
        return out

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}"


def add_lora(model: nn.Module, targets: Sequence[str] = ("q", "v"), rank: int = 4, alpha: float = 8.0,
             layers: Sequence[int] | None = None) -> nn.Module:
    """Replace every ``nn.Linear`` whose attribute name is in ``targets`` by a :class:`LoRALinear`
    around it (in place; returns ``model``). ``layers``: only in these blocks (``blocks.<i>.``) of a
    :class:`TokenTransformer`; ``None``: in every one."""
    for name, module in list(model.named_modules()):
        if layers is not None and not any(name.startswith(f"blocks.{i}.") for i in layers):
            continue
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, rank, alpha))
    return model


def freeze_base(model: nn.Module, trainable: Sequence[str] = LORA_ADAPT) -> nn.Module:
    """Freeze every parameter (``requires_grad_(False)``) except those matching ``trainable`` (glob
    patterns; default: the LoRA adapters and the head). Returns ``model``."""
    for name, p in model.named_parameters():
        p.requires_grad_(any(fnmatchcase(name, pat) for pat in trainable))
    return model


# -- the transformer -------------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    """Multi-head self-attention with separate ``q``, ``k``, ``v``, ``o`` projections (``[d, d]`` each),
    written out with matmul and softmax (twice differentiable everywhere)."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} must be a multiple of heads {heads}.")
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d_model, d_model) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        """``x [batch, length, d] -> [batch, length, d]``."""
        b, n, d = x.shape
        h = self.heads

        def split(t: Tensor) -> Tensor:  # [b, n, d] -> [b, h, n, d / h]
            return t.reshape(b, n, h, d // h).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // h), dim=-1)
        out: Tensor = self.o((weights @ v).transpose(1, 2).reshape(b, n, d))
        return out


class Block(nn.Module):
    """A pre-LayerNorm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))`` (GELU, 4 d)."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, heads)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        out: Tensor = x + self.mlp(self.ln2(x))
        return out


class TokenTransformer(nn.Module):
    """A sequence classifier: ``tokens [batch, length] (int64) -> logits [batch, classes]``.

    Token and learned position embeddings, ``layers`` pre-LN blocks, a final LayerNorm, mean pooling
    over positions and a linear ``head``. Parameter names: ``embed.weight``, ``pos``,
    ``blocks.<i>.attn.{q,k,v,o}.*``, ``blocks.<i>.mlp.{0,2}.*``, ``blocks.<i>.ln{1,2}.*``, ``ln.*``,
    ``head.*``.
    """

    def __init__(self, vocab: int, length: int, classes: int, d_model: int = 256, layers: int = 4,
                 heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(length, d_model))
        self.blocks = nn.Sequential(*(Block(d_model, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[-1]]
        logits: Tensor = self.head(self.ln(self.blocks(x)).mean(dim=-2))
        return logits


def lora_transformer(vocab: int, length: int, classes: int, *, d_model: int = 256, layers: int = 4,
                     heads: int = 4, rank: int = 8, alpha: float = 8.0, targets: Sequence[str] = ("q", "k", "v"),
                     lora_layers: Sequence[int] | None = None, frozen: bool = True, zero_head: bool = True,
                     seed: int = 0) -> TokenTransformer:
    """A :class:`TokenTransformer` (weights from ``seed``) with LoRA adapters on ``targets`` of the
    blocks ``lora_layers`` (``None``: every block). ``frozen``: everything but the adapters and the
    head is frozen (``False``: every parameter is trainable, adapters included). ``zero_head``: the head
    starts at zero (every class equally likely before adapting; the usual start of MAML's head for
    N-way tasks whose labels are permuted from task to task)."""
    torch.manual_seed(seed)
    model = TokenTransformer(vocab, length, classes, d_model, layers, heads)
    if zero_head:
        nn.init.zeros_(model.head.weight)
        nn.init.zeros_(model.head.bias)
    add_lora(model, targets, rank, alpha, lora_layers)
    if frozen:
        freeze_base(model)
    else:
        model.requires_grad_(True)
    return model


def count(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (elements) of ``model`` (that require grad, with ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# -- the task family -------------------------------------------------------------------------------------
class PatternTokens:
    """N-way K-shot sequence classification with per-task token patterns.

    Task ``i`` of a split (a pure function of ``(seed, split, i)``) draws ``ways`` disjoint sets of
    ``pattern`` tokens out of the first ``informative`` tokens of the vocabulary; an example of class
    ``c`` is ``length`` tokens uniform over all ``vocab`` of which each position is, with probability
    ``signal``, replaced by a uniform token of class ``c``'s set. Support: ``shots`` examples per
    class, query: ``queries`` per class, labels ``0..ways-1``. What the tasks share (which tokens can
    carry a class, and that the rest is noise) is what meta-learning can learn; which tokens make
    which class is each task's own.

    Tensors: ``x [examples, length]`` int64 tokens, ``y [examples]`` int64 labels.
    """

    objective: Objective = "classification"

    def __init__(self, ways: int = 5, shots: int = 1, queries: int = 5, *, vocab: int = 256, length: int = 16,
                 informative: int = 20, pattern: int = 4, signal: float = 0.2, seed: int = 0) -> None:
        if not ways * pattern <= informative <= vocab:
            raise ValueError(f"{ways} ways of {pattern} pattern tokens need >= {ways * pattern} informative "
                             f"tokens, and at most vocab = {vocab}; got informative = {informative}.")
        if not 0.0 < signal <= 1.0:
            raise ValueError(f"signal must be in (0, 1], got {signal}.")
        self.ways, self.shots, self.queries = ways, shots, queries
        self.vocab, self.length, self.informative = vocab, length, informative
        self.pattern, self.signal = pattern, signal
        self.seed = int(seed)

    def _examples(self, g: torch.Generator, patterns: Tensor, per_class: int) -> tuple[Tensor, Tensor]:
        n = self.ways * per_class
        labels = torch.arange(self.ways).repeat_interleave(per_class)
        noise = torch.randint(self.vocab, (n, self.length), generator=g)
        picks = patterns[labels[:, None], torch.randint(self.pattern, (n, self.length), generator=g)]
        keep = torch.rand(n, self.length, generator=g) < self.signal
        return torch.where(keep, picks, noise), labels

    def task(self, split: Split, index: int) -> Task:
        """Task ``index`` of ``split``: support ``[ways * shots, length]``, query ``[ways * queries, length]``."""
        check_split(split)
        g = torch.Generator().manual_seed(task_seed(self.seed, split, int(index), "PatternTokens"))
        chosen = torch.randperm(self.informative, generator=g)[: self.ways * self.pattern]
        patterns = chosen.view(self.ways, self.pattern)
        sx, sy = self._examples(g, patterns, self.shots)
        qx, qy = self._examples(g, patterns, self.queries)
        return Task(sx, sy, qx, qy)

    def batch(self, split: Split, indices: Sequence[int]) -> TaskBatch:
        """Tasks ``indices`` of ``split`` stacked: ``[len(indices), examples, length]``."""
        return TaskBatch.stack([self.task(split, int(i)) for i in indices])


# -- the run ---------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=80, help="outer steps (meta-batches)")
    p.add_argument("--meta-batch", type=int, default=4)
    p.add_argument("--outer-lr", type=float, default=3e-3)
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=3, help="query examples per class")
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--informative", type=int, default=20, help="tokens that can carry a class")
    p.add_argument("--signal", type=float, default=0.2, help="share of a sequence's positions that carry it")
    p.add_argument("--length", type=int, default=16)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", nargs="+", default=["q", "k", "v"], help="projections that get adapters")
    p.add_argument("--inner-lr", type=float, default=0.5)
    p.add_argument("--inner-steps", type=int, default=1)
    p.add_argument("--test-tasks", type=int, default=100)
    p.add_argument("--test-steps", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="task family and model initialisation")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    family = PatternTokens(args.ways, args.shots, args.queries, vocab=args.vocab, length=args.length,
                           informative=args.informative, signal=args.signal, seed=args.seed)
    model = lora_transformer(args.vocab, args.length, args.ways, d_model=args.d_model, layers=args.layers,
                             heads=args.heads, rank=args.rank, targets=args.targets, seed=args.seed)
    maml = MAML(model, "classification", inner_lr=args.inner_lr, inner_steps=args.inner_steps,
                adapt=list(LORA_ADAPT))
    named = dict(model.named_parameters())
    print(f"model: {count(model):,} parameters; {count(model, trainable_only=True):,} trainable "
          f"({len(maml.trainable())} tensors: adapters and head), "
          f"{sum(named[n].numel() for n in maml.adapt_names):,} adapted; the rest frozen", flush=True)
    frozen_before = {n: p.detach().clone() for n, p in named.items() if not p.requires_grad}

    def test(label: str) -> None:
        t0 = time.perf_counter()
        res = meta_test(maml, family, "test", tasks=args.test_tasks, steps=args.test_steps)
        steps = ", ".join(f"{k} step{'s' * (k != 1)} {res.per_step[k]}" for k in range(args.test_steps + 1))
        print(f"{label}: {args.ways}-way {args.shots}-shot accuracy on {args.test_tasks} test tasks after "
              f"{steps} ({time.perf_counter() - t0:.0f} s)", flush=True)

    test("before meta-training")
    cfg = TrainConfig(iterations=args.iterations, meta_batch_size=args.meta_batch, outer_lr=args.outer_lr,
                      validate_every=args.iterations, val_tasks=20, log_every=max(1, args.iterations // 10),
                      seed=args.seed)
    result = meta_train(maml, family, cfg, progress=False, val_steps=args.inner_steps)
    print(f"meta-trained {args.iterations} iterations of {args.meta_batch} tasks in {result.wall_time_s:.0f} s "
          f"({1000 * result.wall_time_s / args.iterations:.0f} ms per meta-iteration, validation included); "
          f"last training loss {result.final_metrics['loss']:.3f}", flush=True)
    test("after meta-training")
    unchanged = all(torch.equal(p, frozen_before[n]) for n, p in named.items() if n in frozen_before)
    print(f"frozen base unchanged: {unchanged}")


if __name__ == "__main__":
    main()
