"""Where a run's wall time goes: named stages summed, printed as one table at the end of the run.

`StageTimes` sums wall seconds per name (`with times("stage 2/data"): ...`, `times.wrap(iterator, name)`
for time spent waiting on `next`, `times.hook_fn(name, fn)` for a hook). `StepTimer` is a loop hook that
runs after every step: the first step's time (tracing + compiling the step + one step) and the steady
steps are kept apart, without the data waits and hooks timed under the same prefix. The jitted step itself is one fused program, so its parts (first-stage encoder,
text encoder, UNet forward/backward, EMA) are timed separately by `bench/bench_main_job.py`.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator, Sequence

from ldm_jax.training.objective import Hook, HookContext


class StageTimes:
    """Wall seconds and call counts per stage name, in first-seen order."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.ends: dict[str, float] = {}  # perf_counter when each stage last finished

    def add(self, name: str, seconds: float, count: int = 1) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.counts[name] = self.counts.get(name, 0) + count
        self.ends[name] = time.perf_counter()

    def total(self, prefix: str, exclude: tuple[str, ...] = ()) -> float:
        """Seconds of the stages named `prefix/...`, except `exclude`."""
        return sum(v for k, v in self.seconds.items() if k.startswith(prefix + "/") and k not in exclude)

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def wrap(self, iterator: Any, name: str) -> "TimedIterator":
        """`iterator` with the time of each `next` added to `name` (other attributes pass through)."""
        return TimedIterator(iterator, self, name)

    def hook_fn(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args, **kwargs):
            with self(name):
                return fn(*args, **kwargs)

        return timed

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {k: {"seconds": round(v, 3), "count": self.counts[k]} for k, v in self.seconds.items()}

    def summary(self, total: float | None = None, title: str = "time per stage") -> str:
        """A table: stage, seconds, share of `total` (default: the sum of top-level stages), calls, ms per call."""
        top = sum(v for k, v in self.seconds.items() if "/" not in k)
        total = total if total is not None else top
        width = max([len(k) for k in self.seconds] + [10])
        lines = [f"{title} (wall {total:.1f} s):", f"  {'stage':{width}s} {'s':>8s} {'%':>6s} {'calls':>7s} {'ms/call':>9s}"]
        for k, v in self.seconds.items():
            n = self.counts[k]
            share = 100 * v / total if total > 0 else 0.0
            lines.append(f"  {k:{width}s} {v:8.1f} {share:6.1f} {n:7d} {1e3 * v / max(n, 1):9.1f}")
        return "\n".join(lines)


class TimedIterator:
    """An iterator whose `next` is timed into a `StageTimes` entry; everything else is the wrapped object's."""

    def __init__(self, inner: Any, times: StageTimes, name: str):
        self._inner, self._times, self._name = inner, times, name

    def __iter__(self) -> Iterator:
        return self

    def __next__(self) -> Any:
        with self._times(self._name):
            return next(self._inner)

    def __getattr__(self, attr: str) -> Any:  # get_state / set_state / close of the wrapped iterator
        return getattr(self._inner, attr)


class StepTimer:
    """A loop hook (every step): the steps' own wall time, the first one ("trace + compile") apart.

    Each interval runs from the previous call (for the first step: from the end of the data fetch
    `data_name`, the batch the loop fetches before its first step) to this call, minus the time other
    `prefix/...` stages (data waits, other hooks) took inside it, so no second is counted twice.
    """

    def __init__(self, times: StageTimes, prefix: str, data_name: str):
        self.times, self.prefix, self.data_name = times, prefix, data_name
        self.first_name, self.steps_name = f"{prefix}/first step (trace + compile)", f"{prefix}/steps"
        self.t_last: float | None = None
        self.others_last = 0.0

    def __call__(self, ctx: Any = None) -> None:
        now = time.perf_counter()
        others = self.times.total(self.prefix, exclude=(self.first_name, self.steps_name))
        first = self.t_last is None
        start = self.times.ends.get(self.data_name, now) if first else self.t_last
        if first:  # the first batch's fetch ended at `start`: nothing else of the prefix ran since
            self.others_last = others
        self.times.add(self.first_name if first else self.steps_name, max(now - start - (others - self.others_last), 0.0))
        self.t_last, self.others_last = time.perf_counter(), others


class TimedHook(Hook):
    """A loop hook whose calls are timed into `times` under `label` (schedule, sync and close are the inner's)."""

    def __init__(self, inner: Hook, times: StageTimes, label: str):
        super().__init__(every=inner.every, name=inner.name, at_end=inner.at_end)
        self.inner, self.times, self.label = inner, times, label
        self.sync = inner.sync

    def due(self, step: int, last: int) -> bool:
        return self.inner.due(step, last)

    def __call__(self, ctx: HookContext) -> None:
        with self.times(self.label):
            self.inner(ctx)

    def close(self) -> None:
        self.inner.close()


def timed_hooks(hooks: Sequence[Hook], times: StageTimes, prefix: str, data_name: str) -> list[Hook]:
    """`hooks` each timed as `prefix/hook: <name>`, then a `StepTimer` (every step, no metrics sync)."""
    timer = Hook(every=1, fn=StepTimer(times, prefix, data_name), name="timing", at_end=False)
    timer.sync = False  # reading each step's metrics would make the host wait for every step
    return [*(TimedHook(h, times, f"{prefix}/hook: {h.name}") for h in hooks), timer]
