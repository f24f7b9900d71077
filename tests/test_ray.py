"""Scale-out on Ray: the Serve deployment (two replicas, multiplexed adapter
routing, a replica killed mid-run) and Ray Data batch annotation, on a local
Ray instance started here (2 CPUs), against in-process predictions."""
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import pytest

ray = pytest.importorskip("ray", reason='the Ray tests need the ray extra: pip install "spacy-ptuning[ray]"')
serve = pytest.importorskip("ray.serve", reason='the Ray tests need the ray extra: pip install "spacy-ptuning[ray]"')

import httpx  # noqa: E402
import spacy  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from spacy_ptuning.serving.pool import AdapterPool  # noqa: E402
from spacy_ptuning.serving.server import ServeConfig, create_app  # noqa: E402
from tests.helpers import TEXTS, assert_doc as _assert_doc, pipeline as _pipeline  # noqa: E402

SERVED = ["ner", "sentiment", "topics", "multi"]
APP = "ptuning"


@pytest.fixture(scope="module")
def adapters_dir(tiny_bert, tmp_path_factory):
    """Four working adapters over one backbone, and a corrupt one."""
    root = tmp_path_factory.mktemp("ray-adapters")
    _pipeline(tiny_bert, ["ptuning_ner"], "prefix", 4, 1).to_disk(root / "ner")
    _pipeline(tiny_bert, ["ptuning_textcat"], "prompt", 6, 2).to_disk(root / "sentiment")
    _pipeline(tiny_bert, ["ptuning_textcat_multilabel"], "prompt_encoder", 3, 4).to_disk(root / "topics")
    _pipeline(tiny_bert, ["ptuning_ner", "ptuning_textcat"], "prefix", 2, 5).to_disk(root / "multi")
    _pipeline(tiny_bert, ["ptuning_ner"], "prefix", 4, 7).to_disk(root / "broken")
    # float32 (the helper's default): with this CPU's "auto" dtype, bfloat16,
    # a score moves by ~1e-4 with the padding of the batch it is in; the
    # comparisons here are of the serving paths, to 1e-5.
    for cfg in root.glob("*/config.cfg"):
        assert 'dtype = "float32"' in cfg.read_text()
    model_file = root / "broken" / "ptuning_ner" / "model"
    model_file.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
    return root


@pytest.fixture(scope="module")
def nlps(adapters_dir):
    return {name: spacy.load(adapters_dir / name) for name in SERVED}


@pytest.fixture(scope="module")
def expected(nlps):
    out = {name: {doc.text: doc for doc in nlp.pipe(TEXTS)} for name, nlp in nlps.items()}
    assert any(doc.ents for doc in out["ner"].values())  # not a comparison of empty results
    return out


@pytest.fixture(scope="module")
def ray_local():
    # Serve's proxy must answer its readiness check within 5 s (doubling on
    # each try) or it is restarted: with every core busy it never became
    # ready. Generous bounds, read by Ray's processes, which inherit them.
    for key in ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S"):
        os.environ.setdefault(key, "120")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=150 * 1024**2)
    yield
    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replica_actor(replica_id: str):
    return ray.get_actor(f"SERVE_REPLICA::{APP}#PTuningDeployment#{replica_id}", namespace="serve")


def _running_replicas() -> int:
    status = serve.status().applications.get(APP)
    if status is None:
        return 0
    dep = status.deployments["PTuningDeployment"]
    return dep.replica_states.get("RUNNING", 0) if dep.status == "HEALTHY" else 0


