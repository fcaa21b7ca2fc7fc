"""iterate_ahead: items made in its own thread, in order, errors passed on, no thread left behind."""
from __future__ import annotations

import threading
import time

import pytest

from matting_core.threads import iterate_ahead


def _live(name: str) -> int:
    return sum(t.name == name and t.is_alive() for t in threading.enumerate())


def test_items_are_made_in_the_named_thread_in_order():
    def made():
        for i in range(20):
            yield i, threading.current_thread().name

    got = list(iterate_ahead(made(), 3, "ahead-test"))
    assert [i for i, _ in got] == list(range(20))
    assert {name for _, name in got} == {"ahead-test"}
    assert _live("ahead-test") == 0


def test_an_error_comes_after_the_items_before_it_with_its_type():
    def made():
        yield from range(4)
        raise KeyError("frame 4")

    got = []
    with pytest.raises(KeyError, match="frame 4"):
        for item in iterate_ahead(made(), 2, "ahead-error"):
            got.append(item)
    assert got == [0, 1, 2, 3]
    assert _live("ahead-error") == 0


def test_closing_early_stops_a_producer_blocked_on_a_full_queue():
    produced = []

    def made():
        for i in range(1000):
            produced.append(i)
            yield i

    it = iterate_ahead(made(), 2, "ahead-close")
    assert next(it) == 0
    time.sleep(0.2)  # the producer fills the queue and waits on it
    it.close()
    assert _live("ahead-close") == 0
    assert len(produced) <= 5  # bounded: depth ahead, plus the item in hand


def test_a_failing_consumer_leaves_no_thread():
    with pytest.raises(RuntimeError):
        for _ in iterate_ahead(iter(range(100)), 2, "ahead-consumer"):
            raise RuntimeError("consumer failed")
    assert _live("ahead-consumer") == 0
