"""Run an iterator in a background thread, `depth` items ahead of its consumer.

Reading store shards (`pread`) and decoding video (PyAV) release the GIL, so a thread overlaps them with
the work on the previous item at no IPC cost. The consumer waits in short slices, so Ctrl-C reaches it
at once even while the producer blocks in C code; stopping early (break, an exception) tells the
producer to finish, and its exceptions are raised in the consumer.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_END = object()


@contextlib.contextmanager
def iteration(iterable: Iterable[T]) -> Iterator[Iterator[T]]:
    """iter(iterable), closed on the way out of the block: a `threaded` producer is stopped and joined
    there, even when an exception (Ctrl-C, SIGTERM) leaves the loop, not whenever the garbage collector
    gets to it; a daemon thread still inside torch at interpreter exit can abort the process."""
    it = iter(iterable)
    try:
        yield it
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


class Stopped(Exception):
    """Raised by a producer that noticed `stop` was set; ends the thread quietly."""


def threaded(produce: Callable[[threading.Event], Iterator[T]], depth: int = 2, name: str = "catnet",
             join_seconds: float | None = None,
             lost: Callable[[], BaseException] | None = None) -> Iterator[T]:
    """Yield the items of `produce(stop=event)`, produced in a daemon thread; `stop` is set when the consumer
    is done. A producer thread that vanishes without a word ends the iteration with `lost()`."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in produce(stop=stop):
                if not put(item):
                    return
            put(_END)
        except Stopped:
            pass
        except BaseException as e:  # handed to the consumer, raised there
            put(e)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        while True:
            try:
                item = q.get(timeout=0.1)
            except queue.Empty:
                if not thread.is_alive() and q.empty():
                    error = lost() if lost else RuntimeError(f"thread {name} stopped without a reason")
                    raise error from None
                continue
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(join_seconds)
