"""The cycle collector in a server holding thousands of adapters: how long
it stops the process (``/metrics``: ``ptuning_gc_seconds_total``,
``ptuning_gc_collections_total``, ``ptuning_gc_longest_seconds``, by
generation), and the two things that keep its pauses short: resident
adapters that refcounting alone frees (:func:`untie`), frozen out of the
collections (:class:`Freezer`).

Why: a server holding 10,000 resident adapters holds about 4 million
Python objects (about 400 an adapter, ``bench/adapter_memory.py``), and a
collection of the oldest generation walks all of them while every request
waits: 3.3-3.5 s at 10,000 (bench/RESULTS.md), a stop that no batch's
latency shows and that every request in flight waits out.
prometheus_client's own ``GCCollector`` counts collections and objects; it
does not time them, which is what an operator needs to see such a stall.
Timed with ``gc.callbacks``: one process-wide callback, installed once
(collections run one at a time, under the GIL).

``gc.freeze()`` moves every object the collector tracks to a permanent
generation that no collection walks (CPython's answer for large long-lived
heaps). An object frozen and later dropped is still freed by refcounting,
but a *cycle* frozen and later dropped is never freed. Every thinc
``Model`` built without an ``init`` is such a cycle (``Model.__init__``
stores ``partial(empty_init, self)``), so an evicted adapter would leak its
whole model tree, prompts included; :func:`untie` replaces those partials
by ``empty_init`` itself (``model.initialize`` calls ``init(model, X=, Y=)``
and ``empty_init`` returns the model either way), after which a loaded
pipeline has no cycle and an evicted one is freed the moment its last
request lets go (``tests/test_gc_freeze.py``).
"""
import functools
import gc
import threading
import time
from typing import Callable, Dict, Optional, Tuple

from thinc.model import empty_init

_lock = threading.Lock()
_started = [0.0]
_totals: Dict[int, list] = {0: [0, 0.0, 0.0], 1: [0, 0.0, 0.0], 2: [0, 0.0, 0.0]}  # collections, seconds, longest


def _callback(phase: str, info: dict) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
        return
    seconds = time.perf_counter() - _started[0]
    with _lock:
        entry = _totals.setdefault(info.get("generation", 2), [0, 0.0, 0.0])
        entry[0] += 1
        entry[1] += seconds
        entry[2] = max(entry[2], seconds)


def install() -> None:
    """Time every collection from now on (idempotent)."""
    if _callback not in gc.callbacks:
        gc.callbacks.append(_callback)


def pauses() -> Dict[int, Tuple[int, float, float]]:
    """Per generation: (collections, seconds in all, longest seconds) since install."""
    with _lock:
        return {generation: tuple(entry) for generation, entry in _totals.items()}


def untie(nlp) -> int:
    """Break the reference cycle of each thinc model in ``nlp``'s
    components that has no ``init`` of its own (see the module docstring);
    returns how many. Behaviour is unchanged: ``initialize`` still returns
    the model and does nothing else."""
    untied = 0
    for _, pipe in nlp.pipeline:
        model = getattr(pipe, "model", None)
        for node in model.walk() if model is not None and hasattr(model, "walk") else ():
            init = node.init
            if isinstance(init, functools.partial) and init.func is empty_init and init.args == (node,) and not init.keywords:
                node.init = empty_init
                untied += 1
    return untied


class Freezer:
    """Freezes what the process holds (``gc.freeze``) after adapters were
    loaded: at most once every ``interval_s`` seconds while loads go on, and
    once after the last of them.

    ``changes``: a number that grows with every load (the pool's loads and
    reloads). Each freeze first collects what is not yet frozen (the
    objects allocated since the last freeze: a short pause) so that garbage
    is not frozen with the rest; full collections then walk only what was
    allocated since. A cycle that is alive at a freeze and dropped later is
    not reclaimed (``frozen`` in ``/metrics`` shows the permanent
    generation: with pipelines :func:`untie`-d it follows the resident
    adapters, and grows only by such cycles).
    """

    def __init__(self, changes: Callable[[], int], interval_s: float):
        self.changes = changes
        self.interval_s = interval_s
        self.freezes = 0
        self.seconds = 0.0  # in the collections before each freeze
        self._seen: Optional[int] = None
        self._freezing = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def freeze(self) -> None:
        """Collect what is not frozen, then freeze everything."""
        with self._freezing:
            start = time.perf_counter()
            gc.collect()
            gc.freeze()
            self.seconds += time.perf_counter() - start
            self.freezes += 1

    def poll(self) -> bool:
        """One step of the thread: freeze if there were loads since the
        last step; returns whether it froze."""
        seen = self.changes()
        if seen == self._seen:
            return False
        self._seen = seen
        self.freeze()
        return True

    def start(self) -> None:
        if self._thread is None and self.interval_s > 0:
            self._seen = self.changes()
            self._thread = threading.Thread(target=self._run, name="spacy-ptuning-freezer", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()


def frozen() -> int:
    """Objects in the permanent generation."""
    return gc.get_freeze_count()
