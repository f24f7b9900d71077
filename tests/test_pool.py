"""The adapter pool: names, lazy loading, LRU eviction, reload on change,
bad names and broken adapters."""
import shutil
import threading

import catalogue
import pytest
import spacy
import srsly
import srsly.msgpack
import torch

from spacy_ptuning.serving.pool import AdapterLoadFailed, AdapterPool, InvalidAdapterName, UnknownAdapter
from spacy_ptuning.pipeline.transformer_model import find_adapter_layers

from .helpers import pipeline as _pipeline

TEXT = "alice visited paris with bob"


@pytest.fixture(scope="module")
def saved(tiny_bert, tmp_path_factory):
    """Four saved pipelines: three NER (different prompts), one textcat."""
    root = tmp_path_factory.mktemp("adapters")
    nlps = {
        "ner-a": _pipeline(tiny_bert, "ptuning_ner", "prefix", 4, 11),
        "ner-b": _pipeline(tiny_bert, "ptuning_ner", "prompt", 5, 12),
        "ner-c": _pipeline(tiny_bert, "ptuning_ner", "prefix", 3, 13),
        "sentiment": _pipeline(tiny_bert, "ptuning_textcat", "prefix", 6, 14),
    }
    for name, nlp in nlps.items():
        nlp.to_disk(root / name)
    return root, nlps


def _copy(saved, tmp_path):
    root = tmp_path / "adapters"
    shutil.copytree(saved[0], root)
    return root


def _backbone(nlp):
    return next(a.backbone for _, p in nlp.pipeline for _, _, a in find_adapter_layers(p))


def test_names_and_description_without_loading(saved, tiny_bert):
    root, nlps = saved
    pool = AdapterPool(root)
    assert pool.names() == ["ner-a", "ner-b", "ner-c", "sentiment"]
    info = pool.describe("ner-b")
    assert info["loaded"] is False and pool.loaded == []
    (component,) = info["components"]
    assert component == {
        "name": "ptuning_ner", "factory": "ptuning_ner", "task": "ner",
        "labels": list(nlps["ner-b"].get_pipe("ptuning_ner").labels),
        "method": "prompt", "num_virtual_tokens": 5, "backbone": tiny_bert,
    }
    pool.get("ner-b")
    loaded = pool.describe("ner-b")
    assert loaded["loaded"] is True and loaded["components"] == info["components"]


def test_get_predicts_as_the_saved_pipeline(saved):
    root, nlps = saved
    pool = AdapterPool(root)
    for name, nlp in nlps.items():
        doc, expected = pool.get(name)(TEXT), nlp(TEXT)
        assert [(e.start, e.end, e.label_) for e in doc.ents] == [(e.start, e.end, e.label_) for e in expected.ents]
        assert doc.cats == pytest.approx(expected.cats, abs=1e-6)
    assert pool.get("ner-a") is pool.get("ner-a")  # loaded once
    assert pool.stats["loads"] == 4


def test_lru_eviction_keeps_the_backbone(saved):
    root, _ = saved
    pool = AdapterPool(root, max_loaded=2)
    backbone = _backbone(pool.get("ner-a"))
    pool.get("ner-b")
    pool.get("ner-a")  # now the most recent
    pool.get("ner-c")  # evicts ner-b, the least recently used
    assert pool.loaded == ["ner-a", "ner-c"] and pool.stats["evictions"] == 1
    assert pool.describe("ner-b")["loaded"] is False
    again = pool.get("ner-b")
    assert _backbone(again) is backbone
    assert pool.stats["loads"] == 4 and pool.loaded == ["ner-c", "ner-b"]


def test_changed_folder_is_reloaded_and_old_object_keeps_working(saved, tmp_path):
    root = _copy(saved, tmp_path)
    nlps = saved[1]
    pool = AdapterPool(root, check_interval=0)
    old = pool.get("ner-a")
    shutil.rmtree(root / "ner-a")
    nlps["ner-c"].to_disk(root / "ner-a")  # another adapter under the old name
    new = pool.get("ner-a")
    assert new is not old and pool.stats["reloads"] == 1
    got = [(e.start, e.end, e.label_) for e in new(TEXT).ents]
    assert got == [(e.start, e.end, e.label_) for e in nlps["ner-c"](TEXT).ents]
    assert [(e.start, e.end) for e in old(TEXT).ents] == [(e.start, e.end) for e in nlps["ner-a"](TEXT).ents]


