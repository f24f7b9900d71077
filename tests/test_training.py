"""Training through the spaCy components: frozen backbone, learning, logging."""
import random

import numpy

import pytest
import spacy
import torch
from spacy.training import Example
from spacy.util import fix_random_seed

from spacy_ptuning import get_adapter

METHODS = ["prefix", "prompt_encoder", "prompt"]
POS = ["good", "great", "love", "nice", "fine"]
NEG = ["bad", "awful", "hate", "terrible", "poor"]
FILLER = "the a movie film plot story actor scene today yesterday very really quite is was".split()
PEOPLE = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy"]
CITIES = ["paris", "london", "berlin", "rome", "madrid", "tokyo", "lima", "oslo", "cairo", "delhi"]


def _tok2vec_cfg(backbone: str, method: str, n: int = 4) -> dict:
    return {
        "@architectures": "spacy_ptuning.PTuningTransformer.v1",
        "backbone": backbone,
        "method": method,
        "num_virtual_tokens": n,
    }


def _sentiment_examples(nlp, n, seed):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        positive = i % 2 == 0
        words = rng.sample(FILLER, 4) + [rng.choice(POS if positive else NEG)]
        rng.shuffle(words)
        cats = {"POS": float(positive), "NEG": float(not positive)}
        out.append(Example.from_dict(nlp.make_doc(" ".join(words)), {"cats": cats}))
    return out


def _ner_examples(nlp, n, seed, people=PEOPLE, cities=CITIES):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        person, city = rng.choice(people), rng.choice(cities)
        filler = rng.sample(FILLER, 2)
        text = f"{person} {filler[0]} visited {city} {filler[1]}"
        ents = [(0, len(person), "PER")]
        start = text.index(f" {city} ") + 1
        ents.append((start, start + len(city), "LOC"))
        out.append(Example.from_dict(nlp.make_doc(text), {"entities": ents}))
    return out


def _train(nlp, examples, steps, lr=0.03):
    from thinc.api import Adam

    optimizer = Adam(lr)
    losses_per_step = []
    rng = random.Random(0)
    for _ in range(steps):
        batch = rng.sample(examples, min(16, len(examples)))
        losses = {}
        nlp.update(batch, sgd=optimizer, losses=losses, drop=0.0)
        losses_per_step.append(sum(losses.values()))
    return losses_per_step


@pytest.mark.parametrize("method", METHODS)
def test_backbone_frozen_while_prompts_and_head_train(tiny_bert, method):
    fix_random_seed(0)
    nlp = spacy.blank("en")
    ner = nlp.add_pipe("ptuning_ner", config={"model": {"tok2vec": _tok2vec_cfg(tiny_bert, method)}})
    examples = _ner_examples(nlp, 8, seed=0)
    nlp.initialize(lambda: examples)
    module = get_adapter(ner.model)
    backbone = module.backbone.model
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    prompts_before = {k: v.clone() for k, v in module.state_dict().items()}
    head_before = ner.model.get_ref("lower").get_param("W").copy()
    _train(nlp, examples, steps=3)
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert all(not p.requires_grad and p.grad is None for p in backbone.parameters())
    # The backbone is not a registered submodule: nothing of it can reach the optimizer.
    assert not any("embeddings" in name or "layer." in name for name, _ in module.named_parameters())
    assert not backbone.training
    changed = [not torch.equal(v, prompts_before[k]) for k, v in module.state_dict().items()]
    assert all(changed), dict(zip(module.state_dict(), changed))
    assert not (ner.model.get_ref("lower").get_param("W") == head_before).all()


@pytest.mark.parametrize("method", METHODS)
def test_each_method_learns_sentiment(tiny_bert, method):
    fix_random_seed(0)
    nlp = spacy.blank("en")
    nlp.add_pipe(
        "ptuning_textcat", config={"model": {"tok2vec": _tok2vec_cfg(tiny_bert, method)}}
    )
    train = _sentiment_examples(nlp, 64, seed=1)
    dev = _sentiment_examples(nlp, 40, seed=2)
    nlp.initialize(lambda: train)
    losses = _train(nlp, train, steps=50)
    assert sum(losses[-5:]) < 0.6 * sum(losses[:5]), losses
    scores = nlp.evaluate(dev)
    assert scores["cats_macro_f"] > 0.75, scores  # chance is 0.5


