"""HTTP server for a folder of adapters: FastAPI app, dynamic batcher, metrics.

Start it with ``python -m spacy ptuning serve ADAPTERS_DIR`` (see ``cli.py``),
or build the app with :func:`create_app` and run it with any ASGI server.

How a request is answered:

1. The body is read up to ``max_body_bytes`` (413 beyond), parsed (422 when
   malformed) and checked against ``max_items`` / ``max_chars`` (413).
2. Its adapters are resolved through the :class:`~spacy_ptuning.pool.AdapterPool`
   *before* batching, in a thread (a first use loads the adapter): an unknown
   name answers 404 naming the known ones; an adapter that cannot be loaded
   answers its own error (500 with the ``[PT-E0xx]`` message), and in a mixed
   ``/process`` list only that adapter's items carry the error.
3. The texts join a bounded queue (``max_queue`` texts accepted and not yet
   answered; 503 with ``Retry-After`` when full). One worker thread takes the
   requests that arrived within ``max_wait_ms`` of the first waiting one (or up
   to ``max_batch_texts``) and runs them off the event loop: with
   :func:`~spacy_ptuning.mixed_batch.pipe_mixed` (``batching="mixed"``: one
   backbone pass for the texts of many adapters) or each adapter's own
   ``nlp.pipe`` (``"per_adapter"``). If a batch fails, its adapters are run
   again one by one, so a failing adapter fails only its own items.
4. The handler waits for its result up to ``timeout_s`` (504 beyond) and stops
   waiting when the client disconnects; the worker skips requests nobody waits
   for any more, and never waits on a client.

Shutdown (SIGINT/SIGTERM to uvicorn) stops accepting connections, answers the
requests already accepted, then stops the worker.

Output follows ``Doc.to_json``: ``{"text", "ents": [{"start", "end",
"label"}], "cats"}`` with character offsets.
"""
import asyncio
import concurrent.futures
import hmac
import logging
import threading
import time
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

try:
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from pydantic import BaseModel
    from starlette.concurrency import run_in_threadpool
    from starlette.routing import Match
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
        f"spacy_ptuning.server needs the 'serve' extra ({e}): pip install 'spacy-ptuning[serve]'"
    ) from e

from spacy.language import Language
from spacy.tokens import Doc

from .mixed_batch import MixedStats, pipe_mixed
from .pool import AdapterPool, InvalidAdapterName, UnknownAdapter

logger = logging.getLogger("spacy_ptuning.server")

BATCHING = ("mixed", "per_adapter")


