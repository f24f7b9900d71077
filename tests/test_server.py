"""The HTTP server: a real uvicorn on a free local port, a real HTTP client,
adapters saved to disk and served through the real AdapterPool."""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import spacy
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from spacy_ptuning.serving.pool import AdapterPool
from spacy_ptuning.serving.server import ServeConfig, create_app
from spacy_ptuning.pipeline.transformer_model import find_adapter_layers

from .helpers import TEXTS, assert_doc as _assert_doc, pipeline as _pipeline

SERVED = ["multi", "ner", "sentiment", "topics"]  # the adapters that work
TOKEN = "s3cret-token"
SLOW_SECONDS = 0.6


# Custom components for test adapters, in a file: imported here and by the
# serve command's --code (as spaCy's own commands import custom code).
COMPONENTS = """
import threading
import time

from spacy.language import Language


@Language.factory("ptuning_test_sleep", default_config={"seconds": 0.5})
def make_sleep(nlp, name, seconds):
    \"\"\"A component that takes `seconds` per batch: a slow adapter.\"\"\"
    return Sleep(seconds)


class Sleep:
    def __init__(self, seconds):
        self.seconds = seconds

    def __call__(self, doc):
        time.sleep(self.seconds)
        return doc

    def pipe(self, docs, batch_size=None):
        docs = list(docs)
        time.sleep(self.seconds)
        return docs


@Language.factory("ptuning_test_gate")
def make_gate(nlp, name):
    \"\"\"Holds each batch until a test calls `.opened.set()`: an adapter
    slow for exactly as long as the test needs, whatever the machine's load.\"\"\"
    return Gate()


class Gate:
    def __init__(self):
        self.opened = threading.Event()

    def __call__(self, doc):
        if not self.opened.wait(120):
            raise RuntimeError("the test never opened the gate")
        return doc


@Language.component("ptuning_test_fragile")
def fragile(doc):
    \"\"\"Fails on texts with 'boom': an adapter that breaks at inference.\"\"\"
    if "boom" in doc.text:
        raise ValueError("boom: this adapter failed on purpose")
    return doc
"""


@pytest.fixture(scope="module")
def components_file(tmp_path_factory):
    from spacy.cli._util import import_code

    path = tmp_path_factory.mktemp("code") / "components.py"
    path.write_text(COMPONENTS)
    import_code(path)
    return path


@pytest.fixture(scope="module")
def adapters_dir(tiny_bert, other_tiny_bert, tmp_path_factory, components_file):
    root = tmp_path_factory.mktemp("adapters")
    _pipeline(tiny_bert, ["ptuning_ner"], "prefix", 4, 1).to_disk(root / "ner")
    _pipeline(tiny_bert, ["ptuning_textcat"], "prompt", 6, 2).to_disk(root / "sentiment")
    _pipeline(tiny_bert, ["ptuning_textcat_multilabel"], "prompt_encoder", 3, 4).to_disk(root / "topics")
    _pipeline(tiny_bert, ["ptuning_ner", "ptuning_textcat"], "prefix", 2, 5).to_disk(root / "multi")
    slow = _pipeline(tiny_bert, ["ptuning_textcat"], "prefix", 3, 6)
    slow.add_pipe("ptuning_test_sleep", config={"seconds": SLOW_SECONDS})
    slow.to_disk(root / "slow")
    gated = _pipeline(tiny_bert, ["ptuning_textcat"], "prefix", 3, 11)
    gated.add_pipe("ptuning_test_gate", name="gate")
    gated.to_disk(root / "gated")
    fragile = _pipeline(tiny_bert, ["ptuning_ner"], "prompt", 2, 10)
    fragile.add_pipe("ptuning_test_fragile")
    fragile.to_disk(root / "fragile")
    # A corrupted adapter file ([PT-E008]) and one saved for another backbone ([PT-E006]).
    _pipeline(tiny_bert, ["ptuning_ner"], "prefix", 4, 7).to_disk(root / "broken")
    model_file = root / "broken" / "ptuning_ner" / "model"
    model_file.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
    _pipeline(tiny_bert, ["ptuning_ner"], "prefix", 4, 8).to_disk(root / "mismatched")
    cfg = root / "mismatched" / "config.cfg"
    cfg.write_text(cfg.read_text().replace(tiny_bert, other_tiny_bert))
    # Outside the served folder: for PUT /adapters/NAME.
    extra = tmp_path_factory.mktemp("extra")
    _pipeline(tiny_bert, ["ptuning_textcat"], "prefix", 5, 9).to_disk(extra / "late")
    return root


@pytest.fixture(scope="module")
def expected(adapters_dir):
    """Each working adapter on TEXTS in-process, with nlp.pipe."""
    out = {}
    for name in SERVED:
        nlp = spacy.load(adapters_dir / name)
        out[name] = {doc.text: doc for doc in nlp.pipe(TEXTS)}
    # The comparison is not of empty results.
    assert any(doc.ents for doc in out["ner"].values())
    assert all(doc.cats for doc in out["sentiment"].values())
    return out


@contextmanager
def running(app, graceful_s=10):
    """uvicorn serving `app` on a free 127.0.0.1 port in a thread; stopped at
    the end (and checked to have stopped)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=graceful_s))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "server did not stop"


def _gate(app):
    """The gated adapter's gate, in `app`'s pool (preloaded): `.set()` lets
    its batch go on."""
    return app.state.ptuning.pool.resident("gated").get_pipe("gate").opened


def _app(source, max_loaded=8, **config):
    pool = source if isinstance(source, AdapterPool) else AdapterPool(source, max_loaded=max_loaded, check_interval=None)
    # The process stays unfrozen (a frozen cycle of a test's pipeline would
    # never be freed): tests/test_gc_freeze.py tests the freezing.
    return create_app(pool, ServeConfig(**{"gc_freeze_s": 0, **config}))


@pytest.fixture(scope="module")
def server(adapters_dir):
    app = _app(adapters_dir, max_wait_ms=10, admin_token=TOKEN, preload=SERVED,
               max_items=40, max_chars=3000, max_body_bytes=20_000, timeout_s=20)
    with running(app) as (url, srv):
        with httpx.Client(base_url=url, timeout=20) as client:
            _wait_ready(client)
            yield client


def _wait_ready(client, timeout=120):
    deadline = time.monotonic() + timeout
    while True:
        r = client.get("/ready")
        if r.status_code == 200:
            return r.json()
        assert r.status_code == 503 and time.monotonic() < deadline, r.text
        time.sleep(0.05)


def _metrics(client):
    """{(name, frozenset(labels)): value} of the /metrics text."""
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    values = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            values[(s.name, frozenset(s.labels.items()))] = s.value
    return values


def _metric(client, name, **labels):
    return _metrics(client).get((name, frozenset(labels.items())), 0.0)


def _wait_for(predicate, timeout=120, what="condition"):
    """Polls until `predicate` holds; the timeout only bounds a broken server
    (generous: the suite must pass with every core busy)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# -- endpoints ---------------------------------------------------------------