class _RewritingPool(AdapterPool):
    """A pool whose folder of ``target`` is rewritten in place by
    ``rewrite(load number)`` right after each load of it has read it (as a
    deploy that copies files into the served folder would, mid-load)."""

    def __init__(self, *args, target, rewrite, **kwargs):
        super().__init__(*args, **kwargs)
        self.target, self.rewrite, self.reads = target, rewrite, 0

    def _spacy_load(self, location):
        nlp = super()._spacy_load(location)
        if location.endswith(self.target):
            self.reads += 1
            self.rewrite(self.reads)
        return nlp


def test_a_folder_replaced_while_it_loads_is_read_again(saved, tmp_path):
    root = _copy(saved, tmp_path)
    nlps = saved[1]

    def replace_once(reads):
        if reads == 1:  # the first read saw ner-a; the folder now holds ner-c
            shutil.rmtree(root / "ner-a")
            nlps["ner-c"].to_disk(root / "ner-a")

    pool = _RewritingPool(root, check_interval=None, target="ner-a", rewrite=replace_once)
    nlp = pool.get("ner-a")
    assert pool.reads == 2
    (adapter,) = [a for _, p in nlp.pipeline for _, _, a in find_adapter_layers(p)]
    assert adapter.num_virtual_tokens == 3  # ner-c's (ner-a has 4): the version now on disk
    assert pool.get("ner-a") is nlp and pool.stats["loads"] == 1


def test_a_folder_that_keeps_changing_fails_alone_with_its_error(saved, tmp_path):
    import os

    root = _copy(saved, tmp_path)
    meta = root / "ner-a" / "meta.json"

    def touch(reads):
        os.utime(meta, ns=(reads * 10**9, reads * 10**9))

    pool = _RewritingPool(root, check_interval=0, target="ner-a", rewrite=touch)  # the folder compared on every get
    with pytest.raises(AdapterLoadFailed, match="PT-E052") as info:
        pool.get("ner-a")
    assert "rename it into place" in str(info.value) and pool.reads == 3
    with pytest.raises(AdapterLoadFailed, match="PT-E052"):
        pool.get("ner-a")  # the folder has not changed since: the failure is remembered, no new reads
    assert pool.reads == 3
    assert pool.get("ner-b")(TEXT) is not None and pool.stats["load_failures"] == 1


def test_failed_reload_keeps_serving_the_old_version_and_says_why(saved, tmp_path):
    root = _copy(saved, tmp_path)
    pool = AdapterPool(root, check_interval=0)
    old = pool.get("ner-a")
    model = root / "ner-a" / "ptuning_ner" / "model"
    model.write_bytes(model.read_bytes()[:100])
    assert pool.get("ner-a") is old
    assert "PT-E008" in pool.describe("ner-a")["error"]
    assert pool.stats["load_failures"] == 1


def test_broken_adapter_fails_alone(saved, tmp_path):
    root = _copy(saved, tmp_path)
    model = root / "ner-b" / "ptuning_ner" / "model"
    model.write_bytes(model.read_bytes()[:100])
    pool = AdapterPool(root)
    with pytest.raises(AdapterLoadFailed, match=r"ner-b.*\[PT-E008\]"):
        pool.get("ner-b")
    assert pool.get("ner-a")(TEXT) is not None
    assert "PT-E008" in pool.describe("ner-b")["error"]


@pytest.mark.parametrize("name", ["../ner-a", "ner-a/../ner-b", "/etc/passwd", "", ".hidden", "a" * 129, "ner a", None])
def test_invalid_names_never_reach_the_disk(saved, name):
    pool = AdapterPool(saved[0])
    with pytest.raises(InvalidAdapterName, match=r"\[PT-E035\]"):
        pool.get(name)


def test_unknown_name_does_not_list_the_known_ones(saved):
    """With thousands of adapters (and tenants who should not see each
    other's names) the error says where to look, not what exists."""
    pool = AdapterPool(saved[0])
    with pytest.raises(UnknownAdapter, match=r"\[PT-E033\].*'nope'.*GET /adapters") as e:
        pool.get("nope")
    assert "ner-a" not in str(e.value)


def test_a_long_invalid_name_is_not_echoed_whole(saved):
    with pytest.raises(InvalidAdapterName, match=r"\(100000 characters\)") as e:
        AdapterPool(saved[0]).get("x" * 99_999 + "/")
    assert len(str(e.value)) < 400


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _ents(nlp):
    return [(e.start, e.end, e.label_) for e in nlp(TEXT).ents]