@dataclass
class ServeConfig:
    """Server settings (the ``serve`` command's options)."""

    batching: str = "mixed"  # "mixed" (pipe_mixed) or "per_adapter" (nlp.pipe)
    max_wait_ms: float = 5.0  # gather requests this long after the first one
    max_batch_texts: int = 64  # most texts per batch (a larger request: a batch of its own)
    max_batch_tokens: int = 4096  # pipe_mixed's wordpiece budget per backbone pass
    max_queue: int = 1024  # texts accepted and not yet answered; 503 beyond
    timeout_s: float = 30.0  # per request; 504 beyond
    max_items: int = 512  # texts or items per request; 413 beyond
    max_chars: int = 1_000_000  # characters of text per request; 413 beyond
    max_body_bytes: int = 2_000_000  # request body; 413 beyond
    admin_token: Optional[str] = None  # PUT/DELETE /adapters/NAME need it; off without
    preload: Sequence[str] = field(default_factory=tuple)  # names, or ["all"]
    retry_after_s: int = 1  # the Retry-After of a 503

    def __post_init__(self) -> None:
        if self.batching not in BATCHING:
            raise ValueError(f"batching must be one of {BATCHING}, got {self.batching!r}")
        for name in ("max_batch_texts", "max_queue", "max_items", "max_chars", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        if self.timeout_s <= 0 or self.max_wait_ms < 0:
            raise ValueError("timeout_s must be positive and max_wait_ms at least 0")


# -- output ------------------------------------------------------------------


def doc_json(doc: Doc) -> Dict[str, Any]:
    """The parts of ``Doc.to_json`` the components set: text, entities with
    character offsets, categories."""
    return {
        "text": doc.text,
        "ents": [{"start": e.start_char, "end": e.end_char, "label": e.label_} for e in doc.ents],
        "cats": {label: float(score) for label, score in doc.cats.items()},
    }


# -- batcher -----------------------------------------------------------------


class Job:
    """One request's texts, each with its resolved pipeline; answered through
    an asyncio future of the request's event loop."""

    __slots__ = ("work", "loop", "future", "cancelled", "enqueued")

    def __init__(self, work: List[Tuple[str, Language, str]], loop: asyncio.AbstractEventLoop):
        self.work = work  # (adapter name, nlp, text)
        self.loop = loop
        self.future: asyncio.Future = loop.create_future()
        self.cancelled = False  # nobody waits for it any more
        self.enqueued = time.monotonic()

    def settle(self, results: List[Union[Dict[str, Any], str]]) -> None:
        def _set() -> None:
            if not self.future.done():
                self.future.set_result(results)

        try:
            self.loop.call_soon_threadsafe(_set)
        except RuntimeError:  # the loop is closed: nobody to answer
            pass


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


class Batcher:
    """Gathers requests for ``max_wait_ms`` (or up to ``max_batch_texts``) and
    runs them in one worker thread; at most ``max_queue`` texts accepted and
    not yet answered."""

    def __init__(self, config: ServeConfig, metrics: Optional["_Metrics"] = None):
        self.config = config
        self.metrics = metrics
        self._cond = threading.Condition()
        self._jobs: "deque[Job]" = deque()
        self._waiting = 0  # texts in _jobs
        self._pending = 0  # texts accepted, not yet answered (waiting or running)
        self._closing = False
        self._thread: Optional[threading.Thread] = None

    @property
    def pending(self) -> int:
        return self._pending

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="spacy-ptuning-batcher", daemon=True)
            self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job; raises QueueFull or ShuttingDown instead."""
        n = len(job.work)
        with self._cond:
            if self._closing:
                raise ShuttingDown()
            # A request larger than the whole queue is accepted when the queue
            # is empty (it is within max_items), never on top of others.
            if self._pending and self._pending + n > self.config.max_queue:
                raise QueueFull()
            self._jobs.append(job)
            self._waiting += n
            self._pending += n
            self._cond.notify_all()

    def close(self, timeout: Optional[float] = None) -> None:
        """Finish the jobs already accepted, then stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        max_wait = self.config.max_wait_ms / 1000.0
        max_texts = self.config.max_batch_texts
        while True:
            with self._cond:
                while not self._jobs and not self._closing:
                    self._cond.wait()
                if not self._jobs:  # closing, nothing left
                    return
                deadline = self._jobs[0].enqueued + max_wait
                while not self._closing and self._waiting < max_texts:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch: List[Job] = []
                n = 0
                while self._jobs and (not batch or n + len(self._jobs[0].work) <= max_texts):
                    job = self._jobs.popleft()
                    self._waiting -= len(job.work)
                    if job.cancelled:  # timed out or disconnected while waiting
                        self._pending -= len(job.work)
                        if self.metrics:
                            self.metrics.skipped.inc()
                        continue
                    batch.append(job)
                    n += len(job.work)
            if not batch:
                continue
            try:
                self._process(batch)
            except Exception:  # never let the worker die
                logger.exception("batch failed")
                for job in batch:
                    job.settle(["internal error while processing the batch"] * len(job.work))
            finally:
                with self._cond:
                    self._pending -= n
                    self._cond.notify_all()

    def _process(self, batch: List[Job]) -> None:
        items = [(nlp, text) for job in batch for (_, nlp, text) in job.work]
        start = time.perf_counter()
        stats = MixedStats()
        try:
            outputs: List[Union[Doc, Exception]] = list(self._run_items(items, stats))
        except Exception:
            logger.exception("a batch of %d texts failed; running its adapters one by one", len(items))
            outputs = self._run_isolated(items, stats)
        results: List[Union[Dict[str, Any], str]] = [
            doc_json(out) if isinstance(out, Doc) else describe_error(out) for out in outputs
        ]
        if self.metrics:
            self.metrics.observe_batch(batch, stats, time.perf_counter() - start)
        k = 0
        for job in batch:
            job.settle(results[k : k + len(job.work)])
            k += len(job.work)

    def _run_items(self, items: List[Tuple[Language, str]], stats: MixedStats) -> List[Doc]:
        if self.config.batching == "mixed":
            return pipe_mixed(items, max_batch_tokens=self.config.max_batch_tokens, stats=stats)
        # per_adapter: each pipeline's texts through its own nlp.pipe
        docs: List[Optional[Doc]] = [None] * len(items)
        for nlp, indices in _group(items).values():
            for i, doc in zip(indices, nlp.pipe([items[i][1] for i in indices])):
                docs[i] = doc
        return docs  # type: ignore[return-value]

    def _run_isolated(self, items: List[Tuple[Language, str]], stats: MixedStats) -> List[Union[Doc, Exception]]:
        outputs: List[Union[Doc, Exception]] = [RuntimeError("not run")] * len(items)
        for nlp, indices in _group(items).values():
            try:
                docs = self._run_items([items[i] for i in indices], stats)
            except Exception as e:
                logger.exception("adapter pipeline failed on %d texts", len(indices))
                docs = [e] * len(indices)
            for i, doc in zip(indices, docs):
                outputs[i] = doc
        return outputs