class TestServe:
    @pytest.fixture(scope="class")
    @classmethod
    def url(cls, ray_local, adapters_dir):
        from spacy_ptuning.ray.serve import build_app

        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # Two replicas of half a CPU each (the Ray Data tests get the rest),
        # two adapters per replica: four adapters fit only if routing places them.
        # timeout_s bounds a broken replica only: with both cores busy a
        # replica's first request (its first load) took more than 30 s, and
        # max_queue_wait_s would refuse work at a starved replica's rate.
        serve.run(
            build_app({"adapters_dir": str(adapters_dir), "num_replicas": "2", "max_models": "2",
                       "num_cpus": "0.5", "max_wait_ms": "5", "timeout_s": "240", "max_queue_wait_s": "240", "check_interval": "-1",
                       "max_items": "5000", "max_queue": "8000"}),
            name=APP, route_prefix="/",
        )
        yield f"http://127.0.0.1:{port}"
        serve.shutdown()

    @pytest.fixture(scope="class")
    @classmethod
    def client(cls, url):
        with httpx.Client(base_url=url, timeout=300) as c:
            yield c

    @pytest.fixture(scope="class")
    @classmethod
    def placed(cls, client):
        """One request per adapter, one at a time, so that each replica's
        report of its adapters reaches the router before the next new one:
        returns adapter -> replica."""
        where = {}
        for name in SERVED:
            r = client.post(f"/adapters/{name}/process", json={"texts": ["warm up"]})
            assert r.status_code == 200, r.text
            where[name] = r.headers["x-ptuning-replica"]
            time.sleep(0.6)  # > Serve's 0.1 s push of multiplexed ids + the long poll
        return where

    def test_same_json_and_results_as_in_process(self, client, expected, placed):
        def one(k):
            name = SERVED[k % len(SERVED)]
            texts = TEXTS[k % 3 :] if k % 2 else TEXTS
            r = client.post(f"/adapters/{name}/process", json={"texts": texts})
            return name, texts, r

        with ThreadPoolExecutor(8) as ex:
            answers = list(ex.map(one, range(24)))
        for name, texts, r in answers:
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["adapter"] == name and len(body["docs"]) == len(texts)
            for text, got in zip(texts, body["docs"]):
                _assert_doc(got, expected[name][text])
        # The mixed endpoint: in order, each item with its adapter's result.
        items = [{"adapter": SERVED[i % 4], "text": TEXTS[i % len(TEXTS)]} for i in range(12)]
        r = client.post("/process", json={"items": items})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["errors"] == 0 and len(body["results"]) == 12
        for item, got in zip(items, body["results"]):
            assert got["adapter"] == item["adapter"]
            _assert_doc({k: v for k, v in got.items() if k != "adapter"}, expected[item["adapter"]][item["text"]])
        # ...and each adapter's part went to that adapter's replica.
        parts = dict(p.split("=") for p in r.headers["x-ptuning-replicas"].split(","))
        assert parts == placed

    def test_adapter_requests_land_on_the_replica_that_has_it(self, client, placed):
        # Placement: two adapters per replica (max_models=2), found by Serve's
        # multiplexed routing (fewest models for a new adapter).
        per_replica = defaultdict(set)
        for name, replica in placed.items():
            per_replica[replica].add(name)
        assert len(per_replica) == 2 and all(len(v) == 2 for v in per_replica.values()), placed

        def one(k):
            name = SERVED[(k * 7) % 4]
            r = client.post(f"/adapters/{name}/process", json={"texts": [TEXTS[k % len(TEXTS)]]})
            assert r.status_code == 200, r.text
            return name, r.headers["x-ptuning-replica"], r.headers["x-ptuning-loaded"].split(",")

        with ThreadPoolExecutor(6) as ex:
            seen = list(ex.map(one, range(60)))
        served_by = defaultdict(set)
        for name, replica, loaded in seen:
            served_by[name].add(replica)
            assert name in loaded  # the replica that answered has it loaded
            assert set(loaded) <= per_replica[replica] | {name}, (replica, loaded)
        # Every request of an adapter went to the replica that loaded it.
        assert {name: replicas for name, replicas in served_by.items()} == {n: {placed[n]} for n in SERVED}
        # No replica loaded an adapter twice (nothing was evicted and reloaded).
        loads = {}
        for name, replica in placed.items():
            r = client.post(f"/adapters/{name}/process", json={"texts": ["x"]})
            loads[replica] = int(r.headers["x-ptuning-loads"])
        assert loads == {rid: 2 for rid in per_replica}

    def test_unknown_adapter_is_the_same_404_as_our_server(self, client, adapters_dir):
        ours = TestClient(create_app(AdapterPool(adapters_dir, check_interval=None), ServeConfig()))
        for method, path, body in [
            ("post", "/adapters/nope/process", {"texts": ["a"]}),
            ("post", "/process", {"items": [{"adapter": "ner", "text": "a"}, {"adapter": "nope", "text": "b"}]}),
            ("get", "/adapters/nope", None),
            ("post", "/adapters/..%2Fner/process", {"texts": ["a"]}),
        ]:
            want = getattr(ours, method)(path, **({"json": body} if body else {}))
            got = getattr(client, method)(path, **({"json": body} if body else {}))
            assert (got.status_code, got.json()) == (want.status_code, want.json()), path
        assert client.post("/adapters/nope/process", json={"texts": ["a"]}).status_code == 404
        assert "GET /adapters" in client.get("/adapters/nope").json()["detail"]

    def test_corrupt_adapter_fails_alone(self, client, adapters_dir, expected):
        ours = TestClient(create_app(AdapterPool(adapters_dir, check_interval=None), ServeConfig()))
        r = client.post("/adapters/broken/process", json={"texts": ["alice visited paris"]})
        want = ours.post("/adapters/broken/process", json={"texts": ["alice visited paris"]})
        assert r.status_code == want.status_code == 500
        assert r.json() == want.json() and "[PT-E034] Adapter 'broken' could not be loaded" in r.json()["detail"]
        items = [{"adapter": "broken", "text": TEXTS[0]}, {"adapter": "ner", "text": TEXTS[0]},
                 {"adapter": "broken", "text": TEXTS[1]}, {"adapter": "sentiment", "text": TEXTS[1]}]
        r = client.post("/process", json={"items": items})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["errors"] == 2
        assert body["results"][0]["error"].startswith("[PT-E034]") and body["results"][2]["error"].startswith("[PT-E034]")
        _assert_doc({k: v for k, v in body["results"][1].items() if k != "adapter"}, expected["ner"][TEXTS[0]])
        _assert_doc({k: v for k, v in body["results"][3].items() if k != "adapter"}, expected["sentiment"][TEXTS[1]])
        assert client.get("/adapters").json()["adapters"][0]["name"] == "broken"

    def test_replica_killed_mid_run_loses_no_request(self, client, expected, placed, nlps):
        expected_big = {doc.text: doc for doc in nlps["ner"].pipe([f"{TEXTS[k % len(TEXTS)]} {k}" for k in range(50)])}
        victim = client.post("/adapters/ner/process", json={"texts": ["x"]}).headers["x-ptuning-replica"]
        stop = threading.Event()
        results = []

        def worker(k):
            i = 0
            while not stop.is_set() or i < 3:
                name = SERVED[(k + i) % 4]
                texts = TEXTS[: 1 + (i % 4)]
                try:
                    r = client.post(f"/adapters/{name}/process", json={"texts": texts})
                    results.append((name, texts, r.status_code, r.json(), r.headers.get("x-ptuning-replica")))
                except httpx.HTTPError as e:  # a dropped connection would be a lost request
                    results.append((name, texts, -1, {"detail": repr(e)}, None))
                i += 1

        big_texts = [f"{TEXTS[k % len(TEXTS)]} {k}" for k in range(3000)]
        big = []

        def big_request():  # seconds of work for the victim: in flight when it dies
            r = client.post("/adapters/ner/process", json={"texts": big_texts})
            big.append((r.status_code, r.json(), r.headers.get("x-ptuning-replica")))

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        n_before = len(results)
        big_thread = threading.Thread(target=big_request)
        big_thread.start()
        time.sleep(0.5)
        ray.kill(_replica_actor(victim), no_restart=False)
        time.sleep(1.5)
        stop.set()
        for t in threads + [big_thread]:
            t.join(120)
        assert n_before > 0 and len(results) > n_before + 4
        # The big request was on the victim when it died: it was re-sent to the
        # live replica (or failed with a clear error), never answered short.
        status, body, replica = big[0]
        assert (status == 200 and replica != victim) or (status == 503 and "[PT-E043]" in body["detail"]), (status, replica, victim)
        if status == 200:
            assert len(body["docs"]) == len(big_texts)
            for text, got in zip(big_texts[:50], body["docs"]):
                _assert_doc(got, expected_big[text])
        failed = []
        for name, texts, status, body, replica in results:
            if status == 200:  # an answer is the right answer
                assert body["adapter"] == name and len(body["docs"]) == len(texts)
                for text, got in zip(texts, body["docs"]):
                    _assert_doc(got, expected[name][text])
            else:  # never silent: a status and a message saying what happened
                assert status in (503, 500), (status, body)
                assert body["detail"] and ("PT-E043" in body["detail"] or "replica" in body["detail"].lower())
                failed.append(body["detail"])
        assert len(failed) <= len(results) // 4, failed
        # Serve replaces the replica; then everything is answered again, the
        # lost replica's adapters by a live one.
        deadline = time.monotonic() + 600  # a bound for a broken Serve: starved, a restart took > 60 s
        while _running_replicas() < 2:
            assert time.monotonic() < deadline, serve.status()
            time.sleep(0.5)
        for name in SERVED:
            r = client.post(f"/adapters/{name}/process", json={"texts": TEXTS})
            assert r.status_code == 200, r.text
            assert r.headers["x-ptuning-replica"] != victim
            for text, got in zip(TEXTS, r.json()["docs"]):
                _assert_doc(got, expected[name][text])


