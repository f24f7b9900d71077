"""Bad input gets a clear error or a correct empty result, never a crash."""
import numpy
import pytest
import torch
import spacy
from spacy.training import Example
from spacy.util import fix_random_seed

from spacy_ptuning import get_adapter, load_backbone
from spacy_ptuning.model.methods import MIN_TEXT_POSITIONS
from spacy_ptuning.errors import ConfigError
from spacy_ptuning.pipeline.architectures import ptuning_transformer_v1


@pytest.fixture(scope="module")
def ner_nlp(tiny_bert):
    fix_random_seed(0)
    nlp = spacy.blank("en")
    nlp.add_pipe(
        "ptuning_ner",
        config={"model": {"tok2vec": {"@architectures": "spacy_ptuning.PTuningTransformer.v1", "backbone": tiny_bert, "num_virtual_tokens": 4}}},
    )
    ex = Example.from_dict(nlp.make_doc("alice visited paris"), {"entities": [(0, 5, "PER")]})
    nlp.initialize(lambda: [ex])
    return nlp


@pytest.mark.parametrize("method", ["prefix", "prompt_encoder", "prompt"])
def test_empty_whitespace_and_long_docs(tiny_bert, method):
    nlp = spacy.blank("en")
    model = ptuning_transformer_v1(backbone=tiny_bert, method=method, num_virtual_tokens=4)
    model.initialize()
    long_text = " ".join(["alice visited paris with bob"] * 400)  # 2,000 tokens >> 64 positions
    docs = [nlp(""), nlp("   \n "), nlp(long_text), nlp("a " + "x" * 300), nlp("good")]
    outputs = model.predict(docs)
    assert [o.shape[0] for o in outputs] == [len(d) for d in docs]
    assert all(numpy.isfinite(o).all() for o in outputs)
    # Every token of the long doc got a real (non-zero) vector from some window.
    assert (numpy.abs(outputs[2]).sum(axis=1) > 0).all()
    assert model.predict([nlp("")])[0].shape[0] == 0  # a batch of only empty docs


def test_pipeline_handles_empty_and_long_docs(ner_nlp):
    texts = ["", "   ", " ".join(["carol met dave in rome ."] * 300)]
    docs = list(ner_nlp.pipe(texts))
    assert [len(d) for d in docs] == [0, 1, 1800]
    losses = {}
    examples = [Example.from_dict(ner_nlp.make_doc(t), {"entities": []}) for t in texts]
    ner_nlp.update(examples, losses=losses)
    assert numpy.isfinite(losses["ptuning_ner"])


def test_missing_backbone_names_it_and_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"\[PT-E001\].*no-such-org/no-such-model") as info:
        load_backbone("no-such-org/no-such-model")
    assert "local folder" in str(info.value) and "spacy.load" in str(info.value)
    with pytest.raises(OSError, match=r"\[PT-E001\].*/nowhere/model"):
        load_backbone("/nowhere/model")


