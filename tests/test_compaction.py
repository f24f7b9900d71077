"""Compacted serving copies (``spacy ptuning compact``,
``pipeline.compaction``, adapter format /3): the copy saves each adapter's
prompt row, exactly what its prompt module computes, in place of the module;
it predicts what the original predicts (alone and in mixed batches), cannot
be trained, round-trips, and bad input says what to do."""
import shutil

import pytest
import spacy
import srsly
import torch
from safetensors.torch import load as st_load
from spacy.training import Example
from typer.testing import CliRunner

from spacy_ptuning.errors import AdapterError, PTuningError
from spacy_ptuning.model import serialization
from spacy_ptuning.model.serialization import ADAPTER_FORMAT, COMPACTED_FORMAT, read_header
from spacy_ptuning.pipeline.compaction import save_compacted
from spacy_ptuning.pipeline.transformer_model import find_adapter_layers
from spacy_ptuning.serving.mixed_batch import pipe_mixed
from spacy_ptuning.serving.pool import AdapterPool

from .helpers import TEXTS, pipeline

WORDS = {"@architectures": "spacy_ptuning.WordFeatures.v1", "width": 8, "rows": [300, 50, 100, 40]}
TEXTS_ = [t for t in TEXTS if t] + ["Naloxone reversed the clonidine-induced hypotension ."]


def _adapters(nlp):
    return [(name, tok2vec, adapter) for name, pipe in nlp.pipeline for tok2vec, _, adapter in find_adapter_layers(pipe)]


def _saved_adapter(folder, component):
    """The header and tensors of the one adapter saved in a component's model file."""
    msg = srsly.msgpack_loads((folder / component / "model").read_bytes())
    (shim,) = [s for shims in msg["shims"] for s in shims]
    header = read_header(shim)
    return header, st_load(header["weights"])


def _ents(doc):
    return [(e.start_char, e.end_char, e.label_) for e in doc.ents]


@pytest.mark.parametrize("method,v2", [("prefix", {}), ("prompt", {}), ("prompt_encoder", {}), ("prompt_encoder", {"word_features": WORDS})])
def test_a_compacted_copy_saves_the_exact_row_and_predicts_the_same(tiny_bert, tmp_path, method, v2):
    original = pipeline(tiny_bert, ["ptuning_ner", "ptuning_textcat"], method, 4, 71, **v2)
    original.to_disk(tmp_path / "a")
    count, before, after = save_compacted(tmp_path / "a", tmp_path / "b")
    assert count == 2 and after > 0
    copy = spacy.load(tmp_path / "b")
    for (name, tok2vec, adapter), (_, want_tok2vec, source) in zip(_adapters(copy), _adapters(original)):
        assert adapter.compacted and not source.compacted and not list(adapter.prompts.parameters())
        source.eval()
        with torch.no_grad():
            want_row = source.prompts()  # the module's own forward: the reference
        header, tensors = _saved_adapter(tmp_path / "b", name)
        assert header["format"] == COMPACTED_FORMAT and header["compacted"] is True
        # Exactly the row in place of the module's parameters; every other tensor as the original saved it.
        _, full = _saved_adapter(tmp_path / "a", name)
        assert set(tensors) == {"prompts.row"} | {k for k in full if not k.startswith("prompts.")}
        assert tensors["prompts.row"].dtype == torch.float32 and torch.equal(tensors["prompts.row"], want_row)
        assert torch.equal(adapter.prompts.row, want_row)
        docs = [copy.make_doc(t) for t in TEXTS_]
        for got, want in zip(tok2vec.predict(docs), want_tok2vec.predict(docs)):
            assert got.shape == want.shape and (got == want).all()
    want = list(original.pipe(TEXTS_))
    for docs in (list(copy.pipe(TEXTS_)), pipe_mixed([(copy, t) for t in TEXTS_])):
        for got, doc in zip(docs, want):
            assert _ents(got) == _ents(doc) and got.cats == pytest.approx(doc.cats, abs=1e-6)
    # One mixed batch of the copy and the original equals each alone.
    requests = [(nlp, t) for t in TEXTS_ for nlp in (copy, original)]
    for got, (nlp, text) in zip(pipe_mixed(requests), requests):
        doc = nlp(text)
        assert _ents(got) == _ents(doc) and got.cats == pytest.approx(doc.cats, abs=1e-6)
    # What the copy saves less is the prompt modules' weights less their rows.
    freed = sum(sum(p.numel() * 4 for p in source.prompts.parameters()) - adapter.prompts.row.numel() * 4
                for (_, _, adapter), (_, _, source) in zip(_adapters(copy), _adapters(original)))
    assert abs((before - after) - freed) < 4096  # headers and msgpack framing
    if method == "prompt_encoder":
        assert freed > 0
    # The copy round-trips as a copy, and the source folder was not touched.
    copy.to_disk(tmp_path / "c")
    again = spacy.load(tmp_path / "c")
    for got, doc in zip(again.pipe(TEXTS_), want):
        assert _ents(got) == _ents(doc) and got.cats == pytest.approx(doc.cats, abs=1e-6)
    assert all(_saved_adapter(tmp_path / "a", name)[0]["format"] == ADAPTER_FORMAT for name, _, _ in _adapters(original))


