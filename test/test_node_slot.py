"""fol_ros.ros.slot.FrameSlot: newest frame wins, replaced frames count as dropped, rate limit, no backlog."""
import threading

import pytest

from fol_ros.ros.slot import FrameSlot


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_newest_frame_wins_and_replacements_are_drops():
    slot = FrameSlot()
    assert slot.take() is None
    assert slot.put('a') is False
    assert slot.put('b') is True and slot.put('c') is True
    assert slot.take() == 'c' and slot.take() is None   # never a backlog: a, b are gone
    slot.put('d')
    slot.clear()
    assert slot.take() is None


def test_rate_limit_waits_and_then_hands_out_the_newest():
    clock = FakeClock()
    slot = FrameSlot(max_rate_hz=2.0, clock=clock, sleep=clock.sleep)
    slot.put(1)
    assert slot.take() == 1 and clock.slept == []
    clock.now += 0.1
    slot.put(2)
    assert slot.take() == 2 and clock.slept == pytest.approx([0.4])   # 0.5 s period since the last start
    clock.now += 1.0
    slot.put(3)
    assert slot.take() == 3 and len(clock.slept) == 1   # the period already passed: no wait


def test_concurrent_producers_never_lose_the_newest():
    slot = FrameSlot()
    drops = []

    def produce(base: int) -> None:
        for i in range(1000):
            drops.append(slot.put((base, i)))

    threads = [threading.Thread(target=produce, args=(b,)) for b in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    last = slot.take()
    assert last[1] == 999 and sum(drops) == 3999   # every frame but the one taken was replaced
