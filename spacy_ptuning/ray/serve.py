"""Ray Serve deployment of a folder of adapters: replicas that each hold one
backbone and an adapter pool, with adapters placed by Ray Serve's model
multiplexing (install with ``pip install "spacy-ptuning[ray]"``).

Two deployments make one application (:func:`build_app`):

``PTuningRouter`` (the HTTP ingress, FastAPI)
    The endpoints, URLs and JSON of our own server (``server.py``):
    ``POST /adapters/NAME/process {"texts": [...]}`` and
    ``POST /process {"items": [{"adapter", "text"}]}``, ``GET /adapters``,
    ``GET /adapters/NAME``, ``GET /health``, ``GET /ready``. It checks sizes and
    adapter names (unknown: the same 404 body as our server, from the same
    :class:`~spacy_ptuning.pool.AdapterPool` lookup) and forwards each
    adapter's texts to ``PTuningDeployment`` through a DeploymentHandle with
    ``.options(multiplexed_model_id=NAME)``. Clients therefore keep our
    server's URLs: they need not know Ray's ``serve_multiplexed_model_id``
    header, which Ray's HTTP proxy only reads for the ingress deployment and
    which a path like ``/adapters/NAME/process`` cannot set. A mixed
    ``/process`` request is split by adapter (each adapter goes to a replica
    that has it), then put back in order.

``PTuningDeployment`` (the replicas)
    Each replica holds an :class:`~spacy_ptuning.pool.AdapterPool` over the
    folder (the backbone is loaded once per replica) and loads adapters
    through an ``@serve.multiplexed(max_num_models_per_replica=N)`` method,
    in a thread (a load is blocking spaCy/torch work). Ray Serve's router
    then sends an adapter's requests to the replicas that report it loaded,
    and a new adapter to the replica with the fewest.

Why the replica keeps our :class:`~spacy_ptuning.server.Batcher` rather than
``@serve.batch``: ``@serve.batch`` splits a batch by multiplexed model id, so
every batch would hold one adapter's texts. Our Batcher gathers the requests
of *all* the adapters the replica holds for ``max_wait_ms`` and runs them in
one :func:`~spacy_ptuning.mixed_batch.pipe_mixed` call: one backbone pass for
the texts of many adapters, which is the point of sharing a backbone.

Faults: a replica that dies with requests in flight (the router sees a
``RayActorError``) gets them re-sent through the handle, which routes them to
a live replica, up to ``retries`` times (inference has no side effects, so a
retry cannot answer twice); Ray Serve restarts the replica. When every try
fails the client gets 503 with ``[PT-E043]``, never a partial or wrong answer.
An adapter that cannot be loaded (a corrupt file) answers its own error (500
on ``/adapters/NAME/process``; ``"error"`` on its items of ``/process``) and the
replica keeps serving the others.

Run it::

    serve run spacy_ptuning.ray.serve:build_app adapters_dir=/models/adapters num_replicas=2

or from a config file (``serve deploy config.yaml``); see docs/ray.md.
"""
import asyncio
import concurrent.futures
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

from ..errors import Errors

try:
    import ray
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import JSONResponse
    from ray import serve
    from ray.exceptions import RayActorError
    from ray.serve.handle import DeploymentHandle
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(Errors.E036.format(what="spacy_ptuning.ray.serve", error=e)) from e

from ..serving.gc_pauses import Freezer
from ..serving.pool import AdapterPool, InvalidAdapterName, UnknownAdapter
from ..serving.api import (
    ItemsIn, RequestError, TextsIn, loads_busy_error, pipeline_batcher, public_message as describe_error, wordpiece_costs,
)
from ..serving.load_budget import LoadBudget, LoadsBusy
from ..serving.batcher import Job, QueueFull, ShuttingDown
from ..serving.server import ServeConfig, check_size, install_error_handlers, public_info

logger = logging.getLogger("spacy_ptuning.ray_serve")

REPLICA_HEADER = "x-ptuning-replica"  # which replica answered (/adapters/NAME/process)
REPLICAS_HEADER = "x-ptuning-replicas"  # NAME=replica,... (/process)
LOADED_HEADER = "x-ptuning-loaded"  # the answering replica's loaded adapters
LOADS_HEADER = "x-ptuning-loads"  # adapter loads on the answering replica so far
DEFAULT_MAX_MODELS = 8


