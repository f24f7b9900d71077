"""What several test modules share: one pipeline builder, the texts the
serving tests send, and the comparison of a served doc with an in-process
one. (Test modules import this, never each other.)"""
import numpy
import pytest
import spacy
import torch
from spacy.training import Example
from spacy.util import fix_random_seed

from spacy_ptuning.pipeline.transformer_model import find_adapter_layers, get_adapter

TEXTS = [
    "alice visited paris today",
    "a good film , said bob in london",
    "carol met dave",
    "the plot was awful and the actor was terrible , really bad movie yesterday",
    "oslo",
    "bob works at acme in london",
]


def pipeline(backbone, factories, method, n, seed, dtype="float32", **v2):
    """A pipeline of spacy-ptuning components (one factory name or a list)
    over one backbone, initialised on three examples, its prompts then set
    far from their initialisation (non-trivial predictions).

    float32 by default: mixed batches equal each pipeline alone to 1e-5
    there; in bfloat16 (what "auto" picks on some CPUs) only to its rounding.
    ``v2``: PTuningTransformer.v2 settings (layer_mix, word_features);
    without them the tok2vec is v1.
    """
    factories = [factories] if isinstance(factories, str) else list(factories)
    fix_random_seed(seed)
    nlp = spacy.blank("en")
    tok2vec = {"@architectures": "spacy_ptuning.PTuningTransformer.v1", "backbone": backbone,
               "method": method, "num_virtual_tokens": n, "dtype": dtype}
    if v2:
        tok2vec.update({"@architectures": "spacy_ptuning.PTuningTransformer.v2", **v2})
    for f in factories:
        nlp.add_pipe(f, config={"model": {"tok2vec": tok2vec}})
    examples = []
    for text in ("alice visited paris", "a good film", "bob hated rome"):
        ann = {}
        if "ptuning_ner" in factories:
            ann["entities"] = [(0, len(text.split()[0]), "PER")]
        if any(f.startswith("ptuning_textcat") for f in factories):
            ann["cats"] = {"POS": float("good" in text), "NEG": float("good" not in text)}
        examples.append(Example.from_dict(nlp.make_doc(text), ann))
    nlp.initialize(lambda: examples)
    gen = torch.Generator().manual_seed(seed)
    for _, pipe in nlp.pipeline:
        for _, _, adapter in find_adapter_layers(pipe):
            with torch.no_grad():
                for p in adapter.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        # Word features (thinc params) away from their initialisation too.
        for node in pipe.model.walk() if v2.get("word_features") else ():
            for name in node.param_names:
                if node.has_param(name) and not node.name.startswith("ptuning"):
                    value = node.get_param(name)
                    noise = torch.randn(value.shape, generator=gen).numpy() * 0.1
                    node.set_param(name, (value + noise.astype(value.dtype)))
    return nlp


def assert_doc(got, doc):
    """A served Doc.to_json equals the in-process doc: same entities (char
    offsets, labels), same cats within 1e-5."""
    assert got["text"] == doc.text
    assert got["ents"] == [{"start": e.start_char, "end": e.end_char, "label": e.label_} for e in doc.ents]
    assert got["cats"].keys() == doc.cats.keys()
    for label, score in doc.cats.items():
        assert got["cats"][label] == pytest.approx(score, abs=1e-5)


def assert_only_prompts_and_head_train(model, update, steps: int = 3):
    """Call ``update()`` ``steps`` times: the backbone under ``model``'s
    adapter stays bit-identical, while every prompt tensor and every thinc
    parameter of ``model`` (the head, word features) moves."""
    module = get_adapter(model)
    frozen = {k: v.clone() for k, v in module.backbone.model.state_dict().items()}
    prompts = {k: v.clone() for k, v in module.state_dict().items()}
    heads = {(node.id, p): node.get_param(p).copy() for node in model.walk() for p in node.param_names
             if node.has_param(p)}
    for _ in range(steps):
        update()
    for k, v in module.backbone.model.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    for k, v in module.state_dict().items():
        assert not torch.equal(v, prompts[k]), k
    nodes = {node.id: node for node in model.walk()}
    for (node_id, p), before in heads.items():
        assert not numpy.array_equal(nodes[node_id].get_param(p), before), (nodes[node_id].name, p)


def small_tok2vec(backbone, method: str = "prefix", words: bool = True) -> dict:
    """A PTuningTransformer.v2 block of 3 virtual tokens in float32 over
    ``backbone``, with word features of width 8 if ``words``."""
    tok2vec = {"@architectures": "spacy_ptuning.PTuningTransformer.v2", "backbone": backbone,
               "method": method, "num_virtual_tokens": 3, "dtype": "float32"}
    if words:
        tok2vec["word_features"] = {"@architectures": "spacy_ptuning.WordFeatures.v1", "width": 8}
    return tok2vec