def test_health_ready_and_preload(server):
    assert server.get("/health").json() == {"status": "ok"}
    ready = server.get("/ready")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready" and body["adapters"] == 9
    assert set(SERVED) <= set(body["loaded"]) and body["preload_errors"] == {}


def test_adapters_lists_loaded_and_not_loaded(server):
    r = server.get("/adapters")
    assert r.status_code == 200
    adapters = {a["name"]: a for a in r.json()["adapters"]}
    assert set(adapters) == {"broken", "fragile", "gated", "mismatched", "multi", "ner", "sentiment", "slow", "topics"}
    assert adapters["ner"]["loaded"] is True and adapters["slow"]["loaded"] is False
    ner = adapters["ner"]["components"]
    assert [(c["task"], c["labels"], c["method"], c["num_virtual_tokens"]) for c in ner] == [("ner", ["PER"], "prefix", 4)]
    assert ner[0]["backbone"]
    assert [c["task"] for c in adapters["multi"]["components"]] == ["ner", "textcat"]
    assert adapters["sentiment"]["components"][0]["method"] == "prompt"
    assert adapters["topics"]["components"][0]["task"] == "textcat_multilabel"
    # Read from disk, not loaded: still described.
    assert sorted(adapters["slow"]["components"][0]["labels"]) == ["NEG", "POS"]
    assert all("location" not in a for a in adapters.values())  # no server paths
    one = server.get("/adapters/ner")
    assert one.status_code == 200 and one.json()["components"] == ner


def test_process_one_adapter_equals_nlp_pipe(server, expected):
    for name in SERVED:
        r = server.post(f"/adapters/{name}/process", json={"texts": TEXTS})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["adapter"] == name and len(body["docs"]) == len(TEXTS)
        for got, text in zip(body["docs"], TEXTS):
            _assert_doc(got, expected[name][text])


@pytest.mark.parametrize("batching", ["mixed", "per_adapter"])
def test_mixed_list_equals_nlp_pipe_per_adapter(adapters_dir, expected, batching):
    app = _app(adapters_dir, batching=batching, max_wait_ms=5)
    items = [{"adapter": name, "text": text} for text in TEXTS for name in SERVED]
    with running(app) as (url, _), httpx.Client(base_url=url, timeout=20) as client:
        r = client.post("/process", json={"items": items})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["errors"] == 0 and len(body["results"]) == len(items)
        for item, got in zip(items, body["results"]):
            assert got["adapter"] == item["adapter"]
            _assert_doc(got, expected[item["adapter"]][item["text"]])
        passes = _metric(client, "ptuning_backbone_passes_total")
        adapters_per_pass = _metric(client, "ptuning_backbone_pass_adapters_sum")
    if batching == "mixed":
        # 4 adapters (5 components) x 6 texts: passes shared by the adapters.
        assert 0 < passes <= len(TEXTS) and adapters_per_pass / passes > 1
    else:
        assert passes == 0  # nlp.pipe per adapter


def test_empty_text_is_a_valid_empty_result(server):
    r = server.post("/adapters/multi/process", json={"texts": ["", "alice visited paris"]})
    assert r.status_code == 200, r.text
    empty = r.json()["docs"][0]
    assert empty["text"] == "" and empty["ents"] == [] and set(empty["cats"]) == {"NEG", "POS"}
    r = server.post("/process", json={"items": [{"adapter": "ner", "text": ""}]})
    assert r.status_code == 200 and r.json()["results"][0]["ents"] == []
    assert server.post("/adapters/ner/process", json={"texts": []}).json()["docs"] == []
    assert server.post("/process", json={"items": []}).json() == {"results": [], "errors": 0}


def test_metrics_count_requests_latency_passes_and_adapters(server):
    server.post("/adapters/ner/process", json={"texts": ["alice"]})
    server.post("/adapters/nope/process", json={"texts": ["alice"]})
    m = _metrics(server)
    ok = ("ptuning_http_requests_total", frozenset({"endpoint": "/adapters/{name}/process", "method": "POST", "status": "200"}.items()))
    missing = ("ptuning_http_requests_total", frozenset({"endpoint": "/adapters/{name}/process", "method": "POST", "status": "404"}.items()))
    assert m[ok] >= 1 and m[missing] >= 1
    count = ("ptuning_http_request_duration_seconds_count", frozenset({"endpoint": "/adapters/{name}/process"}.items()))
    assert m[count] >= 2
    assert m[("ptuning_backbone_passes_total", frozenset())] >= 1
    assert m[("ptuning_backbone_rows_total", frozenset())] >= m[("ptuning_backbone_passes_total", frozenset())]
    assert m[("ptuning_adapters_loaded", frozenset())] >= len(SERVED)
    assert ("ptuning_adapter_evictions_total", frozenset()) in m
    assert m[("ptuning_texts_total", frozenset({"adapter": "ner"}.items()))] >= 1
    # Paths are labelled by their route, not by the adapter name in them.
    assert not any(dict(labels).get("endpoint", "").endswith("nope/process") for _, labels in m)


def test_metrics_time_the_cycle_collector_by_generation(server):
    import gc

    before = _metrics(server)
    key = lambda name: (name, frozenset({"generation": "2"}.items()))  # noqa: E731
    gc.collect()  # a full collection in the server's process (the app runs in this one)
    after = _metrics(server)
    assert after[key("ptuning_gc_collections_total")] >= before[key("ptuning_gc_collections_total")] + 1
    assert after[key("ptuning_gc_seconds_total")] > before[key("ptuning_gc_seconds_total")]
    assert 0 < after[key("ptuning_gc_longest_seconds")] <= after[key("ptuning_gc_seconds_total")]
    assert {dict(labels)["generation"] for name, labels in after if name == "ptuning_gc_collections_total"} == {"0", "1", "2"}


def test_evictions_beyond_max_loaded(adapters_dir):
    app = _app(adapters_dir, max_loaded=1)
    with running(app) as (url, _), httpx.Client(base_url=url, timeout=20) as client:
        for name in ("ner", "sentiment", "ner"):
            assert client.post(f"/adapters/{name}/process", json={"texts": ["alice"]}).status_code == 200
        assert _metric(client, "ptuning_adapter_evictions_total") == 2
        assert _metric(client, "ptuning_adapters_loaded") == 1
        assert _metric(client, "ptuning_adapter_loads_total") == 3


def test_x_adapter_loads_says_how_many_adapters_a_request_waited_to_load(adapters_dir):
    app = _app(adapters_dir, max_loaded=8)
    with running(app) as (url, _), httpx.Client(base_url=url, timeout=20) as client:
        def loads(path, body):
            r = client.post(path, json=body)
            assert r.status_code == 200, r.text
            return r.headers["x-adapter-loads"]

        assert loads("/adapters/ner/process", {"texts": ["alice"]}) == "1"  # nothing preloaded
        assert loads("/adapters/ner/process", {"texts": ["alice"]}) == "0"
        two = [{"adapter": "sentiment", "text": "a good film"}, {"adapter": "topics", "text": "bob"}, {"adapter": "ner", "text": "carol"}]
        assert loads("/process", {"items": two}) == "2"  # sentiment and topics were not loaded, ner was
        assert loads("/process", {"items": two}) == "0"
        assert "x-adapter-loads" not in client.get("/adapters").headers