# -- Ray Data -------------------------------------------------------------------------


def _sentences(n):
    subjects = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
    verbs = ["visited", "met", "said", "works in", "lives in", "hated", "loves"]
    places = ["paris", "london", "berlin", "rome", "acme", "the river", "a good film", "tokyo"]
    tails = ["", " today", " yesterday", " , really bad movie", " and it was great"]
    return [f"{subjects[i % 8]} {verbs[(i // 8) % 7]} {places[(i // 56) % 8]}{tails[(i // 3) % 5]}" for i in range(n)]


def _check_rows(rows, inputs, nlps):
    assert len(rows) == len(inputs)
    by_adapter = defaultdict(list)
    for k, row in enumerate(inputs):
        by_adapter[row["adapter"]].append(k)
    for name, ks in by_adapter.items():
        for k, doc in zip(ks, nlps[name].pipe([inputs[k]["text"] for k in ks])):
            row = rows[k]
            assert row["id"] == inputs[k]["id"] and row["text"] == inputs[k]["text"]
            assert row["ents"] == [{"start": e.start_char, "end": e.end_char, "label": e.label_, "text": e.text} for e in doc.ents]
            assert row["cats"].keys() == doc.cats.keys()
            for label, score in doc.cats.items():
                assert row["cats"][label] == pytest.approx(score, abs=1e-5)