def test_missing_backbone_from_add_pipe(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nlp = spacy.blank("en")
    with pytest.raises(OSError, match=r"\[PT-E001\]"):
        nlp.add_pipe("ptuning_ner", config={"model": {"tok2vec": {"backbone": "/nowhere/model"}}})
    assert nlp.pipe_names == []


def test_unsupported_architecture_lists_supported(tmp_path):
    from transformers import GPT2Config, GPT2Model

    GPT2Model(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"\[PT-E002\].*gpt2.*Supported: .*bert"):
        load_backbone(str(tmp_path))


@pytest.mark.parametrize(
    "kwargs,code",
    [
        ({"method": "lora"}, "E003"),
        ({"num_virtual_tokens": 0}, "E004"),
        ({"method": "prompt_encoder", "prompt_encoder": "gru"}, "E005"),
        ({"dtype": "int8"}, "E009"),
        # Options of another method, set to a non-default value.
        ({"method": "prompt", "prefix_projection": 32}, "E011"),
        ({"method": "prefix", "prompt_encoder": "mlp"}, "E011"),
        ({"prefix_projection": -1}, "E012"),
        ({"max_batch_tokens": -5}, "E012"),
        ({"prompt_dropout": 1.0}, "E012"),
    ],
)
def test_bad_settings(tiny_bert, kwargs, code):
    with pytest.raises(ConfigError, match=rf"\[PT-{code}\]"):
        ptuning_transformer_v1(backbone=tiny_bert, **kwargs)


@pytest.mark.parametrize("method", ["prompt", "prompt_encoder"])
def test_input_prompts_must_leave_room_for_text(tiny_bert, method):
    """tiny_bert holds 64 positions: input prompts may take 64 - 16 of them."""
    most = load_backbone(tiny_bert).max_length - MIN_TEXT_POSITIONS
    model = ptuning_transformer_v1(backbone=tiny_bert, method=method, num_virtual_tokens=most)
    assert get_adapter(model).max_length == MIN_TEXT_POSITIONS
    for n in (most + 1, 63, 64, 600):
        with pytest.raises(ConfigError, match=rf"\[PT-E013\].*at most {most} virtual tokens"):
            ptuning_transformer_v1(backbone=tiny_bert, method=method, num_virtual_tokens=n)
    # Prefixes take no positions: any length works.
    ptuning_transformer_v1(backbone=tiny_bert, method="prefix", num_virtual_tokens=600)


def test_options_at_their_defaults_are_accepted_for_every_method(tiny_bert):
    """Configs list every option; defaults of other methods are not errors."""
    for method in ("prefix", "prompt_encoder", "prompt"):
        ptuning_transformer_v1(
            backbone=tiny_bert, method=method, prefix_projection=0, prompt_encoder="lstm", num_virtual_tokens=4
        )


def test_twenty_thousand_token_doc(tiny_bert):
    nlp = spacy.blank("en")
    model = ptuning_transformer_v1(backbone=tiny_bert, num_virtual_tokens=4)
    model.initialize()
    doc = nlp(" ".join(["carol met dave in rome today ."] * 2858)[:-1] + "!")
    assert len(doc) >= 20_000
    (vectors,) = model.predict([doc])
    assert vectors.shape == (len(doc), 32)
    assert (numpy.abs(vectors).sum(axis=1) > 0).all()


# --- Span getters that leave tokens out; the GPU without a CUDA torch ---


@pytest.mark.parametrize("window,stride", [(2, 3), (4, 5), (96, 128), (4, 0), (0, 0)])
def test_strided_spans_with_gaps_are_refused(tiny_bert, window, stride):
    """spacy-transformers' strided spans with stride > window skip tokens
    (they would get zero vectors); refused when the config is resolved."""
    from spacy_transformers.span_getters import configure_strided_spans

    get_spans = configure_strided_spans(window=window, stride=stride)
    with pytest.raises(ConfigError, match=rf"\[PT-E020\].*stride \({stride}\).*window \({window}\)"):
        ptuning_transformer_v1(backbone=tiny_bert, num_virtual_tokens=4, get_spans=get_spans)
    nlp = spacy.blank("en")
    tok2vec = {
        "@architectures": "spacy_ptuning.PTuningTransformer.v1",
        "backbone": tiny_bert,
        "get_spans": {"@span_getters": "spacy-transformers.strided_spans.v1", "window": window, "stride": stride},
    }
    with pytest.raises(ConfigError, match=r"\[PT-E020\]"):
        nlp.add_pipe("ptuning_ner", config={"model": {"tok2vec": tok2vec}})


@pytest.mark.parametrize(
    "getter",
    [
        {"@span_getters": "spacy-transformers.strided_spans.v1", "window": 3, "stride": 3},
        {"@span_getters": "spacy-transformers.strided_spans.v1", "window": 5, "stride": 2},
        {"@span_getters": "spacy-transformers.doc_spans.v1"},
    ],
)
def test_span_getters_that_cover_every_token_work(tiny_bert, getter):
    nlp = spacy.blank("en")
    model = ptuning_transformer_v1(
        backbone=tiny_bert, num_virtual_tokens=4, get_spans=spacy.util.registry.resolve({"g": getter})["g"]
    )
    model.initialize()
    docs = [nlp("alice visited paris with bob and carol today ."), nlp("good"), nlp("")]
    outputs = model.predict(docs)
    assert [o.shape[0] for o in outputs] == [len(d) for d in docs]
    assert all((numpy.abs(o).sum(axis=1) > 0).all() for o in outputs)


def test_custom_span_getter_that_skips_tokens_is_refused(tiny_bert):
    """Any getter is checked on its output: a gap is an error naming the
    getter, the doc and the first token without a window, not zero vectors."""

    def every_other_pair(docs):
        return [[doc[i : i + 2] for i in range(0, len(doc), 4)] for doc in docs]

    nlp = spacy.blank("en")
    model = ptuning_transformer_v1(backbone=tiny_bert, num_virtual_tokens=4, get_spans=every_other_pair)
    model.initialize()
    ok = nlp("alice met")  # two tokens: covered
    assert model.predict([ok])[0].shape == (2, 32)
    bad = nlp("alice met bob in paris")
    with pytest.raises(ConfigError, match=r"\[PT-E021\].*every_other_pair.*2 of the 5 tokens of doc 1.*token 2, 'bob'"):
        model.predict([ok, bad])
    # Spans of another doc cover nothing of this one.
    other = nlp("alice met bob in paris")
    stray = ptuning_transformer_v1(backbone=tiny_bert, num_virtual_tokens=4, get_spans=lambda docs: [[other[:]] for _ in docs])
    stray.initialize()
    with pytest.raises(ConfigError, match=r"\[PT-E021\].*5 of the 5 tokens of doc 0"):
        stray.predict([bad])


@pytest.mark.parametrize(
    "cuda_version,expected",
    [(None, r"CPU-only build"), ("12.1", r"CUDA 12.1\) sees no GPU.*CUDA_VISIBLE_DEVICES")],
)
def test_gpu_requested_without_cuda_torch_says_what_to_install(tiny_bert, monkeypatch, cuda_version, expected):
    """`spacy train --gpu-id 0` with CuPy installed but a torch without CUDA:
    thinc's ops are CupyOps, torch cannot follow. Our message says what to
    install instead of torch's 'Torch not compiled with CUDA enabled'."""
    import torch
    from thinc.api import CupyOps, get_current_ops, set_current_ops

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", cuda_version)
    nlp = spacy.blank("en")
    previous = get_current_ops()
    set_current_ops(CupyOps())  # what require_gpu() does once CuPy sees a GPU
    try:
        with pytest.raises(ConfigError, match=rf"\[PT-E022\].*{expected}") as info:
            ptuning_transformer_v1(backbone=tiny_bert, num_virtual_tokens=4)
        with pytest.raises(ConfigError, match=r"\[PT-E022\]"):
            nlp.add_pipe("ptuning_ner", config={"model": {"tok2vec": {"backbone": tiny_bert}}})
    finally:
        set_current_ops(previous)
    message = str(info.value)
    assert "cupy-cuda12x" in message and "download.pytorch.org/whl/cu" in message
    assert "--gpu-id -1" in message


def _no_probe():
    raise AssertionError("a CPU without bfloat16 instructions needs no timing")


@pytest.mark.parametrize(
    "flags,speedup,expected",
    [
        ({"avx512f", "avx512_bf16"}, 2.5, "bfloat16"),
        ({"amx_bf16", "amx_tile"}, 6.0, "bfloat16"),
        ({"avx512f", "avx512_bf16"}, 0.6, "float32"),  # seen: AVX512-BF16 without AMX, bf16 slower
        ({"avx512f", "avx512_bf16"}, 1.1, "float32"),  # within the margin: not worth the rounding
        ({"avx2", "avx512f"}, None, "float32"),
        (set(), None, "float32"),
    ],
)
def test_auto_dtype_follows_the_cpu(tiny_bert, monkeypatch, capsys, flags, speedup, expected):
    from spacy_ptuning.model import backbone as bb

    monkeypatch.setattr(bb, "_cpu_flags", lambda: set(flags))
    monkeypatch.setattr(bb, "_bf16_speedup", _no_probe if speedup is None else lambda: speedup)
    choice, reason = bb.auto_dtype(torch.device("cpu"))
    assert choice == expected
    if speedup is not None and expected == "float32":
        assert f"ran only {speedup:.2f}x as fast" in reason and 'dtype = "bfloat16"' in reason
    nlp = spacy.blank("en")
    nlp.add_pipe("ptuning_ner", config={"model": {"tok2vec": {"backbone": tiny_bert, "dtype": "auto", "num_virtual_tokens": 4}}})
    assert get_adapter(nlp.get_pipe("ptuning_ner").model).backbone.dtype == expected
    ex = Example.from_dict(nlp.make_doc("alice visited paris"), {"entities": [(0, 5, "PER")]})
    nlp.initialize(lambda: [ex])
    line = capsys.readouterr().out
    assert f"dtype={expected} (auto: the CPU has" in line
