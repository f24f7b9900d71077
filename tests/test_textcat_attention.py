"""TextCatAttention.v1: a text classifier head pooling token vectors by mean
and by a learned attention. Its scores are checked against numpy computing
the same formula from the trained parameters; it trains with the backbone
frozen, round-trips, and serves through mixed-adapter batches."""
import numpy
import pytest
import spacy
from spacy.training import Example
from spacy.util import fix_random_seed
from thinc.api import Adam

from spacy_ptuning.errors import ConfigError
from spacy_ptuning.serving.mixed_batch import pipe_mixed

from .helpers import TEXTS, assert_only_prompts_and_head_train, small_tok2vec

DATA = [("a good film", "POS"), ("an awful plot", "NEG"), ("really great actor", "POS"),
        ("a terrible scene", "NEG"), ("nice story today , great", "POS"), ("poor movie", "NEG")]


def _pipeline(backbone, *, hidden_width=0, exclusive=True, words=True, method="prefix", seed=0):
    """A classifier with the attention head over ``backbone``, trained a few
    steps (so that the attention query and prompts are away from their
    initialisation); returns (nlp, component name)."""
    fix_random_seed(seed)
    nlp = spacy.blank("en")
    tok2vec = small_tok2vec(backbone, method, words)
    factory = "ptuning_textcat" if exclusive else "ptuning_textcat_multilabel"
    nlp.add_pipe(factory, config={"model": {"@architectures": "spacy_ptuning.TextCatAttention.v1",
                                            "exclusive_classes": exclusive, "hidden_width": hidden_width,
                                            "tok2vec": tok2vec}})
    examples = [Example.from_dict(nlp.make_doc(t), {"cats": {"POS": float(lab == "POS"), "NEG": float(lab == "NEG")}})
                for t, lab in DATA]
    optimizer = nlp.initialize(lambda: examples)
    optimizer.learn_rate = 0.05
    for _ in range(4):
        nlp.update(examples, sgd=optimizer)
    return nlp, factory


def _layer_norm(x, layer):
    mu = x.mean(axis=1, keepdims=True)
    var = x.var(axis=1, keepdims=True) + 1e-08
    return (x - mu) / numpy.sqrt(var) * layer.get_param("G") + layer.get_param("b")


def _reference(model, docs):
    """The head's formula in numpy, from its parameters and its tok2vec's
    vectors: z = [mean_t x_t, sum_t softmax_t(x_t . q) x_t]; z through the
    maxout + layer norm (if any); then softmax or logistic."""
    vectors = model.get_ref("tok2vec").predict(docs)
    q = model.get_ref("attention_layer").get_param("Q")
    pooled = []
    for x in vectors:
        a = numpy.exp(x @ q - (x @ q).max())
        a /= a.sum()
        pooled.append(numpy.concatenate([x.mean(axis=0), (a[:, None] * x).sum(axis=0)]))
    z = numpy.stack(pooled)
    if model.has_ref("hidden_layer"):
        maxout, norm = model.get_ref("hidden_layer").layers
        W, b = maxout.get_param("W"), maxout.get_param("b")  # (nO, nP, nI), (nO, nP)
        z = _layer_norm((numpy.einsum("opi,ni->nop", W, z) + b).max(axis=2), norm)
    out = model.get_ref("output_layer")
    logits = z @ out.get_param("W").T + out.get_param("b")
    if model.attrs["multi_label"]:
        return 1 / (1 + numpy.exp(-logits))
    e = numpy.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("hidden_width,exclusive", [(0, True), (6, True), (6, False)])
def test_scores_equal_the_formula_and_the_backbone_stays_frozen(tiny_bert, hidden_width, exclusive):
    fix_random_seed(0)
    nlp, name = _pipeline(tiny_bert, hidden_width=hidden_width, exclusive=exclusive)
    component = nlp.get_pipe(name)
    model = component.model
    docs = [nlp.make_doc(t) for t in TEXTS]
    got = model.predict(docs)
    want = _reference(model, docs)
    assert numpy.allclose(got, want, atol=1e-5), numpy.abs(got - want).max()
    # The attention is not uniform (else it would equal the mean): the query trained.
    q = model.get_ref("attention_layer").get_param("Q")
    x = model.get_ref("tok2vec").predict(docs[3:4])[0]
    assert float(numpy.ptp(x @ q)) > 1e-3


