"""One backbone, many adapters: sharing, isolation, adapter-only saving."""
import hashlib
import threading

import numpy
import pytest
import spacy
import srsly
import torch
from spacy.training import Example
from spacy.util import fix_random_seed
from thinc.api import Adam

from spacy_ptuning import get_adapter, load_backbone
from spacy_ptuning.model.identity import describe_fingerprint

TEXTS = ["alice visited paris today", "a good film", "bob works at acme in london"]


def _pipeline(backbone, factory="ptuning_ner", method="prefix", name=None):
    fix_random_seed(0)
    nlp = spacy.blank("en")
    tok2vec = {
        "@architectures": "spacy_ptuning.PTuningTransformer.v1",
        "backbone": backbone,
        "method": method,
        "num_virtual_tokens": 4,
    }
    nlp.add_pipe(factory, name=name, config={"model": {"tok2vec": tok2vec}})
    if factory == "ptuning_ner":
        examples = [
            Example.from_dict(nlp.make_doc("alice visited paris"), {"entities": [(0, 5, "PER"), (14, 19, "LOC")]}),
            Example.from_dict(nlp.make_doc("bob met carol"), {"entities": [(0, 3, "PER"), (8, 13, "PER")]}),
        ]
    else:
        examples = [
            Example.from_dict(nlp.make_doc("a good film"), {"cats": {"POS": 1.0, "NEG": 0.0}}),
            Example.from_dict(nlp.make_doc("an awful plot"), {"cats": {"POS": 0.0, "NEG": 1.0}}),
        ]
    nlp.initialize(lambda: examples)
    optimizer = Adam(0.05)
    for _ in range(3):
        nlp.update(examples, sgd=optimizer)
    return nlp, examples


def _outputs(nlp):
    """Every component's tok2vec output and predictions, as comparable arrays."""
    docs = [nlp.make_doc(t) for t in TEXTS]
    out = []
    for name, pipe in nlp.pipeline:
        out.extend(pipe.model.get_ref("tok2vec").predict(docs))
    for doc in nlp.pipe(TEXTS):
        out.append(numpy.array([len(doc.ents)] + sorted(doc.cats.values()), dtype="f"))
    return out


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        numpy.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("method", ["prefix", "prompt_encoder", "prompt"])
def test_save_load_round_trip_is_exact_and_small(tiny_bert, tmp_path, method):
    nlp, _ = _pipeline(tiny_bert, method=method)
    before = _outputs(nlp)
    nlp.to_disk(tmp_path / "pipe")
    loaded = spacy.load(tmp_path / "pipe")
    _assert_same(before, _outputs(loaded))
    reloaded = spacy.blank("en").from_config(nlp.config).from_bytes(nlp.to_bytes())
    _assert_same(before, _outputs(reloaded))
    # Nothing of the backbone is saved: no backbone weight bytes in any file,
    # and the component is the size of its trainable parameters.
    module = get_adapter(loaded.get_pipe("ptuning_ner").model)
    needle = module.backbone.model.get_input_embeddings().weight[7].view(torch.uint8).numpy().tobytes()
    files = [f for f in (tmp_path / "pipe").rglob("*") if f.is_file()]
    assert not any(needle in f.read_bytes() for f in files)
    trainable = sum(p.numel() for p in module.parameters()) + sum(
        node.get_param(n).size for node in loaded.get_pipe("ptuning_ner").model.walk()
        for n in node.param_names if node.has_param(n)
    )
    model_file = (tmp_path / "pipe" / "ptuning_ner" / "model").stat().st_size
    assert model_file < 4 * trainable * 1.2 + 20_000, (model_file, trainable)


