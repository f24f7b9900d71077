"""The batcher alone: a fake runner that records its batches, a gate that
holds the worker, no HTTP, no model. Every wait is on an event."""
import threading
from dataclasses import dataclass

import pytest

from spacy_ptuning.serving.batcher import Batcher, Job, QueueFull, ShuttingDown

WAIT = 30  # seconds: only a bound for a broken batcher, never a measurement


@dataclass
class Config:
    max_wait_ms: float = 0.0
    max_batch_texts: int = 4
    max_batch_tokens: int = 1000
    max_queue: int = 1000
    max_queue_wait_s: float = 5.0
    retry_after_s: int = 1


class Runner:
    """Answers each text with (nlp, text); records each batch; raises for a
    text holding "boom"; while `gate` is clear, the batch it runs waits."""

    def __init__(self):
        self.batches = []
        self.gate = threading.Event()
        self.gate.set()
        self.running = threading.Event()

    def __call__(self, items, stats):
        self.batches.append([text for _, text in items])
        self.running.set()
        assert self.gate.wait(WAIT)
        if any("boom" in text for _, text in items):
            raise ValueError("boom in this batch")
        return [(nlp, text) for nlp, text in items]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _batcher(config=None, runner=None, clock=None, observer=None):
    runner = runner or Runner()
    batcher = Batcher(
        config or Config(), observer, runner=runner,
        render=lambda out: {"text": out[1]}, describe=lambda e: f"{type(e).__name__}: {e}",
        clock=clock or (lambda: 0.0),
    )
    return batcher, runner


def _job(adapter, texts, costs=None, deadline=None):
    return Job([(adapter, adapter, t) for t in texts], costs=costs, deadline=deadline)


def _hold(batcher, runner):
    """A job that occupies the worker until runner.gate is set."""
    runner.gate.clear()
    runner.running.clear()
    blocker = _job("blocker", ["hold"])
    batcher.submit(blocker)
    assert runner.running.wait(WAIT)
    return blocker


def test_answers_each_text_in_order():
    batcher, runner = _batcher()
    batcher.start()
    job = _job("a", ["t0", "t1", "t2"])
    batcher.submit(job)
    assert job.wait(WAIT) == [{"text": "t0"}, {"text": "t1"}, {"text": "t2"}]
    batcher.close(WAIT)
    assert batcher.pending == 0


def test_a_flood_from_one_adapter_shares_the_worker_round_robin():
    batcher, runner = _batcher(Config(max_batch_texts=4))
    batcher.start()
    blocker = _hold(batcher, runner)
    flood = _job("a", [f"a{i}" for i in range(8)])
    batcher.submit(flood)
    small = [_job("b", ["b0"]), _job("c", ["c0"])]
    for job in small:
        batcher.submit(job)
    runner.gate.set()
    for job in [blocker, flood, *small]:
        job.wait(WAIT)
    # The first batch after the blocker takes one text from each adapter in
    # turn: b and c run beside a's texts, not after all eight of them.
    assert runner.batches[1] == ["a0", "b0", "c0", "a1"]
    assert runner.batches[2:] == [["a2", "a3", "a4", "a5"], ["a6", "a7"]]
    batcher.close(WAIT)


def test_a_large_request_is_split_over_batches_of_bounded_size():
    batcher, runner = _batcher(Config(max_batch_texts=3, max_batch_tokens=10))
    batcher.start()
    job = _job("a", ["x"] * 7, costs=[4] * 7)
    batcher.submit(job)
    job.wait(WAIT)
    assert [len(b) for b in runner.batches] == [2, 2, 2, 1]  # 2 x 4 wordpieces <= 10 < 3 x 4
    long = _job("a", ["long"], costs=[50])  # above the budget: a batch of its own
    batcher.submit(long)
    assert long.wait(WAIT) == [{"text": "long"}]
    batcher.close(WAIT)


def test_one_bad_text_fails_only_itself():
    """Regression: a batch that raised failed every request in it."""
    batcher, runner = _batcher(Config(max_batch_texts=8))
    batcher.start()
    blocker = _hold(batcher, runner)
    good = [_job("a", ["good0"]), _job("b", ["good1", "good2"])]
    bad = _job("a", ["fine", "boom"])
    for job in (good[0], bad, good[1]):
        batcher.submit(job)
    runner.gate.set()
    blocker.wait(WAIT)
    assert good[0].wait(WAIT) == [{"text": "good0"}]
    assert good[1].wait(WAIT) == [{"text": "good1"}, {"text": "good2"}]
    assert bad.wait(WAIT) == [{"text": "fine"}, "ValueError: boom in this batch"]
    batcher.close(WAIT)


