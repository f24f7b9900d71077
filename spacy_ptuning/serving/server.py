"""HTTP server for a folder of adapters: settings, metrics, the FastAPI app,
the uvicorn runner.

Start it with ``python -m spacy ptuning serve ADAPTERS_DIR`` (see ``cli.py``),
or build the app with :func:`create_app` and run it with any ASGI server.
Every limit, its option and what a client gets past it: docs/serving.md.

How a request is answered:

1. The middleware gives it a request id (``X-Request-ID``: the client's, if
   it is a plain token, or a new one), refuses a body above
   ``max_body_bytes`` (413) or one that does not arrive within
   ``read_timeout_s`` (408), and writes one JSON access-log line at the end.
   The connection itself must deliver its request line and headers within
   ``read_timeout_s`` (:class:`_TimedH11Protocol`).
2. The body is parsed (422 when malformed, never echoing the input) and its
   texts checked (:func:`~spacy_ptuning.api.check_texts`: counts, characters,
   valid Unicode naming the bad text).
3. Its adapters are resolved through the :class:`~spacy_ptuning.pool.AdapterPool`:
   on a thread of their own when all are resident, else on two loader
   threads, where loads take turns with the batches
   (:class:`~spacy_ptuning.serving.load_budget.LoadBudget`; 503 with
   ``Retry-After`` for cold adapters that could not be loaded within half
   of ``timeout_s``). A first use loads the adapter; a broken one fails
   from the pool's negative cache without a new load. An unknown name is
   404, a bad one 422, an adapter that cannot be loaded answers its numbered
   error (500; in a mixed ``/process`` list only its items). Each text's
   wordpieces are counted (413 above ``max_text_wordpieces``).
4. The texts go to the :class:`~spacy_ptuning.batcher.Batcher` (503 with
   ``Retry-After`` when the queued work would take more than
   ``max_queue_wait_s``), which runs them round-robin over adapters on one
   worker thread, and drops the texts of requests whose client left or
   whose ``timeout_s`` passed (504).

On SIGTERM the server drains: ``/ready`` answers 503 (for a load balancer or
a Kubernetes pre-stop hook) while the requests accepted, and those still
arriving during ``drain_s``, are answered; then uvicorn stops. A second
signal stops at once.

Output follows ``Doc.to_json``: ``{"text", "ents": [{"start", "end",
"label"}], "cats"}`` with character offsets.
"""
import asyncio
import concurrent.futures
import hmac
import ipaddress
import json
import logging
import re
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

try:
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.routing import Match
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
        f"spacy_ptuning.server needs the 'serve' extra ({e}): pip install 'spacy-ptuning[serve]'"
    ) from e

from spacy.language import Language

from .api import (
    AdapterPathIn, ItemsIn, RequestError, TextsIn, check_adapters, check_texts, doc_json, loads_busy_error,
    pipeline_batcher, public_message, request_error, scrub, wordpiece_costs,
)
from .batcher import Batcher, Job, QueueFull, ShuttingDown, estimate_wordpieces
from ..errors import Errors
from .load_budget import LoadBudget, LoadsBusy
from . import gc_pauses
from .pool import AdapterLoadFailed, AdapterPool, InvalidAdapterName, UnknownAdapter

__all__ = [  # doc_json, BATCHING, DTYPES, config_fields: re-exported for code that imported them from here
    "ServeConfig", "config_fields", "BATCHING", "DTYPES", "create_app", "serve", "set_threads",
    "timed_protocol", "DrainingServer", "doc_json", "check_size", "describe_error", "public_info",
    "install_error_handlers",
]

logger = logging.getLogger("spacy_ptuning.server")
access_logger = logging.getLogger("spacy_ptuning.access")

from .serve_config import BATCHING, DTYPES, ServeConfig, config_fields  # noqa: E402,F401

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")


# -- compatibility: names other modules imported from here --------------------


def check_size(config: ServeConfig, texts: Sequence[str], names: Sequence[str] = ()) -> None:
    """:func:`~spacy_ptuning.api.check_texts` and
    :func:`~spacy_ptuning.api.check_adapters` as an HTTPException."""
    try:
        check_texts(config, texts)
        check_adapters(config, names)
    except RequestError as e:
        raise HTTPException(e.status, e.detail, headers=e.headers or None)


