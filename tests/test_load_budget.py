"""Turns between batches and cold loads (spacy_ptuning/serving/load_budget.py).

Threads wait on events and on the budget's own state, never on sleeps; the
timeouts only bound a broken budget."""
import threading
import time

import pytest

from spacy_ptuning.serving.load_budget import LoadBudget, LoadsBusy
from spacy_ptuning.serving.serve_config import ServeConfig

BOUND = 60  # seconds: only a broken budget gets near this


def _until(predicate, what):
    deadline = time.monotonic() + BOUND
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _thread(fn):
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def _batch_then_a_load_then_a_batch(budget):
    """One thread runs two batches back to back, as the server's batcher;
    a load is asked for during the first. The order in which they ran."""
    log, release = [], threading.Event()

    def first_batch():
        log.append("batch 1 starts")
        assert release.wait(BOUND)
        log.append("batch 1 ends")

    def batcher():
        budget.batch(first_batch)
        budget.batch(log.append, "batch 2 starts")

    t1 = _thread(batcher)
    _until(lambda: log == ["batch 1 starts"], "the first batch")
    t2 = _thread(lambda: budget.run(log.append, "load runs"))
    _until(lambda: budget.loads_waiting == 1, "the load to wait")
    assert log == ["batch 1 starts"]  # not during the batch
    release.set()
    t1.join(BOUND), t2.join(BOUND)
    return log


def test_a_waiting_load_runs_between_two_batches_never_during_one():
    budget = LoadBudget(0.5, burst_s=BOUND)  # plenty of credit; the batch's wait bound far away
    assert _batch_then_a_load_then_a_batch(budget) == ["batch 1 starts", "batch 1 ends", "load runs", "batch 2 starts"]
    assert budget.loads == 1


def test_without_credit_the_next_batch_goes_before_the_waiting_load():
    clock = FakeClock()
    budget = LoadBudget(0.5, burst_s=1.0, clock=clock)

    def long_load():
        clock.now += 3.0  # 3 s of loading: 1 s of credit + 1.5 earned - 3 = -0.5

    budget.run(long_load)
    # In debt, the load gives its turn to the batch; with no batch waiting, it runs.
    assert _batch_then_a_load_then_a_batch(budget) == ["batch 1 starts", "batch 1 ends", "batch 2 starts", "load runs"]


def test_loads_run_back_to_back_when_no_batch_waits_and_the_debt_is_bounded():
    clock = FakeClock()
    budget = LoadBudget(0.25, burst_s=0.5, clock=clock)

    def load():
        clock.now += 10.0

    for _ in range(3):  # each far beyond the credit; nothing waits for credit
        budget.run(load)
    assert budget.loads == 3 and budget.spent_s == pytest.approx(30.0)
    # The debt is kept to burst_s, so a batch arriving now makes the next
    # loads wait burst_s / share at most, not 30 s of loading / share.
    assert budget._credit == pytest.approx(-0.5)


@pytest.mark.parametrize("make", [lambda: LoadBudget(0.5, burst_s=0.05),
                                  # beside batches, never: between them, it would wait for the
                                  # whole load (burst_s far beyond the test's BOUND)
                                  lambda: LoadBudget(0.5, burst_s=10 * BOUND, overlap=True)],
                         ids=["between-batches-briefly", "beside-batches-never"])
def test_a_batch_waits_for_a_running_load_only_briefly(make):
    budget = make()
    loading, release, batch_ran = threading.Event(), threading.Event(), threading.Event()

    def slow_load():  # a load held up by its disk
        loading.set()
        assert release.wait(BOUND)

    t = _thread(lambda: budget.run(slow_load))
    assert loading.wait(BOUND)
    try:
        _thread(lambda: budget.batch(batch_ran.set))
        assert batch_ran.wait(BOUND), "the batch waited for the whole load"
    finally:
        release.set()
    t.join(BOUND)


