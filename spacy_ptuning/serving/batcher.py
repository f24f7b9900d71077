"""The dynamic batcher of the server and of each Ray Serve replica: requests
in, batches of texts through one worker thread, answers out. No HTTP here.

What it guarantees (each with a unit test in ``tests/test_batcher.py``, with
a fake runner and a fake clock):

* **Bounded waiting.** A request is admitted while the work already accepted
  would take at most ``max_queue_wait_s`` at the rate measured on the last
  batches (in wordpieces per second), and while fewer than ``max_queue``
  texts wait; otherwise :class:`QueueFull` (a 503 with ``Retry-After``), at
  once, without waiting for anything.
* **Fairness between adapters.** Each adapter has its own queue; a batch takes
  one text from each adapter in turn (round-robin), so one tenant's flood of
  texts shares the worker with the others instead of delaying them.
* **Bounded batches.** A batch holds at most ``max_batch_texts`` texts and
  ``max_batch_tokens`` wordpieces (a text above that runs alone; the server
  caps a text at ``max_text_wordpieces``). A large request is split over
  several batches.
* **No work for nobody.** A request whose client has gone or whose deadline
  has passed is cancelled; its texts not yet started are dropped.
* **One bad text fails only itself.** When a batch raises, its texts run
  again one by one, so the exception answers only the text that raised it.

Why our own and not Ray Serve's ``@serve.batch`` or Triton's dynamic batcher:
those batch calls of one model; here one batch holds texts of many adapters
(``pipe_mixed`` shares the backbone pass between them), and admission,
fairness and cancellation are per adapter and per request.
"""
import asyncio
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

logger = logging.getLogger("spacy_ptuning.batcher")

Result = Union[Dict[str, Any], str]  # a doc's JSON, or the error message for that text
Runner = Callable[[List[Tuple[Any, str]], Any], List[Any]]


