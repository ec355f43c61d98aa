from __future__ import annotations

import pytest

from micro.errors import TooManyRequests
from micro_daemon.auth.throttle import Throttle

from .conftest import Clock


@pytest.fixture
def clock():
    return Clock(0.0)


@pytest.fixture
def throttle(clock):
    return Throttle(limit=5, window=60, block=60, clock=clock)


def fail(throttle, clock, times, every=1.0, key="k"):
    for _ in range(times):
        throttle.check(key, "k")
        throttle.fail(key)
        clock.advance(every)


def test_five_failures_in_a_minute_block_for_a_minute(throttle, clock):
    fail(throttle, clock, 4, every=0)
    throttle.check("k", "k")
    fail(throttle, clock, 1, every=0)
    with pytest.raises(TooManyRequests, match=r"too many failed sign-ins for account x: try again in 60 s"):
        throttle.check("k", "account x")
    clock.advance(59.5)
    with pytest.raises(TooManyRequests, match="try again in 1 s"):
        throttle.check("k", "k")
    clock.advance(0.5)
    throttle.check("k", "k")


def test_failures_older_than_the_window_are_forgotten(throttle, clock):
    fail(throttle, clock, 4, every=0)
    clock.advance(60)  # those four fall out of the window
    fail(throttle, clock, 4, every=0)
    throttle.check("k", "k")
    fail(throttle, clock, 1, every=0)
    with pytest.raises(TooManyRequests):
        throttle.check("k", "k")


def test_keys_are_counted_apart_and_success_resets(throttle, clock):
    fail(throttle, clock, 4, key="a")
    fail(throttle, clock, 4, key="b")
    throttle.succeed("a")
    fail(throttle, clock, 4, key="a")
    throttle.check("a", "a")
    fail(throttle, clock, 1, key="b")
    with pytest.raises(TooManyRequests):
        throttle.check("b", "b")


def test_memory_is_bounded(clock):
    throttle = Throttle(max_keys=3, clock=clock)
    for key in "abcd":
        throttle.fail(key)
    assert list(throttle._keys) == ["b", "c", "d"]