def test_a_compacted_copy_cannot_be_trained(tiny_bert, tmp_path):
    pipeline(tiny_bert, "ptuning_ner", "prompt_encoder", 3, 72).to_disk(tmp_path / "a")
    save_compacted(tmp_path / "a", tmp_path / "b")
    copy = spacy.load(tmp_path / "b")
    sgd = copy.resume_training()
    example = Example.from_dict(copy.make_doc("alice visited paris"), {"entities": [(0, 5, "PER")]})
    with pytest.raises(AdapterError, match=r"PT-E049.*trained.*original folder"):
        copy.update([example], sgd=sgd)


def test_a_row_that_does_not_fit_the_config_is_refused(tiny_bert, tmp_path):
    pipeline(tiny_bert, "ptuning_ner", "prompt", 3, 73).to_disk(tmp_path / "a")
    save_compacted(tmp_path / "a", tmp_path / "b")
    config = tmp_path / "b" / "config.cfg"
    text = config.read_text()
    assert "num_virtual_tokens = 3" in text
    config.write_text(text.replace("num_virtual_tokens = 3", "num_virtual_tokens = 4"))
    with pytest.raises(AdapterError, match=r"(?s)PT-E007.*prompts.row.*\[3, 32\].*\[4, 32\]"):
        spacy.load(tmp_path / "b")


def test_a_release_that_knows_only_format_2_refuses_a_copy_saying_upgrade(tiny_bert, tmp_path, monkeypatch):
    pipeline(tiny_bert, "ptuning_ner", "prefix", 3, 74).to_disk(tmp_path / "a")
    save_compacted(tmp_path / "a", tmp_path / "b")
    spacy.load(tmp_path / "a")  # the original still loads under the older reader
    monkeypatch.setattr(serialization, "KNOWN_FORMATS", (serialization.LEGACY_FORMAT, ADAPTER_FORMAT))
    spacy.load(tmp_path / "a")
    with pytest.raises(AdapterError, match=r"PT-E016.*adapter/3.*upgrade"):
        spacy.load(tmp_path / "b")


def test_on_a_bfloat16_backbone_the_copy_holds_float32_and_a_pool_halves_it(tiny_bert, tmp_path):
    original = pipeline(tiny_bert, "ptuning_textcat", "prompt_encoder", 3, 75, dtype="bfloat16")
    original.to_disk(tmp_path / "a")
    save_compacted(tmp_path / "a", tmp_path / "served" / "b")
    copy = spacy.load(tmp_path / "served" / "b")
    (_, _, adapter), = _adapters(copy)
    assert adapter.prompts.row.dtype == torch.float32  # exact: what is saved
    pool = AdapterPool(tmp_path / "served", check_interval=None, compact=True)
    served = pool.get("b")
    (_, _, resident), = _adapters(served)
    assert resident.prompts.row.dtype == torch.bfloat16  # the backbone's dtype: no cast per batch
    assert torch.equal(resident.prompts.row, adapter.prompts.row.bfloat16())
    for a, b, c in zip(served.pipe(TEXTS_), copy.pipe(TEXTS_), original.pipe(TEXTS_)):
        assert a.cats == b.cats == c.cats
    with pytest.raises(AdapterError, match=r"PT-E049.*saved.*bfloat16"):
        served.to_disk(tmp_path / "resaved")