@pytest.mark.parametrize("method", METHODS)
def test_each_method_learns_ner(tiny_bert, method):
    fix_random_seed(0)
    nlp = spacy.blank("en")
    nlp.add_pipe("ptuning_ner", config={"model": {"tok2vec": _tok2vec_cfg(tiny_bert, method)}})
    train = _ner_examples(nlp, 64, seed=3)
    dev = _ner_examples(nlp, 30, seed=4)
    nlp.initialize(lambda: train)
    losses = _train(nlp, train, steps=40)
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5]), losses
    scores = nlp.evaluate(dev)
    assert scores["ents_f"] > 0.5, scores  # predicting nothing scores 0


def test_initialize_logs_trainable_share(tiny_bert, capsys):
    nlp = spacy.blank("en")
    nlp.add_pipe("ptuning_textcat", config={"model": {"tok2vec": _tok2vec_cfg(tiny_bert, "prefix", 8)}})
    nlp.initialize(lambda: _sentiment_examples(nlp, 4, seed=0))
    lines = [line for line in capsys.readouterr().out.splitlines() if "training" in line]
    assert len(lines) == 1
    out = lines[0]
    # 8 tokens x 2 layers x (key + value) x 32 = 1024 prefix parameters.
    assert "ptuning_textcat: training" in out and "method=prefix, length=8" in out
    module = get_adapter(nlp.get_pipe("ptuning_textcat").model)
    assert sum(p.numel() for p in module.parameters()) == 8 * 2 * 2 * 32


