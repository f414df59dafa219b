"""The thread governor (engine/threads.py): one thread or all for the decode steps, by measurement."""

from __future__ import annotations

import pytest

from pagedlm.engine import threads


@pytest.fixture()
def gov(monkeypatch):
    capped: list[bool] = []
    monkeypatch.setattr(threads, "cap_at_one", capped.append)
    monkeypatch.setattr(threads, "full_threads", lambda: 2)
    g = threads.ThreadGovernor()
    g.capped = capped
    return g


def feed(g, seconds: float, n: int, bucket: str = "compiled batch-1") -> None:
    for _ in range(n):
        g.record(bucket, seconds)


def test_a_slowdown_on_all_threads_caps_at_one(gov):
    feed(gov, 0.014, 12)
    assert not gov.single and not gov.capped
    feed(gov, 0.300, 6)  # another process took a core: every parallel region waits for it
    assert gov.single and gov.capped[-1] is True


def test_a_losing_probe_costs_one_step_and_backs_off(gov):
    feed(gov, 0.014, 12)
    feed(gov, 0.300, 6)
    assert gov.single
    feed(gov, 0.023, gov.countdown)  # one thread: steady; then the probe of all threads starts
    assert gov.probe == [] and gov.capped[-1] is False
    gov.record("compiled batch-1", 0.300)  # still contended: the probe ends after this one step
    assert gov.probe is None and gov.single and gov.capped[-1] is True
    assert gov.interval == 2 * threads.ThreadGovernor.MIN_INTERVAL


def test_a_winning_probe_returns_to_all_threads(gov):
    feed(gov, 0.014, 12)
    feed(gov, 0.300, 6)
    feed(gov, 0.023, gov.countdown)
    feed(gov, 0.014, threads.ThreadGovernor.WINDOW)  # the other process is gone
    assert not gov.single and gov.capped[-1] is False and gov.switches == 2


def test_probes_compare_like_with_like(gov):
    feed(gov, 0.014, 12)
    feed(gov, 0.300, 6)
    feed(gov, 0.023, gov.countdown)
    feed(gov, 0.001, 20, bucket="eager 3-row")  # other steps during the probe are not counted
    assert gov.probe == []


def test_cap_and_builders_share_one_count(monkeypatch):
    import torch

    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_base", [4])
    monkeypatch.setattr(threads, "_yielded", set())
    monkeypatch.setattr(threads, "_capped", False)
    try:
        threads.yield_core("builder")
        assert torch.get_num_threads() == 3 and threads.full_threads() == 3
        threads.cap_at_one(True)
        assert torch.get_num_threads() == 1
        threads.reclaim_core("builder")
        assert torch.get_num_threads() == 1  # still capped
        threads.cap_at_one(False)
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)