describe_error = public_message


def public_info(info: dict) -> dict:
    """An adapter's description without its location on the server's disk."""
    out = {k: v for k, v in info.items() if k not in ("location", "path")}
    if out.get("error"):
        out["error"] = scrub(out["error"])
    components = []
    for c in out.get("components", []):
        backbone = c.get("backbone")
        if isinstance(backbone, str) and Path(backbone).is_absolute():
            c = {**c, "backbone": Path(backbone).name}  # a local copy: its folder's name only
        components.append(c)
    if "components" in out:
        out["components"] = components
    return out


# -- metrics -----------------------------------------------------------------

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
MIXED = "_mixed"  # the adapter label of a /process request over several adapters
OTHER = "_other"  # the adapter label past --metrics-adapters (and of adapters whose texts never ran)


class _PoolCollector:
    """The pool's counters and each adapter's load state, read at each scrape."""

    def __init__(self, pool: AdapterPool):
        self.pool = pool

    def collect(self):
        stats = dict(self.pool.stats)
        yield GaugeMetricFamily("ptuning_adapters_loaded", "Adapters loaded now", value=len(self.pool.loaded))
        for key, doc in (
            ("loads", "Adapter loads"),
            ("reloads", "Adapter reloads after their folder changed"),
            ("evictions", "Adapters dropped beyond max_loaded (least recently used)"),
            ("load_failures", "Adapter loads that failed"),
            ("load_seconds", "Seconds spent in adapter loads and reloads that succeeded"),
        ):
            yield CounterMetricFamily(f"ptuning_adapter_{key}", doc, value=float(stats.get(key, 0)))
        state = GaugeMetricFamily("ptuning_adapter_state", "1 for each adapter's load state (UNLOADED, LOADING, READY, FAILED)",
                                  labels=["adapter", "state"])
        version = GaugeMetricFamily("ptuning_adapter_version", "Successful loads and reloads of each adapter", labels=["adapter"])
        for name, (st, ver) in self.pool.states().items():
            state.add_metric([name, st], 1)
            version.add_metric([name], ver)
        yield state
        yield version


class _GcCollector:
    """The cycle collector's pauses and the frozen objects (gc_pauses.py),
    read at each scrape."""

    def __init__(self, freezer: Optional[gc_pauses.Freezer]):
        self.freezer = freezer

    def collect(self):
        seconds = CounterMetricFamily("ptuning_gc_seconds", "Seconds the cycle collector ran, by generation", labels=["generation"])
        count = CounterMetricFamily("ptuning_gc_collections", "Timed collections, by generation", labels=["generation"])
        longest = GaugeMetricFamily("ptuning_gc_longest_seconds", "The longest collection, by generation", labels=["generation"])
        for generation, (n, total, most) in sorted(gc_pauses.pauses().items()):
            seconds.add_metric([str(generation)], total)
            count.add_metric([str(generation)], n)
            longest.add_metric([str(generation)], most)
        yield seconds
        yield count
        yield longest
        yield GaugeMetricFamily("ptuning_gc_frozen_objects", "Objects frozen out of the cycle collector (--gc-freeze-interval)", value=gc_pauses.frozen())
        if self.freezer is not None:
            yield CounterMetricFamily("ptuning_gc_freezes", "Freezes after adapter loads", value=self.freezer.freezes)


class _BudgetCollector:
    """The turns of cold loads (load_budget.py), read at each scrape."""

    def __init__(self, budget: LoadBudget):
        self.budget = budget

    def collect(self):
        b = self.budget
        yield GaugeMetricFamily("ptuning_loads_waiting", "Loads for requests waiting for their turn", value=b.loads_waiting)
        yield CounterMetricFamily("ptuning_load_turn_seconds", "Seconds of loads for requests run in their turns", value=b.spent_s)
        yield CounterMetricFamily("ptuning_load_turns", "Loads for requests run in their turns", value=b.loads)