def test_hot_reload_at_a_positive_check_interval(saved, tmp_path):
    """Regression: get() checked `_due` twice with one `now`; the first call
    recorded the check, so the second (under the lock) never reloaded at
    any check_interval > 0."""
    root = _copy(saved, tmp_path)
    nlps = saved[1]
    clock = FakeClock()
    pool = AdapterPool(root, check_interval=1.0, clock=clock)
    old = pool.get("ner-a")
    assert pool.describe("ner-a")["version"] == 1
    shutil.rmtree(root / "ner-a")
    nlps["ner-c"].to_disk(root / "ner-a")
    clock.now += 0.5  # within the interval: not looked at yet
    assert pool.get("ner-a") is old
    clock.now += 0.6
    new = pool.get("ner-a")
    assert new is not old and pool.stats["reloads"] == 1
    assert _ents(new) == _ents(nlps["ner-c"])
    info = pool.describe("ner-a")
    assert info["version"] == 2 and info["state"] == "READY"
    assert info["components"][0]["num_virtual_tokens"] == 3  # ner-c's, not ner-a's 4


def test_deleted_folder_makes_the_name_unknown_after_the_interval(saved, tmp_path):
    root = _copy(saved, tmp_path)
    clock = FakeClock()
    pool = AdapterPool(root, check_interval=1.0, clock=clock)
    pool.get("ner-a")
    shutil.rmtree(root / "ner-a")
    clock.now += 1.0
    with pytest.raises(UnknownAdapter, match=r"\[PT-E033\].*'ner-a'"):
        pool.get("ner-a")
    assert "ner-a" not in pool.loaded and "ner-a" not in pool.names()


def test_broken_adapter_is_not_reloaded_on_every_request(saved, tmp_path, monkeypatch):
    """Negative cache: one load attempt per version of the folder (and a
    doubling retry), not one per request."""
    root = _copy(saved, tmp_path)
    model = root / "ner-b" / "ptuning_ner" / "model"
    good = model.read_bytes()
    model.write_bytes(good[:100])
    clock = FakeClock()
    pool = AdapterPool(root, check_interval=1.0, retry_after_failure=5.0, clock=clock)
    attempts = []
    real = pool._spacy_load
    monkeypatch.setattr(pool, "_spacy_load", lambda location: attempts.append(location) or real(location))
    for _ in range(50):
        with pytest.raises(AdapterLoadFailed, match=r"ner-b.*\[PT-E008\]"):
            pool.get("ner-b")
    assert len(attempts) == 1 and pool.stats["load_failures"] == 1
    assert pool.describe("ner-b")["state"] == "FAILED"
    clock.now += 2.0  # the folder is checked again, unchanged: still no load
    with pytest.raises(AdapterLoadFailed):
        pool.get("ner-b")
    assert len(attempts) == 1
    clock.now += 3.0  # the retry is due: one more attempt, then 10 s
    with pytest.raises(AdapterLoadFailed):
        pool.get("ner-b")
    assert len(attempts) == 2
    clock.now += 6.0
    with pytest.raises(AdapterLoadFailed):
        pool.get("ner-b")
    assert len(attempts) == 2
    model.write_bytes(good)  # fixed on disk: loaded at the next check
    clock.now += 1.0
    assert _ents(pool.get("ner-b")) == _ents(saved[1]["ner-b"])
    assert len(attempts) == 3 and pool.describe("ner-b")["state"] == "READY"


def test_new_folder_is_found_without_restart(saved, tmp_path):
    root = _copy(saved, tmp_path)
    pool = AdapterPool(root)
    assert "late" not in pool.names()
    saved[1]["ner-a"].to_disk(root / "late")
    assert pool.get("late") is not None
    shutil.rmtree(root / "late")
    assert "late" not in pool.names()


def test_mapping_and_add_remove(saved):
    root, _ = saved
    pool = AdapterPool({"x": root / "ner-a"})
    pool.add("y", root / "sentiment")
    assert pool.names() == ["x", "y"]
    assert set(pool.get("y")(TEXT).cats) == {"POS", "NEG"}
    pool.remove("y")
    with pytest.raises(UnknownAdapter):
        pool.get("y")
    with pytest.raises(FileNotFoundError, match=r"\[PT-E032\]"):
        pool.add("z", root / "missing")