def test_adapter_weights_are_safetensors_with_fingerprint(tiny_bert, tmp_path):
    from safetensors.torch import load as st_load
    from spacy_ptuning.model.serialization import AdapterShim

    nlp, _ = _pipeline(tiny_bert)
    shim = next(s for node in nlp.get_pipe("ptuning_ner").model.walk() for s in node.shims)
    assert isinstance(shim, AdapterShim)
    msg = srsly.msgpack_loads(shim.to_bytes())
    assert msg["format"] == "spacy-ptuning-adapter/2"
    tensors = st_load(msg["weights"])
    assert set(tensors) == set(get_adapter(nlp.get_pipe("ptuning_ner").model).state_dict())
    assert msg["weights_sha256"] == hashlib.sha256(msg["weights"]).hexdigest()
    fingerprint = get_adapter(nlp.get_pipe("ptuning_ner").model).backbone.fingerprint()
    assert msg["fingerprint"] == fingerprint
    assert set(fingerprint) == {"architecture", "tokenizer", "weights"}
    # The weight sketch covers every floating tensor of the backbone.
    state = load_backbone(tiny_bert).model.state_dict()
    assert [n for n, _ in fingerprint["weights"]["tensors"]] == sorted(n for n, t in state.items() if t.is_floating_point())


def test_components_and_pipelines_share_one_backbone(tiny_bert, tmp_path):
    nlp, _ = _pipeline(tiny_bert)
    nlp.to_disk(tmp_path / "a")
    second = spacy.blank("en")
    second.add_pipe(
        "ptuning_textcat",
        config={"model": {"tok2vec": {"@architectures": "spacy_ptuning.PTuningTransformer.v1", "backbone": tiny_bert}}},
    )
    loaded = [spacy.load(tmp_path / "a") for _ in range(2)]
    modules = [get_adapter(p.pipeline[0][1].model) for p in [nlp, second, *loaded]]
    backbones = {id(m.backbone) for m in modules}
    assert len(backbones) == 1
    ptrs = {m.backbone.model.get_input_embeddings().weight.data_ptr() for m in modules}
    assert len(ptrs) == 1
    # ...while each adapter has its own prompts.
    assert len({m.prompts.embedding.data_ptr() for m in modules}) == len(modules)


def test_training_one_adapter_never_changes_another(tiny_bert):
    ner_nlp, examples = _pipeline(tiny_bert, "ptuning_ner")
    cat_nlp, _ = _pipeline(tiny_bert, "ptuning_textcat")
    backbone = get_adapter(ner_nlp.get_pipe("ptuning_ner").model).backbone
    assert backbone is get_adapter(cat_nlp.get_pipe("ptuning_textcat").model).backbone
    modes = []
    hook = backbone.model.register_forward_pre_hook(lambda m, a: modes.append(m.training))
    try:  # the backbone is shared by the whole session: always remove the hook
        before = _outputs(cat_nlp)
        optimizer = Adam(0.05)
        for _ in range(3):
            ner_nlp.update(examples, sgd=optimizer, drop=0.3)
            _assert_same(before, _outputs(cat_nlp))
        _assert_same(before, _outputs(cat_nlp))
    finally:
        hook.remove()
    assert modes and not any(modes)  # the shared backbone never switched to train mode


