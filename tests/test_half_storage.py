"""Resident adapters held in float16 (``AdapterPool(storage_dtype=...)``,
``Adapter.compact(dtype)``, ``pipeline.half_storage``): the predictions are
those of the same pipeline with its prompt row and its word features' hash
tables and maxout weights rounded to float16 and run in float32 by the stock
thinc and torch code, in about half their bytes; nothing else changes, and
bad settings say what to set."""
import numpy
import pytest
import spacy
import torch
from thinc.layers.hashembed import forward as hashembed_forward
from thinc.layers.maxout import forward as maxout_forward

from spacy_ptuning.errors import AdapterError
from spacy_ptuning.pipeline.gathered_words import gathered_word_features, plan_of
from spacy_ptuning.pipeline.half_storage import half_hashembed_forward, half_maxout_forward, halve
from spacy_ptuning.pipeline.transformer_model import find_adapter_layers
from spacy_ptuning.serving.mixed_batch import pipe_mixed
from spacy_ptuning.serving.pool import AdapterPool, resident_bytes

from .helpers import TEXTS, pipeline

WORDS = {"@architectures": "spacy_ptuning.WordFeatures.v1", "width": 8, "rows": [300, 50, 100, 40]}
TEXTS_ = [t for t in TEXTS if t] + ["Naloxone reversed the clonidine-induced hypotension ."]


HALVED = {"hashembed": ("E",), "maxout": ("W", "b")}  # what a float16 pool holds in float16


def _halved(model):
    """(layer, parameter names) of every initialised layer that float16 storage halves."""
    return [(node, HALVED[node.name]) for node in model.walk() if node.name in HALVED and node.has_param(HALVED[node.name][0])]


def _round(model):
    for node, names in _halved(model):
        for name in names:
            node.set_param(name, node.get_param(name).astype("float16").astype("float32"))


def _rounded_reference(path):
    """The pipeline at ``path``, compacted in float32, with its prompt rows and
    hash tables rounded to float16 values and kept in float32: what a
    float16-stored copy must compute, by the stock code paths."""
    nlp = spacy.load(path)
    for _, pipe in nlp.pipeline:
        for _, _, adapter in find_adapter_layers(pipe):
            adapter.compact()
            row = adapter.prompts.row
            adapter.prompts.row = row.half().to(row.dtype)
        _round(pipe.model)
    return nlp


@pytest.mark.parametrize("method", ["prefix", "prompt", "prompt_encoder"])
def test_a_float16_pool_predicts_as_the_rounded_pipeline_in_less_memory(tiny_bert, tmp_path, method):
    nlp = pipeline(tiny_bert, ["ptuning_ner", "ptuning_textcat"], method, 4, 31, word_features=WORDS)
    nlp.to_disk(tmp_path / "a")
    reference = _rounded_reference(tmp_path / "a")
    exact = AdapterPool(tmp_path, check_interval=None, compact=True).get("a")
    half = AdapterPool(tmp_path, check_interval=None, compact=True, storage_dtype="float16").get("a")
    rows = halved = 0
    for name, pipe in half.pipeline:
        (tok2vec, _, adapter), = find_adapter_layers(pipe)
        assert adapter.prompts.row.dtype == torch.float16
        with torch.no_grad():
            assert adapter.prompt_row().dtype == adapter.backbone.model.dtype == torch.float32
        rows += adapter.prompts.row.numel() * 2
        found = _halved(pipe.model)
        assert sorted(n.name for n, _ in found) == ["hashembed"] * 4 + ["maxout"] * 3  # the tables, the mix, 2 CNN layers
        assert all(n.get_param(name).dtype == numpy.float16 for n, names in found for name in names)
        halved += sum(n.get_param(name).size * 2 for n, names in found for name in names)
        (want_tok2vec, _, _), = find_adapter_layers(reference.get_pipe(name))
        docs = [half.make_doc(t) for t in TEXTS_]
        for got, want in zip(tok2vec.predict(docs), want_tok2vec.predict(docs)):
            assert got.shape == want.shape
            numpy.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Exactly the float16 halves are saved: the rows, tables and maxout weights, nothing else.
    assert resident_bytes(exact) - resident_bytes(half) == rows + halved
    want = list(reference.pipe(TEXTS_))
    for docs in (list(half.pipe(TEXTS_)), pipe_mixed([(half, t) for t in TEXTS_])):
        for got, doc in zip(docs, want):
            assert [(e.start_char, e.end_char, e.label_) for e in got.ents] == [(e.start_char, e.end_char, e.label_) for e in doc.ents]
            assert got.cats == pytest.approx(doc.cats, abs=1e-5)
    # Saved, it is a float16 serving copy: spacy.load gives the float16 forwards back, same predictions.
    half.to_disk(tmp_path / "copy")
    copy = spacy.load(tmp_path / "copy")
    for name, pipe in copy.pipeline:
        assert all(n._func in (half_hashembed_forward, half_maxout_forward) for n, _ in _halved(pipe.model))
        assert all(n.get_param(p).dtype == numpy.float16 for n, names in _halved(pipe.model) for p in names)
    for got, doc in zip(copy.pipe(TEXTS_), half.pipe(TEXTS_)):
        assert [(e.start_char, e.end_char, e.label_) for e in got.ents] == [(e.start_char, e.end_char, e.label_) for e in doc.ents]
        assert got.cats == doc.cats


