"""ptuning_ner_tagger: entities by BILUO token tagging. The decoder is
checked against a brute-force search over every tag sequence, the scores and
entities against numpy computing the softmax from the trained weights, the
loss against the cross-entropy gradient written out; it trains with the
backbone frozen, round-trips, serves through mixed-adapter batches and the
adapter pool, and refuses bad labels with numbered errors."""
import itertools

import numpy
import pytest
import spacy
from spacy.tokens import Span
from spacy.training import Example
from spacy.util import fix_random_seed
from thinc.api import Adam

from spacy_ptuning.errors import ConfigError
from spacy_ptuning.pipeline.entity_tagger import decode, tag_names
from spacy_ptuning.serving.mixed_batch import pipe_mixed, run_items
from spacy_ptuning.serving.pool import AdapterPool

from .helpers import TEXTS, assert_only_prompts_and_head_train, pipeline, small_tok2vec

DATA = [
    ("alice visited paris today", [(0, 5, "PER"), (14, 19, "LOC")]),
    ("bob works at acme in london", [(0, 3, "PER"), (13, 17, "ORG"), (21, 27, "LOC")]),
    ("carol met dave in rome", [(0, 5, "PER"), (10, 14, "PER"), (18, 22, "LOC")]),
    ("the city of oslo", [(12, 16, "LOC")]),
]


def _log_softmax(scores):
    shifted = scores - scores.max(axis=1, keepdims=True)
    return shifted - numpy.log(numpy.exp(shifted).sum(axis=1, keepdims=True))


def _valid(tags):
    """Whether a BILUO sequence is a set of well-formed entities (written
    out as a state machine, apart from the decoder's transition tables)."""
    inside = None  # the type of the entity open at this point
    for tag in tags:
        move, _, label = tag.partition("-")
        if inside is None and move in ("I", "L"):
            return False
        if inside is not None and (move not in ("I", "L") or label != inside):
            return False
        inside = label if move in ("B", "I") else None
    return inside is None


@pytest.mark.parametrize("n_labels", [1, 2])
def test_decode_is_the_best_valid_sequence(n_labels):
    names = tag_names([f"T{k}" for k in range(n_labels)])
    rng = numpy.random.default_rng(n_labels)
    valid = {n: [s for s in itertools.product(range(len(names)), repeat=n) if _valid([names[i] for i in s])]
             for n in (1, 2, 3, 4)}
    for _ in range(25):
        # One batch of docs of different lengths (an empty one too): they are decoded together.
        lengths = [4, 1, 0, 3, 2, 4]
        batch = [_log_softmax(rng.normal(size=(n, len(names))) * 3) for n in lengths]
        for log_probs, got in zip(batch, decode(batch, n_labels)):
            n = len(log_probs)
            assert got.shape == (n,)
            if n == 0:
                continue
            totals = [log_probs[numpy.arange(n), list(s)].sum() for s in valid[n]]
            assert _valid([names[i] for i in got])
            assert log_probs[numpy.arange(n), got].sum() == pytest.approx(max(totals), abs=1e-9)
    assert decode([], n_labels) == []


def _tagger(backbone, *, method="prefix", words=True, seed=0, steps=4):
    """A tagger over ``backbone`` trained a few steps on DATA (prompts and
    softmax away from their initialisation)."""
    fix_random_seed(seed)
    nlp = spacy.blank("en")
    tok2vec = small_tok2vec(backbone, method, words)
    nlp.add_pipe("ptuning_ner_tagger", name="ner", config={"model": {"tok2vec": tok2vec}})
    examples = _examples(nlp)
    optimizer = nlp.initialize(lambda: examples)
    optimizer.learn_rate = 0.05
    for _ in range(steps):
        nlp.update(examples, sgd=optimizer)
    return nlp


def _examples(nlp):
    return [Example.from_dict(nlp.make_doc(t), {"entities": ents}) for t, ents in DATA]