def _group(items: Sequence[Tuple[Language, str]]) -> Dict[int, Tuple[Language, List[int]]]:
    groups: Dict[int, Tuple[Language, List[int]]] = {}
    for i, (nlp, _) in enumerate(items):
        groups.setdefault(id(nlp), (nlp, []))[1].append(i)
    return groups


def describe_error(e: BaseException) -> str:
    text = str(e)
    return text if text.startswith("[PT-") else f"{type(e).__name__}: {text}"


# -- metrics -----------------------------------------------------------------

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class _PoolCollector:
    """The pool's counters, read at each scrape."""

    def __init__(self, pool: AdapterPool):
        self.pool = pool

    def collect(self):
        stats = dict(getattr(self.pool, "stats", {}) or {})
        loaded = self.pool.loaded if hasattr(self.pool, "loaded") else stats.get("loaded", 0)
        n_loaded = len(loaded) if isinstance(loaded, (list, tuple, set, dict)) else int(loaded)
        yield GaugeMetricFamily("ptuning_adapters_loaded", "Adapters loaded now", value=n_loaded)
        for key, doc in (
            ("loads", "Adapter loads"),
            ("reloads", "Adapter reloads after their folder changed"),
            ("evictions", "Adapters dropped beyond max_loaded (least recently used)"),
            ("load_failures", "Adapter loads that failed"),
        ):
            yield CounterMetricFamily(f"ptuning_adapter_{key}", doc, value=float(stats.get(key, 0)))


