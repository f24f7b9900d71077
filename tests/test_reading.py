"""PTuningTransformer.v2: what it reads from the backbone beside the last
layer (a learned mix of hidden states, ``layer_mix.py``) and what it adds
beside the transformer (word features, ``word_features.py``)."""
import numpy
import pytest
import spacy
import torch

from spacy_ptuning.model.adapter import Adapter
from spacy_ptuning.model.backbone import load_backbone
from spacy_ptuning.errors import ConfigError
from spacy_ptuning.model.injection import injected_prefix
from spacy_ptuning.serving.mixed_batch import MixedStats, pipe_mixed
from spacy_ptuning.pipeline.transformer_model import find_adapter_layers

from .helpers import pipeline

TEXTS = ["alice visited paris today", "", "a good film , said bob in london", "oslo",
         "the plot was awful and the actor was terrible , really bad movie yesterday"]


def _batch(backbone, texts):
    with backbone.borrow_tokenizer() as tok:
        enc = tok(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _set_mix(adapter, weights, scale):
    with torch.no_grad():
        adapter.mix.weights.copy_(torch.tensor(weights))
        adapter.mix.scale.fill_(scale)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_mix_is_the_softmax_weighted_sum_of_hf_hidden_states(tiny_bert, method):
    """The reference is HF's own output_hidden_states, mixed here by hand
    with numpy: prefixes injected by the (separately tested) injection,
    input prompts put in front of the text's embeddings."""
    backbone = load_backbone(tiny_bert, dtype="float32")
    adapter = Adapter(backbone, method=method, num_virtual_tokens=3, layer_mix=[0, -1, 1])
    _set_mix(adapter, [0.3, -1.0, 2.0], 1.7)
    adapter.eval()
    ids, mask = _batch(backbone, ["alice visited paris", "oslo"])
    with torch.no_grad():
        got = adapter(ids, mask).numpy()
        model, P = backbone.model, 3
        if method == "prefix":
            with injected_prefix(backbone, adapter.prompt_values(2)):
                full = torch.cat([mask.new_ones((2, P)), mask], dim=1)
                states = model(input_ids=ids, attention_mask=full, output_hidden_states=True).hidden_states
            states = [h.numpy() for h in states]
        else:
            embeds = torch.cat([adapter.prompt_values(2), model.get_input_embeddings()(ids)], dim=1)
            full = torch.cat([mask.new_ones((2, P)), mask], dim=1)
            states = model(inputs_embeds=embeds, attention_mask=full, output_hidden_states=True).hidden_states
            states = [h[:, P:].numpy() for h in states]
    w = numpy.exp([0.3, -1.0, 2.0])
    w /= w.sum()
    last = backbone.num_layers
    expected = 1.7 * (w[0] * states[0] + w[1] * states[last] + w[2] * states[1])
    real = mask.numpy().astype(bool)
    numpy.testing.assert_allclose(got[real], expected[real], atol=1e-5)
    assert numpy.abs(expected - states[last]).max() > 0.1  # not the last layer in disguise


def test_a_mix_of_the_last_layer_alone_equals_v1(tiny_bert):
    backbone = load_backbone(tiny_bert, dtype="float32")
    torch.manual_seed(0)
    plain = Adapter(backbone, num_virtual_tokens=4)
    mixed = Adapter(backbone, num_virtual_tokens=4, layer_mix=[-1])
    mixed.prompts.load_state_dict(plain.prompts.state_dict())
    ids, mask = _batch(backbone, ["carol met dave", "bob"])
    with torch.no_grad():
        numpy.testing.assert_allclose(mixed(ids, mask).numpy(), plain(ids, mask).numpy(), atol=1e-6)
    assert set(plain.state_dict()) == {k for k in mixed.state_dict() if not k.startswith("mix.")}


@pytest.mark.parametrize("value, problem", [
    ([], "non-empty"), ([3, 99], "99"), ([-1, 2], "twice"), ("last", "non-empty"), ([1.5], "1.5"),
])
def test_bad_layer_mix_is_a_numbered_error(tiny_bert, value, problem):
    backbone = load_backbone(tiny_bert, dtype="float32")
    with pytest.raises(ConfigError, match=r"PT-E046.*" + problem + r".*0 \(the embedding output\) to 2"):
        Adapter(backbone, layer_mix=value)


@pytest.mark.parametrize("option, value", [("width", 0), ("depth", 0), ("rows", [100]), ("window_size", -1)])
def test_bad_word_features_are_a_numbered_error(option, value):
    config = {"@architectures": "spacy_ptuning.WordFeatures.v1", option: value}
    with pytest.raises(ConfigError, match=rf"PT-E047.*{option}"):
        spacy.util.registry.resolve({"x": config})


def test_word_features_widen_the_vectors_and_train_with_the_prompts(tiny_bert):
    nlp = pipeline(tiny_bert, "ptuning_ner", "prefix", 4, 1, word_features={
        "@architectures": "spacy_ptuning.WordFeatures.v1", "width": 8})
    (inner, _, adapter), = find_adapter_layers(nlp.get_pipe("ptuning_ner"))
    tok2vec = next(n for n in nlp.get_pipe("ptuning_ner").model.walk() if n.layers and n.layers[0] is inner)
    docs = [nlp.make_doc(t) for t in TEXTS]
    vectors = tok2vec.predict(docs)
    prompted = inner.predict(docs)
    for doc, v, p in zip(docs, vectors, prompted):
        assert v.shape == (len(doc), adapter.backbone.hidden_width + 8)
        numpy.testing.assert_array_equal(v[:, : p.shape[1]], p)  # the transformer's own, then the words'
    # One update moves the word features too (they are trained, not frozen).
    from spacy.training import Example
    hashes = [n for n in tok2vec.walk() if n.name.startswith("hashembed")]
    before = [n.get_param("E").copy() for n in hashes]
    examples = [Example.from_dict(nlp.make_doc("alice visited paris"), {"entities": [(0, 5, "PER")]})]
    nlp.update(examples, sgd=spacy.util.registry.optimizers.get("Adam.v1")(0.01))
    assert hashes and any(not numpy.array_equal(b, n.get_param("E")) for b, n in zip(before, hashes))


def test_word_features_that_are_not_a_model_are_a_numbered_error(tiny_bert):
    from spacy_ptuning.pipeline.architectures import ptuning_transformer_v2

    with pytest.raises(ConfigError, match="PT-E048"):
        ptuning_transformer_v2(backbone=tiny_bert, dtype="float32", word_features="SUFFIX")


def _v2_pipelines(backbone):
    words = {"@architectures": "spacy_ptuning.WordFeatures.v1", "width": 8}
    return [
        pipeline(backbone, "ptuning_ner", "prefix", 4, 1, layer_mix=[-1, -2, 0]),
        pipeline(backbone, "ptuning_ner", "prompt", 6, 2, layer_mix=[1, 2], word_features=words),
        pipeline(backbone, "ptuning_textcat", "prompt_encoder", 3, 3, layer_mix=[0, 2]),
        pipeline(backbone, "ptuning_textcat", "prefix", 5, 4, word_features=words),
        pipeline(backbone, "ptuning_ner", "prefix", 2, 5),  # v1 beside them
    ]


@pytest.mark.parametrize("backbone", ["tiny_bert", "tiny_roberta"])
def test_every_v2_option_through_pipe_mixed_equals_each_pipeline_alone(request, backbone):
    nlps = _v2_pipelines(request.getfixturevalue(backbone))
    requests = [(nlp, t) for t in TEXTS if t for nlp in nlps]
    stats = MixedStats()
    docs = pipe_mixed(requests, stats=stats)
    alone = {id(nlp): iter(list(nlp.pipe([t for t in TEXTS if t]))) for nlp in nlps}
    for (nlp, text), doc in zip(requests, docs):
        ref = next(alone[id(nlp)])
        assert [(e.start_char, e.end_char, e.label_) for e in doc.ents] == [
            (e.start_char, e.end_char, e.label_) for e in ref.ents]
        for label in ref.cats:
            assert doc.cats[label] == pytest.approx(ref.cats[label], abs=1e-5)
    assert max(stats.adapters_per_pass) == len(nlps)  # really one shared pass
    # ... and the mixed vectors themselves equal each tok2vec alone.
    from spacy_ptuning.serving.mixed_batch import _mixed_vectors
    jobs = []
    for nlp in nlps:
        own = [nlp.make_doc(t) for t in TEXTS]
        for _, pipe in nlp.pipeline:
            jobs.extend((t, i, a, own) for t, i, a in find_adapter_layers(pipe))
    mixed = _mixed_vectors(jobs, 4096, MixedStats())
    for tok2vec, _, _, own in jobs:
        for doc, expected in zip(own, tok2vec.predict(own)):
            numpy.testing.assert_allclose(mixed[(id(tok2vec), id(doc))], expected, atol=1e-5)


def test_v2_pipeline_saves_and_loads_predicting_the_same(tiny_bert, tmp_path):
    nlp = pipeline(tiny_bert, ["ptuning_ner", "ptuning_textcat"], "prefix", 3, 7, layer_mix=[0, -1],
                   word_features={"@architectures": "spacy_ptuning.WordFeatures.v1", "width": 8})
    nlp.to_disk(tmp_path / "p")
    loaded = spacy.load(tmp_path / "p")
    for a, b in zip(nlp.pipe(TEXTS), loaded.pipe(TEXTS)):
        assert [(e.start, e.end, e.label_) for e in a.ents] == [(e.start, e.end, e.label_) for e in b.ents]
        for label in a.cats:
            assert b.cats[label] == pytest.approx(a.cats[label], abs=1e-6)
    (_, _, adapter), = find_adapter_layers(loaded.get_pipe("ptuning_ner"))
    assert adapter.mix is not None and adapter.mix.layers == [0, 2]
    original = find_adapter_layers(nlp.get_pipe("ptuning_ner"))[0][2]
    assert torch.equal(adapter.mix.weights, original.mix.weights)