def test_annotate_2000_sentences_with_2_workers_equals_nlp_pipe(ray_local, adapters_dir, nlps, tmp_path):
    from spacy_ptuning.ray.data import AnnotationError, annotate, read_output

    texts = _sentences(2000)
    inputs = [{"id": k, "text": t, "adapter": SERVED[(k * 5) % 3]} for k, t in enumerate(texts)]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in inputs))
    out = tmp_path / "out"
    kwargs = dict(adapter_column="adapter", num_workers=2, num_cpus=0.5, batch_size=64, rows_per_shard=250)
    summary = annotate(source, out, adapters_dir, **kwargs)
    assert summary["shards"] == 8 and summary["done"] == 8 and summary["skipped"] == 0 and summary["rows"] == 2000
    assert len(summary["workers"]) == 2  # two worker processes wrote shards
    rows = read_output(out)
    _check_rows(rows, inputs, nlps)
    assert sum(bool(r["ents"]) for r in rows) > 100  # not a comparison of empty results

    # Resume: a lost shard (and a temp file of a crashed write) is redone, the rest skipped.
    (out / "part-00000-000003.jsonl").unlink()
    (out / ".part-00000-000004.jsonl.123.tmp").write_text("partial")
    kept = (out / "part-00000-000005.jsonl").stat().st_mtime_ns
    summary = annotate(source, out, adapters_dir, **kwargs)
    assert summary["done"] == 1 and summary["skipped"] == 7
    assert (out / "part-00000-000005.jsonl").stat().st_mtime_ns == kept
    assert read_output(out) == rows

    # Another input in the same output folder: refused, not mixed.
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in inputs[:10]))
    with pytest.raises(AnnotationError, match=r"PT-E039.*different inputs"):
        annotate(other, out, adapters_dir, **kwargs)


