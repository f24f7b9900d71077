"""How long Python's cycle collector stops the server process, for
``/metrics`` (``ptuning_gc_seconds_total``, ``ptuning_gc_collections_total``
and ``ptuning_gc_longest_seconds``, by generation).

Why: a server holding thousands of resident adapters holds millions of
Python objects (about 400 an adapter, ``bench/adapter_memory.py``), and a
collection of the oldest generation walks all of them while every request
waits: a pause that no latency percentile of one batch shows, but that the
throughput of a whole run does. prometheus_client's own ``GCCollector``
counts collections and objects; it does not time them, which is what an
operator needs to see such a stall. Timed with ``gc.callbacks``: one
process-wide callback, installed once (collections run one at a time,
under the GIL).
"""
import gc
import threading
import time
from typing import Dict, Tuple

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
