"""Pipelines saved by earlier releases load and predict as they did.

``tests/data/saved-0.1.0`` was written by release 0.1.0's code (commit
6f9d7ed, ``tests/data/make_saved.py`` run from a worktree of it) with what
that code predicted; the reference is that release's output, not this
checkout's. ``saved-v2-4b8d50d`` is the same on PTuningTransformer.v2 (a
layer mix and word features, ``make_saved.py --v2``), written at commit
4b8d50d, before the word features' concatenation became our own node
(``architectures.words_beside``). Freeze each release the same way and add
it to SAVED."""
import json
from pathlib import Path

import pytest
import spacy

from spacy_ptuning.pipeline.transformer_model import find_adapter_layers
from spacy_ptuning.serving.mixed_batch import pipe_mixed, planned_words

DATA = Path(__file__).parent / "data"
SAVED = ["saved-0.1.0", "saved-v2-4b8d50d"]


def _check(docs, expected):
    for doc, want in zip(docs, expected):
        assert doc.text == want["text"]
        assert [[e.start_char, e.end_char, e.label_] for e in doc.ents] == want["ents"]
        assert doc.cats.keys() == want["cats"].keys()
        for label, score in want["cats"].items():
            assert doc.cats[label] == pytest.approx(score, abs=1e-5)


@pytest.mark.parametrize("name", SAVED)
def test_a_pipeline_saved_by_an_earlier_release_predicts_as_it_did(name):
    expected = json.loads((DATA / name / "expected.json").read_text())
    nlp = spacy.load(DATA / name / "pipeline")
    _check(list(nlp.pipe([e["text"] for e in expected])), expected)
    # The same through a mixed-adapter batch, as a server runs it (the v2
    # pipeline's word features gathered: planned after loading too).
    planned = [planned_words(pipe, tok2vec) is not None for _, pipe in nlp.pipeline for tok2vec, _, _ in find_adapter_layers(pipe)]
    assert planned == [name.startswith("saved-v2")] * len(planned)
    non_empty = [e for e in expected if e["text"]]
    _check(pipe_mixed([(nlp, e["text"]) for e in non_empty]), non_empty)
    assert any(e["ents"] for e in expected) and len({round(e["cats"]["POS"], 3) for e in expected}) > 2