def test_admit_refuses_loads_that_would_not_be_done_in_time():
    budget = LoadBudget(0.5, first_load_s=1.0)
    budget.admit(30, limit_s=10)  # the first is always admitted: nothing waits before it
    with pytest.raises(LoadsBusy) as e:
        budget.admit(1, limit_s=10)  # (30 + 1) loads of 1 s in half the time: 62 s
    assert e.value.asked == 30 and e.value.wait_s == pytest.approx(62.0)
    budget.release(30)
    budget.admit(4, limit_s=10)  # 4 s of loading in half the time: 8 s
    with pytest.raises(LoadsBusy):
        budget.admit(2, limit_s=10)  # 12 s
    budget.admit(1, limit_s=10)  # 10 s


@pytest.mark.parametrize("share", [0, -0.5, 1.5])
def test_a_bad_share_is_refused(share):
    with pytest.raises(ValueError, match="load_share"):
        LoadBudget(share)
    with pytest.raises(ValueError, match="load_share"):
        ServeConfig(load_share=share)


def test_admit_goes_by_the_measured_pace_of_a_backlog():
    # Loads of 0.1 s that, with everything else on the machine, end only
    # once a second: the admission goes by that pace (31 loads: 31 s), not
    # by their length (31 x 0.1 s in half the time: 6.2 s).
    clock = FakeClock()
    budget = LoadBudget(0.5, clock=clock)
    budget.admit(31, limit_s=100)

    def load():
        clock.now += 0.1

    for _ in range(6):
        budget.run(load)
        clock.now += 0.9
    assert budget.rate == pytest.approx(1.0)
    assert budget.mean_load_s == pytest.approx(0.1)
    with pytest.raises(LoadsBusy) as e:
        budget.admit(1, limit_s=10)
    assert e.value.wait_s == pytest.approx(32.0)
    budget.release(31)
    budget.run(load)  # nothing else asked for: the backlog is over, its pace forgotten
    assert budget.rate is None
    budget.admit(1, limit_s=10)


def _load_asked_during_a_batch(budget):
    """A batch runs; a load is asked for during it, then the batch is let
    finish once the load ran or waits. The order in which they ran."""
    log, release = [], threading.Event()

    def batch():
        log.append("batch starts")
        assert release.wait(BOUND)
        log.append("batch ends")

    t1 = _thread(lambda: budget.batch(batch))
    _until(lambda: log == ["batch starts"], "the batch")
    t2 = _thread(lambda: budget.run(log.append, "load runs"))
    _until(lambda: "load runs" in log or budget.loads_waiting == 1, "the load to run or wait")
    release.set()
    t1.join(BOUND), t2.join(BOUND)
    return log


def test_with_overlap_a_load_runs_during_a_batch():
    budget = LoadBudget(0.5, burst_s=BOUND, overlap=True)
    assert _load_asked_during_a_batch(budget) == ["batch starts", "load runs", "batch ends"]
    # between batches (the default), the same load waits for the batch to end
    assert _load_asked_during_a_batch(LoadBudget(0.5, burst_s=BOUND)) == ["batch starts", "batch ends", "load runs"]


def test_with_overlap_a_load_without_credit_waits_for_the_batch_and_loads_run_one_at_a_time():
    clock = FakeClock()
    budget = LoadBudget(0.5, burst_s=1.0, overlap=True, clock=clock)

    def long_load():
        clock.now += 3.0  # into debt (see above)

    budget.run(long_load)
    assert _load_asked_during_a_batch(budget) == ["batch starts", "batch ends", "load runs"]
    # one load at a time: a second load waits for the running one
    log, release, first = [], threading.Event(), threading.Event()

    def held():
        first.set()
        assert release.wait(BOUND)
        log.append("first ends")

    clock.now += 100.0  # credit again
    t1 = _thread(lambda: budget.run(held))
    assert first.wait(BOUND)
    t2 = _thread(lambda: budget.run(log.append, "second runs"))
    _until(lambda: budget.loads_waiting == 1, "the second load to wait")
    release.set()
    t1.join(BOUND), t2.join(BOUND)
    assert log == ["first ends", "second runs"]
