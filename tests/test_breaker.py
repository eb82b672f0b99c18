"""shared/breaker.py's half-open probe: one at a time, and always ended by the thread that holds it, however
its call ends (on Celery's threads pool a soft time limit can interrupt a call anywhere)."""
from __future__ import annotations

import threading

import pytest
from celery.exceptions import SoftTimeLimitExceeded

from shared.breaker import Breaker


class Down(Exception):
    pass


class Refused(Exception):
    pass


class Open(Exception):
    pass


def _breaker(clock: list[float]) -> Breaker:
    return Breaker("test", failures=(Down,), answered=(Refused,), opened=Open, threshold=1, cooldown_seconds=10,
                   clock=lambda: clock[0])


def _fail(breaker: Breaker) -> None:
    def down() -> None:
        raise Down()

    with pytest.raises(Down):
        breaker.call(down)


def test_an_interrupted_probe_does_not_leave_the_breaker_open_for_good() -> None:
    clock = [0.0]
    breaker = _breaker(clock)
    _fail(breaker)
    assert breaker.state == "open"
    clock[0] = 11.0  # half-open: one probe allowed

    def interrupted() -> None:
        raise SoftTimeLimitExceeded()  # neither a failure nor an answer

    with pytest.raises(SoftTimeLimitExceeded):
        breaker.call(interrupted)
    # The probe ended with it: the next call is the probe again, and an answer closes the breaker.
    assert breaker.call(lambda: "up") == "up"
    assert breaker.state == "closed"


def test_a_probe_interrupted_as_it_is_admitted_is_ended_too() -> None:
    """The interruption lands just as the probe was let through (after the flag is set, before the call)."""
    clock = [0.0]
    breaker = _breaker(clock)
    _fail(breaker)
    clock[0] = 11.0
    admit = breaker._admit

    def admitted_then_interrupted() -> bool:
        admit()
        raise SoftTimeLimitExceeded()

    breaker._admit = admitted_then_interrupted  # type: ignore[method-assign]
    with pytest.raises(SoftTimeLimitExceeded):
        breaker.call(lambda: "never")
    del breaker._admit
    assert breaker.call(lambda: "up") == "up"  # not refused as "a probe is already out"


def test_one_probe_at_a_time_across_threads() -> None:
    clock = [0.0]
    breaker = _breaker(clock)
    _fail(breaker)
    clock[0] = 11.0
    inside, release = threading.Event(), threading.Event()
    outcome: list[object] = []

    def slow_probe() -> str:
        inside.set()
        release.wait(5)
        return "up"

    thread = threading.Thread(target=lambda: outcome.append(breaker.call(slow_probe)))
    thread.start()
    inside.wait(5)
    with pytest.raises(Open):  # another thread while the probe is out
        breaker.call(lambda: "second")
    release.set()
    thread.join(5)
    assert outcome == ["up"] and breaker.state == "closed"
    assert breaker.call(lambda: "after") == "after"


def test_a_slow_probe_is_not_taken_for_abandoned_but_one_left_for_good_is() -> None:
    from shared.breaker import PROBE_ABANDONED_SECONDS

    clock = [0.0]
    breaker = _breaker(clock)
    _fail(breaker)
    clock[0] = 11.0
    prober = threading.Thread(target=breaker._admit)  # a probe goes out on another thread, which never
    prober.start()                                    # comes back to end it
    prober.join(5)
    for waited in (60, PROBE_ABANDONED_SECONDS - 1):  # slow, several cool-downs: still the only probe
        clock[0] = 11.0 + waited
        with pytest.raises(Open):
            breaker.call(lambda: "second")
    clock[0] = 11.0 + PROBE_ABANDONED_SECONDS  # left for good: the next caller probes
    assert breaker.call(lambda: "up") == "up"
    assert breaker.state == "closed"