def test_threads_under_eviction_churn(saved):
    root, nlps = saved
    pool = AdapterPool(root, max_loaded=2)
    expected = {name: [(e.start, e.end) for e in nlp(TEXT).ents] for name, nlp in nlps.items() if name != "sentiment"}
    errors = []

    def work(seed):
        names = sorted(expected)
        try:
            for i in range(12):
                name = names[(seed + i) % len(names)]
                assert [(e.start, e.end) for e in pool.get(name)(TEXT).ents] == expected[name]
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(pool.loaded) <= 2 and pool.stats["evictions"] > 0


def test_pipelines_with_identical_tokenizers_share_one(saved, tmp_path):
    """Loads after the first reuse its Vocab and Tokenizer (faster, smaller);
    a pipeline with other tokenizer rules keeps its own, and every pipeline
    tokenises exactly as spacy.load's copy of it."""
    from spacy.attrs import ORTH

    root = _copy(saved, tmp_path)
    custom = spacy.load(root / "ner-c")
    custom.tokenizer.add_special_case("paris-bob", [{ORTH: "paris"}, {ORTH: "-bob"}])
    shutil.rmtree(root / "ner-c")
    custom.to_disk(root / "ner-c")
    pool = AdapterPool(root)
    a, b, c = pool.get("ner-a"), pool.get("ner-b"), pool.get("ner-c")
    assert b.tokenizer is a.tokenizer and b.vocab is a.vocab
    assert c.tokenizer is not a.tokenizer
    text = "alice visited paris-bob (again), e-mail: a@b.com, can't 3.5kg!"
    for name, nlp in (("ner-a", a), ("ner-b", b), ("ner-c", c)):
        assert [t.text for t in nlp(text)] == [t.text for t in spacy.load(root / name)(text)]
    assert b.config["nlp"]["tokenizer"] == {"@tokenizers": "spacy.Tokenizer.v1"}  # saves as loaded
    b.to_disk(tmp_path / "resaved")
    assert [t.text for t in spacy.load(tmp_path / "resaved")(text)] == [t.text for t in b(text)]


def test_add_and_remove_survive_a_rescan(saved, tmp_path):
    root = _copy(saved, tmp_path)
    pool = AdapterPool(root)
    pool.add("outside", saved[0] / "sentiment")
    pool.remove("ner-c")
    assert pool.names() == ["ner-a", "ner-b", "outside", "sentiment"]  # names() rescans
    assert set(pool.get("outside")(TEXT).cats) == {"POS", "NEG"}
    with pytest.raises(UnknownAdapter):
        pool.get("ner-c")  # an unknown name rescans too
    pool.add("ner-c", root / "ner-c")
    assert "ner-c" in pool.names()


@pytest.mark.parametrize("method", ["prefix", "prompt", "prompt_encoder"])
def test_compacted_adapters_predict_the_same_with_less_memory_and_save_as_serving_copies(tiny_bert, tmp_path, method):
    nlp = _pipeline(tiny_bert, ["ptuning_ner", "ptuning_textcat"], method, 4, 21)
    nlp.to_disk(tmp_path / "a")
    plain = AdapterPool(tmp_path, check_interval=None).get("a")
    pool = AdapterPool(tmp_path, check_interval=None, compact=True)
    compact = pool.get("a")
    texts = [TEXT, "bob hated rome", "a good film about alice in paris"]
    for name, pipe in compact.pipeline:
        (tok2vec, _, adapter), = find_adapter_layers(pipe)
        (reference, _, original), = find_adapter_layers(plain.get_pipe(name))
        assert adapter.compacted and not original.compacted
        assert not list(adapter.prompts.parameters())  # the module's weights are gone
        assert sum(p.numel() for p in adapter.parameters()) < sum(p.numel() for p in original.parameters())
        docs = [compact.make_doc(t) for t in texts]
        for got, want in zip(tok2vec.predict(docs), reference.predict(docs)):
            assert got.shape == want.shape and abs(got - want).max() < 1e-6
    for got, want in zip(compact.pipe(texts), plain.pipe(texts)):
        assert [(e.start_char, e.end_char, e.label_) for e in got.ents] == [(e.start_char, e.end_char, e.label_) for e in want.ents]
        assert got.cats == pytest.approx(want.cats, abs=1e-6)
    # Saved, a compacted (float32) pipeline is a serving copy: it predicts the same (tests/test_compaction.py).
    compact.to_disk(tmp_path / "copy")
    copy = spacy.load(tmp_path / "copy")
    for got, want in zip(copy.pipe(texts), plain.pipe(texts)):
        assert [(e.start_char, e.end_char, e.label_) for e in got.ents] == [(e.start_char, e.end_char, e.label_) for e in want.ents]
        assert got.cats == pytest.approx(want.cats, abs=1e-6)