def test_annotate_parquet_one_adapter_and_bad_rows(ray_local, adapters_dir, nlps, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from spacy_ptuning.ray.data import AnnotationError, annotate, read_output

    texts = _sentences(300)
    inputs = [{"id": k, "text": t, "adapter": "multi"} for k, t in enumerate(texts)]
    pq.write_table(pa.Table.from_pylist(inputs), tmp_path / "in.parquet", row_group_size=70)
    summary = annotate(tmp_path / "in.parquet", tmp_path / "out", adapters_dir, adapter="multi",
                       num_workers=2, num_cpus=0.5, rows_per_shard=100)
    assert summary["format"] == "parquet" and summary["done"] == 3
    _check_rows(read_output(tmp_path / "out"), inputs, nlps)

    # Errors that name the problem, before or inside the workers.
    with pytest.raises(AnnotationError, match=r"PT-E037.*'body'.*\['adapter', 'id', 'text'\]"):
        annotate(tmp_path / "in.parquet", tmp_path / "o2", adapters_dir, adapter="multi", text_column="body")
    with pytest.raises(AnnotationError, match=r"PT-E040"):
        annotate(tmp_path / "in.parquet", tmp_path / "o2", adapters_dir)
    bad = [dict(r) for r in inputs[:40]]
    bad[33]["adapter"] = "nerr"
    bad[35]["adapter"] = "nerr"
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    with pytest.raises(AnnotationError, match=r"PT-E038.*'nerr' in 2 row\(s\).*rows: 33, 35.*Known adapters: broken, multi"):
        annotate(tmp_path / "bad.jsonl", tmp_path / "o3", adapters_dir, adapter_column="adapter",
                 num_workers=1, num_cpus=0.5, rows_per_shard=20)
    # The bad shard was not written (the good one may have been, before the
    # job stopped: shards run in any order), and no temp file is left.
    assert {p.name for p in (tmp_path / "o3").iterdir()} <= {"_annotate.json", "part-00000-000000.jsonl"}


def test_annotate_cli(ray_local, adapters_dir, nlps, tmp_path):
    from typer.testing import CliRunner

    from spacy_ptuning.cli import ptuning_cli
    from spacy_ptuning.ray.data import read_output

    inputs = [{"id": k, "body": t, "adapter": "ner"} for k, t in enumerate(_sentences(120))]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in inputs))
    args = ["annotate", str(tmp_path / "in.jsonl"), str(tmp_path / "out"), str(adapters_dir),
            "--text-column", "body", "--workers", "1", "--num-cpus", "0.5", "--rows-per-shard", "50"]
    result = CliRunner().invoke(ptuning_cli, args + ["--adapter", "ner"])
    assert result.exit_code == 0, result.output
    assert "120 rows in 3 shards" in result.output and "3 written now, 0 already there" in result.output
    rows = read_output(tmp_path / "out")
    _check_rows([{**r, "text": r["body"]} for r in rows], [{**r, "text": r["body"]} for r in inputs], nlps)
    result = CliRunner().invoke(ptuning_cli, args + ["--adapter", "ner"])
    assert result.exit_code == 0 and "0 written now, 3 already there" in result.output
    result = CliRunner().invoke(ptuning_cli, args + ["--adapter", "nope"])
    assert result.exit_code == 1 and "[PT-E033] Unknown adapter 'nope'" in result.output