class _GatedPool(AdapterPool):
    """A pool whose loads of the ``gated`` adapters wait until released."""

    def __init__(self, *args, gated=(), **kw):
        super().__init__(*args, **kw)
        self.entered = {name: threading.Event() for name in gated}
        self.release = threading.Event()

    def _spacy_load(self, location):
        name = os.path.basename(os.path.normpath(str(location)))
        if name in self.entered:
            self.entered[name].set()
            assert self.release.wait(120), "the test never released the load"
        return super()._spacy_load(location)


@pytest.mark.parametrize("overlap", [False, True], ids=["between-batches", "beside-batches"])
def test_cold_loads_never_delay_requests_for_resident_adapters(adapters_dir, expected, overlap):
    # Two cold adapters are asked for. Loads run one at a time: one starts
    # and hangs there (a slow disk), the other waits for its turn. Requests
    # for a resident adapter are still answered: a batch waits for a running
    # load only briefly (load_budget.py), or not at all beside batches (the default),
    # and warm requests never queue behind the loads. Then the cold ones are
    # answered too.
    pool = _GatedPool(adapters_dir, max_loaded=8, check_interval=None, gated=("sentiment", "topics"))
    app = _app(pool, preload=["ner"], loads_between_batches=not overlap)
    budget = app.state.ptuning.load_budget
    assert budget.overlap is overlap
    names = ("sentiment", "topics")
    with running(app) as (url, _), httpx.Client(base_url=url, timeout=60) as client:
        _wait_ready(client)
        cold = []
        threads = [_post_in_thread(url, f"/adapters/{name}/process", {"texts": [TEXTS[0]]}, cold, timeout=120)
                   for name in names]
        _wait_for(lambda: any(pool.entered[n].is_set() for n in names) and budget.loads_waiting == 1,
                  what="one load running and one waiting")
        (loading,) = [n for n in names if pool.entered[n].is_set()]  # one load at a time
        try:
            r = client.post("/adapters/ner/process", json={"texts": [TEXTS[0]]})
            assert r.status_code == 200
            _assert_doc(r.json()["docs"][0], expected["ner"][TEXTS[0]])
            r = client.post("/process", json={"items": [{"adapter": "ner", "text": TEXTS[1]}]})
            assert r.status_code == 200
            assert pool.states()[loading][0] == "LOADING"  # still held: the warm ones did not wait for it
            assert budget.loads_waiting == 1
        finally:
            pool.release.set()
        for t in threads:
            t.join(120)
        assert sorted(r.status_code for r in cold) == [200, 200]


@contextlib.contextmanager
def _sentiment_load_held(pool, app):
    """A running server whose first request, for the cold "sentiment",
    hangs in its load, holding the load turn. Yields the client and a
    ``release()`` that lets the load finish and checks that the request was
    then answered (called at the end of the block if the test did not)."""
    with running(app) as (url, _), httpx.Client(base_url=url, timeout=60) as client:
        _wait_ready(client)
        cold = []
        thread = _post_in_thread(url, "/adapters/sentiment/process", {"texts": [TEXTS[0]]}, cold, timeout=120)

        def release():
            if pool.release.is_set():
                return
            pool.release.set()
            thread.join(120)
            assert [r.status_code for r in cold] == [200]

        try:
            assert pool.entered["sentiment"].wait(60), "sentiment never started loading"
            yield client, release
        except BaseException:
            pool.release.set()
            thread.join(120)
            raise
        release()


def test_a_due_folder_check_of_a_loaded_adapter_does_not_wait_for_the_load_turn(adapters_dir, expected):
    # check_interval=0: every use of "ner" checks its folder (a stat), so it
    # is never "resident"; but it is loaded, and a check is not a load: it
    # must not queue behind the cold load that holds the turn.
    pool = _GatedPool(adapters_dir, max_loaded=8, check_interval=0, gated=("sentiment",))
    app = _app(pool, preload=["ner"])
    budget = app.state.ptuning.load_budget
    with _sentiment_load_held(pool, app) as (client, _):
        for _ in range(2):
            r = client.post("/adapters/ner/process", json={"texts": [TEXTS[0]]})
            assert r.status_code == 200
            _assert_doc(r.json()["docs"][0], expected["ner"][TEXTS[0]])
        assert budget.loads == 0 and pool.states()["sentiment"][0] == "LOADING"


def test_cold_requests_beyond_what_loads_in_time_are_refused_with_retry_after(adapters_dir, expected):
    # One cold load hangs. Loads of ~10 s each (as measured) in half the
    # time, against a 20 s timeout: the next cold request could not be
    # loaded in time, so it is refused at once with a 503 and a Retry-After,
    # not accepted and answered 504 later. Warm requests are not refused;
    # once the load is done, the refused adapter is served.
    pool = _GatedPool(adapters_dir, max_loaded=8, check_interval=None, gated=("sentiment",))
    app = _app(pool, preload=["ner"], timeout_s=20.0, load_share=0.5)
    budget = app.state.ptuning.load_budget
    budget._mean = 10.0  # the recent load time
    with _sentiment_load_held(pool, app) as (client, release):
        r = client.post("/adapters/topics/process", json={"texts": [TEXTS[0]]})
        assert r.status_code == 503, r.text
        assert "busy loading adapters" in r.json()["detail"] and "--load-share" in r.json()["detail"]
        assert int(r.headers["retry-after"]) >= 5  # at least half of the 10 s of loads it admits
        assert client.post("/adapters/nope/process", json={"texts": ["a"]}).status_code == 404  # not a 503
        assert client.post("/adapters/ner/process", json={"texts": [TEXTS[0]]}).status_code == 200
        release()
        budget._mean = 0.01
        r = client.post("/adapters/topics/process", json={"texts": [TEXTS[0]]})
        assert r.status_code == 200


# -- bad input -----------------------------------------------------------------


def test_unknown_adapter_is_404_without_listing_the_others(server):
    for r in (
        server.post("/adapters/nope/process", json={"texts": ["alice"]}),
        server.post("/process", json={"items": [{"adapter": "ner", "text": "a"}, {"adapter": "nope", "text": "b"}]}),
        server.get("/adapters/nope"),
    ):
        assert r.status_code == 404
        detail = r.json()["detail"]
        assert "'nope'" in detail and "GET /adapters" in detail and "sentiment" not in detail


def test_invalid_adapter_names_are_refused(server):
    for name in ("..%2F..%2Fetc", "a%20b", "-x"):
        r = server.post(f"/adapters/{name}/process", json={"texts": ["a"]})
        assert r.status_code in (404, 422), (name, r.status_code)
    r = server.post("/process", json={"items": [{"adapter": "../ner", "text": "a"}]})
    assert r.status_code == 422 and "Invalid adapter name" in r.json()["detail"]