def test_memory_budget_evicts_by_bytes_and_refuses_an_adapter_above_it(saved, tmp_path):
    from spacy_ptuning.serving.pool import resident_bytes

    root = _copy(saved, tmp_path)
    sizes = {n: resident_bytes(AdapterPool(root, check_interval=None).get(n)) for n in ("ner-a", "ner-b", "ner-c")}
    budget = sizes["ner-a"] + sizes["ner-b"]
    pool = AdapterPool(root, max_loaded=100, max_resident_mb=budget / 2**20, check_interval=None)
    pool.get("ner-a")
    pool.get("ner-b")
    assert pool.loaded == ["ner-a", "ner-b"] and pool.resident_total == budget  # exactly full: nothing dropped
    pool.get("ner-c")
    loaded = pool.loaded
    assert loaded[-1] == "ner-c" and "ner-a" not in loaded  # the least recently used went first
    assert pool.resident_total == sum(sizes[n] for n in loaded) <= budget
    assert pool.stats["evictions"] == 3 - len(loaded)
    # An adapter larger than the whole budget fails alone, saying what to set.
    small = AdapterPool(root, max_resident_mb=sizes["ner-a"] / 2**20 / 2, check_interval=None)
    with pytest.raises(AdapterLoadFailed, match=r"PT-E050.*--max-resident-mb"):
        small.get("ner-a")
    assert small.loaded == [] and small.resident_total == 0
    with pytest.raises(ValueError, match="PT-E051"):
        AdapterPool(root, max_resident_mb=0)
    # What compacting frees (counted by the adapter itself) is what the pool counts less.
    compact = AdapterPool(root, check_interval=None, compact=True)
    nlp = spacy.load(root / "ner-a")
    (_, _, adapter), = find_adapter_layers(nlp.get_pipe("ptuning_ner"))
    freed = adapter.compact()
    assert freed >= 0 and resident_bytes(compact.get("ner-a")) == sizes["ner-a"] - freed == resident_bytes(nlp)


def test_unknown_names_are_looked_up_without_rescanning_every_folder(saved, tmp_path, monkeypatch):
    # With thousands of adapter folders, a rescan per unknown name would be a
    # stat per folder per request.
    root = _copy(saved, tmp_path)
    pool = AdapterPool(root, check_interval=None)
    scans = []
    real_scan = pool._scan
    monkeypatch.setattr(pool, "_scan", lambda: scans.append(1) or real_scan())
    for _ in range(3):
        with pytest.raises(UnknownAdapter):
            pool.get("nope")
    saved[1]["ner-a"].to_disk(root / "late")
    assert pool.get("late") is not None  # a new folder, found by its name
    assert scans == []


def test_a_load_beside_a_shared_vocab_keeps_its_lexemes_and_adds_its_strings(saved, tmp_path):
    # Vocab.from_disk empties the vocab's lexeme table and copies its whole
    # string store; a pipeline that shares another's vocab must not do that
    # to the vocab the first one is using.
    root = _copy(saved, tmp_path)
    pool = AdapterPool(root, max_loaded=8, check_interval=None)
    first = pool.get("ner-a")
    first("zanzibarquux visited paris with bob")
    lexemes = len(first.vocab)
    assert lexemes > 0 and "zanzibarquux" in first.vocab.strings
    strings_file = root / "ner-b" / "vocab" / "strings.json"
    strings = srsly.read_json(strings_file) + ["only-in-ner-b"]
    srsly.write_json(strings_file, strings)
    second = pool.get("ner-b")
    assert second.vocab is first.vocab  # shared
    assert len(first.vocab) >= lexemes and "zanzibarquux" in first.vocab.strings
    assert all(s in second.vocab.strings for s in strings)
    assert [e.label_ for e in second("alice visited paris with bob").ents] == [
        e.label_ for e in spacy.load(root / "ner-b")("alice visited paris with bob").ents]


