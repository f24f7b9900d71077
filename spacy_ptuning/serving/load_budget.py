"""Turns between the batcher and the loads of cold adapters, and the share
of the time the loads may take while requests wait.

Why this exists: loading an adapter is 20-30 ms of Python that holds the
GIL (config, registries, thinc's deserialisation). A server cannot hand it
to another process, because the pipeline must live in its own. The
batcher's backbone pass lets go of the GIL around every torch op and must
take it back after each one, and while a loader thread is running Python,
each retake waits up to the interpreter's switch interval. So a load that
overlaps a batch slows both: measured with ``bench/serve_cold.py`` on 2
cores (2026-12-02, when a load was 60-90 ms of Python), loads took about
100 ms instead of 25; with today's loads the batch pays less (below). And a
burst of cold requests kept two loader threads loading back to back: 50
cold adapters at once, beside 8 clients of warm ones, cut warm docs/s from
48 to 4.6 and raised warm p95 from 0.2 s to 3.1 s.

:class:`LoadBudget` therefore rations the loads, in one of two ways:

- **overlap** (the server's default): a load runs as
  soon as it is asked for, beside the running batch, one load at a time.
  A cold request then waits for its own load and joins the next batch, as
  a warm request arriving at that moment would; between batches, it also
  waited for the batch that the load had to let go first. The batch pays
  for the overlap in GIL contention, not in a turn. Measured on 2 cores
  (``bench/serve_churn.py``, 1,000 resident of 3,000, Zipf traffic; and
  ``bench/serve_cold.py``; bench/RESULTS.md, "Loads beside batches"): cold
  p95 minus warm p95 fell from about 1.2 s to 0.05-0.07 s at the same
  docs/s (at 10,000 resident of 30,000: from 2.9 s to 0.3-0.45 s). What still needs a bound is a burst: loads back to back beside
  the batches (a share of 1) starved the warm traffic (3.8 docs/s instead
  of 39), so the share below still applies;
- **between batches** (``--loads-between-batches``): a load never starts during a
  batch, and a batch waits for the running load, for ``burst_s`` at most
  (a load slowed by its disk then runs beside the batch); one load runs at
  a time, at full speed. Warm traffic keeps more of its pace during a
  burst of loads, cold requests wait longer.

In both, the loads that are waiting go while they have credit. The credit
is a token bucket over load seconds: it fills at ``share`` of the wall
time, up to ``burst_s``, and a debt is kept to ``burst_s`` at most. So
while the batcher has work, loads take about ``share`` of the time, and
warm requests keep the rest; when the batcher has nothing to do, loads run
back to back. :meth:`admit` counts the loads asked for and refuses those
that could not be done in time (the server asks for half of its request
timeout), so that the server answers 503 with a Retry-After at once
instead of accepting them and answering 504.

Warm requests never pass through it. Neither does preloading at start.
The HTTP server and the Ray Serve replica (``ray/serve.py``) use it.
"""
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Optional


class LoadsBusy(Exception):
    """More loads are asked for than could be done in time."""

    def __init__(self, asked: int, wait_s: float, limit_s: float):
        super().__init__(f"{asked} adapter loads are waiting, about {wait_s:.0f} s of work (limit {limit_s:g} s)")
        self.asked, self.wait_s, self.limit_s = asked, wait_s, limit_s