class _Status(Exception):
    """An HTTP status to answer, raised inside the router's helpers."""

    def __init__(self, status: int, detail: str, headers: Optional[Dict[str, str]] = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


def _router_public(info: dict) -> dict:
    out = public_info(info)
    out.pop("loaded", None)  # the router's own pool never loads: not the replicas' state
    return out


# -- the replicas ----------------------------------------------------------------


@serve.deployment(name="PTuningDeployment", max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
class PTuningDeployment:
    """One replica: one backbone, an adapter pool, our mixed-adapter batcher.

    adapters_dir: a folder with one saved pipeline per subfolder (the same on
        every node: a shared file system, or baked into the image).
    max_models: adapters kept loaded per replica (``max_num_models_per_replica``
        of Ray's multiplexing, which decides where requests go; the pool
        keeps one more, so that the two LRUs never fight over a load).
    config: :class:`~spacy_ptuning.server.ServeConfig` fields for the
        batcher (batching, max_wait_ms, max_batch_texts, max_batch_tokens,
        max_queue, timeout_s) and for loads (load_share, loads_between_batches,
        retry_after_s: loads of new adapters run beside batches, or between
        them, as in our server;
        one that could not be done within half of timeout_s answers 503
        with Retry-After), gc_freeze_s (freezes after loads, as in our
        server) and storage_dtype (the pool's).
    """

    def __init__(
        self,
        adapters_dir: str,
        max_models: int = DEFAULT_MAX_MODELS,
        config: Optional[Mapping[str, Any]] = None,
        check_interval: Optional[float] = 1.0,
    ):
        if ray.get_gpu_ids():  # ray_actor_options={"num_gpus": ...}: CUDA_VISIBLE_DEVICES is ours
            import spacy

            spacy.require_gpu(0)
        self.config = ServeConfig(**dict(config or {}))
        self.pool = AdapterPool(adapters_dir, max_loaded=max_models + 1, check_interval=check_interval, compact=True,
                                 storage_dtype=self.config.storage_dtype)
        # Loads are rationed as in our server (load_budget.py): one at a time,
        # beside the batches (or between them), within load_share of the time,
        # so that a burst of new adapters does not stall the adapters this
        # replica already serves.
        self.load_budget = LoadBudget(self.config.load_share, overlap=not self.config.loads_between_batches)
        self.batcher = pipeline_batcher(self.config, turns=self.load_budget)
        self.batcher.start()
        # A replica is a process of its own: after loads, its objects are
        # frozen out of the cycle collector, as in our server (gc_pauses.py).
        pool = self.pool  # not self: the thread must not keep the replica alive
        self.freezer = Freezer(lambda: pool.loads_done, self.config.gc_freeze_s)
        self.freezer.start()
        # Loads on two threads of their own (as server.py: fewer malloc arenas).
        self.loader = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="spacy-ptuning-loader")
        context = serve.get_replica_context()
        self.replica = str(context.replica_id.unique_id) if context is not None else f"pid-{os.getpid()}"

        async def load(name: str):
            return await self._load(name)

        # The limit is the constructor's, so the multiplexed loader is made per
        # instance (Ray Serve detects a multiplexed instance attribute too).
        self.get_adapter = serve.multiplexed(max_num_models_per_replica=max_models)(load)

    @serve.multiplexed(max_num_models_per_replica=DEFAULT_MAX_MODELS)
    async def get_adapter(self, name: str):  # replaced in __init__; marks the class as multiplexed
        return await self._load(name)

    async def _load(self, name: str):
        """The adapter's pipeline. Loading it (not loaded yet) takes its turn
        with the batches; a loaded adapter (whose folder check may be due: a
        stat) does not. Raises LoadsBusy when the load could not be done
        within half of ``timeout_s``, UnknownAdapter before any wait."""
        loop = asyncio.get_running_loop()
        if self.pool.is_loaded(name):
            return await loop.run_in_executor(self.loader, self.pool.get, name)
        self.pool.require(name)  # an unknown name is not a load to wait for
        self.load_budget.admit(1, 0.5 * self.config.timeout_s)
        try:
            return await loop.run_in_executor(self.loader, self.load_budget.run, self.pool.get, name)
        finally:
            self.load_budget.release(1)

    async def process(self, texts: List[str]) -> Dict[str, Any]:
        """The adapter named by the request's multiplexed model id on
        ``texts``: ``{"replica", "loaded", "results": [doc_json | error message]}``,
        or ``{"replica", "status", "detail"}`` when the request fails as a whole."""
        name = serve.get_multiplexed_model_id()
        out: Dict[str, Any] = {"replica": self.replica}
        try:
            # The pool first: an adapter that cannot be loaded fails here and
            # never enters Ray's multiplexed cache (which drops its least
            # recently used model *before* it tries a load).
            nlp = await self._load(name)
            # Ray's bookkeeping: the replica reports the adapter as loaded, so
            # the router sends its next requests here. The pool still answers
            # the pipeline: it reloads a changed folder, Ray's cache would not.
            await self.get_adapter(name)
        except UnknownAdapter as e:
            return {**out, "status": 404, "detail": str(e)}
        except InvalidAdapterName as e:
            return {**out, "status": 422, "detail": str(e)}
        except LoadsBusy as e:  # 503 with Retry-After, as our server answers it
            busy = loads_busy_error(self.config, e)
            return {**out, "status": busy.status, "detail": busy.detail, "headers": busy.headers}
        except Exception as e:  # AdapterLoadFailed: this adapter only
            return {**out, "status": 500, "detail": describe_error(e)}
        try:
            costs = wordpiece_costs(self.config, nlp, texts)
        except RequestError as e:  # a text above max_text_wordpieces: 413
            return {**out, "status": e.status, "detail": e.detail}
        loop = asyncio.get_running_loop()
        job = Job([(name, nlp, t) for t in texts], loop, costs=costs, deadline=time.monotonic() + self.config.timeout_s)
        try:
            self.batcher.submit(job)
        except (QueueFull, ShuttingDown) as e:
            return {**out, "status": 503, "detail": f"Replica {self.replica}: {e}"}
        try:
            results = await asyncio.wait_for(asyncio.shield(job.future), self.config.timeout_s)
        except asyncio.TimeoutError:
            job.cancelled = True
            return {**out, "status": 504, "detail": f"The request was not answered within {self.config.timeout_s} s on replica {self.replica}; retry later."}
        except asyncio.CancelledError:  # the caller gave up
            job.cancelled = True
            raise
        out["loaded"] = self.pool.loaded
        out["loads"] = self.pool.loads_done
        out["results"] = results
        return out

    def info(self) -> Dict[str, Any]:
        """This replica's id and loaded adapters (tests, debugging)."""
        return {"replica": self.replica, "loaded": self.pool.loaded, "pid": os.getpid()}

    def __del__(self):
        try:
            self.freezer.stop()
            self.batcher.close(5)
            self.loader.shutdown(wait=False)
        except Exception:
            pass


# -- the HTTP ingress --------------------------------------------------------------

app = FastAPI(
    title="spacy-ptuning on Ray Serve",
    description="Adapters (continuous prompts) over one shared, frozen transformer, on Ray Serve replicas.",
    docs_url=None, redoc_url=None, openapi_url=None,
)
install_error_handlers(app)


@serve.deployment(name="PTuningRouter", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class PTuningRouter:
    """Our server's HTTP API in front of ``PTuningDeployment``: checks the
    request, then forwards each adapter's texts with the adapter as the
    multiplexed model id (so they go to a replica that has it loaded)."""

    def __init__(
        self,
        replicas: DeploymentHandle,
        adapters_dir: str,
        config: Optional[Mapping[str, Any]] = None,
        retries: int = 3,
    ):
        self.replicas = replicas
        self.config = ServeConfig(**dict(config or {}))
        # Names and descriptions only (read from disk): this pool never loads.
        self.pool = AdapterPool(adapters_dir, max_loaded=1, check_interval=None)
        self.retries = max(1, int(retries))

    def _check_name(self, name: str) -> None:
        """The same lookup (and so the same 404/422 body) as our server."""
        try:
            self.pool.require(name)
        except UnknownAdapter as e:
            raise _Status(404, str(e))
        except InvalidAdapterName as e:
            raise _Status(422, str(e))

    async def _forward(self, name: str, texts: List[str]) -> Dict[str, Any]:
        """The replica's answer for one adapter's texts; re-sent when the
        replica died (Ray restarts it; the handle routes to a live one)."""
        handle = self.replicas.options(multiplexed_model_id=name)
        error: Optional[BaseException] = None
        for attempt in range(self.retries):
            try:
                return await asyncio.wait_for(handle.process.remote(texts), self.config.timeout_s)
            except asyncio.TimeoutError:
                raise _Status(504, f"The request was not answered within {self.config.timeout_s} s; retry later.")
            except RayActorError as e:
                error = e
                logger.warning("replica lost while processing adapter %r (try %d/%d): %s", name, attempt + 1, self.retries, e)
                await asyncio.sleep(0.2 * (attempt + 1))
        raise _Status(503, Errors.E043.format(name=name, error=type(error).__name__, tries=self.retries),
                      headers={"Retry-After": "1"})

    @app.get("/health")
    def health(self):
        return {"status": "ok"}

    @app.get("/ready")
    def ready(self):
        return {"status": "ready", "adapters": len(self.pool.names())}

    @app.get("/adapters")
    def list_adapters(self):
        """Every adapter in the folder (whether a replica has it loaded is
        Ray's business: see ``serve status``)."""
        return {"adapters": [_router_public(self.pool.describe(n)) for n in self.pool.names()]}

    @app.get("/adapters/{name}")
    def describe_adapter(self, name: str):
        try:
            self._check_name(name)
        except _Status as s:
            raise HTTPException(s.status, s.detail)
        return _router_public(self.pool.describe(name))

    @app.post("/adapters/{name}/process")
    async def process_adapter(self, name: str, body: TextsIn):
        """Process texts with one adapter: {"adapter", "docs": [...]}."""
        try:
            check_size(self.config, body.texts)
            self._check_name(name)
            answer = await self._forward(name, body.texts)
        except _Status as s:
            raise HTTPException(s.status, s.detail, headers=s.headers)
        headers = {REPLICA_HEADER: answer["replica"]}
        if "loaded" in answer:  # the replica's adapters and its loads so far (debugging, tests)
            headers[LOADED_HEADER] = ",".join(answer["loaded"])
            headers[LOADS_HEADER] = str(answer["loads"])
        if "status" in answer:
            raise HTTPException(answer["status"], answer["detail"], headers={**headers, **answer.get("headers", {})})
        errors = [r for r in answer["results"] if isinstance(r, str)]
        if errors:
            raise HTTPException(500, f"Adapter '{name}' failed: {errors[0]}", headers=headers)
        return JSONResponse({"adapter": name, "docs": answer["results"]}, headers=headers)

    @app.post("/process")
    async def process_mixed(self, body: ItemsIn):
        """A mixed list of (adapter, text) items, answered in order; the
        items of an adapter that failed carry "error"."""
        items = [(item.adapter, item.text) for item in body.items]
        by_name: Dict[str, List[int]] = {}
        for i, (name, _) in enumerate(items):
            by_name.setdefault(name, []).append(i)
        try:
            check_size(self.config, [t for _, t in items], names=list(by_name))
            for name in by_name:  # the client's mistakes fail the whole request
                self._check_name(name)
            answers = await asyncio.gather(
                *(self._forward(name, [items[i][1] for i in idx]) for name, idx in by_name.items()),
                return_exceptions=True,
            )
        except _Status as s:
            raise HTTPException(s.status, s.detail, headers=s.headers)
        results: List[Any] = [None] * len(items)
        replicas = []
        for (name, idx), answer in zip(by_name.items(), answers):
            if isinstance(answer, _Status):
                if answer.status in (404, 422):  # the folder changed under us
                    raise HTTPException(answer.status, answer.detail)
                per_item: List[Union[str, dict]] = [answer.detail] * len(idx)
            elif isinstance(answer, BaseException):
                per_item = [describe_error(answer)] * len(idx)
            else:
                replicas.append(f"{name}={answer['replica']}")
                if "status" in answer:
                    if answer["status"] in (404, 422):
                        raise HTTPException(answer["status"], answer["detail"])
                    per_item = [answer["detail"]] * len(idx)
                else:
                    per_item = answer["results"]
            for i, result in zip(idx, per_item):
                results[i] = result
        out = [
            {"adapter": name, "error": r} if isinstance(r, str) else {"adapter": name, **r}
            for (name, _), r in zip(items, results)
        ]
        n_errors = sum(isinstance(r, str) for r in results)
        return JSONResponse({"results": out, "errors": n_errors}, headers={REPLICAS_HEADER: ",".join(replicas)})


# -- the application -------------------------------------------------------------

# The batcher and request limits a replica takes: ServeConfig's fields (their
# types convert the strings of `serve run ... key=value`); the HTTP-only ones
# (connections, tokens, hosts, drain) belong to Serve's proxy, not to ours.
_CONFIG = ("batching", "max_wait_ms", "max_batch_texts", "max_batch_tokens", "max_queue", "max_queue_wait_s",
           "timeout_s", "load_share", "loads_between_batches", "retry_after_s", "max_items", "max_request_adapters", "max_chars", "max_text_wordpieces",
           "storage_dtype", "gc_freeze_s")
_INT = ("num_replicas", "router_replicas", "max_models", "max_ongoing_requests", "retries",
        *(f.name for f in dataclasses.fields(ServeConfig) if f.name in _CONFIG and f.type in (int, "int")))
_FLOAT = ("num_cpus", "num_gpus", "check_interval",
          *(f.name for f in dataclasses.fields(ServeConfig) if f.name in _CONFIG and f.type in (float, "float")))
_BOOL = tuple(f.name for f in dataclasses.fields(ServeConfig) if f.name in _CONFIG and f.type in (bool, "bool"))


def _as_bool(key: str, value: Any) -> bool:
    """A boolean argument: a bool, or the strings of ``serve run ... key=value``."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"build_app: {key} must be true or false, got {value!r}")


def build_app(args: Mapping[str, Any]) -> "serve.Application":
    """The application: ``PTuningRouter`` in front of ``PTuningDeployment``.

    An application builder for ``serve run spacy_ptuning.ray.serve:build_app
    adapters_dir=DIR num_replicas=2`` and for the ``args:`` of a Serve config
    file. Arguments (strings from the command line are converted):

    adapters_dir (required), num_replicas (1), router_replicas (1: the HTTP
    ingress; one per node or more on a cluster), max_models (8: adapters per
    replica), num_cpus (1 per replica), num_gpus (0 per replica; > 0 puts the
    backbone on the replica's GPU), max_ongoing_requests (64 per replica),
    retries (3: tries when a replica dies mid-request), check_interval (1.0 s;
    negative: never reload a changed adapter folder), and the batcher's
    batching, max_wait_ms, max_batch_texts, max_batch_tokens, max_queue,
    max_queue_wait_s, timeout_s, load_share, loads_between_batches, retry_after_s, max_items,
    max_chars, max_text_wordpieces, the pool's storage_dtype and the
    replica's gc_freeze_s (as ``ServeConfig``).
    """
    opts: Dict[str, Any] = dict(args)  # one parameter: Serve's rule for application builders
    if "adapters_dir" not in opts:
        raise ValueError("build_app needs adapters_dir=FOLDER (one saved pipeline per subfolder)")
    unknown = set(opts) - {"adapters_dir", *_INT, *_FLOAT, *_CONFIG}
    if unknown:
        raise ValueError(f"build_app: unknown arguments {sorted(unknown)}")
    for key in _INT:
        if key in opts:
            opts[key] = int(opts[key])
    for key in _FLOAT:
        if key in opts:
            opts[key] = float(opts[key])
    for key in _BOOL:
        if key in opts:
            opts[key] = _as_bool(key, opts[key])
    # Absolute: replicas do not run in the driver's working directory.
    adapters_dir = str(Path(opts["adapters_dir"]).expanduser().resolve())
    AdapterPool(adapters_dir, max_loaded=1)  # a missing folder fails here, not in every replica
    config = {k: opts[k] for k in _CONFIG if k in opts}
    ServeConfig(**config)  # bad values fail here too
    check_interval = opts.get("check_interval", 1.0)
    replicas = PTuningDeployment.options(
        num_replicas=opts.get("num_replicas", 1),
        max_ongoing_requests=opts.get("max_ongoing_requests", 64),
        ray_actor_options={"num_cpus": opts.get("num_cpus", 1.0), "num_gpus": opts.get("num_gpus", 0.0)},
    ).bind(adapters_dir, opts.get("max_models", DEFAULT_MAX_MODELS), config,
           None if check_interval < 0 else check_interval)
    router = PTuningRouter.options(num_replicas=opts.get("router_replicas", 1))
    return router.bind(replicas, adapters_dir, config, opts.get("retries", 3))


__all__ = ["PTuningDeployment", "PTuningRouter", "build_app", "REPLICA_HEADER", "REPLICAS_HEADER"]
