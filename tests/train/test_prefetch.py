"""The background prefetch of micro-batches: same items in the same order, errors surface, the thread stops."""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time

import pytest

from mpo.train.data import Prefetched, prefetch


def test_same_items_in_the_same_order():
    assert list(prefetch(range(50), 3)) == list(range(50))
    assert list(prefetch(range(5), 0)) == list(range(5))
    assert not isinstance(prefetch(range(5), 0), Prefetched)  # depth 0: no thread


def test_an_error_in_the_source_is_raised_where_it_is_reached():
    def source():
        yield 1
        yield 2
        raise OSError("disk gone at item 3")

    it = prefetch(source(), 2)
    assert next(it) == 1
    assert next(it) == 2
    with pytest.raises(OSError, match="disk gone at item 3"):
        next(it)


def test_close_stops_an_endless_source_and_runs_ahead_at_most_depth_items():
    produced = []

    def source():
        for i in itertools.count():
            produced.append(i)
            yield i

    it = prefetch(source(), 2)
    assert next(it) == 0
    time.sleep(0.3)
    assert len(produced) <= 4  # 1 consumed + 2 queued + 1 waiting to be queued
    it.close()
    assert not any(t.name == "mpo-prefetch" and t.is_alive() for t in threading.enumerate())


def test_dropping_the_iterator_stops_its_thread():
    it = prefetch(itertools.count(), 1)
    next(it)
    thread = it._thread
    del it
    thread.join(timeout=2)
    assert not thread.is_alive()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are a Linux feature")
def test_the_thread_runs_at_the_lowest_priority_and_the_caller_keeps_its_own():
    def source():
        yield os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert list(prefetch(source(), 1)) == [19]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before
