"""Overlap of reading and computing in inference: a reader thread that stays a few tiles ahead of the network.

:class:`Prefetcher` runs ``read(item)`` for a sequence of items in one background thread, at most ``depth`` results
ahead of the consumer (a bounded queue, so memory stays at ``depth`` tiles); with ``depth`` 0 it reads in line
(the serial baseline). A read error is raised in the consuming thread; leaving the ``with`` block early stops the
reader. ``busy_s`` is the time spent in ``read``, so a caller can report read against compute and wall time.
No torch here: ``read`` decides what a tile is (pinned memory and so on). Writes stay with the consumer:
a writer thread measured slower on CPU (docs/benchmarks.md), and on CUDA the consumer writes one group behind
the GPU instead (cytonet.mapping.infer._map_blocks).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

_DONE = object()  # end of the reader's items / the writer's last call


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Prefetcher:
    """``read(item)`` for every item, computed up to ``depth`` items ahead in a thread (``depth`` 0: in line)."""

    def __init__(self, items: Sequence[Any], read: Callable[[Any], Any], depth: int, name: str = "prefetch") -> None:
        self.items, self.read, self.depth = items, read, max(0, int(depth))
        self.busy_s = 0.0  # seconds inside read()
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, self.depth))
        self._thread: threading.Thread | None = None
        if self.depth:
            self._thread = threading.Thread(target=self._produce, name=name, daemon=True)
            self._thread.start()

    def _timed_read(self, item: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self.read(item)
        finally:
            self.busy_s += time.perf_counter() - t0

    def _put(self, value: Any) -> bool:
        while not self._stop.is_set():  # a bounded put that gives up once the consumer has left
            try:
                self._queue.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for item in self.items:
                if self._stop.is_set() or not self._put(self._timed_read(item)):
                    return
            self._put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            self._put(_Failure(exc))

    def __iter__(self) -> Iterator[Any]:
        if self._thread is None:
            for item in self.items:
                yield self._timed_read(item)
            return
        while True:
            value = self._queue.get()
            if value is _DONE:
                return
            if isinstance(value, _Failure):
                raise value.exc
            yield value

    def close(self) -> None:
        """Stop the reader (it finishes the read it is in) and drop what it read ahead."""
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:
                    self._queue.get(timeout=0.1)
                except queue.Empty:
                    pass
            self._thread.join()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