class _Metrics:
    """Prometheus metrics; the batcher's observer."""

    def __init__(self, pool: AdapterPool, batcher_pending, load_budget: LoadBudget,
                 freezer: Optional[gc_pauses.Freezer] = None, max_adapters: int = 100) -> None:
        # Series by adapter for the first max_adapters adapters whose texts
        # ran, the rest under OTHER: prometheus_client keeps every labelled
        # series for the process's life (a histogram's is about 40 objects),
        # so unbounded labels grew memory, the objects the cycle collector
        # freezes, and every scrape, with each adapter ever asked for.
        self.max_adapters = max_adapters
        self._labelled: set = set()
        self._labels_lock = threading.Lock()
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
        self.adapter_requests = Counter(
            "ptuning_adapter_requests", "Inference requests by adapter (_mixed: several) and status",
            ["adapter", "status"], registry=r,
        )
        self.adapter_latency = Histogram(
            "ptuning_adapter_request_seconds", "Inference request latency by adapter",
            ["adapter"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.queue_seconds = Histogram(
            "ptuning_queue_seconds", "Time a request waited before its first text ran, by adapter",
            ["adapter"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.compute_seconds = Histogram(
            "ptuning_compute_seconds", "Time of the batches that ran a request's texts, by adapter",
            ["adapter"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.texts = Counter("ptuning_texts", "Texts answered with a result, by adapter", ["adapter"], registry=r)
        self.text_failures = Counter("ptuning_text_failures", "Texts answered with an error, by adapter", ["adapter"], registry=r)
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
        self.skipped_jobs = Counter("ptuning_skipped_jobs", "Requests whose texts were dropped unrun (timed out or client gone)", registry=r)
        queue = Gauge("ptuning_queue_texts", "Texts accepted and not yet answered", registry=r)
        queue.set_function(batcher_pending)
        r.register(_PoolCollector(pool))
        r.register(_BudgetCollector(load_budget))
        gc_pauses.install()
        r.register(_GcCollector(freezer))

    def adapter_label(self, name: str, ran: bool = False) -> str:
        """``name`` if it has series of its own (given to it now if its texts
        ``ran`` and fewer than ``max_adapters`` adapters have them), else
        OTHER; MIXED stays MIXED."""
        if name == MIXED or name in self._labelled:
            return name
        if ran:
            with self._labels_lock:
                if name in self._labelled or len(self._labelled) < self.max_adapters:
                    self._labelled.add(name)
                    return name
        return OTHER

    # the batcher's observer
    def batch(self, texts: List[Tuple[str, Any]], seconds: float, stats) -> None:
        self.batch_texts.observe(len(texts))
        self.batch_adapters.observe(len({name for name, _ in texts}))
        self.batch_seconds.observe(seconds)
        for name, result in texts:
            label = self.adapter_label(name, ran=True)
            (self.text_failures if isinstance(result, str) else self.texts).labels(label).inc()
        if stats is not None:
            self.passes.inc(stats.passes)
            self.rows.inc(stats.rows)
            for n in stats.adapters_per_pass:
                self.pass_adapters.observe(n)

    def answered(self, job: Job) -> None:
        label = self.adapter_label(_job_label(job))
        if job.started is not None:
            self.queue_seconds.labels(label).observe(max(0.0, job.started - job.enqueued))
        self.compute_seconds.labels(label).observe(job.compute_seconds)

    def skipped(self, job: Job) -> None:
        self.skipped_jobs.inc()


def _job_label(job: Job) -> str:
    names = {name for name, _, _ in job.work}
    return next(iter(names)) if len(names) == 1 else MIXED


# -- the middleware ------------------------------------------------------------

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class _Middleware:
    """Request ids, body limits and read timeout, metrics, access log; and
    every unexpected error as a JSON 500 that names only the request id (the
    details go to the log), so the connection stays usable."""

    def __init__(self, app, state: "_State"):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = [0]
        endpoint = self.state.endpoint(scope)
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_tagged(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = dict(message)
                headers = list(message.get("headers", [])) + [(b"x-request-id", request_id.encode())]
                loads = scope["state"].get("access", {}).get("loads")
                if loads is not None:  # an inference request: how many of its adapters it waited to load
                    headers.append((b"x-adapter-loads", str(loads).encode()))
                message["headers"] = headers
            await send(message)

        config = self.state.config
        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                try:
                    body = await asyncio.wait_for(self._read_body(receive), config.read_timeout_s)
                except asyncio.TimeoutError:
                    await _json(scope, receive, send_tagged, 408, f"The request body did not arrive within {config.read_timeout_s:g} s (--read-timeout).", {"connection": "close"})
                    return
                if body is None:
                    await _json(scope, receive, send_tagged, 413,
                                f"The request body is larger than this server's limit of {config.max_body_bytes} bytes "
                                "(--max-body-bytes). Send fewer or shorter texts per request.")
                    return
                receive = _replay(body, receive)
            await self.app(scope, receive, send_tagged)
        except Exception:
            logger.exception("request %s failed", request_id)
            if status[0] == 0:
                await _json(scope, receive, send_tagged, 500, f"Internal error; the server's log has the details under request id {request_id}.")
            else:
                raise
        finally:
            seconds = time.perf_counter() - start
            metrics = self.state.metrics
            metrics.requests.labels(endpoint, scope["method"], str(status[0] or 500)).inc()
            metrics.latency.labels(endpoint).observe(seconds)
            if access_logger.isEnabledFor(logging.INFO):
                client = scope.get("client") or ("", 0)
                access_logger.info(json.dumps({
                    "time": round(time.time(), 3), "request_id": request_id, "client": client[0],
                    "method": scope["method"], "path": endpoint, "status": status[0] or 500,
                    "seconds": round(seconds, 4), **scope["state"].get("access", {}),
                }))

    async def _read_body(self, receive) -> Optional[bytes]:
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


async def _json(scope, receive, send, status: int, detail: str, headers: Optional[dict] = None) -> None:
    await JSONResponse({"detail": detail}, status_code=status, headers=headers)(scope, receive, send)


def _replay(body: bytes, receive):
    sent = [False]

    async def replayed():
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later calls: the client's disconnect

    return replayed


# -- the app -------------------------------------------------------------------


class _State:
    def __init__(self, pool: AdapterPool, config: ServeConfig):
        self.pool = pool
        self.config = config
        # Loads for requests and batches take turns, the loads at most
        # config.load_share of the time while a batch waits (load_budget.py).
        self.load_budget = LoadBudget(config.load_share, overlap=not config.loads_between_batches)
        # After loads, what the process holds is frozen out of the cycle
        # collector, so that its full collections do not walk every resident
        # adapter (gc_pauses.py); started with the app, and once after the
        # preloads.
        self.freezer = gc_pauses.Freezer(lambda: pool.loads_done, config.gc_freeze_s)
        self.metrics = _Metrics(pool, lambda: self.batcher.pending, self.load_budget, self.freezer,
                                max_adapters=config.metrics_adapters)
        self.batcher: Batcher = pipeline_batcher(config, self.metrics, self.load_budget)
        self.closing = False  # draining or stopping: /ready answers 503
        self.preloaded = threading.Event()
        self.preload_errors: Dict[str, str] = {}
        self.routes: list = []
        self.admin_lock = threading.Lock()
        # Adapters are looked up and loaded on two threads of their own, not
        # on the ASGI thread pool (up to 40 threads): every thread that loads
        # a pipeline gets its own malloc arena, and under adapter churn those
        # arenas held about 1 GB more RSS (bench/serve_load.py, churn mode).
        self.loader = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="spacy-ptuning-loader")
        # Requests whose adapters are all resident are prepared (looked up,
        # counted in wordpieces) on a thread of their own, so that a burst
        # of requests for cold adapters, queued on the loader, never delays
        # them.
        self.warm = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="spacy-ptuning-warm")

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
                names = self.pool.names()[: self.pool.max_loaded]
            for name in names:
                try:
                    self.pool.get(name)
                except Exception as e:
                    self.preload_errors[name] = public_message(e)
                    logger.error("could not preload adapter %r: %s", name, e)
            if names and self.config.gc_freeze_s > 0:
                self.freezer.freeze()  # before /ready: the one long collection, while no request waits
        finally:
            self.preloaded.set()

    def resolve(self, names: Sequence[str], items: Sequence[Tuple[str, str]], field_name: str = "texts"):
        """Each name's pipeline (or the exception that loading it raised),
        and each item's wordpieces (None for items of failed adapters);
        raises RequestError for a text above the wordpiece cap."""
        found: Dict[str, Union[Language, Exception]] = {}
        for name in names:
            try:
                found[name] = self.pool.get(name)
            except Exception as e:
                found[name] = e
        costs: List[Optional[int]] = []
        for i, (name, text) in enumerate(items):
            nlp = found[name]
            if isinstance(nlp, Exception):
                costs.append(None)
            else:
                costs.append(wordpiece_costs(self.config, nlp, [text], field_name, offset=i)[0])
        return found, costs

    def check_token(self, request: Request, token: Optional[str], what: str, env: str) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise HTTPException(
                401, f"{what} needs 'Authorization: Bearer TOKEN' (the server's {env}).",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(given.strip().encode(), (token or "").encode()):
            raise HTTPException(401, "Wrong token.", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})

    def check_admin(self, request: Request) -> None:
        if not self.config.admin_token:
            raise HTTPException(
                403,
                "Adapter management over HTTP is off. Start the server with --admin-token TOKEN "
                "(or $SPACY_PTUNING_ADMIN_TOKEN) and send 'Authorization: Bearer TOKEN'.",
            )
        self.check_token(request, self.config.admin_token, "Adapter management", "--admin-token")

    def check_api(self, request: Request) -> None:
        """The inference token, when the server has one (the admin token is
        accepted too)."""
        token = self.config.api_token
        if not token:
            return
        given = request.headers.get("authorization", "").partition(" ")[2].strip().encode()
        admin = self.config.admin_token
        if admin and hmac.compare_digest(given, admin.encode()):
            return
        self.check_token(request, token, "This endpoint", "--api-token")


def create_app(
    pool: Union[AdapterPool, str, Path, Mapping[str, Union[str, Path]]],
    config: Optional[ServeConfig] = None,
    **pool_kwargs: Any,
) -> FastAPI:
    """The ASGI app over an :class:`AdapterPool` (or the source to build one
    from, with ``pool_kwargs`` such as ``max_loaded``)."""
    config = config or ServeConfig()
    if not isinstance(pool, AdapterPool):
        pool = AdapterPool(pool, **{"dtype": config.dtype, "compact": True, "storage_dtype": config.storage_dtype, **pool_kwargs})
    state = _State(pool, config)
    admin_root = Path(config.admin_root).resolve() if config.admin_root else (
        pool.root.resolve() if pool.root is not None else None
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.batcher.start()
        state.freezer.start()
        threading.Thread(target=state.preload, name="spacy-ptuning-preload", daemon=True).start()
        yield
        state.freezer.stop()
        # uvicorn has stopped accepting connections and answered the requests
        # in flight; anything still queued is finished before the worker stops.
        state.closing = True
        await run_in_threadpool(state.batcher.close, config.timeout_s)
        state.loader.shutdown(wait=False)
        state.warm.shutdown(wait=False)

    docs = {} if config.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(
        title="spacy-ptuning",
        description="Adapters (continuous prompts) over one shared, frozen transformer.",
        lifespan=lifespan,
        **docs,
    )
    app.state.ptuning = state
    install_error_handlers(app)

    @app.get("/health")
    async def health():
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready")
    def ready():
        """Readiness: the pool lists its adapters and the preloads are done;
        503 while draining."""
        if state.closing:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        if not state.preloaded.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        try:
            names = state.pool.names()
        except Exception as e:
            return JSONResponse({"status": "error", "detail": public_message(e)}, status_code=503)
        return {
            "status": "ready",
            "adapters": len(names),
            "loaded": list(state.pool.loaded),
            "preload_errors": state.preload_errors,
        }

    @app.get("/adapters")
    def list_adapters(request: Request):
        """Every adapter, loaded or not: tasks, labels, method, backbone."""
        state.check_api(request)
        return {"adapters": [public_info(state.pool.describe(name)) for name in state.pool.names()]}

    @app.get("/adapters/{name}")
    def describe_adapter(name: str, request: Request):
        state.check_api(request)
        try:
            return public_info(state.pool.describe(name))
        except (UnknownAdapter, InvalidAdapterName) as e:
            raise _http(request_error(e))

    @app.post("/adapters/{name}/process")
    async def process_adapter(name: str, body: TextsIn, request: Request):
        """Process texts with one adapter: {"docs": [Doc.to_json, ...]}."""
        state.check_api(request)
        results, _ = await _answer(state, request, [(name, t) for t in body.texts], mixed=False)
        errors = [r for r in results if isinstance(r, str)]
        if errors:
            raise HTTPException(500, f"Adapter '{name}' failed: {errors[0]}")
        return JSONResponse({"adapter": name, "docs": results})

    @app.post("/process")
    async def process_mixed(body: ItemsIn, request: Request):
        """Process a mixed list of (adapter, text) items: {"results": [...]}, in
        order; an item whose adapter failed carries "error" instead."""
        state.check_api(request)
        items = [(item.adapter, item.text) for item in body.items]
        results, n_errors = await _answer(state, request, items, mixed=True)
        out = []
        for (name, _), result in zip(items, results):
            out.append({"adapter": name, "error": result} if isinstance(result, str) else {"adapter": name, **result})
        return JSONResponse({"results": out, "errors": n_errors})

    @app.put("/adapters/{name}", status_code=201)
    def put_adapter(name: str, body: AdapterPathIn, request: Request):
        """Add (or replace) an adapter from a pipeline folder under the
        admin root; it is loaded at once, and kept only if it loads (admin
        token)."""
        state.check_admin(request)
        path = _admin_path(admin_root, body.path)
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
                raise HTTPException(422, scrub(str(e)))
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
                raise HTTPException(422, public_message(e))
        status = 200 if previous is not None else 201
        return JSONResponse(public_info(state.pool.describe(name)), status_code=status)

    @app.delete("/adapters/{name}", status_code=204)
    def delete_adapter(name: str, request: Request):
        """Forget an adapter (requests holding it finish with it; admin token)."""
        state.check_admin(request)
        with state.admin_lock:
            try:
                state.pool.remove(name)
            except (UnknownAdapter, InvalidAdapterName) as e:
                raise _http(request_error(e))
        return Response(status_code=204)

    @app.get("/metrics")
    def metrics():
        """Prometheus text format."""
        return PlainTextResponse(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(_Middleware, state=state)
    if config.allowed_hosts is not None and list(config.allowed_hosts) != ["*"]:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(config.allowed_hosts))
    state.routes = [r for r in app.routes if hasattr(r, "matches")]
    return app


def install_error_handlers(app: FastAPI) -> None:
    """422 for a malformed body that names what is wrong and where, never
    echoing the input (which may be huge, or hold NaN, which JSON cannot
    answer with)."""

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        errors = [
            {"loc": [str(p)[:64] for p in e.get("loc", ())][:8], "msg": str(e.get("msg", ""))[:200], "type": str(e.get("type", ""))}
            for e in exc.errors()[:20]
        ]
        return JSONResponse({"detail": errors}, status_code=422)


def _http(e: RequestError) -> HTTPException:
    return HTTPException(e.status, e.detail, headers=e.headers or None)


def _admin_path(root: Optional[Path], given: str) -> Path:
    """A PUT's folder: a saved pipeline folder inside the admin root (never an
    installed package, never a folder elsewhere on the server)."""
    if root is None:
        raise HTTPException(403, "PUT /adapters/NAME needs an admin root: start the server with --admin-root FOLDER.")
    path = Path(given).expanduser()
    path = (root / path if not path.is_absolute() else path).resolve()
    if path != root and root not in path.parents:
        raise HTTPException(422, Errors.E044.format(path=scrub(given)))
    if not (path / "config.cfg").is_file():
        raise HTTPException(422, Errors.E045.format(path=scrub(given)))
    return path


async def _answer(
    state: _State, request: Request, items: List[Tuple[str, str]], *, mixed: bool
) -> Tuple[List[Union[Dict[str, Any], str]], int]:
    """Results for (adapter, text) items, in order: a Doc.to_json dict or an
    error message per item; and the number of errors."""
    config = state.config
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + config.timeout_s
    names = list(dict.fromkeys(name for name, _ in items))
    label = names[0] if len(names) == 1 else MIXED
    request.scope["state"]["access"] = {"adapter": label, "texts": len(items)}
    status = [500]
    try:
        try:
            check_texts(config, [t for _, t in items], "items" if mixed else "texts")
            check_adapters(config, names)
            try:  # refuse an overloaded server's requests before loading or tokenising anything
                state.batcher.admit(len(items), sum(estimate_wordpieces(t) for _, t in items))
            except (QueueFull, ShuttingDown) as e:
                state.metrics.rejected.inc()
                raise request_error(e)
            # Not resident: not loaded (a load, in its turn), or loaded with a
            # check of its folder due (a stat; a changed folder is reloaded).
            not_resident = [name for name in names if state.pool.resident(name) is None]
            cold_names = [name for name in not_resident if not state.pool.is_loaded(name)]
            for name in cold_names:  # an unknown or bad name is the client's mistake, not a load to wait for
                try:
                    state.pool.require(name)
                except (UnknownAdapter, InvalidAdapterName) as e:
                    raise request_error(e)
            cold = len(cold_names)
            request.scope["state"]["access"]["loads"] = cold  # X-Adapter-Loads, the access log
            if cold:  # refuse at once what could not be loaded in half the timeout (the pace of loads varies)
                try:
                    state.load_budget.admit(cold, 0.5 * config.timeout_s)
                except LoadsBusy as e:
                    state.metrics.rejected.inc()
                    raise loads_busy_error(config, e)
            try:
                field = "items" if mixed else "texts"
                if cold:
                    resolving = loop.run_in_executor(state.loader, state.load_budget.run, state.resolve, names, items, field)
                else:
                    resolving = loop.run_in_executor(state.loader if not_resident else state.warm,
                                                     state.resolve, names, items, field)
                resolved, costs = await asyncio.wait_for(resolving, timeout=config.timeout_s)
            except asyncio.TimeoutError:
                state.metrics.timeouts.inc()
                raise RequestError(504, f"Loading the adapters took longer than {config.timeout_s} s (--timeout); retry later.")
            finally:
                if cold:
                    state.load_budget.release(cold)
            for name in names:  # the client's mistakes fail the whole request
                found = resolved[name]
                if isinstance(found, (UnknownAdapter, InvalidAdapterName)):
                    raise request_error(found)
            failed = {name: public_message(e) for name, e in resolved.items() if isinstance(e, Exception)}
            if failed and not mixed:
                raise RequestError(500, next(iter(failed.values())))
            results: List[Union[Dict[str, Any], str, None]] = [failed.get(name) for name, _ in items]
            todo = [i for i, (name, _) in enumerate(items) if name not in failed]
            if todo:
                job = Job([(items[i][0], resolved[items[i][0]], items[i][1]) for i in todo], loop,
                          costs=[costs[i] for i in todo], deadline=time.monotonic() + max(0.0, deadline - loop.time()),
                          request_id=request.scope["state"].get("request_id", ""))
                try:
                    state.batcher.submit(job)
                except (QueueFull, ShuttingDown) as e:
                    state.metrics.rejected.inc()
                    raise request_error(e)
                done = await _wait(state, request, job, deadline)
                for i, result in zip(todo, done):
                    results[i] = result
        except RequestError as e:
            status[0] = e.status
            raise _http(e)
        n_errors = sum(isinstance(r, str) for r in results)
        status[0] = 500 if (n_errors and not mixed) else 200
        return results, n_errors  # type: ignore[return-value]
    except HTTPException as e:
        status[0] = e.status_code
        raise
    finally:
        label = state.metrics.adapter_label(label)
        state.metrics.adapter_requests.labels(label, str(status[0])).inc()
        state.metrics.adapter_latency.labels(label).observe(loop.time() - start)


async def _wait(state: _State, request: Request, job: Job, deadline: float) -> list:
    """The job's results; 504 past the deadline; gives up (and drops the
    texts not yet started) when the client disconnects."""
    loop = asyncio.get_running_loop()
    while True:
        left = deadline - loop.time()
        if left <= 0:
            job.cancelled = True
            state.metrics.timeouts.inc()
            raise RequestError(
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
            raise RequestError(499, "Client closed the request.")


# -- running -------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def set_threads(threads: int) -> None:
    """torch's intra-op threads for this process (0: leave torch's default).

    Why 1 by default: the server's batches are small (a few sentences), so
    a second OpenMP thread gains little, while its spinning waits compete
    with the event loop, the loader threads and anything else on the
    machine; on a busy 2-core machine that made throughput unstable and up
    to 10x lower (docs/serving.md, "Threads")."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)


def check_budget(pool: AdapterPool) -> None:
    """Load the adapter with the fewest bytes on disk (the next one, if that
    one is broken): exits with PT-E050 when the pool's memory budget cannot
    hold even that one."""
    names = pool.names()
    if not names:
        return

    def size(name: str) -> int:
        location = Path(pool.describe(name)["location"])
        return sum(f.stat().st_size for f in location.rglob("*") if f.is_file()) if location.is_dir() else 0

    for name in sorted(names, key=size):
        try:
            pool.get(name)
            return
        except (AdapterLoadFailed, UnknownAdapter) as e:  # a folder removed meanwhile: the next
            if "PT-E050" in str(e):
                raise SystemExit(f"Cannot start: the smallest adapter, {name!r}, does not fit: {e}")
            # a broken adapter fails alone (per request, as always): try the next


def serve(
    source: Union[str, Path, Mapping[str, Union[str, Path]]],
    config: Optional[ServeConfig] = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    max_loaded: int = 8,
    max_resident_mb: Optional[float] = None,
    check_interval: Optional[float] = 1.0,
    log_level: str = "info",
) -> None:
    """Run the server until SIGTERM/SIGINT (then drain, and finish the
    accepted requests). With ``max_resident_mb``, the smallest adapter
    folder is loaded first: a budget that cannot hold it stops the server
    here (PT-E050), not at the first request."""
    config = config or ServeConfig()
    set_threads(config.threads)
    if config.allowed_hosts is None:
        config.allowed_hosts = list(LOOPBACK_HOSTS) if _is_loopback(host) else ["*"]
    # compact: a served adapter is never trained or saved; its prompts alone
    # are kept (a P-Tuning v1 encoder or a prefix MLP is freed).
    pool = AdapterPool(source, max_loaded=max_loaded, max_resident_mb=max_resident_mb,
                       check_interval=check_interval, dtype=config.dtype, compact=True,
                       storage_dtype=config.storage_dtype)
    if max_resident_mb is not None:
        check_budget(pool)
    app = create_app(pool, config)
    if not logging.getLogger().handlers and not access_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        access_logger.addHandler(handler)
        access_logger.setLevel(logging.INFO if log_level in ("info", "debug", "trace") else logging.WARNING)
        access_logger.propagate = False
    uv_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,  # ours: one JSON line per request, with its id
        http=timed_protocol(config.read_timeout_s),
        limit_concurrency=config.max_connections,
        timeout_graceful_shutdown=int(config.timeout_s) + 5,
    )
    DrainingServer(uv_config, app.state.ptuning).run()


def timed_protocol(read_timeout_s: float):
    """uvicorn's h11 protocol, closing a connection that has not sent a
    whole request line and headers within ``read_timeout_s`` of connecting
    (or of its previous response).

    Why our own: uvicorn times out idle keep-alive connections only after a
    response, and never a request whose headers trickle in (slowloris)."""

    class _TimedH11Protocol(H11Protocol):
        _header_timer = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(read_timeout_s, self._header_timeout)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # a whole request arrived; the body has its own timeout

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return _TimedH11Protocol


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain phase: the first SIGTERM/SIGINT makes
    ``/ready`` answer 503 and keeps serving until ``drain_s`` has passed and
    the batcher has answered everything accepted (at most ``timeout_s``
    more); then uvicorn's own graceful shutdown runs. A second signal stops
    at once."""

    def __init__(self, config, state: _State):
        super().__init__(config)
        self.state = state
        self.draining = threading.Event()

    def handle_exit(self, sig, frame) -> None:
        # Not uvicorn's: it re-raises the signals it caught once it has
        # stopped, so a drained server would exit 130 instead of 0.
        if self.draining.is_set():
            self.should_exit = self.force_exit = True
            return
        self.draining.set()
        self.state.closing = True
        logger.info("draining: /ready answers 503; %d texts in flight", self.state.batcher.pending)
        threading.Thread(target=self._drain, name="spacy-ptuning-drain", daemon=True).start()

    def _drain(self) -> None:
        cfg = self.state.config
        end = time.monotonic() + cfg.drain_s
        limit = end + cfg.timeout_s
        while time.monotonic() < limit and (time.monotonic() < end or self.state.batcher.pending):
            time.sleep(0.05)
        self.should_exit = True
