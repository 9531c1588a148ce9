"""The run's time table: stages summed, data waits and hooks not double-counted in the step time."""
import time

import pytest

from ldm_jax.training.timing import StageTimes, StepTimer


class Slow:
    """An iterator whose next sleeps `dt`, with a state method the wrapper must pass through."""

    def __init__(self, dt):
        self.dt, self.n = dt, 0

    def __next__(self):
        time.sleep(self.dt)
        self.n += 1
        return self.n

    def get_state(self):
        return {"n": self.n}


def test_step_timer_splits_compile_steps_data_and_hooks():
    times = StageTimes()
    data = times.wrap(Slow(0.02), "ldm/data")
    timer = StepTimer(times, "ldm", "ldm/data")
    hook = times.hook_fn("ldm/hook: samples", lambda ctx: time.sleep(0.05))
    t0 = time.perf_counter()
    assert next(data) == 1
    for step in range(1, 5):
        time.sleep(0.2 if step == 1 else 0.03)  # the first step compiles
        timer(None)
        if step % 2 == 0:
            hook(None)
        if step < 4:
            next(data)
    wall = time.perf_counter() - t0
    s, n = times.seconds, times.counts
    assert n == {"ldm/data": 4, "ldm/first step (trace + compile)": 1, "ldm/steps": 3, "ldm/hook: samples": 2}
    assert data.get_state() == {"n": 4}
    # sleeps are lower bounds; a loaded machine adds to each, never subtracts
    assert 0.2 <= s["ldm/first step (trace + compile)"] < 0.2 + 0.15
    assert 0.09 <= s["ldm/steps"] < 0.09 + 0.15  # without the 2 hooks (0.1 s) and 3 fetches (0.06 s) between
    assert s["ldm/data"] >= 0.08 and s["ldm/hook: samples"] >= 0.1
    assert sum(s.values()) == pytest.approx(wall, abs=0.02)  # every second counted once
    table = times.summary(total=wall)
    assert "ldm/steps" in table and "calls" in table and f"wall {wall:.1f} s" in table
    assert times.to_dict()["ldm/hook: samples"]["count"] == 2