def test_a_mixed_batch_of_float16_and_float32_pipelines_equals_each_alone(tiny_bert, tmp_path):
    pipeline(tiny_bert, "ptuning_ner", "prefix", 3, 41, word_features=WORDS).to_disk(tmp_path / "ner")
    pipeline(tiny_bert, "ptuning_textcat", "prompt", 5, 42, word_features=WORDS).to_disk(tmp_path / "cat")
    half = AdapterPool(tmp_path, check_interval=None, compact=True, storage_dtype="float16")
    exact = AdapterPool(tmp_path, check_interval=None, compact=True)
    nlps = [half.get("ner"), half.get("cat"), exact.get("ner"), exact.get("cat")]
    requests = [(nlp, t) for t in TEXTS_ for nlp in nlps]
    for got, (nlp, text) in zip(pipe_mixed(requests), requests):
        doc = nlp(text)
        assert [(e.start, e.end, e.label_) for e in got.ents] == [(e.start, e.end, e.label_) for e in doc.ents]
        assert got.cats == pytest.approx(doc.cats, abs=1e-5)


def test_halved_word_features_compute_the_rounded_model_in_float32_in_both_forwards():
    from spacy.util import registry

    model = registry.get("architectures", "spacy_ptuning.WordFeatures.v1")(**{k: v for k, v in WORDS.items() if k != "@architectures"})
    docs = [spacy.blank("en").make_doc(t) for t in TEXTS_ + [""]]
    model.initialize(X=docs[:3])
    gen = numpy.random.default_rng(0)
    for node, names in _halved(model):  # values that float16 rounds
        for name in names:
            node.set_param(name, (gen.standard_normal(node.get_param(name).shape) * 0.3).astype("float32"))
    _round(model)
    want = model.predict(docs)  # thinc's own forwards over the rounded float32 parameters
    nbytes = sum(n.get_param(name).nbytes for n, names in _halved(model) for name in names)
    assert halve(model) == nbytes // 2
    assert halve(model) == 0  # already halved
    assert all(n._func not in (hashembed_forward, maxout_forward) for n, _ in _halved(model))
    (planned,) = gathered_word_features([(plan_of(model), docs)])
    for got in (model.predict(docs), planned):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert a.dtype == numpy.float32 and a.shape == b.shape
            numpy.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(AdapterError, match="PT-E049.*trained"):
        model.begin_update(docs)


def test_compact_converts_the_row_it_holds(tiny_bert):
    nlp = pipeline(tiny_bert, "ptuning_ner", "prefix", 4, 51)
    (_, _, adapter), = find_adapter_layers(nlp.get_pipe("ptuning_ner"))
    full = adapter.prompt_row().clone()
    before = sum(p.numel() * p.element_size() for p in adapter.prompts.parameters())
    freed = adapter.compact("float16")
    assert adapter.prompts.row.dtype == torch.float16
    assert freed == before - full.numel() * 2
    with torch.no_grad():
        assert torch.equal(adapter.prompt_row(), full.half().float())
    assert adapter.compact("float16") == 0 and adapter.compact("float32") == 0  # never more bytes a value
    assert adapter.prompts.row.dtype == torch.float16
    # A compacted float32 row converts; a bfloat16 one (a bfloat16 backbone's) stays as it is.
    other = pipeline(tiny_bert, "ptuning_ner", "prompt", 3, 52)
    (_, _, second), = find_adapter_layers(other.get_pipe("ptuning_ner"))
    second.compact()
    row = second.prompts.row.clone()
    assert second.compact("float16") == row.numel() * 2
    with torch.no_grad():
        assert torch.equal(second.prompt_row(), row.half().float())
    second.prompts.row = row.bfloat16()
    assert second.compact("float16") == 0 and second.prompts.row.dtype == torch.bfloat16


def test_bad_storage_settings_say_what_to_set(tiny_bert, tmp_path):
    from spacy_ptuning.errors import ConfigError

    pipeline(tiny_bert, "ptuning_ner", "prefix", 2, 61).to_disk(tmp_path / "a")
    with pytest.raises(ValueError, match=r"PT-E054.*compact=True"):
        AdapterPool(tmp_path, storage_dtype="float16")
    with pytest.raises(ValueError, match=r"PT-E054.*unknown dtype.*float16"):
        AdapterPool(tmp_path, compact=True, storage_dtype="bfloat16")
    nlp = spacy.load(tmp_path / "a")
    (_, _, adapter), = find_adapter_layers(nlp.get_pipe("ptuning_ner"))
    with pytest.raises(ConfigError, match="PT-E054"):
        adapter.compact("int8")
    # float32 is the same as none: the exact pool (with or without compact).
    AdapterPool(tmp_path, storage_dtype="float32")
    pool = AdapterPool(tmp_path, check_interval=None, compact=True, storage_dtype="float32")
    (_, _, served), = find_adapter_layers(pool.get("a").get_pipe("ptuning_ner"))
    assert served.prompts.row.dtype == torch.float32
