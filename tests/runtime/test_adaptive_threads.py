"""AdaptiveThreads: full width while calls run at their best, one thread while another process takes a core."""
import threading

import pytest
import torch
from torch import nn

import kiln
from kiln.errors import KilnError
from kiln.runtime import AdaptiveThreads


def test_backs_off_on_a_slow_full_width_call_and_returns_after_a_fast_probe():
    p = AdaptiveThreads(slow=1.5, probe_every=3)
    assert p.choose(2) == 2
    p.record(2, 2, 0.010)  # the best
    p.record(2, 2, 0.012)  # within 1.5x: stays
    assert not p.backed_off and p.choose(2) == 2
    p.record(2, 2, 0.020)  # 2x the best: another process took a core
    assert p.backed_off
    assert [p.choose(2) for _ in range(3)] == [1, 1, 2]  # every third call probes full width
    p.record(1, 2, 0.015)  # one-thread calls do not move it
    assert p.backed_off
    p.record(2, 2, 0.030)  # a slow probe: stay backed off
    assert p.backed_off and p.choose(2) == 1
    p.record(2, 2, 0.011)  # a fast probe: back to full width
    assert not p.backed_off and p.choose(2) == 2
    assert p.best == pytest.approx(0.010)


def test_one_thread_machines_and_bad_options():
    p = AdaptiveThreads()
    p.record(1, 1, 1.0)
    p.record(1, 1, 9.0)
    assert not p.backed_off
    for kwargs, match in [({"threads": 0}, "threads"), ({"slow": 1.0}, "slow"), ({"probe_every": 0}, "probe_every")]:
        with pytest.raises(KilnError, match=match):
            AdaptiveThreads(**kwargs)


def test_a_call_runs_at_the_chosen_count_and_restores_the_callers():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU())
    x = torch.randn(4, 16)
    cm = kiln.compile(m, (x,))
    cm.threads = AdaptiveThreads(threads=2, probe_every=1000)
    seen = []
    real = cm._run

    def spy(*args):
        seen.append(torch.get_num_threads())
        return real(*args)

    cm._run = spy
    before = torch.get_num_threads()
    torch.testing.assert_close(cm(x), m(x))
    cm.threads.backed_off = True
    torch.testing.assert_close(cm(x), m(x))
    assert seen == [2, 1] and torch.get_num_threads() == before

    def other_thread():  # each calling thread's own count
        torch.set_num_threads(1)
        cm.threads.backed_off = False
        cm(x)
        seen.append(torch.get_num_threads())

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    assert seen[-2:] == [2, 1] and torch.get_num_threads() == before