class LoadBudget:
    """Turns between batches and loads; loads may take ``share`` (0 < share
    <= 1) of the time while a batch is waiting or running, with up to
    ``burst_s`` seconds of them at once; ``overlap``: loads run beside
    batches instead of between them."""

    def __init__(self, share: float, burst_s: float = 0.25, *, overlap: bool = False, first_load_s: float = 0.1,
                 clock: Callable[[], float] = time.monotonic):
        if not 0 < share <= 1:
            raise ValueError(f"load_share must be above 0 and at most 1, got {share!r}")
        if not burst_s > 0:
            raise ValueError(f"the load budget's burst must be positive, got {burst_s!r}")
        self.share, self.burst_s = share, burst_s
        self.overlap = overlap  # loads run beside batches (see the module's docstring)
        self._clock = clock
        self._cond = threading.Condition()
        self._credit = burst_s
        self._at = clock()
        self._loading = False  # a load is running
        self._computing = False  # a batch is running
        self._loads_waiting = 0
        self._batch_waiting = False
        self.spent_s = 0.0  # seconds of loads run through the budget
        self.loads = 0
        self._mean: Optional[float] = None
        self.first_load_s = first_load_s
        self._asked = 0  # loads admitted and not yet released
        self._backlog_ends: Deque[float] = deque(maxlen=20)  # when loads ended with others asked for

    @property
    def loads_waiting(self) -> int:
        """Loads waiting for their turn now."""
        return self._loads_waiting

    @property
    def mean_load_s(self) -> float:
        """Seconds of a recent load: an average, ``first_load_s`` before the
        first."""
        return self._mean if self._mean is not None else self.first_load_s

    @property
    def rate(self) -> Optional[float]:
        """Loads done per second while others were waiting, over the last
        ones (None until enough were measured): the pace a queue of loads
        goes at, whatever slows them (the batches, other threads, clients
        on the same cores)."""
        ends = self._backlog_ends
        if len(ends) < 5 or ends[-1] <= ends[0]:
            return None
        return (len(ends) - 1) / (ends[-1] - ends[0])

    def admit(self, loads: int, limit_s: float) -> None:
        """Count ``loads`` more loads as asked for, or raise
        :class:`LoadsBusy` if they would not be done within ``limit_s``: the
        loads asked for before them and these, at the measured :attr:`rate`;
        before it is measured, at :attr:`mean_load_s` each, in ``share`` of
        the time (as if batches kept waiting: whether one waits at this
        instant says little about the next seconds). Each admit needs its
        :meth:`release`."""
        with self._cond:
            rate = self.rate
            if rate is not None:
                wait = (self._asked + loads) / rate
            else:
                wait = (self._asked + loads) * self.mean_load_s / self.share
            if self._asked and wait > limit_s:
                raise LoadsBusy(self._asked, wait, limit_s)
            self._asked += loads

    def release(self, loads: int) -> None:
        """The loads counted by :meth:`admit` are done (or given up)."""
        with self._cond:
            self._asked = max(0, self._asked - loads)

    def _refill(self) -> None:
        now = self._clock()
        self._credit = min(self.burst_s, self._credit + (now - self._at) * self.share)
        self._at = now

    def batch(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a batch, ``fn(*args, **kwargs)``, in its turn: at once with
        ``overlap``; otherwise after the running load, and after the waiting
        loads that have credit."""
        if self.overlap:  # never waits for a load
            with self._cond:
                self._computing = True
            return self._computed(fn, *args, **kwargs)
        with self._cond:
            self._batch_waiting = True
            deadline = self._clock() + self.burst_s
            try:
                while True:
                    self._refill()
                    if not self._loading and not (self._loads_waiting and self._credit >= 0):
                        break
                    # A load ending notifies (credit only runs out when one
                    # ends). A load that takes longer than burst_s (a slow
                    # disk) no longer holds the batch: it runs beside it.
                    left = deadline - self._clock()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            finally:
                self._batch_waiting = False
            self._computing = True
        return self._computed(fn, *args, **kwargs)

    def _computed(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        finally:
            with self._cond:
                self._computing = False
                self._cond.notify_all()

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a load, ``fn(*args, **kwargs)``, in its turn. Its time is
        charged whether it loaded anything or not."""
        with self._cond:
            self._loads_waiting += 1
            try:
                while True:
                    self._refill()
                    # Between batches a running batch blocks a load; beside
                    # them it only makes the load need credit, as a waiting one does.
                    blocked = self._loading or (self._computing and not self.overlap)
                    batches_busy = self._batch_waiting or (self._computing and self.overlap)
                    if not blocked and (self._credit >= 0 or not batches_busy):
                        break
                    timeout = None if blocked else -self._credit / self.share  # no credit: wait for it
                    self._cond.wait(timeout)
            finally:
                self._loads_waiting -= 1
            self._loading = True
        start = self._clock()
        try:
            return fn(*args, **kwargs)
        finally:
            with self._cond:
                self._loading = False
                self._refill()
                end = self._clock()
                spent = end - start
                self._credit = max(-self.burst_s, self._credit - spent)
                self.spent_s += spent
                self.loads += 1
                self._mean = spent if self._mean is None else 0.8 * self._mean + 0.2 * spent
                if self._asked > 1:
                    self._backlog_ends.append(end)
                else:
                    self._backlog_ends.clear()  # the queue ran dry: the next backlog is measured afresh
                self._cond.notify_all()
