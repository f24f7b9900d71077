"""Pipelines in worker processes and threads: nlp.pipe(n_process=...) with fork
and spawn, pickling and deep copies that share the backbone, and a shared
tokenizer that outside code cannot break."""
import copy
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading

import numpy
import torch
import pytest
import spacy
from spacy.training import Example
from spacy.util import fix_random_seed
from thinc.api import Adam

from spacy_ptuning import get_adapter

TEXTS = [
    "alice visited paris today",
    "a good film",
    "bob works at acme in london",
    "",
    "carol met dave in rome . " * 30,
    "the plot was awful",
] * 3


def _pipeline(backbone):
    """NER (prefix) and textcat (prompt) over one tiny backbone, briefly trained."""
    fix_random_seed(0)
    nlp = spacy.blank("en")
    for factory, method in (("ptuning_ner", "prefix"), ("ptuning_textcat", "prompt")):
        tok2vec = {
            "@architectures": "spacy_ptuning.PTuningTransformer.v1",
            "backbone": backbone,
            "method": method,
            "num_virtual_tokens": 4,
        }
        nlp.add_pipe(factory, config={"model": {"tok2vec": tok2vec}})
    examples = [
        Example.from_dict(
            nlp.make_doc("alice visited paris"),
            {"entities": [(0, 5, "PER"), (14, 19, "LOC")], "cats": {"POS": 1.0, "NEG": 0.0}},
        ),
        Example.from_dict(
            nlp.make_doc("bob met carol"),
            {"entities": [(0, 3, "PER"), (8, 13, "PER")], "cats": {"POS": 0.0, "NEG": 1.0}},
        ),
    ]
    nlp.initialize(lambda: examples)
    optimizer = Adam(0.05)
    for _ in range(3):
        nlp.update(examples, sgd=optimizer)
    return nlp


@pytest.fixture(scope="module")
def nlp(tiny_bert):
    return _pipeline(tiny_bert)


def _results(docs):
    return [
        {"ents": [(e.start, e.end, e.label_) for e in doc.ents], "cats": doc.cats}
        for doc in docs
    ]


def _assert_same_results(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["ents"] == y["ents"]
        assert x["cats"].keys() == y["cats"].keys()
        for label in x["cats"]:
            assert x["cats"][label] == pytest.approx(y["cats"][label], abs=1e-5)


# The child script: load the saved pipeline, use torch's thread pool in this
# (parent) process first (as any real run does: initialize, a first batch),
# then pipe with n_process=2 under each start method (one script: the
# interpreter start-up is most of the time).
_PIPE_SCRIPT = textwrap.dedent(
    """
    import json, multiprocessing, sys
    import spacy, torch

    if __name__ == "__main__":
        torch.set_num_threads(2)  # an OpenMP pool even on a one-core machine
        nlp = spacy.load(sys.argv[1])
        texts = json.loads(open(sys.argv[2]).read())
        dump = lambda docs: [
            {"ents": [[e.start, e.end, e.label_] for e in d.ents], "cats": d.cats} for d in docs
        ]
        print("RESULT single " + json.dumps(dump(nlp.pipe(texts, n_process=1, batch_size=4))), flush=True)
        for method in sys.argv[3:]:
            multiprocessing.set_start_method(method, force=True)
            docs = list(nlp.pipe(texts, n_process=2, batch_size=4))
            print(f"RESULT {method} " + json.dumps(dump(docs)), flush=True)
    """
)


def test_pipe_n_process_matches_single_process(nlp, tmp_path):
    """n_process=2 gives n_process=1's results, under fork (the Linux default,
    which hung once the parent had used torch's OpenMP pool) and spawn (which
    pickles the pipeline). A hang fails through the timeout."""
    import multiprocessing

    methods = [m for m in ("fork", "spawn") if m in multiprocessing.get_all_start_methods()]
    nlp.to_disk(tmp_path / "pipe")
    expected = _results(nlp.pipe(TEXTS))
    script = tmp_path / "pipe_script.py"
    script.write_text(_PIPE_SCRIPT)
    (tmp_path / "texts.json").write_text(json.dumps(TEXTS))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    # Its own session, so that a hang is cleaned up with all its workers.
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "pipe"), str(tmp_path / "texts.json"), *methods],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # pragma: no cover - the bug this guards against
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, _ = proc.communicate()
        done = [l.split()[1] for l in stdout.splitlines() if l.startswith("RESULT")]
        pytest.fail(f"nlp.pipe(n_process=2) hung; finished: {done} of single + {methods}")
    assert proc.returncode == 0, stderr[-3000:]
    got = {}
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            _, key, data = line.split(" ", 2)
            got[key] = json.loads(data)
    assert set(got) == {"single", *methods}
    for key, docs in got.items():
        for doc in docs:
            doc["ents"] = [tuple(e) for e in doc["ents"]]
        _assert_same_results(expected, docs)