def test_labels_tags_and_the_saved_pipeline(tiny_bert, tmp_path):
    nlp = _tagger(tiny_bert)
    tagger = nlp.get_pipe("ner")
    assert tagger.labels == ("LOC", "ORG", "PER")
    assert tagger.tag_names == ["O", "B-LOC", "I-LOC", "L-LOC", "U-LOC", "B-ORG", "I-ORG", "L-ORG", "U-ORG",
                                "B-PER", "I-PER", "L-PER", "U-PER"]
    assert tagger.model.get_dim("nO") == 13
    nlp.to_disk(tmp_path / "p")
    loaded = spacy.load(tmp_path / "p")
    assert loaded.get_pipe("ner").labels == tagger.labels
    docs = [nlp.make_doc(t) for t in TEXTS]
    for a, b in zip(tagger.model.predict(docs), loaded.get_pipe("ner").model.predict(docs)):
        assert numpy.array_equal(a, b)


def test_entities_are_the_decoded_softmax_of_the_vectors(tiny_bert):
    nlp = _tagger(tiny_bert, steps=30)
    model = nlp.get_pipe("ner").model
    names = nlp.get_pipe("ner").tag_names
    softmax = model.layers[-1].layers[0]  # spaCy's Tagger.v2: chain(tok2vec, with_array(Softmax))
    W, b = softmax.get_param("W"), softmax.get_param("b")
    texts = TEXTS + [t for t, _ in DATA]
    docs = [nlp.make_doc(t) for t in texts]
    vectors = model.get_ref("tok2vec").predict(docs)
    found = 0
    for text, x in zip(texts, vectors):
        logits = x @ W.T + b
        tags = [names[i] for i in decode([_log_softmax(logits.astype("float64"))], 3)[0]]
        doc = nlp(text)
        want = [(s.start, s.end, s.label_) for s in spacy.training.biluo_tags_to_spans(doc, tags)]
        assert [(e.start, e.end, e.label_) for e in doc.ents] == want
        assert all(t.ent_iob_ in ("B", "I", "O") for t in doc)
        found += len(want)
    assert found >= 5  # trained: real entities are compared, not only "O"


def test_loss_is_the_cross_entropy_of_the_annotated_tokens(tiny_bert):
    nlp = _tagger(tiny_bert)
    tagger = nlp.get_pipe("ner")
    # The second token's annotation is missing: it gives no loss.
    egs = [Example.from_dict(nlp.make_doc("alice visited paris today"), {"entities": ["U-PER", "-", "U-LOC", "O"]}),
           Example.from_dict(nlp.make_doc("bob met carol dave"), {"entities": ["U-PER", "O", "B-PER", "L-PER"]})]
    gold = [{0: "U-PER", 2: "U-LOC", 3: "O"}, {0: "U-PER", 1: "O", 2: "B-PER", 3: "L-PER"}]
    scores, _ = tagger.model.begin_update([eg.predicted for eg in egs])
    loss, d_scores = tagger.get_loss(egs, scores)
    names = tagger.tag_names
    total = 0.0
    for probs, d, tags in zip(scores, d_scores, gold):
        assert numpy.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
        want = numpy.zeros_like(probs)
        for t, tag in tags.items():
            want[t] = probs[t]
            want[t, names.index(tag)] -= 1.0
        assert numpy.allclose(d, want, atol=1e-6)
        total += float((want ** 2).sum())
    assert loss == pytest.approx(total, rel=1e-4)


def test_training_moves_prompts_and_softmax_not_the_backbone(tiny_bert):
    nlp = _tagger(tiny_bert, steps=0)
    optimizer = Adam(0.05)
    assert_only_prompts_and_head_train(nlp.get_pipe("ner").model, lambda: nlp.update(_examples(nlp), sgd=optimizer))