class _Metrics:
    def __init__(self, pool: AdapterPool, batcher_pending) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ptuning_http_requests", "HTTP requests by endpoint, method and status",
            ["endpoint", "method", "status"], registry=r,
        )
        self.latency = Histogram(
            "ptuning_http_request_duration_seconds", "HTTP request latency by endpoint",
            ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.texts = Counter("ptuning_texts", "Texts processed, by adapter", ["adapter"], registry=r)
        self.batch_texts = Histogram("ptuning_batch_texts", "Texts per batch of the batcher", buckets=_COUNT_BUCKETS, registry=r)
        self.batch_adapters = Histogram(
            "ptuning_batch_adapters", "Adapters per batch of the batcher", buckets=_COUNT_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "ptuning_batch_seconds", "Time to run one batch", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.passes = Counter("ptuning_backbone_passes", "Backbone passes (batching=mixed)", registry=r)
        self.rows = Counter(
            "ptuning_backbone_rows",
            "Rows through backbone passes (batching=mixed); rows per pass = rows_total / passes_total",
            registry=r,
        )
        self.pass_adapters = Histogram(
            "ptuning_backbone_pass_adapters", "Adapters per backbone pass (batching=mixed)",
            buckets=_COUNT_BUCKETS, registry=r,
        )
        self.rejected = Counter("ptuning_rejected", "Requests refused with 503 (queue full or shutting down)", registry=r)
        self.timeouts = Counter("ptuning_timeouts", "Requests answered 504 (not done within the timeout)", registry=r)
        self.disconnects = Counter("ptuning_client_disconnects", "Clients gone before their answer", registry=r)
        self.skipped = Counter("ptuning_skipped_jobs", "Queued requests dropped unrun (timed out or client gone)", registry=r)
        queue = Gauge("ptuning_queue_texts", "Texts accepted and not yet answered", registry=r)
        queue.set_function(batcher_pending)
        r.register(_PoolCollector(pool))

    def observe_batch(self, batch: List[Job], stats: MixedStats, seconds: float) -> None:
        names = [name for job in batch for name, _, _ in job.work]
        self.batch_texts.observe(len(names))
        self.batch_adapters.observe(len(set(names)))
        self.batch_seconds.observe(seconds)
        for name in names:
            self.texts.labels(name).inc()
        self.passes.inc(stats.passes)
        self.rows.inc(stats.rows)
        for n in stats.adapters_per_pass:
            self.pass_adapters.observe(n)


# -- request checks ------------------------------------------------------------


class _Middleware:
    """Counts and times every request (by route template, not by path), and
    refuses bodies above ``max_body_bytes`` before anything parses them."""

    def __init__(self, app, state: "_State"):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = [500]
        endpoint = self.state.endpoint(scope)

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body = await self._read_body(scope, receive)
                if body is None:
                    limit = self.state.config.max_body_bytes
                    response = JSONResponse(
                        {"detail": f"The request body is larger than this server's limit of {limit} bytes "
                                   "(--max-body-bytes). Send fewer or shorter texts per request."},
                        status_code=413,
                    )
                    await response(scope, receive, send_status)
                    return
                receive = _replay(body, receive)
            await self.app(scope, receive, send_status)
        finally:
            metrics = self.state.metrics
            metrics.requests.labels(endpoint, scope["method"], str(status[0])).inc()
            metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

    async def _read_body(self, scope, receive) -> Optional[bytes]:
        """The whole body, or None when it is above the limit."""
        limit = self.state.config.max_body_bytes
        chunks, size = [], 0  # stops reading at the limit, whatever Content-Length says
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replay(body: bytes, receive):
    sent = [False]

    async def replayed():
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later calls: the client's disconnect

    return replayed


class TextsIn(BaseModel):
    texts: List[str]


class ItemIn(BaseModel):
    adapter: str
    text: str


class ItemsIn(BaseModel):
    items: List[ItemIn]


class AdapterPathIn(BaseModel):
    path: str


# -- the app -------------------------------------------------------------------


class _State:
    def __init__(self, pool: AdapterPool, config: ServeConfig):
        self.pool = pool
        self.config = config
        self.metrics = _Metrics(pool, lambda: self.batcher.pending)
        self.batcher = Batcher(config, self.metrics)
        self.closing = False
        self.preloaded = threading.Event()
        self.preload_errors: Dict[str, str] = {}
        self.routes: list = []
        self.admin_lock = threading.Lock()
        # Adapters are looked up and loaded on two threads of their own, not
        # on the ASGI thread pool (up to 40 threads): every thread that loads
        # a pipeline gets its own malloc arena, and under adapter churn those
        # arenas held about 1 GB more RSS (bench/serve_load.py, churn mode).
        self.loader = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="spacy-ptuning-loader")

    def endpoint(self, scope) -> str:
        for route in self.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return route.path
        return "unmatched"

    def preload(self) -> None:
        try:
            names = list(self.config.preload)
            if names == ["all"]:
                names = self.pool.names()[: getattr(self.pool, "max_loaded", len(names))]
            for name in names:
                try:
                    self.pool.get(name)
                except Exception as e:
                    self.preload_errors[name] = str(e)
                    logger.error("could not preload adapter %r: %s", name, e)
        finally:
            self.preloaded.set()

    def resolve(self, names: Sequence[str]) -> Dict[str, Union[Language, Exception]]:
        """Each name's pipeline, or the exception that loading it raised."""
        out: Dict[str, Union[Language, Exception]] = {}
        for name in names:
            try:
                out[name] = self.pool.get(name)
            except Exception as e:
                out[name] = e
        return out

    def check_admin(self, request: Request) -> None:
        token = self.config.admin_token
        if not token:
            raise HTTPException(
                403,
                "Adapter management over HTTP is off. Start the server with --admin-token TOKEN "
                "(or $SPACY_PTUNING_ADMIN_TOKEN) and send 'Authorization: Bearer TOKEN'.",
            )
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise HTTPException(
                401, "Send 'Authorization: Bearer TOKEN' (the server's --admin-token).",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPException(
                401, "Wrong admin token.", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
            )


def create_app(
    pool: Union[AdapterPool, str, Path, Mapping[str, Union[str, Path]]],
    config: Optional[ServeConfig] = None,
    **pool_kwargs: Any,
) -> FastAPI:
    """The ASGI app over an :class:`AdapterPool` (or the source to build one
    from, with ``pool_kwargs`` such as ``max_loaded``)."""
    if not isinstance(pool, AdapterPool):
        pool = AdapterPool(pool, **pool_kwargs)
    config = config or ServeConfig()
    state = _State(pool, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.batcher.start()
        threading.Thread(target=state.preload, name="spacy-ptuning-preload", daemon=True).start()
        yield
        # uvicorn has stopped accepting connections and answered the requests
        # in flight; anything still queued is finished before the worker stops.
        state.closing = True
        await run_in_threadpool(state.batcher.close, config.timeout_s)
        state.loader.shutdown(wait=False)

    app = FastAPI(
        title="spacy-ptuning",
        description="Adapters (continuous prompts) over one shared, frozen transformer.",
        lifespan=lifespan,
    )
    app.state.ptuning = state

    @app.get("/health")
    async def health():
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready")
    def ready():
        """Readiness: the pool lists its adapters and the preloads are done."""
        if state.closing:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        if not state.preloaded.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        try:
            names = state.pool.names()
        except Exception as e:
            return JSONResponse({"status": "error", "detail": str(e)}, status_code=503)
        return {
            "status": "ready",
            "adapters": len(names),
            "loaded": list(state.pool.loaded),
            "preload_errors": state.preload_errors,
        }

    @app.get("/adapters")
    def list_adapters():
        """Every adapter, loaded or not: tasks, labels, method, backbone."""
        return {"adapters": [public_info(state.pool.describe(name)) for name in state.pool.names()]}

    @app.get("/adapters/{name}")
    def describe_adapter(name: str):
        return public_info(_describe(state, name))

    @app.post("/adapters/{name}/process")
    async def process_adapter(name: str, body: TextsIn, request: Request):
        """Process texts with one adapter: {"docs": [Doc.to_json, ...]}."""
        check_size(config, body.texts)
        results, _ = await _answer(state, request, [(name, t) for t in body.texts], mixed=False)
        errors = [r for r in results if isinstance(r, str)]
        if errors:
            raise HTTPException(500, f"Adapter '{name}' failed: {errors[0]}")
        return JSONResponse({"adapter": name, "docs": results})

    @app.post("/process")
    async def process_mixed(body: ItemsIn, request: Request):
        """Process a mixed list of (adapter, text) items: {"results": [...]}, in
        order; an item whose adapter failed carries "error" instead."""
        check_size(config, [item.text for item in body.items])
        items = [(item.adapter, item.text) for item in body.items]
        results, n_errors = await _answer(state, request, items, mixed=True)
        out = []
        for (name, _), result in zip(items, results):
            out.append({"adapter": name, "error": result} if isinstance(result, str) else {"adapter": name, **result})
        return JSONResponse({"results": out, "errors": n_errors})

    @app.put("/adapters/{name}", status_code=201)
    def put_adapter(name: str, body: AdapterPathIn, request: Request):
        """Add (or replace) an adapter from a pipeline folder on the server;
        it is loaded at once, and kept only if it loads (admin token)."""
        state.check_admin(request)
        path = Path(body.path).expanduser()
        with state.admin_lock:
            try:
                previous = state.pool.describe(name).get("location")
            except UnknownAdapter:
                previous = None
            except InvalidAdapterName as e:
                raise HTTPException(422, str(e))
            try:
                state.pool.add(name, str(path))
            except (InvalidAdapterName, FileNotFoundError, ValueError) as e:
                raise HTTPException(422, str(e))
            try:
                state.pool.get(name)
            except Exception as e:
                try:  # keep what the name meant before
                    if previous is not None:
                        state.pool.add(name, previous)
                    else:
                        state.pool.remove(name)
                except Exception:
                    logger.exception("could not restore adapter %r", name)
                raise HTTPException(422, describe_error(e))
        status = 200 if previous is not None else 201
        return JSONResponse(public_info(state.pool.describe(name)), status_code=status)

    @app.delete("/adapters/{name}", status_code=204)
    def delete_adapter(name: str, request: Request):
        """Forget an adapter (requests holding it finish with it; admin token)."""
        state.check_admin(request)
        with state.admin_lock:
            try:
                state.pool.remove(name)
            except UnknownAdapter as e:
                raise HTTPException(404, str(e))
            except InvalidAdapterName as e:
                raise HTTPException(422, str(e))
        return Response(status_code=204)

    @app.get("/metrics")
    def metrics():
        """Prometheus text format."""
        return PlainTextResponse(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(_Middleware, state=state)
    state.routes = [r for r in app.routes if hasattr(r, "matches")]
    return app


def public_info(info: dict) -> dict:
    """An adapter's description without its location on the server's disk."""
    return {k: v for k, v in info.items() if k not in ("location", "path")}


def _describe(state: _State, name: str) -> dict:
    try:
        return state.pool.describe(name)
    except UnknownAdapter as e:
        raise HTTPException(404, str(e))
    except InvalidAdapterName as e:
        raise HTTPException(422, str(e))


def check_size(config: ServeConfig, texts: Sequence[str]) -> None:
    if len(texts) > config.max_items:
        raise HTTPException(
            413, f"{len(texts)} texts in one request; this server takes at most {config.max_items} "
                 "(--max-items). Split the request."
        )
    chars = sum(len(t) for t in texts)
    if chars > config.max_chars:
        raise HTTPException(
            413, f"{chars} characters of text in one request; this server takes at most "
                 f"{config.max_chars} (--max-chars). Split the request."
        )


async def _answer(
    state: _State, request: Request, items: List[Tuple[str, str]], *, mixed: bool
) -> Tuple[List[Union[Dict[str, Any], str]], int]:
    """Results for (adapter, text) items, in order: a Doc.to_json dict or an
    error message per item; and the number of errors."""
    config = state.config
    loop = asyncio.get_running_loop()
    deadline = loop.time() + config.timeout_s
    if state.closing:
        state.metrics.rejected.inc()
        raise HTTPException(503, "The server is shutting down.", headers={"Retry-After": str(config.retry_after_s)})
    names = list(dict.fromkeys(name for name, _ in items))
    try:
        resolved = await asyncio.wait_for(loop.run_in_executor(state.loader, state.resolve, names), timeout=config.timeout_s)
    except asyncio.TimeoutError:
        state.metrics.timeouts.inc()
        raise HTTPException(504, f"Loading the adapters {names} took longer than {config.timeout_s} s (--timeout); retry later.")
    for name in names:  # the client's mistakes fail the whole request
        found = resolved[name]
        if isinstance(found, UnknownAdapter):
            raise HTTPException(404, str(found))
        if isinstance(found, InvalidAdapterName):
            raise HTTPException(422, str(found))
    failed = {name: describe_error(e) for name, e in resolved.items() if isinstance(e, Exception)}
    if failed and not mixed:
        name, message = next(iter(failed.items()))
        raise HTTPException(500, message)
    results: List[Union[Dict[str, Any], str, None]] = [failed.get(name) for name, _ in items]
    todo = [i for i, (name, _) in enumerate(items) if name not in failed]
    if todo:
        job = Job([(items[i][0], resolved[items[i][0]], items[i][1]) for i in todo], loop)  # type: ignore[misc]
        try:
            state.batcher.submit(job)
        except QueueFull:
            state.metrics.rejected.inc()
            raise HTTPException(
                503,
                f"The server is busy: {state.batcher.pending} texts are waiting (--max-queue "
                f"{config.max_queue}). Retry after {config.retry_after_s} s.",
                headers={"Retry-After": str(config.retry_after_s)},
            )
        except ShuttingDown:
            state.metrics.rejected.inc()
            raise HTTPException(503, "The server is shutting down.", headers={"Retry-After": str(config.retry_after_s)})
        done = await _wait(state, request, job, deadline)
        for i, result in zip(todo, done):
            results[i] = result
    n_errors = sum(isinstance(r, str) for r in results)
    return results, n_errors  # type: ignore[return-value]


async def _wait(state: _State, request: Request, job: Job, deadline: float) -> list:
    """The job's results; 504 past the deadline; gives up (and drops the job
    if it has not started) when the client disconnects."""
    loop = asyncio.get_running_loop()
    while True:
        left = deadline - loop.time()
        if left <= 0:
            job.cancelled = True
            state.metrics.timeouts.inc()
            raise HTTPException(
                504,
                f"The request was not answered within {state.config.timeout_s} s (--timeout); "
                f"{state.batcher.pending} texts are in the queue. Retry later, or send fewer texts per request.",
            )
        done, _ = await asyncio.wait({job.future}, timeout=min(left, 0.1))
        if done:
            return job.future.result()
        if await request.is_disconnected():
            job.cancelled = True
            state.metrics.disconnects.inc()
            raise HTTPException(499, "Client closed the request.")


def serve(
    source: Union[str, Path, Mapping[str, Union[str, Path]]],
    config: Optional[ServeConfig] = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    max_loaded: int = 8,
    check_interval: Optional[float] = 1.0,
    log_level: str = "info",
) -> None:
    """Run the server until SIGINT/SIGTERM (then finish the accepted requests)."""
    import uvicorn

    config = config or ServeConfig()
    pool = AdapterPool(source, max_loaded=max_loaded, check_interval=check_interval)
    app = create_app(pool, config)
    # One process: the adapters and the backbone live in it. Graceful shutdown
    # waits for the requests in flight, each bounded by the request timeout.
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=int(config.timeout_s) + 5,
    )
