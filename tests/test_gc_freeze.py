"""The cycle collector in a server (``serving/gc_pauses.py``): a pipeline
the pool loaded holds no reference cycle, so an evicted one is freed by
refcounting alone, frozen or not; the Freezer collects what is not frozen
before it freezes (garbage is never frozen), and only after loads; the
server freezes after its preloads and says so in /metrics."""
import gc
import weakref

import pytest
from fastapi.testclient import TestClient

from spacy_ptuning.pipeline.transformer_model import find_adapter_layers
from spacy_ptuning.serving.gc_pauses import Freezer, untie
from spacy_ptuning.serving.pool import AdapterPool
from spacy_ptuning.serving.server import ServeConfig, create_app
from thinc.api import Model

from .helpers import pipeline

WORDS = {"@architectures": "spacy_ptuning.WordFeatures.v1", "width": 8, "rows": [300, 50, 100, 40]}


@pytest.fixture
def unfrozen():
    """Whatever a test freezes goes back to the collector after it."""
    yield
    gc.unfreeze()
    gc.collect()


class _Cycle:
    def __init__(self):
        self.me = self


@pytest.mark.parametrize("method,storage", [("prefix", None), ("prompt", "float16"), ("prompt_encoder", None)])
def test_an_evicted_pipeline_is_freed_by_refcounting_alone(tiny_bert, tmp_path, method, storage):
    for name, seed in (("a", 1), ("b", 2)):
        pipeline(tiny_bert, ["ptuning_ner", "ptuning_textcat"], method, 4, seed, word_features=WORDS).to_disk(tmp_path / name)
    pool = AdapterPool(tmp_path, max_loaded=2, check_interval=None, compact=True, storage_dtype=storage)
    nlp = pool.get("a")
    pool.get("b")
    adapters = [weakref.ref(a) for _, pipe in nlp.pipeline for _, _, a in find_adapter_layers(pipe)]
    models = sum(1 for _, pipe in nlp.pipeline for _ in pipe.model.walk())
    assert len(adapters) == 2 and models > 20
    del nlp
    gc.collect()  # nothing of the test's own left for the check below
    gc.disable()
    try:
        pool.remove("a")  # the pool's last reference
        alive = [r() is not None for r in adapters]
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        cyclic = [o for o in gc.garbage if isinstance(o, Model)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert alive == [False, False]
    assert cyclic == []
    assert pool.get("b").pipeline  # the other one still serves


def test_untie_changes_no_behaviour(tiny_bert):
    nlp = pipeline(tiny_bert, "ptuning_textcat", "prefix", 4, 3)
    want = [doc.cats for doc in nlp.pipe(["a good film", "bob hated rome"])]
    untied = untie(nlp)
    assert untied > 0 and untie(nlp) == 0
    for node in nlp.get_pipe("ptuning_textcat").model.walk():
        assert node.initialize() is node
    assert [doc.cats for doc in nlp.pipe(["a good film", "bob hated rome"])] == want


def test_the_freezer_freezes_after_loads_only_and_never_freezes_garbage(unfrozen):
    loads = [0]
    freezer = Freezer(lambda: loads[0], interval_s=60)
    freezer._seen = loads[0]
    gc.unfreeze()
    assert not freezer.poll() and gc.get_freeze_count() == 0  # no load: nothing frozen
    kept = [[]]
    garbage = _Cycle()
    dropped = weakref.ref(garbage)
    del garbage
    loads[0] += 1
    assert freezer.poll() and freezer.freezes == 1
    assert dropped() is None  # collected, not frozen
    assert gc.get_freeze_count() > 0
    assert not any(o is kept[0] for o in gc.get_objects())  # frozen: no collection walks it
    assert not freezer.poll()


@pytest.mark.parametrize("interval,freezes", [(3600, 1), (0, 0)])
def test_the_server_freezes_after_its_preloads_unless_told_not_to(tiny_bert, tmp_path, unfrozen, interval, freezes):
    pipeline(tiny_bert, "ptuning_ner", "prefix", 4, 1).to_disk(tmp_path / "a")
    gc.unfreeze()
    app = create_app(AdapterPool(tmp_path, check_interval=None), ServeConfig(preload=["a"], gc_freeze_s=interval))
    with TestClient(app) as client:
        assert app.state.ptuning.preloaded.wait(120)
        assert client.post("/adapters/a/process", json={"texts": ["alice visited paris"]}).status_code == 200
        metrics = dict(line.rsplit(" ", 1) for line in client.get("/metrics").text.splitlines() if line.startswith("ptuning_gc_f"))
    assert float(metrics["ptuning_gc_freezes_total"]) == freezes  # the one after the preloads; the thread waits an hour
    assert (float(metrics["ptuning_gc_frozen_objects"]) > 0) == bool(freezes)
    assert (gc.get_freeze_count() > 0) == bool(freezes)


def test_a_negative_freeze_interval_is_refused():
    with pytest.raises(ValueError, match="gc_freeze_s"):
        ServeConfig(gc_freeze_s=-1)