@pytest.mark.parametrize(
    "path, body",
    [
        ("/adapters/ner/process", b"not json"),
        ("/adapters/ner/process", b'{"texts": "alice"}'),
        ("/adapters/ner/process", b'{"texts": [1, 2]}'),
        ("/adapters/ner/process", b'{"text": ["alice"]}'),
        ("/process", b'{"items": [{"adapter": "ner"}]}'),
        ("/process", b'{"items": [{"adapter": "ner", "text": null}]}'),
        ("/process", b"[]"),
    ],
)
def test_malformed_body_is_422(server, path, body):
    r = server.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text


def test_a_request_naming_too_many_adapters_is_413_before_any_load(adapters_dir):
    pool = AdapterPool(adapters_dir, check_interval=None)
    app = _app(pool, max_request_adapters=2)
    with running(app) as (url, _), httpx.Client(base_url=url, timeout=60) as client:
        items = [{"adapter": name, "text": "alice"} for name in ("ner", "sentiment", "topics", "ner")]
        r = client.post("/process", json={"items": items})
        assert r.status_code == 413 and "3 different adapters" in r.json()["detail"]
        assert "--max-request-adapters" in r.json()["detail"]
        assert pool.stats["loads"] == 0 and pool.loaded == []  # refused before loading anything
        r = client.post("/process", json={"items": items[:2] + items[3:]})  # two adapters: served
        assert r.status_code == 200 and len(r.json()["results"]) == 3


def test_a_memory_budget_below_the_smallest_adapter_stops_the_server_at_start(adapters_dir):
    from spacy_ptuning.serving.server import check_budget

    with pytest.raises(SystemExit, match=r"smallest adapter.*PT-E050.*--max-resident-mb"):
        check_budget(AdapterPool(adapters_dir, max_resident_mb=0.0005, check_interval=None))  # the smallest holds about 1 KB
    pool = AdapterPool(adapters_dir, max_resident_mb=1000, check_interval=None)
    check_budget(pool)  # it fits: no error, one adapter loaded
    assert len(pool.loaded) == 1