@pytest.mark.parametrize("method", ["prefix", "prompt_encoder"])
def test_a_float16_copy_predicts_as_a_float16_pool_in_about_half_the_bytes(tiny_bert, tmp_path, method):
    from spacy_ptuning.pipeline.half_storage import half_hashembed_forward, half_maxout_forward

    (tmp_path / "src").mkdir()
    pipeline(tiny_bert, ["ptuning_ner", "ptuning_textcat"], method, 4, 78, word_features=WORDS).to_disk(tmp_path / "src" / "a")
    _, before, exact = save_compacted(tmp_path / "src" / "a", tmp_path / "exact")
    _, _, after = save_compacted(tmp_path / "src" / "a", tmp_path / "half" / "a", storage_dtype="float16")
    held = AdapterPool(tmp_path / "src", check_interval=None, compact=True, storage_dtype="float16").get("a")
    copy = spacy.load(tmp_path / "half" / "a")
    halved = 0
    for name, _, adapter in _adapters(copy):
        header, tensors = _saved_adapter(tmp_path / "half" / "a", name)
        assert tensors["prompts.row"].dtype == torch.float16 == adapter.prompts.row.dtype
        layers = [n for n in copy.get_pipe(name).model.walk() if n.name in ("hashembed", "maxout") and n.has_param("W" if n.name == "maxout" else "E")]
        assert len(layers) == 7 and all(n._func in (half_hashembed_forward, half_maxout_forward) for n in layers)
        halved += sum(n.get_param(p).nbytes for n in layers for p in (("E",) if n.name == "hashembed" else ("W", "b")))
        halved += adapter.prompts.row.numel() * 2
    assert abs((exact - after) - halved) < 4096  # exactly the halved values are saved in half the bytes
    want = list(held.pipe(TEXTS_))
    for docs in (list(copy.pipe(TEXTS_)), pipe_mixed([(copy, t) for t in TEXTS_])):
        for got, doc in zip(docs, want):
            assert _ents(got) == _ents(doc) and got.cats == pytest.approx(doc.cats, abs=1e-6)
    # A pool serving the copy holds it as it is (float16), exact pool or not.
    served = AdapterPool(tmp_path / "half", check_interval=None, compact=True).get("a")
    assert all(a.prompts.row.dtype == torch.float16 for _, _, a in _adapters(served))
    for got, doc in zip(served.pipe(TEXTS_), want):
        assert _ents(got) == _ents(doc) and got.cats == pytest.approx(doc.cats, abs=1e-6)
    sgd = copy.resume_training()
    example = Example.from_dict(copy.make_doc("alice visited paris"), {"entities": [(0, 5, "PER")], "cats": {"POS": 1.0, "NEG": 0.0}})
    with pytest.raises(AdapterError, match="PT-E049.*trained"):
        copy.update([example], sgd=sgd)
    with pytest.raises(PTuningError, match="PT-E054.*bfloat16"):
        save_compacted(tmp_path / "src" / "a", tmp_path / "other", storage_dtype="bfloat16")


def test_bad_input_says_what_to_do_and_changes_nothing(tiny_bert, tmp_path, monkeypatch):
    pipeline(tiny_bert, "ptuning_ner", "prefix", 3, 76).to_disk(tmp_path / "a")
    with pytest.raises(PTuningError, match=r"PT-E059.*no config.cfg"):
        save_compacted(tmp_path, tmp_path / "b")
    with pytest.raises(PTuningError, match=r"PT-E059.*the output is the source folder"):
        save_compacted(tmp_path / "a", tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("mine")
    with pytest.raises(PTuningError, match=r"PT-E059.*--force"):
        save_compacted(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b" / "keep.txt").read_text() == "mine"
    # A copy that cannot take the output's place leaves the output as it was.
    from spacy_ptuning.pipeline import compaction

    real, calls = compaction.os.replace, []

    def failing_second(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("disk gone")
        real(src, dst)

    monkeypatch.setattr(compaction.os, "replace", failing_second)
    with pytest.raises(OSError, match="disk gone"):
        save_compacted(tmp_path / "a", tmp_path / "b", force=True)
    monkeypatch.undo()
    assert len(calls) == 3 and (tmp_path / "b" / "keep.txt").read_text() == "mine"
    assert save_compacted(tmp_path / "a", tmp_path / "b", force=True)[0] == 1
    assert not (tmp_path / "b" / "keep.txt").exists() and spacy.load(tmp_path / "b").pipe_names == ["ptuning_ner"]
    spacy.blank("en").to_disk(tmp_path / "blank")
    with pytest.raises(PTuningError, match=r"PT-E059.*no spacy-ptuning adapter"):
        save_compacted(tmp_path / "blank", tmp_path / "c")
    assert not (tmp_path / "c").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "blank"]  # no staging folder left


def test_the_command_reports_sizes_and_fails_with_the_message(tiny_bert, tmp_path):
    from spacy_ptuning.cli import ptuning_cli

    pipeline(tiny_bert, "ptuning_ner", "prompt_encoder", 3, 77).to_disk(tmp_path / "a")
    result = CliRunner().invoke(ptuning_cli, ["compact", str(tmp_path / "a"), str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert "1 adapter(s) compacted" in result.output and (tmp_path / "b" / "config.cfg").is_file()
    result = CliRunner().invoke(ptuning_cli, ["compact", str(tmp_path / "a"), str(tmp_path / "b")])
    assert result.exit_code == 1 and "PT-E059" in result.output and "--force" in result.output
    shutil.rmtree(tmp_path / "b")