def test_training_moves_prompts_query_and_head_not_the_backbone(tiny_bert):
    fix_random_seed(0)
    nlp = spacy.blank("en")
    tok2vec = {"@architectures": "spacy_ptuning.PTuningTransformer.v2", "backbone": tiny_bert,
               "method": "prefix", "num_virtual_tokens": 3, "dtype": "float32"}
    nlp.add_pipe("ptuning_textcat", config={"model": {"@architectures": "spacy_ptuning.TextCatAttention.v1",
                                                      "exclusive_classes": True, "hidden_width": 4, "tok2vec": tok2vec}})
    examples = [Example.from_dict(nlp.make_doc(t), {"cats": {"POS": float(lab == "POS"), "NEG": float(lab == "NEG")}})
                for t, lab in DATA]
    nlp.initialize(lambda: examples)
    optimizer = Adam(0.05)
    assert_only_prompts_and_head_train(nlp.get_pipe("ptuning_textcat").model,
                                       lambda: nlp.update(examples, sgd=optimizer))


def test_round_trips_and_serves_in_mixed_batches(tiny_bert, tmp_path):
    nlps = [_pipeline(tiny_bert, hidden_width=5, seed=1)[0], _pipeline(tiny_bert, method="prompt", words=False, seed=2)[0],
            _pipeline(tiny_bert, hidden_width=0, exclusive=False, method="prompt_encoder", seed=3)[0]]
    nlps[0].to_disk(tmp_path / "p")
    loaded = spacy.load(tmp_path / "p")
    for a, b in zip(nlps[0].pipe(TEXTS), loaded.pipe(TEXTS)):
        assert a.cats == b.cats
    requests = [(nlp, text) for text in TEXTS for nlp in nlps + [loaded]]
    alone = {id(nlp): iter(list(nlp.pipe(TEXTS))) for nlp in nlps + [loaded]}
    for (nlp, text), doc in zip(requests, pipe_mixed(requests)):
        want = next(alone[id(nlp)])
        assert doc.cats.keys() == want.cats.keys()
        for label, score in want.cats.items():
            assert doc.cats[label] == pytest.approx(score, abs=1e-5)
    # The classifiers disagree with each other: the comparison is of real answers.
    first = [doc.cats["POS"] for doc in nlps[0].pipe(TEXTS)]
    second = [doc.cats["POS"] for doc in nlps[1].pipe(TEXTS)]
    assert max(abs(a - b) for a, b in zip(first, second)) > 1e-3


def test_a_label_added_after_training_resizes_the_output(tiny_bert):
    nlp, name = _pipeline(tiny_bert, hidden_width=3)
    component = nlp.get_pipe(name)
    docs = [nlp.make_doc(t) for t in TEXTS]
    before = component.model.predict(docs)
    component.add_label("MIXED")
    after = component.model.predict(docs)
    assert after.shape == (len(TEXTS), 3)
    # The old labels keep their logits; the new one starts far below them.
    assert numpy.allclose(after[:, :2] / after[:, :2].sum(axis=1, keepdims=True), before, atol=1e-5)
    assert float(after[:, 2].max()) < 1e-6


@pytest.mark.parametrize("setting,value", [("hidden_width", -1), ("maxout_pieces", 0)])
def test_bad_settings_get_a_numbered_error(tiny_bert, setting, value):
    nlp = spacy.blank("en")
    tok2vec = {"@architectures": "spacy_ptuning.PTuningTransformer.v1", "backbone": tiny_bert,
               "method": "prefix", "num_virtual_tokens": 2}
    with pytest.raises(ConfigError, match=rf"PT-E053.*{setting}"):
        nlp.add_pipe("ptuning_textcat", config={"model": {"@architectures": "spacy_ptuning.TextCatAttention.v1",
                                                          "exclusive_classes": True, setting: value, "tok2vec": tok2vec}})