def test_two_pipelines_in_two_threads_match_sequential(tiny_bert):
    ner_nlp, _ = _pipeline(tiny_bert, "ptuning_ner")
    cat_nlp, _ = _pipeline(tiny_bert, "ptuning_textcat", method="prompt")
    expected = {"ner": _outputs(ner_nlp), "cat": _outputs(cat_nlp)}
    results = {"ner": [], "cat": []}
    errors = []

    def work(key, nlp):
        try:
            for _ in range(5):
                results[key].append(_outputs(nlp))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [
        threading.Thread(target=work, args=("ner", ner_nlp)),
        threading.Thread(target=work, args=("cat", cat_nlp)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for key in results:
        for got in results[key]:
            for x, y in zip(expected[key], got):
                numpy.testing.assert_allclose(x, y, atol=1e-6)


def test_wrong_backbone_is_refused_with_both_names(tiny_bert, other_tiny_bert, tmp_path):
    nlp, _ = _pipeline(tiny_bert)
    nlp.to_disk(tmp_path / "pipe")
    override = {"components": {"ptuning_ner": {"model": {"tok2vec": {"backbone": other_tiny_bert}}}}}
    with pytest.raises(ValueError, match=r"\[PT-E006\].*different backbone") as info:
        spacy.load(tmp_path / "pipe", config=override)
    message = str(info.value)
    expected = describe_fingerprint(load_backbone(tiny_bert).fingerprint())
    found = describe_fingerprint(load_backbone(other_tiny_bert).fingerprint())
    assert expected != found
    assert expected in message and found in message
    assert tiny_bert in message and other_tiny_bert in message
    # It says what differs: only the (scaled) word embeddings.
    assert "the weights differ in 'embeddings.word_embeddings.weight' (1 of 1 chunks" in message
    assert "architecture" not in message and "tokenizer differs" not in message


def test_backbone_path_can_be_overridden_at_load_time(tiny_bert, tmp_path):
    """A moved backbone folder: point the saved pipeline at the new copy."""
    import shutil

    nlp, _ = _pipeline(tiny_bert)
    nlp.to_disk(tmp_path / "pipe")
    moved = shutil.copytree(tiny_bert, tmp_path / "moved-backbone")
    override = {"components": {"ptuning_ner": {"model": {"tok2vec": {"backbone": str(moved)}}}}}
    loaded = spacy.load(tmp_path / "pipe", config=override)
    _assert_same(_outputs(nlp), _outputs(loaded))


def test_corrupted_adapter_gives_clear_error(tiny_bert, tmp_path):
    nlp, _ = _pipeline(tiny_bert)
    nlp.to_disk(tmp_path / "pipe")
    model_file = tmp_path / "pipe" / "ptuning_ner" / "model"
    data = bytearray(model_file.read_bytes())
    model_file.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match=r"\[PT-E008\]"):
        spacy.load(tmp_path / "pipe")


def test_add_saved_adapter_to_running_pipeline(tiny_bert, tmp_path):
    ner_nlp, _ = _pipeline(tiny_bert, "ptuning_ner")
    ner_nlp.to_disk(tmp_path / "ner")
    cat_nlp, _ = _pipeline(tiny_bert, "ptuning_textcat")
    source = spacy.load(tmp_path / "ner")
    cat_nlp.add_pipe("ptuning_ner", source=source)
    assert cat_nlp.pipe_names == ["ptuning_textcat", "ptuning_ner"]
    doc = cat_nlp("alice visited paris today")
    expected = ner_nlp("alice visited paris today")
    assert [(e.text, e.label_) for e in doc.ents] == [(e.text, e.label_) for e in expected.ents]
    assert set(doc.cats) == {"POS", "NEG"}


def test_alias_and_paths_to_one_folder_are_one_backbone(tiny_bert, monkeypatch):
    import os

    monkeypatch.chdir(os.path.dirname(tiny_bert))
    relative = os.path.join(".", os.path.basename(tiny_bert))
    assert load_backbone(relative) is load_backbone(tiny_bert)
    assert load_backbone(tiny_bert, dtype="bfloat16") is not load_backbone(tiny_bert)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_bfloat16_backbone_with_float32_prompts(tiny_bert, method):
    fp32, _ = _pipeline(tiny_bert, method=method)
    model = fp32.get_pipe("ptuning_ner").model
    cfg = fp32.config.copy()
    cfg["components"]["ptuning_ner"]["model"]["tok2vec"]["dtype"] = "bfloat16"
    half = spacy.blank("en").from_config(cfg).from_bytes(fp32.to_bytes())
    half_module = get_adapter(half.get_pipe("ptuning_ner").model)
    assert half_module.backbone.model.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in half_module.parameters())
    docs = [half.make_doc(t) for t in TEXTS]
    a = model.get_ref("tok2vec").predict(docs)
    b = half.get_pipe("ptuning_ner").model.get_ref("tok2vec").predict(docs)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype == numpy.float32
        numpy.testing.assert_allclose(x, y, atol=0.1)
    # It trains: prompts (float32) change, the bfloat16 backbone does not.
    before = {k: v.clone() for k, v in half_module.state_dict().items()}
    examples = [Example.from_dict(half.make_doc("alice visited paris"), {"entities": [(0, 5, "PER")]})]
    half.update(examples, sgd=Adam(0.05))
    assert any(not torch.equal(v, before[k]) for k, v in half_module.state_dict().items())
    assert all(p.grad is None for p in half_module.backbone.model.parameters())