def test_a_strings_file_already_added_to_the_shared_vocab_is_not_read_again(saved, tmp_path, monkeypatch):
    # Adapters saved from one training run carry the same thousands of
    # strings; adding them again at every load is wasted time holding the GIL.
    root = _copy(saved, tmp_path)
    strings_b = (root / "ner-b" / "vocab" / "strings.json").read_bytes()
    (root / "ner-c" / "vocab" / "strings.json").write_bytes(strings_b)  # same run, same strings
    parsed = []
    real = srsly.json_loads
    monkeypatch.setattr(srsly, "json_loads", lambda data: parsed.append(data) or real(data))
    pool = AdapterPool(root, max_loaded=8, check_interval=None)
    pool.get("ner-a")
    parsed.clear()
    second = pool.get("ner-b")
    assert parsed.count(strings_b) == 1
    third = pool.get("ner-c")
    assert parsed.count(strings_b) == 1  # not again
    assert third.vocab is second.vocab and all(s in third.vocab.strings for s in real(strings_b))
    other = real(strings_b) + ["only-in-sentiment"]  # another run's strings: read and added
    srsly.write_json(root / "sentiment" / "vocab" / "strings.json", other)
    fourth = pool.get("sentiment")
    assert fourth.vocab is second.vocab and "only-in-sentiment" in fourth.vocab.strings


class _CountingRegistry(dict):
    copies = 0

    def copy(self):
        _CountingRegistry.copies += 1
        return dict(self)


def test_an_adapter_load_does_not_walk_the_registry_per_unpack(saved, tmp_path, monkeypatch):
    # catalogue's get_all copies the whole REGISTRY, and srsly calls it on
    # every msgpack unpack (30 or more in one adapter's load). With
    # registry_cache (installed by the pool), a load walks it a few times,
    # for spaCy's own lookups, not once per unpack.
    root = _copy(saved, tmp_path)
    pool = AdapterPool(root, max_loaded=8, check_interval=None)
    pool.get("ner-a")  # the first load builds the shared tokenizer
    monkeypatch.setattr(catalogue, "REGISTRY", _CountingRegistry(catalogue.REGISTRY))
    _CountingRegistry.copies = 0
    unpacks = []
    real_loads = srsly.msgpack.loads
    monkeypatch.setattr(srsly.msgpack, "loads", lambda *a, **k: unpacks.append(1) or real_loads(*a, **k))
    pool.get("ner-b")
    assert len(unpacks) >= 5, "the load no longer unpacks through srsly.msgpack: this test checks nothing"
    assert _CountingRegistry.copies < len(unpacks) / 2  # 2 against 8 here; 10 without the cache


def test_one_config_text_is_parsed_once_and_each_pipeline_owns_its_config(saved, tmp_path, monkeypatch):
    # Thousands of adapters saved from one training config share its text:
    # the pool parses it once (spaCy's load path parses it four times a
    # load), and each pipeline still gets the config spacy.load gives it,
    # as its own copy.
    import confection._config

    root = _copy(saved, tmp_path)
    for i in range(3):
        shutil.copytree(root / "ner-a", root / f"twin{i}")
    pool = AdapterPool(root, max_loaded=8, check_interval=None, dtype="bfloat16")
    pool.get("ner-a")  # the first load builds the shared tokenizer (spacy.load)
    parses = []
    real_parse = confection._config.parse_config
    monkeypatch.setattr(confection._config, "parse_config", lambda *a, **k: parses.append(1) or real_parse(*a, **k))
    twins = [pool.get(f"twin{i}") for i in range(3)]
    assert parses == []
    pool.get("sentiment")  # another text: parsed
    assert parses
    monkeypatch.setattr(confection._config, "parse_config", real_parse)
    # what spacy.load gives with the pool's dtype override (the pool's first load)
    saved_config = spacy.util.load_config(root / "twin0" / "config.cfg")
    reference = spacy.load(root / "twin0", config={f"components.{name}.model.tok2vec.dtype": "bfloat16"
                                                   for name in saved_config["components"]})
    for nlp in twins:
        assert nlp.config.to_str() == reference.config.to_str()
        assert nlp.config.is_interpolated == reference.config.is_interpolated
        assert _backbone(nlp).model.dtype == torch.bfloat16  # the pool's override was applied
    twins[0].config["nlp"]["batch_size"] = 7
    assert twins[1].config["nlp"]["batch_size"] == reference.config["nlp"]["batch_size"] != 7