def test_oversized_requests_are_413(server):
    too_many = server.post("/adapters/ner/process", json={"texts": ["a"] * 41})
    assert too_many.status_code == 413 and "--max-items" in too_many.json()["detail"]
    items = [{"adapter": "ner", "text": "a"}] * 41
    assert server.post("/process", json={"items": items}).status_code == 413
    too_long = server.post("/adapters/ner/process", json={"texts": ["alice " * 501]})  # 3006 chars
    assert too_long.status_code == 413 and "--max-chars" in too_long.json()["detail"]
    # Body above --max-body-bytes: refused before parsing, with a Content-Length...
    big = json.dumps({"texts": ["a"], "padding": " " * 25_000}).encode()  # within --max-chars
    r = server.post("/adapters/ner/process", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "--max-body-bytes" in r.json()["detail"]
    # ...and streamed without one (chunked).
    r = server.post("/adapters/ner/process", content=iter([big[:10_000], big[10_000:]]),
                    headers={"content-type": "application/json"})
    assert r.status_code == 413
    # The limits leave the server serving.
    assert server.post("/adapters/ner/process", json={"texts": ["a"] * 40}).status_code == 200


def test_broken_adapters_answer_their_error_and_others_keep_serving(server, expected):
    r = server.post("/adapters/broken/process", json={"texts": ["alice"]})
    assert r.status_code == 500
    assert "[PT-E034]" in r.json()["detail"] and "'broken'" in r.json()["detail"] and "[PT-E008]" in r.json()["detail"]
    r = server.post("/adapters/mismatched/process", json={"texts": ["alice"]})
    assert r.status_code == 500 and "[PT-E006]" in r.json()["detail"]
    # In a mixed list, only the broken adapters' items carry the error.
    items = [{"adapter": a, "text": TEXTS[0]} for a in ("ner", "broken", "sentiment", "mismatched", "multi")]
    r = server.post("/process", json={"items": items})
    assert r.status_code == 200 and r.json()["errors"] == 2
    results = r.json()["results"]
    assert "[PT-E008]" in results[1]["error"] and "[PT-E006]" in results[3]["error"]
    for i in (0, 2, 4):
        assert "error" not in results[i]
        _assert_doc(results[i], expected[items[i]["adapter"]][TEXTS[0]])
    # The listing says what is wrong with it.
    adapters = {a["name"]: a for a in server.get("/adapters").json()["adapters"]}
    assert "[PT-E008]" in adapters["broken"]["error"] and adapters["broken"]["loaded"] is False
    assert adapters["ner"]["error"] is None


def test_adapter_failing_at_inference_fails_only_its_items(server, expected):
    r = server.post("/adapters/fragile/process", json={"texts": ["alice", "boom"]})
    assert r.status_code == 500 and "boom: this adapter failed on purpose" in r.json()["detail"]
    assert server.post("/adapters/fragile/process", json={"texts": ["alice"]}).status_code == 200
    # In one batch with other adapters: the others' items are answered.
    items = [{"adapter": "ner", "text": TEXTS[0]}, {"adapter": "fragile", "text": "boom"},
             {"adapter": "sentiment", "text": TEXTS[1]}]
    r = server.post("/process", json={"items": items})
    assert r.status_code == 200 and r.json()["errors"] == 1
    results = r.json()["results"]
    assert results[1] == {"adapter": "fragile", "error": "ValueError: boom: this adapter failed on purpose"}
    _assert_doc(results[0], expected["ner"][TEXTS[0]])
    _assert_doc(results[2], expected["sentiment"][TEXTS[1]])


def test_preload_of_a_broken_adapter_is_reported_and_server_is_ready(adapters_dir):
    app = _app(adapters_dir, preload=["ner", "broken"])
    with running(app) as (url, _), httpx.Client(base_url=url, timeout=20) as client:
        body = _wait_ready(client)
        assert body["loaded"] == ["ner"] and "[PT-E008]" in body["preload_errors"]["broken"]


# -- load, timeouts, shutdown --------------------------------------------------


def _post_in_thread(url, path, payload, results, timeout=20):
    def go():
        try:
            with httpx.Client(base_url=url, timeout=timeout) as c:
                results.append(c.post(path, json=payload))
        except Exception as e:  # noqa: BLE001 - reported by the test
            results.append(e)

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread


def test_full_queue_answers_503_with_retry_after(adapters_dir):
    app = _app(adapters_dir, max_queue=1, preload=["gated", "ner"])
    with running(app) as (url, _), httpx.Client(base_url=url, timeout=20) as client:
        _wait_ready(client)
        results = []
        try:
            thread = _post_in_thread(url, "/adapters/gated/process", {"texts": ["a good film"]}, results)
            _wait_for(lambda: _metric(client, "ptuning_queue_texts") == 1, what="the gated request")
            r = client.post("/adapters/ner/process", json={"texts": ["alice"]})
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert "--max-queue 1" in r.json()["detail"]
        finally:
            _gate(app).set()
        thread.join(20)
        assert results[0].status_code == 200  # the accepted one is answered
        assert client.post("/adapters/ner/process", json={"texts": ["alice"]}).status_code == 200
        assert _metric(client, "ptuning_rejected_total") == 1


def test_request_timeout_is_504_and_server_recovers(adapters_dir):
    # The gated adapter holds its batch until the test opens it: the 504 does
    # not depend on how fast the machine is, and the timeout is long enough
    # for the next request on a machine with every core busy.
    app = _app(adapters_dir, timeout_s=3, preload=["gated", "ner"])
    with running(app) as (url, _), httpx.Client(base_url=url, timeout=20) as client:
        _wait_ready(client)
        try:
            r = client.post("/adapters/gated/process", json={"texts": ["a good film"]})
            assert r.status_code == 504 and "--timeout" in r.json()["detail"]
            assert _metric(client, "ptuning_batch_texts_count") == 0  # the batch still runs
        finally:
            _gate(app).set()
        _wait_for(lambda: _metric(client, "ptuning_batch_texts_count") == 1, what="the gated batch")
        assert client.post("/adapters/ner/process", json={"texts": ["alice"]}).status_code == 200
        assert _metric(client, "ptuning_timeouts_total") == 1


def test_concurrent_clients_are_batched_together(adapters_dir, expected):
    app = _app(adapters_dir, max_wait_ms=5, preload=SERVED + ["gated"])
    with running(app) as (url, _), httpx.Client(base_url=url, timeout=20) as client:
        _wait_ready(client)
        # A gated batch holds the worker while 8 clients send theirs: they
        # queue, and the next batch takes them together.
        blocker = []
        slow = _post_in_thread(url, "/adapters/gated/process", {"texts": ["a good film"]}, blocker)
        _wait_for(lambda: _metric(client, "ptuning_batch_texts_count") == 0 and _metric(client, "ptuning_queue_texts") == 1)
        results = {}
        threads = []
        try:
            for k in range(8):
                name = SERVED[k % len(SERVED)]
                text = TEXTS[k % len(TEXTS)]
                results[k] = []
                path, payload = (
                    (f"/adapters/{name}/process", {"texts": [text]}) if k % 2
                    else ("/process", {"items": [{"adapter": name, "text": text}]})
                )
                threads.append((name, text, k % 2, _post_in_thread(url, path, payload, results[k])))
            _wait_for(lambda: _metric(client, "ptuning_queue_texts") == 9, what="the 8 requests")
        finally:
            _gate(app).set()
        for *_, t in threads:
            t.join(20)
        slow.join(20)
        assert blocker[0].status_code == 200
        for k, (name, text, single, _) in enumerate(threads):
            r = results[k][0]
            assert not isinstance(r, Exception) and r.status_code == 200, r
            got = r.json()["docs"][0] if single else r.json()["results"][0]
            _assert_doc(got, expected[name][text])
        # The 8 requests (4 adapters) ran in fewer batches than requests, and
        # some batch held several adapters.
        batches = _metric(client, "ptuning_batch_texts_count")
        assert batches < 1 + 8
        assert _metric(client, "ptuning_batch_adapters_sum") > batches


def test_requests_are_gathered_until_the_text_budget(adapters_dir, expected):
    """Requests arriving within --max-wait-ms join one batch, which runs as
    soon as --max-batch-texts is reached (not after the full wait)."""
    # A gathering wait far beyond the requests' own timeout: were the batch
    # not started by the text budget, every request would get 504.
    app = _app(adapters_dir, max_wait_ms=600_000, max_batch_texts=4, preload=SERVED, timeout_s=120)
    with running(app) as (url, _), httpx.Client(base_url=url, timeout=20) as client:
        _wait_ready(client)
        results = {name: [] for name in SERVED}
        threads = [_post_in_thread(url, f"/adapters/{name}/process", {"texts": [TEXTS[0]]}, results[name], timeout=150)
                   for name in SERVED]
        for t in threads:
            t.join(150)
        for name in SERVED:
            _assert_doc(results[name][0].json()["docs"][0], expected[name][TEXTS[0]])
        assert _metric(client, "ptuning_batch_texts_count") == 1
        assert _metric(client, "ptuning_batch_adapters_sum") == len(SERVED)


def test_client_disconnect_does_not_wedge_the_batcher(adapters_dir):
    app = _app(adapters_dir, preload=["gated", "ner"])
    with running(app) as (url, _), httpx.Client(base_url=url, timeout=20) as client:
        _wait_ready(client)
        results = []
        slow = _post_in_thread(url, "/adapters/gated/process", {"texts": ["a good film"]}, results)
        try:
            _wait_for(lambda: _metric(client, "ptuning_queue_texts") == 1)
            # A raw client queues a request behind the gated one, then hangs up.
            port = int(url.rsplit(":", 1)[1])
            body = json.dumps({"texts": ["alice visited paris"]}).encode()
            raw = socket.create_connection(("127.0.0.1", port), timeout=5)
            raw.sendall(b"POST /adapters/ner/process HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                        + f"content-length: {len(body)}\r\n\r\n".encode() + body)
            _wait_for(lambda: _metric(client, "ptuning_queue_texts") == 2, what="the raw request")
            raw.close()
            _wait_for(lambda: _metric(client, "ptuning_client_disconnects_total") == 1, what="the disconnect")
        finally:
            _gate(app).set()
        slow.join(20)
        assert results[0].status_code == 200
        # The abandoned request was dropped unrun, and the batcher goes on.
        _wait_for(lambda: _metric(client, "ptuning_skipped_jobs_total") == 1, what="the skip")
        r = client.post("/adapters/ner/process", json={"texts": ["alice"]})
        assert r.status_code == 200
        assert _metric(client, "ptuning_queue_texts") == 0


def test_graceful_shutdown_answers_accepted_requests(adapters_dir):
    app = _app(adapters_dir, preload=["slow"])
    results = []
    with running(app) as (url, server), httpx.Client(base_url=url, timeout=20) as client:
        _wait_ready(client)
        thread = _post_in_thread(url, "/adapters/slow/process", {"texts": ["a good film"]}, results)
        _wait_for(lambda: _metric(client, "ptuning_queue_texts") == 1)
        client.close()
        server.should_exit = True  # as on SIGTERM
        thread.join(20)
        assert results and not isinstance(results[0], Exception), results
        assert results[0].status_code == 200 and results[0].json()["docs"][0]["text"] == "a good film"
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=2)
    assert app.state.ptuning.batcher._thread is not None and not app.state.ptuning.batcher._thread.is_alive()


# -- admin -----------------------------------------------------------------------


def test_admin_endpoints_are_off_without_a_token(adapters_dir):
    app = _app(adapters_dir)
    late = str(next(adapters_dir.parent.glob("extra*")) / "late")
    with running(app) as (url, _), httpx.Client(base_url=url, timeout=20) as client:
        for auth in ({}, {"authorization": f"Bearer {TOKEN}"}):
            r = client.put("/adapters/late", json={"path": late}, headers=auth)
            assert r.status_code == 403 and "--admin-token" in r.json()["detail"]
            assert client.delete("/adapters/ner", headers=auth).status_code == 403
        assert client.post("/adapters/ner/process", json={"texts": ["a"]}).status_code == 200


def test_admin_token_adds_and_removes_adapters(adapters_dir, tmp_path):
    late = next(adapters_dir.parent.glob("extra*")) / "late"
    app = _app(adapters_dir, admin_token=TOKEN, admin_root=str(adapters_dir.parent))
    auth = {"authorization": f"Bearer {TOKEN}"}
    with running(app) as (url, _), httpx.Client(base_url=url, timeout=20) as client:
        # No token, a wrong one, another scheme: 401.
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {TOKEN}"}):
            r = client.put("/adapters/late", json={"path": str(late)}, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
            assert client.delete("/adapters/ner", headers=headers).status_code == 401
        assert client.post("/adapters/late/process", json={"texts": ["a"]}).status_code == 404
        # Add from a folder on the server: loaded at once and served.
        r = client.put("/adapters/late", json={"path": str(late)}, headers=auth)
        assert r.status_code == 201, r.text
        assert r.json()["loaded"] is True and r.json()["components"][0]["task"] == "textcat"
        expected = spacy.load(late)("a good film").cats
        got = client.post("/adapters/late/process", json={"texts": ["a good film"]}).json()["docs"][0]["cats"]
        assert got == pytest.approx(expected, abs=1e-5)
        # Replacing a name answers 200.
        assert client.put("/adapters/late", json={"path": str(late)}, headers=auth).status_code == 200
        # Remove: no longer served.
        assert client.delete("/adapters/late", headers=auth).status_code == 204
        assert client.post("/adapters/late/process", json={"texts": ["a"]}).status_code == 404
        assert client.delete("/adapters/late", headers=auth).status_code == 404
        # A path that is no pipeline, or a broken one: 422, and the name stays free.
        r = client.put("/adapters/nothing", json={"path": str(tmp_path)}, headers=auth)
        assert r.status_code == 422 and "[PT-E045]" in r.json()["detail"]
        assert str(tmp_path) not in r.text  # no server paths in answers
        r = client.put("/adapters/bad", json={"path": str(adapters_dir / "broken")}, headers=auth)
        assert r.status_code == 422 and "[PT-E008]" in r.json()["detail"]
        assert client.post("/adapters/bad/process", json={"texts": ["a"]}).status_code == 404
        r = client.put("/adapters/bad%20name", json={"path": str(late)}, headers=auth)
        assert r.status_code == 422 and "[PT-E035]" in r.json()["detail"]
        # Replacing a working adapter with a broken one keeps the working one.
        r = client.put("/adapters/ner", json={"path": str(adapters_dir / "broken")}, headers=auth)
        assert r.status_code == 422
        assert client.post("/adapters/ner/process", json={"texts": ["alice"]}).status_code == 200


def test_put_takes_only_pipeline_folders_under_the_admin_root(adapters_dir):
    """Regression: PUT {"path": "spacy"} loaded the installed distribution
    as a spaCy package; any folder on the server could be named."""
    late = next(adapters_dir.parent.glob("extra*")) / "late"
    app = _app(adapters_dir, admin_token=TOKEN)  # admin root: the adapters folder
    auth = {"authorization": f"Bearer {TOKEN}"}
    with running(app) as (url, _), httpx.Client(base_url=url, timeout=20) as client:
        for path, code in [("spacy", "PT-E045"), ("en_core_web_sm", "PT-E045"), ("/etc", "PT-E044"),
                           (str(late), "PT-E044"), ("../" + late.parent.name + "/late", "PT-E044"),
                           (str(adapters_dir / "ner" / ".." / ".." / late.parent.name / "late"), "PT-E044")]:
            r = client.put("/adapters/pkg", json={"path": path}, headers=auth)
            assert r.status_code == 422 and code in r.json()["detail"], (path, r.text)
            assert str(adapters_dir) not in r.text
        assert client.post("/adapters/pkg/process", json={"texts": ["a"]}).status_code == 404
        # A folder inside the root, relative or absolute, is taken.
        assert client.put("/adapters/copy", json={"path": "ner"}, headers=auth).status_code == 201
        assert client.put("/adapters/copy2", json={"path": str(adapters_dir / "sentiment")}, headers=auth).status_code == 201
        assert client.post("/adapters/copy/process", json={"texts": ["alice"]}).status_code == 200


def test_admin_changes_survive_a_rescan(adapters_dir):
    late = next(adapters_dir.parent.glob("extra*")) / "late"
    app = _app(adapters_dir, admin_token=TOKEN, admin_root=str(adapters_dir.parent))
    auth = {"authorization": f"Bearer {TOKEN}"}
    with running(app) as (url, _), httpx.Client(base_url=url, timeout=20) as client:
        assert client.put("/adapters/late", json={"path": str(late)}, headers=auth).status_code == 201
        assert client.delete("/adapters/topics", headers=auth).status_code == 204
        names = [a["name"] for a in client.get("/adapters").json()["adapters"]]  # rescans the folder
        assert "late" in names and "topics" not in names
        assert client.post("/adapters/late/process", json={"texts": ["a"]}).status_code == 200
        assert client.post("/adapters/topics/process", json={"texts": ["a"]}).status_code == 404


# -- the command -----------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_refuses_a_memory_budget_below_every_adapter(adapters_dir, components_file):
    out = subprocess.run(
        [sys.executable, "-m", "spacy", "ptuning", "serve", str(adapters_dir), "--port", str(_free_port()),
         "--max-resident-mb", "0.0005", "--code", str(components_file)],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert out.returncode != 0
    assert "Cannot start" in out.stderr and "PT-E050" in out.stderr and "--max-resident-mb" in out.stderr


def test_spacy_cli_serve_command(adapters_dir, expected, components_file):
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", SPACY_PTUNING_ADMIN_TOKEN=TOKEN)
    proc = subprocess.Popen(
        [sys.executable, "-m", "spacy", "ptuning", "serve", str(adapters_dir), "--port", str(port),
         "--preload", "ner", "--max-wait-ms", "2", "--log-level", "info", "--code", str(components_file)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None, proc.stdout.read()
                try:
                    if client.get("/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the server did not get ready"
                time.sleep(0.2)
            r = client.post("/adapters/ner/process", json={"texts": TEXTS[:2]})
            assert r.status_code == 200
            _assert_doc(r.json()["docs"][0], expected["ner"][TEXTS[0]])
            # The token came from the environment: admin endpoints are on.
            assert client.delete("/adapters/ner").status_code == 401
            # SIGINT with a request in flight: it is answered, then the server exits.
            assert client.post("/adapters/slow/process", json={"texts": ["warm"]}).status_code == 200
            results = []
            thread = _post_in_thread(client.base_url, "/adapters/slow/process", {"texts": ["a good film"]}, results)
            _wait_for(lambda: _metric(client, "ptuning_queue_texts") == 1, what="the slow request")
            proc.send_signal(signal.SIGINT)
            thread.join(30)
            assert results and not isinstance(results[0], Exception), results
            assert results[0].status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, out
    assert f"http://127.0.0.1:{port}" in out  # bound to localhost by default


# -- hardening: one client never fails another, bounded work, no leaks -----------


def test_a_lone_surrogate_is_422_naming_the_text_and_fails_no_other_request(adapters_dir, expected):
    """Regression: a lone surrogate raised in the tokenizer inside the batch,
    and every request batched with it got 500."""
    app = _app(adapters_dir, max_wait_ms=50, preload=["ner", "sentiment"])
    with running(app) as (url, _), httpx.Client(base_url=url, timeout=20) as client:
        _wait_ready(client)
        bad = '{"texts": ["fine", "bad \\ud800 text"]}'
        good = {k: [] for k in range(6)}
        threads = [_post_in_thread(url, f"/adapters/{('ner', 'sentiment')[k % 2]}/process", {"texts": [TEXTS[k]]}, good[k])
                   for k in range(6)]
        r = client.post("/adapters/ner/process", content=bad, headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
        assert "texts[1]" in r.json()["detail"] and "surrogate" in r.json()["detail"]
        r = client.post("/process", content='{"items": [{"adapter": "ner", "text": "ok"}, {"adapter": "ner", "text": "\\udfff"}]}',
                        headers={"content-type": "application/json"})
        assert r.status_code == 422 and "items[1]" in r.json()["detail"]
        for k, t in enumerate(threads):
            t.join(20)
            assert good[k][0].status_code == 200, good[k][0].text
            _assert_doc(good[k][0].json()["docs"][0], expected[("ner", "sentiment")[k % 2]][TEXTS[k]])


def test_nan_in_a_body_is_422_and_the_connection_stays_usable(server):
    """Regression: rendering the 422 of {"texts": [NaN]} failed (500) and the
    keep-alive connection was dropped without Connection: close."""
    port = int(str(server.base_url).rsplit(":", 1)[1])
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=20,
                      limits=httpx.Limits(max_connections=1, max_keepalive_connections=1)) as one:
        for body in ('{"texts": [NaN]}', '{"items": [{"adapter": "ner", "text": Infinity}]}'):
            path = "/adapters/ner/process" if "texts" in body else "/process"
            r = one.post(path, content=body, headers={"content-type": "application/json"})
            assert r.status_code == 422, r.text
            assert r.headers.get("connection", "") != "close"
            assert "input" not in r.text and r.json()["detail"][0]["loc"][0] == "body"
        # The next request goes over the same connection and is answered.
        r = one.post("/adapters/ner/process", json={"texts": ["alice"]})
        assert r.status_code == 200


def test_a_huge_invalid_body_is_not_echoed(server):
    r = server.post("/adapters/ner/process", json={"texts": "x" * 15_000})
    assert r.status_code == 422 and len(r.content) < 1_000


def test_a_text_above_the_wordpiece_cap_is_413_naming_it(adapters_dir):
    app = _app(adapters_dir, max_text_wordpieces=20, preload=["ner"])
    with running(app) as (url, _), httpx.Client(base_url=url, timeout=20) as client:
        _wait_ready(client)
        long = " ".join(["alice visited paris"] * 10)  # 30 wordpieces
        r = client.post("/adapters/ner/process", json={"texts": ["alice", long]})
        assert r.status_code == 413 and "texts[1]" in r.json()["detail"] and "--max-text-wordpieces" in r.json()["detail"]
        huge = "a" * (20 * 64 + 1)  # refused without being tokenised
        r = client.post("/process", json={"items": [{"adapter": "ner", "text": huge}]})
        assert r.status_code == 413 and "items[0]" in r.json()["detail"] and "characters" in r.json()["detail"]
        short = " ".join(["alice visited paris"] * 6)  # 18 wordpieces: within the cap
        assert client.post("/adapters/ner/process", json={"texts": [short]}).status_code == 200


def test_empty_text_is_answered_the_same_alone_and_in_a_batch(server):
    alone = server.post("/adapters/sentiment/process", json={"texts": [""]}).json()["docs"][0]
    batched = server.post("/adapters/sentiment/process", json={"texts": ["", *TEXTS]}).json()["docs"][0]
    mixed = server.post("/process", json={"items": [{"adapter": "ner", "text": TEXTS[0]},
                                                    {"adapter": "sentiment", "text": ""}]}).json()["results"][1]
    assert alone["cats"] == batched["cats"] == {k: v for k, v in mixed.items() if k == "cats"}["cats"]


def test_slow_clients_are_cut_off_at_the_read_timeout(adapters_dir):
    """Regression: connections that sent nothing, half the headers or half
    the body stayed open for the whole test. Their closing is waited for as
    an event (the socket's end), with a generous bound."""
    from spacy_ptuning.serving.server import timed_protocol

    app = _app(adapters_dir, read_timeout_s=0.5, preload=["ner"])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", http=timed_protocol(0.5)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        _wait_for(lambda: server.started, timeout=60, what="the server")
        body = json.dumps({"texts": ["alice"]}).encode()
        clients = {
            "nothing": b"",
            "half headers": b"POST /adapters/ner/process HTTP/1.1\r\nhost: x\r\n",
            "half body": b"POST /adapters/ner/process HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         + f"content-length: {len(body)}\r\n\r\n".encode() + body[:5],
        }
        for what, sent in clients.items():
            raw = socket.create_connection(("127.0.0.1", port), timeout=60)
            raw.sendall(sent)
            got = b""
            while True:  # until the server closes the connection
                chunk = raw.recv(4096)
                if not chunk:
                    break
                got += chunk
            raw.close()
            if what == "half body":
                assert got.startswith(b"HTTP/1.1 408") and b"--read-timeout" in got, got
            else:
                assert got == b"", (what, got)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=20) as client:
            assert client.post("/adapters/ner/process", json={"texts": ["alice"]}).status_code == 200
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def test_no_server_paths_docs_off_and_host_check(adapters_dir, tmp_path):
    app = _app(adapters_dir, preload=["ner"], allowed_hosts=["127.0.0.1", "localhost"])
    with running(app) as (url, _), httpx.Client(base_url=url, timeout=20) as client:
        _wait_ready(client)
        r = client.post("/adapters/broken/process", json={"texts": ["alice"]})
        assert r.status_code == 500 and "[PT-E008]" in r.json()["detail"]
        listing = client.get("/adapters").text
        for text in (r.text, listing, client.get("/adapters/broken").text):
            assert str(adapters_dir) not in text and "/tmp/" not in text, text
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert client.get(path).status_code == 404
        # DNS rebinding: a page of evil.example resolving to 127.0.0.1 sends its own Host.
        assert client.get("/adapters", headers={"host": "evil.example"}).status_code == 400
        assert client.get("/health", headers={"host": "localhost:1234"}).status_code == 200
    with running(_app(adapters_dir, docs=True)) as (url, _), httpx.Client(base_url=url, timeout=20) as client:
        assert client.get("/openapi.json").status_code == 200


def test_api_token_request_ids_and_per_adapter_metrics(adapters_dir):
    api = "inference-token"
    app = _app(adapters_dir, api_token=api, admin_token=TOKEN, preload=["ner", "fragile"])
    with running(app) as (url, _), httpx.Client(base_url=url, timeout=20) as client:
        _wait_ready(client)  # /ready, /health and /metrics need no token
        assert client.post("/adapters/ner/process", json={"texts": ["alice"]}).status_code == 401
        assert client.get("/adapters").status_code == 401
        assert client.get("/adapters/ner", headers={"authorization": "Bearer wrong"}).status_code == 401
        auth = {"authorization": f"Bearer {api}"}
        r = client.post("/adapters/ner/process", json={"texts": ["alice", "bob"]}, headers={**auth, "x-request-id": "req-42"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "req-42"
        r = client.get("/adapters", headers={"authorization": f"Bearer {TOKEN}"})  # the admin token works too
        assert r.status_code == 200 and len(r.headers["x-request-id"]) == 32
        bad_id = client.get("/health", headers={"x-request-id": "x" * 100})
        assert bad_id.headers["x-request-id"] != "x" * 100  # not a plain token: a new one
        r = client.post("/process", json={"items": [{"adapter": "fragile", "text": "boom"},
                                                    {"adapter": "fragile", "text": "alice"}]}, headers=auth)
        assert r.status_code == 200 and r.json()["errors"] == 1
        m = _metrics(client)
        assert m[("ptuning_texts_total", frozenset({"adapter": "ner"}.items()))] == 2
        # The failed text is not counted as served.
        assert m[("ptuning_texts_total", frozenset({"adapter": "fragile"}.items()))] == 1
        assert m[("ptuning_text_failures_total", frozenset({"adapter": "fragile"}.items()))] == 1
        assert m[("ptuning_adapter_requests_total", frozenset({"adapter": "ner", "status": "200"}.items()))] == 1
        assert m[("ptuning_adapter_request_seconds_count", frozenset({"adapter": "ner"}.items()))] == 1
        assert m[("ptuning_queue_seconds_count", frozenset({"adapter": "ner"}.items()))] == 1
        assert m[("ptuning_compute_seconds_count", frozenset({"adapter": "ner"}.items()))] == 1
        assert m[("ptuning_adapter_state", frozenset({"adapter": "ner", "state": "READY"}.items()))] == 1
        assert m[("ptuning_adapter_version", frozenset({"adapter": "ner"}.items()))] == 1
        client.post("/adapters/broken/process", json={"texts": ["a"]}, headers=auth)
        assert _metric(client, "ptuning_adapter_state", adapter="broken", state="FAILED") == 1


def test_per_adapter_metric_series_are_bounded(adapters_dir):
    """Only the first --metrics-adapters adapters whose texts ran get series
    of their own; the rest, and names that never ran (unknown, failed to
    load), are counted under adapter="_other": none is lost, and a client
    naming random adapters cannot grow the server's memory or its scrapes."""
    app = _app(adapters_dir, preload=["ner", "fragile"], metrics_adapters=1)
    with running(app) as (url, _), httpx.Client(base_url=url, timeout=20) as client:
        _wait_ready(client)
        assert client.post("/adapters/ner/process", json={"texts": ["alice", "bob"]}).status_code == 200
        assert client.post("/adapters/fragile/process", json={"texts": ["alice"]}).status_code == 200
        for i in range(3):
            assert client.post(f"/adapters/nope{i}/process", json={"texts": ["a"]}).status_code == 404
        m = _metrics(client)
        adapters = {dict(labels).get("adapter") for (name, labels) in m
                    if name.startswith(("ptuning_texts", "ptuning_adapter_request", "ptuning_queue_seconds",
                                        "ptuning_compute_seconds"))}
        assert adapters == {"ner", "_other"}
        assert m[("ptuning_texts_total", frozenset({"adapter": "ner"}.items()))] == 2
        assert m[("ptuning_texts_total", frozenset({"adapter": "_other"}.items()))] == 1  # fragile's text
        assert m[("ptuning_adapter_requests_total", frozenset({"adapter": "_other", "status": "200"}.items()))] == 1
        assert m[("ptuning_adapter_requests_total", frozenset({"adapter": "_other", "status": "404"}.items()))] == 3
        assert m[("ptuning_compute_seconds_count", frozenset({"adapter": "_other"}.items()))] == 1


def test_sigterm_drains_ready_503_while_work_finishes(adapters_dir):
    """The drain phase: after the signal /ready answers 503 and requests
    (in flight and new) are still answered; then the server stops."""
    from spacy_ptuning.serving.server import DrainingServer

    app = _app(adapters_dir, preload=["slow", "ner"], drain_s=1.0)
    state = app.state.ptuning
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = DrainingServer(uvicorn.Config(app, log_level="warning"), state)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        _wait_for(lambda: server.started, timeout=60, what="the server")
        with httpx.Client(base_url=url, timeout=20) as client:
            _wait_ready(client)
            results = []
            slow = _post_in_thread(url, "/adapters/slow/process", {"texts": ["a good film"]}, results)
            _wait_for(lambda: _metric(client, "ptuning_queue_texts") == 1, what="the slow request")
            server.handle_exit(signal.SIGTERM, None)  # as the signal handler would
            assert client.get("/ready").status_code == 503
            assert client.post("/adapters/ner/process", json={"texts": ["alice"]}).status_code == 200
            slow.join(20)
            assert results[0].status_code == 200
        thread.join(60)
        assert not thread.is_alive()
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def test_dtype_option_loads_every_adapter_in_that_dtype(adapters_dir):
    pool = AdapterPool(adapters_dir, check_interval=None, dtype="bfloat16")
    nlp = pool.get("ner")
    (layer,) = find_adapter_layers(nlp.get_pipe("ptuning_ner"))
    assert layer[2].backbone.model.dtype == torch.bfloat16
    assert nlp.config["components"]["ptuning_ner"]["model"]["tok2vec"]["dtype"] == "bfloat16"


def test_one_json_access_log_line_per_request_with_its_id(server, caplog):
    caplog.set_level("INFO", logger="spacy_ptuning.access")
    r = server.post("/adapters/ner/process", json={"texts": ["alice", "bob"]}, headers={"x-request-id": "abc-1"})
    assert r.status_code == 200
    server.get("/adapters/nope")
    lines = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "spacy_ptuning.access"]
    mine = [line for line in lines if line["request_id"] == "abc-1"]
    assert len(mine) == 1
    assert mine[0]["path"] == "/adapters/{name}/process" and mine[0]["status"] == 200
    assert mine[0]["adapter"] == "ner" and mine[0]["texts"] == 2 and mine[0]["seconds"] >= 0
    assert any(line["status"] == 404 and line["path"] == "/adapters/{name}" for line in lines)