def test_pickle_holds_prompts_not_backbone_and_reuses_the_shared_one(nlp, tiny_bert):
    data = pickle.dumps(nlp)
    # No backbone weight is in the pickle: neither bytes of an embedding row
    # nor anything like the backbone's size (the tiny backbone's weights are
    # ~50-100 KB; the pipeline's own parameters a few KB).
    backbone = get_adapter(nlp.get_pipe(nlp.pipe_names[0]).model).backbone
    for row in (7, 42):
        needle = backbone.model.get_input_embeddings().weight[row].view(torch.uint8).numpy().tobytes()
        assert needle not in data
    weights = backbone.model.dtype.itemsize * backbone.num_parameters
    overhead = len(pickle.dumps(spacy.blank("en")))
    saved = sum(len(nlp.get_pipe(name).to_bytes()) for name in nlp.pipe_names)
    # (a pickle that held the backbone would pass saved + weights)
    assert len(data) - overhead < min(saved * 1.5, saved + weights / 2), (len(data), overhead, saved, weights)
    loaded = pickle.loads(data)
    for name in nlp.pipe_names:
        original = get_adapter(nlp.get_pipe(name).model)
        restored = get_adapter(loaded.get_pipe(name).model)
        assert restored is not original
        assert restored.backbone is original.backbone is backbone
        for key, value in original.state_dict().items():
            assert numpy.array_equal(value.numpy(), restored.state_dict()[key].numpy())
    _assert_same_results(_results(nlp.pipe(TEXTS)), _results(loaded.pipe(TEXTS)))


def test_deepcopy_shares_the_backbone_and_predicts_the_same(nlp):
    before = _results(nlp.pipe(TEXTS))
    copied = copy.deepcopy(nlp)
    for name in nlp.pipe_names:
        original = get_adapter(nlp.get_pipe(name).model)
        twin = get_adapter(copied.get_pipe(name).model)
        assert twin is not original
        assert twin.backbone is original.backbone
        # The prompts are copies, not the same tensors.
        for a, b in zip(original.parameters(), twin.parameters()):
            assert a.data_ptr() != b.data_ptr()
    _assert_same_results(before, _results(copied.pipe(TEXTS)))
    # thinc's Model.copy (deep copies the shims) shares it too.
    model = nlp.get_pipe("ptuning_ner").model
    assert get_adapter(model.copy()).backbone is get_adapter(model).backbone


def test_eight_threads_mixing_pipelines_and_direct_tokenizer_use(nlp, tiny_bert):
    """The backbone's tokenizer is public and shared: code that uses it with
    its own truncation settings (here from several threads, consistently
    among themselves under their own lock) must neither break the pipelines
    ('Already borrowed', or encoding with another call's truncation) nor be
    broken by them."""
    tokenizer = get_adapter(nlp.get_pipe("ptuning_ner").model).backbone.tokenizer
    docs = [nlp.make_doc(t) for t in TEXTS]
    tok2vecs = [nlp.get_pipe(name).model.get_ref("tok2vec") for name in nlp.pipe_names]
    expected_vectors = [m.predict(docs) for m in tok2vecs]
    expected_results = _results(nlp.pipe(TEXTS))
    settings = [dict(truncation=True, max_length=n, padding="max_length") for n in (5, 9, 17)]
    settings.append(dict(truncation=False, padding="longest"))
    expected_ids = [tokenizer(TEXTS, **s)["input_ids"] for s in settings]
    users_lock = threading.Lock()
    errors, checks = [], []

    def work(worker: int):
        try:
            for step in range(6):
                which = (worker + step) % len(tok2vecs)
                for x, y in zip(expected_vectors[which], tok2vecs[which].predict(docs)):
                    numpy.testing.assert_allclose(x, y, atol=1e-5)
                if step % 3 == 0:
                    _assert_same_results(expected_results, _results(nlp.pipe(TEXTS, batch_size=3)))
                k = (worker + step) % len(settings)
                with users_lock:
                    assert tokenizer(TEXTS, **settings[k])["input_ids"] == expected_ids[k]
                checks.append(1)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert len(checks) == 8 * 6


def test_deepcopy_shares_a_backbone_that_load_backbone_cannot_find(tiny_bert):
    """A backbone wrapped by hand (not in load_backbone's registry, its name
    not loadable) is shared by a deep copy too, not looked up or loaded."""
    from transformers import AutoModel, AutoTokenizer

    from spacy_ptuning import Adapter
    from spacy_ptuning.model.backbone import wrap_backbone

    backbone = wrap_backbone(
        AutoModel.from_pretrained(tiny_bert), AutoTokenizer.from_pretrained(tiny_bert), name="hand-made"
    )
    adapter = Adapter(backbone, num_virtual_tokens=4)
    twin = copy.deepcopy(adapter)
    assert twin.backbone is backbone
    assert twin.prompts is not adapter.prompts
    for a, b in zip(adapter.state_dict().values(), twin.state_dict().values()):
        assert a.data_ptr() != b.data_ptr() and numpy.array_equal(a.numpy(), b.numpy())


def test_reconfiguring_the_public_tokenizer_changes_no_pipeline(nlp, tiny_bert):
    """What other code does to ``backbone.tokenizer`` (its length limit,
    padding side, truncation left set by a call) does not reach pipelines."""
    tokenizer = get_adapter(nlp.get_pipe("ptuning_ner").model).backbone.tokenizer
    expected = _results(nlp.pipe(TEXTS))
    docs = [nlp.make_doc(t) for t in TEXTS]
    tok2vec = nlp.get_pipe("ptuning_ner").model.get_ref("tok2vec")
    vectors = tok2vec.predict(docs)
    saved = tokenizer.model_max_length, tokenizer.padding_side
    try:
        tokenizer.model_max_length = 12
        tokenizer.padding_side = "left"
        tokenizer(TEXTS, truncation=True, max_length=6, padding="max_length")
        _assert_same_results(expected, _results(nlp.pipe(TEXTS)))
        for x, y in zip(vectors, tok2vec.predict(docs)):
            numpy.testing.assert_allclose(x, y, atol=1e-5)
    finally:
        tokenizer.model_max_length, tokenizer.padding_side = saved