def test_entities_set_before_it_are_kept(tiny_bert):
    nlp = _tagger(tiny_bert)
    tagger = nlp.get_pipe("ner")
    names = tagger.tag_names
    doc = nlp.make_doc("bob works at acme in london")
    doc.ents = [Span(doc, 3, 4, label="COMPANY")]
    # Predicted: bob (PER), "at acme" (ORG, overlaps the preset entity), london (LOC).
    tags = ["U-PER", "O", "B-ORG", "L-ORG", "O", "U-LOC"]
    tagger.set_annotations([doc], [numpy.array([names.index(t) for t in tags])])
    assert [(e.start, e.end, e.label_) for e in doc.ents] == [(0, 1, "PER"), (3, 4, "COMPANY"), (5, 6, "LOC")]
    assert [t.ent_iob_ for t in doc] == ["B", "O", "O", "B", "O", "B"]


def test_mixed_batches_and_the_pool_equal_each_pipeline_alone(tiny_bert, tmp_path):
    nlps = [_tagger(tiny_bert, seed=1, steps=20), _tagger(tiny_bert, method="prompt", words=False, seed=2, steps=20),
            _tagger(tiny_bert, method="prompt_encoder", seed=3, steps=20),
            pipeline(tiny_bert, ["ptuning_ner", "ptuning_textcat"], "prefix", 2, 5)]
    texts = TEXTS + [t for t, _ in DATA]
    alone = {id(nlp): [[(e.start_char, e.end_char, e.label_) for e in d.ents] for d in nlp.pipe(texts)] for nlp in nlps}
    assert sum(len(ents) for nlp in nlps[:3] for ents in alone[id(nlp)]) >= 10
    requests = [(nlp, text) for text in texts for nlp in nlps]
    got = pipe_mixed(requests)
    for k, ((nlp, text), doc) in enumerate(zip(requests, got)):
        assert [(e.start_char, e.end_char, e.label_) for e in doc.ents] == alone[id(nlp)][k // len(nlps)], text
    # Served from a folder: the pool loads it (compact, float16 storage too) and describes it as NER.
    nlps[0].to_disk(tmp_path / "tagger")
    for storage in (None, "float16"):
        pool = AdapterPool(tmp_path, compact=True, storage_dtype=storage)
        described = [pool.describe("tagger")["components"]]  # from the folder
        served = pool.get("tagger")
        described.append(pool.describe("tagger")["components"])  # from the loaded pipeline
        for info in described:
            assert [(c["factory"], c["task"], c["labels"]) for c in info] == [
                ("ptuning_ner_tagger", "ner", ["LOC", "ORG", "PER"])]
        docs = run_items([(served, t) for t in texts])
        want = alone[id(nlps[0])] if storage is None else [[(e.start_char, e.end_char, e.label_) for e in d.ents]
                                                           for d in served.pipe(texts)]
        assert [[(e.start_char, e.end_char, e.label_) for e in d.ents] for d in docs] == want


def test_bad_labels_get_numbered_errors(tiny_bert):
    nlp = spacy.blank("en")
    tok2vec = {"@architectures": "spacy_ptuning.PTuningTransformer.v1", "backbone": tiny_bert,
               "num_virtual_tokens": 2, "dtype": "float32"}
    tagger = nlp.add_pipe("ptuning_ner_tagger", config={"model": {"tok2vec": tok2vec}})
    with pytest.raises(ConfigError, match=r"PT-E055"):
        tagger.add_label(" PER")
    no_entities = [Example.from_dict(nlp.make_doc("alice visited paris"), {"entities": []})]
    with pytest.raises(ConfigError, match=r"PT-E057"):
        nlp.initialize(lambda: no_entities)
    nlp = _tagger(tiny_bert, steps=0)
    with pytest.raises(ConfigError, match=r"PT-E056"):
        nlp.get_pipe("ner").add_label("DRUG")
    unseen = [Example.from_dict(nlp.make_doc("aspirin helps"), {"entities": [(0, 7, "DRUG")]})]
    with pytest.raises(ConfigError, match=r"PT-E058.*U-DRUG"):
        nlp.update(unseen, sgd=Adam(0.01))
