"""Word features of many pipelines computed together
(``pipeline.gathered_words``) equal each model's own thinc forward, and a
mixed-adapter batch uses them instead of running the models."""
import numpy
import pytest
import spacy
import torch
from spacy.util import registry
from thinc.api import Model

from spacy_ptuning.pipeline.architectures import beside_of
from spacy_ptuning.pipeline.gathered_words import gathered_word_features, plan_of
from spacy_ptuning.pipeline.transformer_model import find_adapter_layers
from spacy_ptuning.serving.mixed_batch import pipe_mixed

from .helpers import TEXTS, pipeline

NLP = spacy.blank("en")
DOCS = [NLP.make_doc(t) for t in TEXTS + ["", "Naloxone reversed the clonidine-induced hypotension .", "x"]]

SETTINGS = {  # WordFeatures.v1 settings
    "defaults": {},
    "narrow-deep": {"width": 8, "depth": 4, "window_size": 1, "maxout_pieces": 2},
    "wide-window": {"width": 16, "depth": 3, "window_size": 2},
    "no-window": {"width": 8, "depth": 1, "window_size": 0},
    "two-attrs": {"width": 8, "attrs": ["SUFFIX", "SHAPE"], "rows": [50, 30]},
}


def _initialised(model: Model, seed: int) -> Model:
    """`model` initialised on DOCS, every parameter then moved off its
    initialisation (a layer norm starts at the identity)."""
    model.initialize(X=DOCS[:3])
    gen = torch.Generator().manual_seed(seed)
    for node in model.walk():
        for name in node.param_names:
            if node.has_param(name):
                value = node.get_param(name)
                noise = torch.randn(value.shape, generator=gen).numpy().astype(value.dtype)
                node.set_param(name, value + noise * 0.3)
    return model


def _word_features(seed=0, **settings) -> Model:
    return _initialised(registry.get("architectures", "spacy_ptuning.WordFeatures.v1")(**settings), seed)


def _assert_same(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.shape == b.shape
        numpy.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_gathered_features_equal_the_models_own_forward(name):
    model = _word_features(**SETTINGS[name])
    plan = plan_of(model)
    assert plan is not None
    (got,) = gathered_word_features([(plan, DOCS)])
    _assert_same(got, model.predict(DOCS))


def test_several_models_in_one_call_each_equal_its_own():
    """Groups of different settings and docs, a doc in several groups (read
    once), an all-empty group and a group of one doc: each as its model."""
    models = [_word_features(seed=k, **SETTINGS[name]) for k, name in enumerate(SETTINGS)]
    models.append(_word_features(seed=9))  # same settings as models[0], other weights
    groups = [(model, DOCS[k % 3:: 2]) for k, model in enumerate(models)]
    groups += [(models[1], [DOCS[6]]), (models[2], [DOCS[8]]), (models[0], [DOCS[6], DOCS[6]])]
    got = gathered_word_features([(plan_of(m), docs) for m, docs in groups])
    for (model, docs), arrays in zip(groups, got):
        _assert_same(arrays, model.predict(docs))
    assert got[-1][0].shape == (0, 64)


def test_spacys_hash_embed_cnn_has_a_plan_and_a_character_embedding_has_none():
    cnn = _initialised(registry.get("architectures", "spacy.HashEmbedCNN.v2")(
        width=12, depth=2, embed_size=300, window_size=1, maxout_pieces=3, subword_features=True,
        pretrained_vectors=None), 3)
    (got,) = gathered_word_features([(plan_of(cnn), DOCS)])
    _assert_same(got, cnn.predict(DOCS))
    chars = registry.get("architectures", "spacy.Tok2Vec.v2")(
        embed=registry.get("architectures", "spacy.CharacterEmbed.v2")(width=12, rows=100, nM=8, nC=4, include_static_vectors=False),
        encode=registry.get("architectures", "spacy.MaxoutWindowEncoder.v2")(width=12, window_size=1, maxout_pieces=3, depth=2))
    assert plan_of(_initialised(chars, 4)) is None


def test_an_uninitialised_model_has_no_plan():
    model = registry.get("architectures", "spacy_ptuning.WordFeatures.v1")(width=8)
    assert plan_of(model) is None  # its tables do not exist yet: it runs (and fails) as itself


WORDS = {"@architectures": "spacy_ptuning.WordFeatures.v1", "width": 8}


def test_a_mixed_batch_answers_word_features_without_running_the_models(tiny_bert):
    nlps = [
        pipeline(tiny_bert, "ptuning_ner", "prompt", 6, 2, layer_mix=[1, 2], word_features=WORDS),
        pipeline(tiny_bert, ["ptuning_ner", "ptuning_textcat"], "prefix", 5, 4, word_features=WORDS),
        pipeline(tiny_bert, "ptuning_textcat", "prefix", 3, 5, word_features={**WORDS, "depth": 3}),
        pipeline(tiny_bert, "ptuning_ner", "prefix", 2, 6),  # v1 beside them
    ]
    texts = [t for t in TEXTS if t]
    alone = {id(nlp): list(nlp.pipe(texts)) for nlp in nlps}
    # What each component's tok2vec (transformer | word features) gives alone.
    besides = []
    for nlp in nlps:
        for _, pipe in nlp.pipeline:
            for tok2vec, _, _ in find_adapter_layers(pipe):
                beside = beside_of(pipe.model, tok2vec)
                if beside is not None:
                    own = beside.predict([nlp.make_doc(t) for t in texts])
                    besides.append((beside, dict(zip(texts, own))))
    assert len(besides) == 4
    # The word-features models may not run in the mixed batch: their plans do.
    words = {node.id for beside, _ in besides for node in beside.layers[1].walk()}
    ran = []
    seen = []
    import spacy_ptuning.pipeline.architectures as architectures
    original_precomputed, original_call = architectures.precomputed, Model.__call__

    def spy(model, docs):
        found = original_precomputed(model, docs)
        if model._func is architectures._beside_forward:
            seen.append((model, [doc.text for doc in docs], found))
        return found

    def call(model, X, is_train=False):
        if model.id in words:
            ran.append(model.name)
        return original_call(model, X, is_train=is_train)

    architectures.precomputed, Model.__call__ = spy, call
    try:
        requests = [(nlp, t) for t in texts for nlp in nlps]
        docs = pipe_mixed(requests)
    finally:
        architectures.precomputed, Model.__call__ = original_precomputed, original_call
    assert ran == []
    position = {id(nlp): 0 for nlp in nlps}
    for (nlp, _), doc in zip(requests, docs):
        ref = alone[id(nlp)][position[id(nlp)]]
        position[id(nlp)] += 1
        assert [(e.start, e.end, e.label_) for e in doc.ents] == [(e.start, e.end, e.label_) for e in ref.ents]
        for label in ref.cats:
            assert doc.cats[label] == pytest.approx(ref.cats[label], abs=1e-5)
    # Each beside node answered (once, for all its docs: in the order its
    # component asks, e.g. by length) with the vectors it gives alone.
    for beside, expected in besides:
        ((asked, answered),) = [(texts_, found) for model, texts_, found in seen if model is beside]
        assert sorted(asked) == sorted(texts)
        _assert_same(answered, [expected[t] for t in asked])
