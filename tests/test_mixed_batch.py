"""Mixed-adapter batches: one backbone pass for rows of many adapters must
give what each pipeline gives alone."""
import numpy
import pytest
import torch

from spacy_ptuning.serving.mixed_batch import MixedStats, _mixed_vectors, pipe_mixed
from spacy_ptuning.pipeline.transformer_model import find_adapter_layers

from .helpers import pipeline as _pipeline

TEXTS = [
    "alice visited paris today",
    "a good film , said bob in london",
    "",
    "carol met dave",
    "the plot was awful and the actor was terrible , really bad movie yesterday",
    "oslo",
]


@pytest.fixture(params=["tiny_bert"])
def pipelines(request):
    backbone = request.getfixturevalue(request.param)
    return _pipelines(backbone)


def _pipelines(backbone):
    return [
        _pipeline(backbone, "ptuning_ner", "prefix", 4, 1),
        _pipeline(backbone, "ptuning_ner", "prompt", 6, 2),
        _pipeline(backbone, "ptuning_textcat", "prefix", 9, 3),
        _pipeline(backbone, "ptuning_textcat", "prompt_encoder", 3, 4),
        _pipeline(backbone, ["ptuning_ner", "ptuning_textcat"], "prefix", 2, 5),
    ]


def _requests(nlps):
    """Every pipeline on every text, interleaved."""
    return [(nlp, text) for text in TEXTS for nlp in nlps]


def test_vectors_equal_each_adapter_alone_on_every_family(any_tiny_backbone):
    nlps = _pipelines(any_tiny_backbone)
    jobs = []
    for nlp in nlps:
        docs = [nlp.make_doc(t) for t in TEXTS]
        for _, pipe in nlp.pipeline:
            for tok2vec, inner, adapter in find_adapter_layers(pipe):
                jobs.append((tok2vec, inner, adapter, docs))
    stats = MixedStats()
    mixed = _mixed_vectors(jobs, max_batch_tokens=4096, stats=stats)
    for tok2vec, _, _, docs in jobs:
        alone = tok2vec.predict(docs)
        for doc, expected in zip(docs, alone):
            got = mixed[(id(tok2vec), id(doc))]
            assert got.shape == expected.shape and got.shape[0] == len(doc)
            numpy.testing.assert_allclose(got, expected, atol=1e-5)
    # Rows of several adapters (prefix and input-prompt alike) shared passes.
    assert stats.passes < len(jobs)
    assert max(stats.adapters_per_pass) >= 4


def test_bfloat16_mixed_batches_agree_to_its_rounding(tiny_bert):
    """With a bfloat16 backbone (what dtype "auto" picks on CPUs with
    AVX512-BF16) a row's vectors depend on its batch at bfloat16 rounding:
    within a few units of 2^-8 of each pipeline alone, far below what a wrong
    prefix or mask would change."""
    nlps = [_pipeline(tiny_bert, "ptuning_ner", "prefix", 4, 1, dtype="bfloat16"),
            _pipeline(tiny_bert, "ptuning_textcat", "prompt", 6, 2, dtype="bfloat16")]
    jobs = []
    for nlp in nlps:
        docs = [nlp.make_doc(t) for t in TEXTS]
        for _, pipe in nlp.pipeline:
            jobs.extend((tok2vec, inner, adapter, docs) for tok2vec, inner, adapter in find_adapter_layers(pipe))
    mixed = _mixed_vectors(jobs, max_batch_tokens=4096, stats=MixedStats())
    worst = 0.0
    for tok2vec, _, _, docs in jobs:
        for doc, expected in zip(docs, tok2vec.predict(docs)):
            got = mixed[(id(tok2vec), id(doc))]
            assert got.shape == expected.shape
            worst = max(worst, float(numpy.abs(got - expected).max(initial=0.0)))
    (a, *_), (b, *_) = jobs[0], jobs[-1]
    docs = jobs[0][3]
    between = max(float(numpy.abs(x - y).max(initial=0.0)) for x, y in zip(a.predict(docs), b.predict(docs)))
    assert worst <= 4 * 2**-8 and between > 100 * 2**-8, (worst, between)  # measured: 2^-8 and 3.0


def test_pipe_mixed_equals_each_pipeline_alone(pipelines):
    requests = _requests(pipelines)
    stats = MixedStats()
    docs = pipe_mixed(requests, stats=stats)
    assert len(docs) == len(requests)
    # Each pipeline alone, on its own texts (spaCy answers an empty doc
    # differently alone and in a batch, so compare batch with batch).
    alone_docs = {id(nlp): iter(list(nlp.pipe(TEXTS))) for nlp in pipelines}
    for (nlp, text), doc in zip(requests, docs):
        alone = next(alone_docs[id(nlp)])
        assert doc.text == alone.text == text
        assert [(e.start_char, e.end_char, e.label_) for e in doc.ents] == [
            (e.start_char, e.end_char, e.label_) for e in alone.ents
        ]
        assert doc.cats.keys() == alone.cats.keys()
        for label in alone.cats:
            assert doc.cats[label] == pytest.approx(alone.cats[label], abs=1e-5)
    # The texts predict something: the comparison is not of empty results.
    assert any(doc.ents for doc in docs) and any(doc.cats for doc in docs)
    # 6 adapters x 5 non-empty texts: passes are per length group (5 texts of
    # different lengths), not per adapter, and hold every adapter.
    assert stats.rows == 6 * 5 and stats.passes <= 5
    assert max(stats.adapters_per_pass) == 6


def test_pipeline_with_a_component_between_adapters_runs_alone(tiny_bert):
    nlp = _pipeline(tiny_bert, ["ptuning_ner", "ptuning_textcat"], "prefix", 2, 7)
    nlp.add_pipe("merge_entities", after="ptuning_ner")
    other = _pipeline(tiny_bert, "ptuning_ner", "prefix", 3, 8)
    requests = _requests([nlp, other])
    stats = MixedStats()
    docs = pipe_mixed(requests, stats=stats)
    alone_docs = {id(p): iter(list(p.pipe(TEXTS))) for p in (nlp, other)}
    for (p, text), doc in zip(requests, docs):
        alone = next(alone_docs[id(p)])
        assert [t.text for t in doc] == [t.text for t in alone]
        assert doc.cats == pytest.approx(alone.cats, abs=1e-5)
    assert stats.rows == 5  # only `other`'s rows went through the mixed pass


def test_mixed_batch_needs_no_gradients_and_changes_no_adapter(pipelines):
    before = [
        {k: v.clone() for k, v in adapter.state_dict().items()}
        for nlp in pipelines for _, pipe in nlp.pipeline for _, _, adapter in find_adapter_layers(pipe)
    ]
    pipe_mixed(_requests(pipelines))
    after = [
        adapter.state_dict()
        for nlp in pipelines for _, pipe in nlp.pipeline for _, _, adapter in find_adapter_layers(pipe)
    ]
    for a, b in zip(before, after):
        for k in a:
            assert torch.equal(a[k], b[k])
