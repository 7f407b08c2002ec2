"""Build the next meta-batches on a background thread while the current one computes.

:class:`Prefetcher` runs ``make(i)`` for ``i = start, start + 1, ...`` on one daemon thread, at
most ``depth`` items ahead of the consumer, and hands item ``i`` to :meth:`Prefetcher.get` ``(i)``.
Item ``i`` is exactly what ``make(i)`` returns inline: the thread only moves *when* it is built,
so a family whose task ``i`` is a function of (seed, split, index), as every innerloop family is,
trains bit for bit as without prefetching. A thread rather than worker processes: a meta-batch is
a gather of tensors already in memory (torch and numpy release the GIL while they copy), so a
thread overlaps it with compute without pickling batches between processes
(``benchmarks/data_compute.py`` measures the split; results in ``benchmarks/results/data_compute.md``).

An exception raised by ``make`` is raised again by :meth:`Prefetcher.get` in the consumer's thread
(the same exception object, its traceback reaching into ``make``); :meth:`Prefetcher.close` (also
on leaving a ``with`` block, on an error or ``KeyboardInterrupt``) stops and joins the thread.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

_POLL_S = 0.05
"""How often a blocked producer or consumer looks whether the other side has stopped."""


class Prefetcher(Generic[T]):
    """``get(i) == make(i)``, built up to ``depth`` items ahead on a background thread.

    Args:
        make: ``index -> item`` (e.g. step ``t`` -> meta-batch ``t``, pinned when it goes to a GPU);
            called on the background thread, in index order.
        depth: how many items may wait, built, for the consumer (>= 1).
        stop: the first index not to build (``None``: no end).
        name: the thread's name.

    A :meth:`get` of an index other than the next one (a resumed or restarted loop) drops what was
    built and starts again from that index.
    """

    def __init__(self, make: Callable[[int], T], depth: int = 2, stop: int | None = None, *,
                 name: str = "innerloop-prefetch") -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}; use the inline path (prefetch=0) "
                             "to build batches in the training thread.")
        self.make, self.depth, self.stop, self.name = make, depth, stop, name
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue[tuple[int, bool, object]] = queue.Queue(maxsize=depth)
        self._halt = threading.Event()
        self._next = -1

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        """Whether the background thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def _produce(self, start: int, halt: threading.Event, out: queue.Queue[tuple[int, bool, object]]) -> None:
        i = start
        while not halt.is_set() and (self.stop is None or i < self.stop):
            try:
                item: tuple[int, bool, object] = (i, True, self.make(i))
            except BaseException as err:  # handed to the consumer, raised there
                item = (i, False, err)
            while not halt.is_set():
                try:
                    out.put(item, timeout=_POLL_S)
                    break
                except queue.Full:
                    continue
            if not item[1]:
                return
            i += 1

    def _start(self, index: int) -> None:
        self.close()
        self._halt = threading.Event()
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(target=self._produce, args=(index, self._halt, self._queue),
                                        name=self.name, daemon=True)
        self._next = index
        self._thread.start()

    def get(self, index: int) -> T:
        """Item ``index`` (what ``make(index)`` returns); raises what ``make(index)`` raised."""
        if self.stop is not None and not 0 <= index < self.stop:
            raise IndexError(f"prefetch index {index} is outside 0..{self.stop - 1}.")
        if self._thread is None or index != self._next:
            self._start(index)
        while True:
            try:
                i, ok, value = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self.alive and self._queue.empty():
                    raise RuntimeError(f"the prefetch thread stopped before building item {index}.") from None
        assert i == index, (i, index)
        self._next = index + 1
        if not ok:
            self.close()
            assert isinstance(value, BaseException)
            raise value
        return value  # type: ignore[return-value]

    def close(self) -> None:
        """Stop the background thread and wait for it (at most the time one ``make`` takes)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._halt.set()
        while thread.is_alive():  # drain, so a producer blocked on a full queue sees the halt
            with contextlib.suppress(queue.Empty):
                self._queue.get_nowait()
            thread.join(timeout=_POLL_S)
        self._next = -1