def _multilabel_examples(nlp, n, seed):
    """Two independent labels: GOOD (a positive word) and CITY (a city name);
    a quarter of the texts have both, a quarter neither."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        good, city = i % 2 == 0, i % 4 < 2
        words = rng.sample(FILLER, 3) + [rng.choice(POS if good else NEG)]
        if city:
            words.append(rng.choice(CITIES))
        rng.shuffle(words)
        cats = {"GOOD": float(good), "CITY": float(city)}
        out.append(Example.from_dict(nlp.make_doc(" ".join(words)), {"cats": cats}))
    return out


def test_multilabel_factory_is_not_exclusive_and_scores_at_its_threshold(tiny_bert):
    fix_random_seed(0)
    nlp = spacy.blank("en")
    nlp.add_pipe(
        "ptuning_textcat_multilabel",
        config={"threshold": 0.3, "model": {"tok2vec": _tok2vec_cfg(tiny_bert, "prefix")}},
    )
    train = _multilabel_examples(nlp, 64, seed=5)
    nlp.initialize(lambda: train)
    _train(nlp, train, steps=60)
    both = [ex for ex in _multilabel_examples(nlp, 40, seed=6) if all(ex.reference.cats.values())]
    docs = list(nlp.pipe([ex.text for ex in both]))
    # Non-exclusive: one text holds both labels (a softmax could not give both > 0.5).
    assert sum(d.cats["GOOD"] > 0.5 and d.cats["CITY"] > 0.5 for d in docs) >= len(docs) // 2
    # The scorer applies the component's threshold (first the config's, then
    # a changed one): recompute micro P/R by hand.
    dev = _multilabel_examples(nlp, 40, seed=6)
    predicted = [d.cats for d in nlp.pipe([ex.text for ex in dev])]
    for threshold in (0.3, 0.97):
        if threshold != 0.3:
            nlp.get_pipe("ptuning_textcat_multilabel").cfg["threshold"] = threshold
        scores = nlp.evaluate(dev)
        tp = sum(p[k] >= threshold and ex.reference.cats[k] for p, ex in zip(predicted, dev) for k in p)
        fp = sum(p[k] >= threshold and not ex.reference.cats[k] for p, ex in zip(predicted, dev) for k in p)
        fn = sum(p[k] < threshold and ex.reference.cats[k] for p, ex in zip(predicted, dev) for k in p)
        assert scores["cats_micro_r"] == pytest.approx(tp / (tp + fn))
        assert scores["cats_micro_p"] == pytest.approx(tp / (tp + fp) if tp + fp else 0.0)


@pytest.mark.parametrize("method", METHODS)
def test_inference_reuses_prompts_until_an_update_changes_them(tiny_bert, method):
    from thinc.api import Adam

    fix_random_seed(0)
    nlp = spacy.blank("en")
    nlp.add_pipe("ptuning_ner", config={"model": {"tok2vec": _tok2vec_cfg(tiny_bert, method)}})
    train = _ner_examples(nlp, 8, seed=3)
    nlp.initialize(lambda: train)
    tok2vec = nlp.get_pipe("ptuning_ner").model.get_ref("tok2vec")
    adapter = get_adapter(tok2vec)
    calls = []
    adapter.prompts.register_forward_hook(lambda *a: calls.append(1))
    docs = [ex.predicted for ex in train]
    first = tok2vec.predict(docs)
    calls.clear()
    tok2vec.predict(docs)
    assert calls == []  # the second prediction reused the prompts
    nlp.update(train, sgd=Adam(0.05))  # thinc's optimizer writes through array views
    calls.clear()
    after = tok2vec.predict(docs)
    assert len(calls) == 1  # recomputed once after the update
    adapter._prompt_cache = None
    fresh = tok2vec.predict(docs)
    for a, b, c in zip(first, after, fresh):
        assert numpy.array_equal(b, c)  # not stale
        assert not numpy.allclose(a, b)  # the update did change the vectors


def test_optimizer_step_is_thincs_and_keeps_each_parameter_one_tensor(tiny_bert):
    """Our finish_update gives exactly thinc's PyTorchShim step, without the
    chain thinc's builds (one new tensor per parameter per step, each holding
    the previous one: memory grew every step with prefix_projection)."""
    import gc
    import types

    from thinc.api import Adam, PyTorchShim

    from spacy_ptuning.model.serialization import AdapterShim

    def build(thincs_step):
        fix_random_seed(0)
        nlp = spacy.blank("en")
        tok2vec = dict(_tok2vec_cfg(tiny_bert, "prefix"), prefix_projection=8)
        ner = nlp.add_pipe("ptuning_ner", config={"model": {"tok2vec": tok2vec}})
        examples = _ner_examples(nlp, 8, seed=0)
        nlp.initialize(lambda: examples)
        (shim,) = [s for node in ner.model.walk() for s in node.shims if isinstance(s, AdapterShim)]
        if thincs_step:
            shim.finish_update = types.MethodType(PyTorchShim.finish_update, shim)
        return nlp, examples, get_adapter(ner.model)

    def tensors_sharing(module):
        gc.collect()
        ptrs = {p.data_ptr() for p in module.parameters()}
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.data_ptr() in ptrs)

    ours, examples, module = build(thincs_step=False)
    theirs, _, reference = build(thincs_step=True)
    assert len(list(module.parameters())) == 5  # embedding, two weights, two biases
    opt_ours, opt_theirs = Adam(0.03), Adam(0.03)
    counts = []
    for _ in range(4):
        ours.update(examples, sgd=opt_ours, drop=0.0)
        theirs.update(examples, sgd=opt_theirs, drop=0.0)
        counts.append(tensors_sharing(module))
    for (name, a), b in zip(module.named_parameters(), reference.parameters()):
        assert torch.equal(a, b), name
    assert len(set(counts)) == 1, counts
    # thinc's own step does chain (the count above could catch it); when a
    # thinc release stops chaining, this fails and our override can go.
    assert tensors_sharing(reference) >= counts[-1] + 5


@pytest.mark.parametrize("method", METHODS)
def test_parameter_averages_reach_the_prompts_while_spacy_scores_and_saves(tiny_bert, method):
    """With ``use_averages = true`` spaCy scores and saves inside
    ``nlp.use_params(optimizer.averages)``: the prompts must take their
    averages there as the head does (thinc's PyTorchShim never found them),
    predict with them (not with a cached copy of the last weights), and get
    their own weights back afterwards (the prompts also when the block
    raises)."""
    from thinc.api import Adam

    from spacy_ptuning.model.serialization import AdapterShim

    fix_random_seed(0)
    nlp = spacy.blank("en")
    ner = nlp.add_pipe("ptuning_ner", config={"model": {"tok2vec": _tok2vec_cfg(tiny_bert, method)}})
    train = _ner_examples(nlp, 8, seed=3)
    nlp.initialize(lambda: train)
    opt = Adam(0.05, use_averages=True)
    for _ in range(4):
        nlp.update(train, sgd=opt, drop=0.0)
    adapter = get_adapter(ner.model)
    (shim,) = [s for node in ner.model.walk() for s in node.shims if isinstance(s, AdapterShim)]
    names = [name for name, _ in adapter.named_parameters()]
    assert names and all((shim.id, name) in opt.averages for name in names)
    last = {name: p.detach().clone() for name, p in adapter.named_parameters()}
    docs = [ex.predicted for ex in train]
    tok2vec = ner.model.get_ref("tok2vec")
    before = tok2vec.predict(docs)  # fills the prompt cache with the last weights

    with nlp.use_params(opt.averages):
        for name, p in adapter.named_parameters():
            average = torch.from_numpy(numpy.asarray(opt.averages[(shim.id, name)]))
            assert torch.equal(p.detach(), average), name
            assert not torch.equal(average, last[name]), name  # the averages are not the last weights
        inside = tok2vec.predict(docs)
        saved = nlp.to_bytes()

    # the reference: the averages written into the weights by hand
    reference = spacy.blank("en")
    reference.add_pipe("ptuning_ner", config={"model": {"tok2vec": _tok2vec_cfg(tiny_bert, method)}})
    reference.initialize(lambda: _ner_examples(reference, 8, seed=3))
    reference.from_bytes(nlp.to_bytes())  # the last weights, head and prompts
    ref_adapter = get_adapter(reference.get_pipe("ptuning_ner").model)
    with torch.no_grad():
        for name, p in ref_adapter.named_parameters():
            p.copy_(torch.from_numpy(numpy.asarray(opt.averages[(shim.id, name)])))
    ref_adapter.invalidate_prompt_cache()
    ref_model = reference.get_pipe("ptuning_ner").model
    for node, ref_node in zip(ner.model.walk(), ref_model.walk()):
        for pname in node.param_names:
            if node.has_param(pname) and (node.id, pname) in opt.averages:
                ref_node.set_param(pname, opt.averages[(node.id, pname)].copy())
    expected = ref_model.get_ref("tok2vec").predict([reference.make_doc(d.text) for d in docs])
    for a, b in zip(inside, expected):
        numpy.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    loaded = spacy.blank("en")
    loaded.add_pipe("ptuning_ner", config={"model": {"tok2vec": _tok2vec_cfg(tiny_bert, method)}})
    loaded.initialize(lambda: _ner_examples(loaded, 8, seed=3))
    loaded.from_bytes(saved)
    got = loaded.get_pipe("ptuning_ner").model.get_ref("tok2vec").predict([loaded.make_doc(d.text) for d in docs])
    for a, b in zip(got, expected):
        numpy.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    # afterwards: the last weights, and predictions from them (not a stale cache)
    for a, b in zip(before, tok2vec.predict(docs)):
        assert numpy.array_equal(a, b)
    # the prompts get their weights back after a block that raised too (thinc's
    # own Model.use_params does not restore the head's in that case)
    with pytest.raises(KeyError):
        with nlp.use_params(opt.averages):
            raise KeyError("scoring failed")
    for name, p in adapter.named_parameters():
        assert torch.equal(p.detach(), last[name]), name