def test_without_ray_the_import_says_how_to_install():
    code = (
        "import sys\n"
        "sys.modules['ray'] = None\n"
        "for mod in ('spacy_ptuning.ray.serve', 'spacy_ptuning.ray.data'):\n"
        "    try:\n"
        "        __import__(mod)\n"
        "    except ImportError as e:\n"
        "        print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2, out.stdout + out.stderr
    assert lines[0].startswith("[PT-E036] spacy_ptuning.ray.serve needs Ray")
    assert lines[1].startswith("[PT-E036] spacy_ptuning.ray.data needs Ray")
    assert all('pip install "spacy-ptuning[ray]"' in line for line in lines)


def test_a_replica_takes_the_loads_between_batches_setting(adapters_dir, monkeypatch):
    from spacy_ptuning.ray import serve as ray_serve

    monkeypatch.setattr(ray_serve.ray, "get_gpu_ids", lambda: [])
    monkeypatch.setattr(ray_serve.serve, "get_replica_context", lambda: None)
    for given, overlap in ((None, True), ("true", False), ("off", True), (True, False)):
        config = {} if given is None else {"loads_between_batches": ray_serve._as_bool("loads_between_batches", given)}
        replica = ray_serve.PTuningDeployment.func_or_class(str(adapters_dir), max_models=2, config=config, check_interval=None)
        assert replica.load_budget.overlap is overlap
    with pytest.raises(ValueError, match="loads_between_batches must be true or false"):
        ray_serve._as_bool("loads_between_batches", "sometimes")
    with pytest.raises(ValueError, match="loads_between_batches must be true or false"):
        ray_serve.build_app({"adapters_dir": str(adapters_dir), "loads_between_batches": "sometimes"})


def test_a_replica_takes_load_turns_and_refuses_what_it_could_not_load_in_time(adapters_dir, expected, monkeypatch):
    """The replica's loads go through our LoadBudget, as in our server: one
    cold load hangs (its turn held); loads of ~10 s each in half the time,
    against a 20 s timeout, so the next new adapter is refused at once with
    503 and a Retry-After (which the router passes on), an unknown one is
    still 404, and once the load is done both are served. Ray's replica
    context and multiplexing are stood in for: this is the replica's own
    logic, called directly."""
    import asyncio

    from spacy_ptuning.ray import serve as ray_serve

    current = {}
    monkeypatch.setattr(ray_serve.ray, "get_gpu_ids", lambda: [])
    monkeypatch.setattr(ray_serve.serve, "get_replica_context", lambda: None)
    monkeypatch.setattr(ray_serve.serve, "get_multiplexed_model_id", lambda: current["name"])
    replica = ray_serve.PTuningDeployment.func_or_class(
        str(adapters_dir), max_models=4, config={"timeout_s": 20.0, "load_share": 0.5, "max_wait_ms": 1}, check_interval=None)
    replica.get_adapter = replica._load  # Ray's bookkeeping of multiplexed ids needs a running replica
    entered, release = threading.Event(), threading.Event()
    get = replica.pool.get

    def gated_get(name):
        if name == "sentiment":
            entered.set()
            assert release.wait(120)
        return get(name)

    replica.pool.get = gated_get
    budget = replica.load_budget

    async def scenario():
        def process(name, texts):
            current["name"] = name  # read by process() before its first await
            return asyncio.ensure_future(replica.process(texts))

        held = process("sentiment", [TEXTS[0]])
        await asyncio.sleep(0)
        assert await asyncio.get_running_loop().run_in_executor(None, entered.wait, 60)
        budget._mean = 10.0  # the recent load time
        busy = await process("topics", [TEXTS[0]])
        unknown = await process("nope", ["a"])
        release.set()
        first = await held
        budget._mean = 0.01
        later = await process("topics", [TEXTS[0]])
        loads = budget.loads
        again = await process("topics", [TEXTS[1]])  # loaded: no load turn
        return busy, unknown, first, later, again, loads

    try:
        busy, unknown, first, later, again, loads = asyncio.run(scenario())
    finally:
        release.set()
        replica.batcher.close(5)
    assert busy["status"] == 503 and "busy loading adapters" in busy["detail"], busy
    assert int(busy["headers"]["Retry-After"]) >= 5  # at least half of the 10 s of loads it admits
    assert unknown["status"] == 404
    assert "status" not in first and "status" not in later, (first, later)
    _assert_doc(first["results"][0], expected["sentiment"][TEXTS[0]])
    _assert_doc(later["results"][0], expected["topics"][TEXTS[0]])
    _assert_doc(again["results"][0], expected["topics"][TEXTS[1]])
    assert loads == 2 and budget.loads == 2  # sentiment and topics, each once, in their turns


def test_the_router_passes_on_a_replicas_503_and_retry_after(adapters_dir):
    import asyncio

    from fastapi import HTTPException

    from spacy_ptuning.ray import serve as ray_serve

    class Replicas:  # a DeploymentHandle whose replica is busy loading
        def options(self, **_):
            return self

        @property
        def process(self):
            return self

        async def remote(self, texts):
            return {"replica": "r1", "status": 503, "detail": "busy loading adapters", "headers": {"Retry-After": "7"}}

    # Our class under Serve's ingress wrapper (whose own __init__ needs a running replica).
    ours = next(c for c in ray_serve.PTuningRouter.func_or_class.__mro__ if "_forward" in vars(c))
    router = ours(Replicas(), str(adapters_dir), {})
    with pytest.raises(HTTPException) as e:
        asyncio.run(router.process_adapter("ner", ray_serve.TextsIn(texts=["a"])))
    assert e.value.status_code == 503 and e.value.detail == "busy loading adapters"
    assert e.value.headers["Retry-After"] == "7" and e.value.headers["x-ptuning-replica"] == "r1"