class QueueFull(Exception):
    """The request would wait too long; ``retry_after`` in seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDown(Exception):
    pass


class Job:
    """One request's texts, each with its adapter's pipeline.

    work: ``(adapter name, nlp, text)`` per text.
    loop: the event loop whose future answers the request (None: wait on
        :meth:`wait` from a thread).
    costs: each text's wordpieces (the unit of admission and of the batch
        budget); by default estimated from its length.
    deadline: ``time.monotonic()`` after which nobody waits for the answer.
    """

    __slots__ = ("work", "costs", "loop", "future", "cancelled", "enqueued", "deadline",
                 "results", "left", "queued", "done", "started", "compute_seconds", "request_id")

    def __init__(
        self,
        work: List[Tuple[str, Any, str]],
        loop: Optional[asyncio.AbstractEventLoop] = None,
        *,
        costs: Optional[Sequence[int]] = None,
        deadline: Optional[float] = None,
        request_id: str = "",
    ):
        self.work = work
        self.costs = list(costs) if costs is not None else [estimate_wordpieces(t) for _, _, t in work]
        self.loop = loop
        self.future: Optional[asyncio.Future] = loop.create_future() if loop is not None else None
        self.cancelled = False  # nobody waits for it any more
        self.enqueued = time.monotonic()
        self.deadline = deadline
        self.results: List[Optional[Result]] = [None] * len(work)
        self.left = len(work)  # texts not answered yet
        self.queued = 0  # texts in the batcher's queues
        self.done = threading.Event()
        self.started: Optional[float] = None  # when its first text entered a batch
        self.compute_seconds = 0.0  # time of the batches that held its texts
        self.request_id = request_id

    @property
    def cost(self) -> int:
        return sum(self.costs)

    def wait(self, timeout: Optional[float] = None) -> List[Result]:
        if not self.done.wait(timeout):
            raise TimeoutError("the job was not answered in time")
        return self.results  # type: ignore[return-value]

    def settle(self, results: List[Result]) -> None:
        """Answer the whole job at once (every text)."""
        self.results = list(results)
        self.left = 0
        self._deliver()

    def _answer(self, index: int, result: Result) -> bool:
        """One text's answer; True when that was the job's last one."""
        self.results[index] = result
        self.left -= 1
        if self.left == 0:
            self._deliver()
            return True
        return False

    def _deliver(self) -> None:
        self.done.set()
        if self.future is None:
            return
        results = list(self.results)

        def _set() -> None:
            if not self.future.done():
                self.future.set_result(results)

        try:
            self.loop.call_soon_threadsafe(_set)
        except RuntimeError:  # the loop is closed: nobody to answer
            pass


def estimate_wordpieces(text: str) -> int:
    """A text's wordpieces when no tokenizer is at hand: about one per four
    characters, plus the two special tokens."""
    return len(text) // 4 + 2


class Batcher:
    """Gathers requests for ``max_wait_ms`` (or up to ``max_batch_texts``)
    and runs them, round-robin over adapters, in one worker thread.

    config: the server's settings (``ServeConfig``: max_wait_ms,
        max_batch_texts, max_batch_tokens, max_queue, max_queue_wait_s).
    runner: ``runner(items, stats) -> docs``, items ``(nlp, text)``.
    render: a doc to its result (``doc_json``).
    describe: an exception to the message its text gets.
    observer: gets ``batch(texts, seconds, stats)``, ``answered(job)`` and
        ``skipped(job)`` calls (the server's metrics); optional.
    stats_factory: makes the ``stats`` object passed to the runner.
    """

    def __init__(
        self,
        config: Any,
        observer: Any = None,
        *,
        runner: Runner,
        render: Callable[[Any], Result],
        describe: Callable[[BaseException], str],
        stats_factory: Callable[[], Any] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.config = config
        self.observer = observer
        self._runner = runner
        self._render = render
        self._describe = describe
        self._stats_factory = stats_factory
        self._clock = clock
        self._cond = threading.Condition()
        self._queues: "OrderedDict[str, deque]" = OrderedDict()  # adapter -> (job, index)
        self._waiting = 0  # texts in the queues
        self._oldest: "deque[Tuple[float, Job]]" = deque()  # arrival order, for the gathering wait
        self._pending = 0  # texts accepted, not yet answered (waiting or running)
        self._pending_cost = 0  # their wordpieces
        self._rate: Optional[float] = None  # wordpieces per second, measured under backlog
        self._backlogged = False  # whether texts were left waiting when the last batch was taken
        self._closing = False
        self._thread: Optional[threading.Thread] = None

    # -- state -----------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Texts accepted and not yet answered."""
        return self._pending

    @property
    def rate(self) -> Optional[float]:
        """Wordpieces per second of the recent batches that ran with work
        still waiting (None before the first such batch).

        Only those: the rate that decides how long queued work takes is the
        rate under backlog; a lone small batch runs below it (its fixed costs
        dominate), and would make a burst after an idle spell look slower
        than it is. Until a backlogged batch has been measured, admission is
        by ``max_queue`` alone."""
        return self._rate

    def expected_wait(self, extra_cost: int = 0) -> Optional[float]:
        """Seconds until work of ``extra_cost`` wordpieces admitted now would
        be done, at the measured rate; None before the first batch."""
        if not self._rate:
            return None
        return (self._pending_cost + extra_cost) / self._rate

    # -- life ------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="spacy-ptuning-batcher", daemon=True)
            self._thread.start()

    def close(self, timeout: Optional[float] = None) -> None:
        """Finish the jobs already accepted, then stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def closing(self) -> bool:
        return self._closing

    # -- admission -------------------------------------------------------------

    def admit(self, n: int, cost: int) -> None:
        """Raise :class:`QueueFull` (or :class:`ShuttingDown`) if a request of
        ``n`` texts and ``cost`` wordpieces would be refused now: for a front
        end to refuse before it loads adapters or counts wordpieces."""
        with self._cond:
            self._admit(n, cost)

    def submit(self, job: Job) -> None:
        """Queue a job; raises :class:`QueueFull` or :class:`ShuttingDown`."""
        n, cost = len(job.work), job.cost
        with self._cond:
            self._admit(n, cost)
            for i, (name, _, _) in enumerate(job.work):
                self._queues.setdefault(name, deque()).append((job, i))
            job.queued = n
            job.enqueued = self._clock()
            self._oldest.append((job.enqueued, job))
            self._waiting += n
            self._pending += n
            self._pending_cost += cost
            self._cond.notify_all()

    def _admit(self, n: int, cost: int) -> None:
        config = self.config
        if self._closing:
            raise ShuttingDown("The server is shutting down.")
        # A request larger than the whole queue is accepted when the queue
        # is empty (it is within max_items), never on top of others.
        if self._pending and self._pending + n > config.max_queue:
            raise QueueFull(
                f"The server is busy: {self._pending} texts are waiting (--max-queue "
                f"{config.max_queue}). Retry after {config.retry_after_s} s.",
                config.retry_after_s,
            )
        wait = self.expected_wait(cost)
        limit = config.max_queue_wait_s
        if self._pending and wait is not None and wait > limit:
            retry = max(config.retry_after_s, math.ceil(wait - limit))
            raise QueueFull(
                f"The server is busy: the work queued now takes about {wait:.1f} s at "
                f"{self._rate:.0f} wordpieces/s (--max-queue-wait {limit:g} s). "
                f"Retry after {retry} s.",
                retry,
            )

    # -- the worker ------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                batch = self._next_batch()
                if batch is None:
                    return
            if batch:
                self._process(batch)

    def _next_batch(self) -> Optional[List[Tuple[Job, int]]]:
        """Under the lock: the next batch ([] when everything taken was
        cancelled), or None when closing with nothing left."""
        config = self.config
        while not self._waiting and not self._closing:
            self._cond.wait()
        if not self._waiting:
            return None
        while self._oldest and self._oldest[0][1].queued == 0:
            self._oldest.popleft()
        first = self._oldest[0][0] if self._oldest else self._clock()
        deadline = first + config.max_wait_ms / 1000.0
        while not self._closing and self._waiting < config.max_batch_texts:
            left = deadline - self._clock()
            if left <= 0:
                break
            self._cond.wait(left)
        batch: List[Tuple[Job, int]] = []
        cost = 0
        now = self._clock()
        while self._queues and len(batch) < config.max_batch_texts:
            name, queue = next(iter(self._queues.items()))
            job, i = queue[0]
            if job.cancelled or (job.deadline is not None and now > job.deadline):
                queue.popleft()
                self._drop(job, i)
            else:
                if batch and cost + job.costs[i] > config.max_batch_tokens:
                    break
                queue.popleft()
                self._waiting -= 1
                job.queued -= 1
                batch.append((job, i))
                cost += job.costs[i]
                if job.started is None:
                    job.started = now
            if queue:
                self._queues.move_to_end(name)  # the next text comes from the next adapter
            else:
                del self._queues[name]
        self._backlogged = self._waiting > 0
        return batch

    def _drop(self, job: Job, index: int) -> None:
        """A text of a cancelled job, taken off its queue unrun."""
        if not job.cancelled:
            job.cancelled = True  # past its deadline: the handler answered 504
        self._waiting -= 1
        job.queued -= 1
        self._pending -= 1
        self._pending_cost -= job.costs[index]
        if job._answer(index, "cancelled: nobody waits for this text any more") and self.observer:
            self.observer.skipped(job)

    def _process(self, batch: List[Tuple[Job, int]]) -> None:
        items = [(job.work[i][1], job.work[i][2]) for job, i in batch]
        stats = self._stats_factory()
        start = self._clock()
        try:
            outputs: List[Any] = list(self._runner(items, stats))
            if len(outputs) != len(items):
                raise RuntimeError(f"the runner answered {len(outputs)} of {len(items)} texts")
        except Exception:
            logger.exception("a batch of %d texts failed; running its texts one by one", len(items))
            outputs = self._run_one_by_one(items)
        results: List[Result] = []
        for out in outputs:
            try:
                results.append(self._describe(out) if isinstance(out, BaseException) else self._render(out))
            except Exception as e:  # rendering must not kill the worker
                logger.exception("could not render a result")
                results.append(self._describe(e))
        seconds = self._clock() - start
        cost = sum(job.costs[i] for job, i in batch)
        if seconds > 0 and self._backlogged:
            rate = cost / seconds
            self._rate = rate if self._rate is None else 0.7 * self._rate + 0.3 * rate
        if self.observer:
            try:
                self.observer.batch([(job.work[i][0], results[k]) for k, (job, i) in enumerate(batch)], seconds, stats)
            except Exception:
                logger.exception("the batch observer failed")
        finished = []
        for job in {id(job): job for job, _ in batch}.values():
            job.compute_seconds += seconds
        with self._cond:
            for k, (job, i) in enumerate(batch):
                self._pending -= 1
                self._pending_cost -= job.costs[i]
                if job._answer(i, results[k]):
                    finished.append(job)
            self._cond.notify_all()
        if self.observer:
            for job in finished:
                try:
                    self.observer.answered(job)
                except Exception:
                    logger.exception("the batch observer failed")

    def _run_one_by_one(self, items: List[Tuple[Any, str]]) -> List[Any]:
        outputs: List[Any] = []
        for item in items:
            try:
                (out,) = self._runner([item], self._stats_factory())
            except Exception as e:
                logger.exception("a text failed alone")
                out = e
            outputs.append(out)
        return outputs