def test_cancelled_and_expired_requests_are_dropped_unrun():
    clock = Clock()
    seen = []

    class Observer:
        def batch(self, texts, seconds, stats):
            pass

        def answered(self, job):
            pass

        def skipped(self, job):
            seen.append(job)

    batcher, runner = _batcher(clock=clock, observer=Observer())
    batcher.start()
    blocker = _hold(batcher, runner)
    gone = _job("a", ["gone0", "gone1"])
    expired = _job("b", ["late"], deadline=5.0)
    kept = _job("c", ["kept"], deadline=50.0)
    for job in (gone, expired, kept):
        batcher.submit(job)
    gone.cancelled = True  # the client left
    clock.now = 10.0  # past `expired`'s deadline
    runner.gate.set()
    blocker.wait(WAIT)
    assert kept.wait(WAIT) == [{"text": "kept"}]
    assert gone.wait(WAIT) and expired.wait(WAIT)
    assert ["gone0"] not in runner.batches and all("late" not in b for b in runner.batches)
    assert runner.batches[-1] == ["kept"]
    assert set(map(id, seen)) == {id(gone), id(expired)} and len(seen) == 2 and expired.cancelled
    batcher.close(WAIT)
    assert batcher.pending == 0


def test_admission_by_expected_wait_at_the_measured_rate():
    """Regression: admission counted texts only; 1,024 queued texts held
    about 9 s of work and accepted requests waited up to 28 s."""
    clock = Clock()

    class TimedRunner(Runner):
        """Each text costs its length in wordpieces; 100 wordpieces take one
        (fake) second."""

        def __call__(self, items, stats):
            out = super().__call__(items, stats)
            clock.now += sum(len(text) for _, text in items) / 100
            return out

    def job(name, cost):
        return _job(name, ["x" * cost], costs=[cost])

    config = Config(max_batch_texts=1, max_queue_wait_s=2.0, retry_after_s=1)
    batcher, runner = _batcher(config, TimedRunner(), clock)
    batcher.start()
    lone = job("a", 10)
    batcher.submit(lone)
    lone.wait(WAIT)
    assert batcher.rate is None  # a batch with nothing waiting behind it is not the rate under load
    blocker = _hold(batcher, runner)
    first = job("a", 50)
    batcher.submit(first)
    batcher.submit(job("b", 10_000))  # no rate yet: admitted by count alone
    runner.gate.set()
    first.wait(WAIT)  # ran with b waiting behind it: 100 wordpieces/s
    _wait_until(lambda: batcher.pending == 0)
    assert batcher.rate == pytest.approx(100.0)
    blocker = _hold(batcher, runner)  # 3 wordpieces (estimated) now in flight
    batcher.submit(job("b", 150))  # 1.53 s of work: admitted
    with pytest.raises(QueueFull, match=r"about 2\.5 s at 100 wordpieces/s.*--max-queue-wait 2 s") as e:
        batcher.submit(job("c", 100))
    assert e.value.retry_after == 1
    batcher.submit(job("c", 40))  # 1.93 s: still within the limit
    runner.gate.set()
    blocker.wait(WAIT)
    batcher.close(WAIT)


def _wait_until(predicate):
    done = threading.Event()

    def poll():
        while not predicate():
            done.wait(0.005)
        done.set()

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    assert done.wait(WAIT)


def test_queue_count_limit_and_shutdown():
    batcher, runner = _batcher(Config(max_queue=2))
    batcher.start()
    blocker = _hold(batcher, runner)
    batcher.submit(_job("a", ["1"]))
    with pytest.raises(QueueFull, match="--max-queue 2"):
        batcher.submit(_job("a", ["2"]))
    runner.gate.set()
    blocker.wait(WAIT)
    batcher.close(WAIT)
    with pytest.raises(ShuttingDown):
        batcher.submit(_job("a", ["3"]))


def test_close_answers_what_was_accepted():
    batcher, runner = _batcher()
    batcher.start()
    blocker = _hold(batcher, runner)
    queued = _job("a", ["q0", "q1"])
    batcher.submit(queued)
    closer = threading.Thread(target=batcher.close, args=(WAIT,))
    closer.start()
    runner.gate.set()
    closer.join(WAIT)
    assert not closer.is_alive()
    assert blocker.wait(0) and queued.wait(0) == [{"text": "q0"}, {"text": "q1"}]


def test_requests_are_gathered_for_max_wait_unless_the_batch_fills():
    clock = Clock()
    batcher, runner = _batcher(Config(max_wait_ms=1000, max_batch_texts=2), clock=clock)
    batcher.start()
    one = _job("a", ["a0"])
    batcher.submit(one)
    assert not one.done.wait(0.05)  # gathering: the fake clock does not move
    two = _job("b", ["b0"])
    batcher.submit(two)  # the batch is full: it runs without waiting out the clock
    assert one.wait(WAIT) and two.wait(WAIT)
    assert runner.batches == [["a0", "b0"]]
    three = _job("c", ["c0"])
    batcher.submit(three)
    clock.now += 2.0  # the gathering time has passed
    with batcher._cond:
        batcher._cond.notify_all()
    assert three.wait(WAIT) == [{"text": "c0"}]
    batcher.close(WAIT)
