"""Iterating ahead in a background thread, for the decoder and the prior stream of a video.

A bounded queue keeps at most `depth` items ahead of the consumer; an exception raised while
producing is raised again in the consumer, with its type, after the items before it; closing the
iterator (or an exception in the consumer) stops the producer and waits for it, so no thread
outlives the video it was working on.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, TypeVar

from matting_core.runtime import lower_thread_priority

__all__ = ["iterate_ahead"]

T = TypeVar("T")

_END = object()


class _Failed:
    """An exception raised in the producer, carried to the consumer's thread."""

    def __init__(self, exc: BaseException):
        self.exc = exc


def iterate_ahead(items: Iterable[T], depth: int, name: str, low_priority: bool = False) -> Iterator[T]:
    """Yield `items` as a thread named `name` produces them, at most `depth` ahead.

    The items are computed in that thread: a generator's body runs there, so its per-item
    state (a count, a smoother's history) is only ever touched by the producer. With
    `low_priority`, the thread lowers its own scheduling priority (work that can wait for the
    network's threads, such as decoding ahead).
    """
    ready: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
    stop = threading.Event()

    def put(item) -> bool:
        # A bounded wait, so a consumer that stopped reading never leaves the producer blocked.
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        if low_priority:
            lower_thread_priority()
        try:
            for item in items:
                if stop.is_set() or not put(item):
                    return
            put(_END)
        except BaseException as exc:  # noqa: BLE001 - raised again in the consumer's thread
            put(_Failed(exc))

    thread = threading.Thread(target=work, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()
