"""A saved adapter's backbone identity and integrity: dtype-robust weight
sketch, tokenizer identity, another width, non-finite or damaged weights,
and adapters saved in format /1."""
import copy
import hashlib
import math
import shutil

import numpy
import pytest
import spacy
import srsly
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from spacy.training import Example
from spacy.util import fix_random_seed
from thinc.api import Adam

from spacy_ptuning import get_adapter, load_backbone
from spacy_ptuning.model.identity import (
    TOLERANCE,
    compare_fingerprints,
    compute_fingerprint,
    describe_fingerprint,
    legacy_fingerprint,
    tokenizer_identity,
    weight_ratios,
    weight_sketch,
)
from spacy_ptuning.model.serialization import ADAPTER_FORMAT, LEGACY_FORMAT

DTYPES = ["float32", "bfloat16", "float16"]
TEXTS = ["alice visited paris today", "bob works at acme in london"]
EXAMPLES = [
    ("alice visited paris", [(0, 5, "PER"), (14, 19, "LOC")]),
    ("bob met carol", [(0, 3, "PER"), (8, 13, "PER")]),
]


def _pipeline(backbone, dtype="float32"):
    fix_random_seed(0)
    nlp = spacy.blank("en")
    tok2vec = {
        "@architectures": "spacy_ptuning.PTuningTransformer.v1",
        "backbone": backbone,
        "num_virtual_tokens": 4,
        "dtype": dtype,
    }
    nlp.add_pipe("ptuning_ner", config={"model": {"tok2vec": tok2vec}})
    examples = [Example.from_dict(nlp.make_doc(t), {"entities": e}) for t, e in EXAMPLES]
    nlp.initialize(lambda: examples)
    optimizer = Adam(0.05)
    for _ in range(2):
        nlp.update(examples, sgd=optimizer)
    return nlp


def _override(backbone=None, dtype=None):
    tok2vec = {}
    if backbone is not None:
        tok2vec["backbone"] = backbone
    if dtype is not None:
        tok2vec["dtype"] = dtype
    return {"components": {"ptuning_ner": {"model": {"tok2vec": tok2vec}}}}


def _vectors(nlp):
    docs = [nlp.make_doc(t) for t in TEXTS]
    return nlp.get_pipe("ptuning_ner").model.get_ref("tok2vec").predict(docs)


def _edit_adapter(model_file, edit):
    """Rewrite the adapter envelope inside a component's saved model file."""
    msg = srsly.msgpack_loads(model_file.read_bytes())
    count = 0
    for saved in msg["shims"]:
        for i, data in enumerate(saved):
            header = srsly.msgpack_loads(data)
            if isinstance(header, dict) and str(header.get("format", "")).startswith("spacy-ptuning-adapter/"):
                saved[i] = srsly.msgpack_dumps(edit(header))
                count += 1
    assert count == 1
    model_file.write_bytes(srsly.msgpack_dumps(msg))


def _copy_backbone(source, target, **config_changes):
    """A copy of a backbone folder, optionally re-initialised with other config values."""
    from transformers import AutoConfig, AutoModel

    path = shutil.copytree(source, target)
    if config_changes:
        config = AutoConfig.from_pretrained(path)
        for key, value in config_changes.items():
            setattr(config, key, value)
        torch.manual_seed(0)
        AutoModel.from_config(config).save_pretrained(path)
    return str(path)


# -- dtypes ------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_by_dtype(tiny_bert):
    """A pipeline trained over each dtype's backbone: its bytes and outputs."""
    saved = {}
    for dtype in DTYPES:
        nlp = _pipeline(tiny_bert, dtype)
        saved[dtype] = (nlp.config, nlp.to_bytes(), _vectors(nlp))
    return saved


@pytest.mark.parametrize("load_dtype", DTYPES)
@pytest.mark.parametrize("train_dtype", DTYPES)
def test_adapter_loads_across_all_nine_dtype_pairs(saved_by_dtype, train_dtype, load_dtype):
    config, data, vectors = saved_by_dtype[train_dtype]
    config = copy.deepcopy(config)
    config["components"]["ptuning_ner"]["model"]["tok2vec"]["dtype"] = load_dtype
    loaded = spacy.blank("en").from_config(config).from_bytes(data)
    assert get_adapter(loaded.get_pipe("ptuning_ner").model).backbone.dtype == load_dtype
    for x, y in zip(vectors, _vectors(loaded)):
        numpy.testing.assert_allclose(x, y, atol=0.1)


def test_dtype_loads_agree_well_inside_the_tolerance(tiny_bert):
    sketches = {d: load_backbone(tiny_bert, dtype=d).fingerprint()["weights"] for d in DTYPES}
    worst = max(weight_ratios(sketches[a], sketches[b]).max() for a in DTYPES for b in DTYPES)
    assert 0 < worst < TOLERANCE / 3, worst
    fps = {d: load_backbone(tiny_bert, dtype=d).fingerprint() for d in DTYPES}
    assert all(compare_fingerprints(fps[a], fps[b]) == [] for a in DTYPES for b in DTYPES)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_and_cpu_fingerprints_agree(tiny_bert, dtype):
    cpu = load_backbone(tiny_bert, dtype=dtype, device=torch.device("cpu"))
    cuda = load_backbone(tiny_bert, dtype=dtype, device=torch.device("cuda"))
    assert compare_fingerprints(cpu.fingerprint(), cuda.fingerprint()) == []
    assert compare_fingerprints(load_backbone(tiny_bert, device=torch.device("cpu")).fingerprint(), cuda.fingerprint()) == []


# -- weights -----------------------------------------------------------------


@pytest.fixture()
def model_copy(tiny_bert):
    return copy.deepcopy(load_backbone(tiny_bert).model)


def _differences(tiny_bert, model):
    return compare_fingerprints(load_backbone(tiny_bert).fingerprint(), {**load_backbone(tiny_bert).fingerprint(), "weights": weight_sketch(model)})


def test_one_changed_embedding_row_is_refused(tiny_bert, model_copy):
    embeddings = model_copy.get_input_embeddings().weight
    with torch.no_grad():
        embeddings[40] = embeddings[41]
    differences = _differences(tiny_bert, model_copy)
    assert len(differences) == 1
    assert "'embeddings.word_embeddings.weight' (1 of 1 chunks" in differences[0]


def test_one_layer_scaled_by_five_percent_is_refused(tiny_bert, model_copy):
    with torch.no_grad():
        model_copy.encoder.layer[1].output.dense.weight.mul_(1.05)
    differences = _differences(tiny_bert, model_copy)
    assert len(differences) == 1
    assert "the weights differ in 'encoder.layer.1.output.dense.weight' (1 of 1 chunks" in differences[0]
    assert "more tensors" not in differences[0]


def test_every_weight_is_covered_not_a_sample(tiny_bert, model_copy):
    """Change every value the format /1 hash did not sample: /1 passes it as
    the original, the sketch does not."""
    with torch.no_grad():
        for tensor in model_copy.state_dict().values():
            if tensor.is_floating_point():
                flat = tensor.view(-1)
                step = max(1, flat.numel() // 512)
                keep = flat[::step][:512].clone()
                flat.mul_(-1.0)
                flat[::step][:512] = keep
    assert legacy_fingerprint(model_copy) == legacy_fingerprint(load_backbone(tiny_bert).model)
    assert _differences(tiny_bert, model_copy)


def test_one_changed_value_in_any_tensor_is_refused(tiny_bert):
    base = load_backbone(tiny_bert).model
    generator = torch.Generator().manual_seed(0)
    names = [n for n, t in base.state_dict().items() if t.is_floating_point()]
    for name in names:
        model = copy.deepcopy(base)
        tensor = model.state_dict()[name].view(-1)
        i = int(torch.randint(tensor.numel(), (1,), generator=generator))
        with torch.no_grad():
            tensor[i] += 0.05 * float(tensor.norm()) + 1e-3
        differences = _differences(tiny_bert, model)
        assert len(differences) == 1 and f"'{name}' (1 of 1 chunks" in differences[0], (name, i)


def test_non_finite_backbone_weights_count_as_a_change(tiny_bert, model_copy):
    with torch.no_grad():
        model_copy.encoder.layer[0].output.LayerNorm.bias[3] = float("inf")
    assert "LayerNorm.bias" in _differences(tiny_bert, model_copy)[0]


def test_sketch_is_small_and_fixed(tiny_bert):
    model = load_backbone(tiny_bert).model
    assert weight_sketch(model) == weight_sketch(model)
    fingerprint = compute_fingerprint(model, load_backbone(tiny_bert).tokenizer)
    assert len(srsly.msgpack_dumps(fingerprint)) < 4000


# -- tokenizer ---------------------------------------------------------------


def _retokenized(tiny_bert, target, vocab_edit=None, **kwargs):
    from transformers import BertTokenizerFast

    path = shutil.copytree(tiny_bert, target)
    vocab = (path / "vocab.txt").read_text().splitlines()
    if vocab_edit:
        vocab = vocab_edit(vocab)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (path / "tokenizer.json").unlink()
    tok = BertTokenizerFast(vocab_file=str(path / "vocab.txt"), **{"do_lower_case": True, **kwargs})
    tok.model_max_length = 64
    tok.save_pretrained(path)
    return str(path)


def _swap(vocab):
    i, j = vocab.index("paris"), vocab.index("london")
    vocab[i], vocab[j] = vocab[j], vocab[i]
    return vocab


def test_same_tokenizer_rebuilt_is_the_same(tiny_bert, tmp_path):
    rebuilt = _retokenized(tiny_bert, tmp_path / "rebuilt")
    fingerprint = load_backbone(tiny_bert).fingerprint()
    assert compare_fingerprints(fingerprint, load_backbone(rebuilt).fingerprint()) == []


def test_another_vocabulary_is_refused(tiny_bert, tmp_path):
    nlp = _pipeline(tiny_bert)
    nlp.to_disk(tmp_path / "pipe")
    swapped = _retokenized(tiny_bert, tmp_path / "swapped", vocab_edit=_swap)
    with pytest.raises(ValueError, match=r"\[PT-E006\]") as info:
        spacy.load(tmp_path / "pipe", config=_override(swapped))
    message = str(info.value)
    assert "the tokenizer differs (vocabulary" in message
    assert "weights differ" not in message and "architecture" not in message
    assert tiny_bert in message and swapped in message


def test_another_lowercasing_is_refused(tiny_bert, tmp_path):
    cased = _retokenized(tiny_bert, tmp_path / "cased", do_lower_case=False)
    differences = compare_fingerprints(load_backbone(tiny_bert).fingerprint(), load_backbone(cased).fingerprint())
    assert differences == ["the tokenizer differs (normalisation or special tokens: lowercase True vs False)"]
    accents = _retokenized(tiny_bert, tmp_path / "accents", strip_accents=False)
    differences = compare_fingerprints(load_backbone(tiny_bert).fingerprint(), load_backbone(accents).fingerprint())
    assert differences == ["the tokenizer differs (normalisation or special tokens)"]


def test_tokenizer_identity_ignores_runtime_state(tiny_bert):
    tokenizer = copy.deepcopy(load_backbone(tiny_bert).tokenizer)
    before = tokenizer_identity(tokenizer)
    tokenizer(["alice visited paris"], truncation=True, max_length=3, padding="max_length")
    tokenizer.backend_tokenizer.enable_truncation(2)
    assert tokenizer_identity(tokenizer) == before
    assert tokenizer.backend_tokenizer.truncation["max_length"] == 2  # left as it was


def test_fingerprint_uses_the_tokenizer_as_loaded(tiny_bert, tmp_path):
    """The pipelines tokenize with copies taken at load; a change to the
    public tokenizer afterwards changes neither them nor the identity."""
    backbone = load_backbone(str(shutil.copytree(tiny_bert, tmp_path / "copy")))
    backbone.tokenizer.add_tokens(["zzzzz"])
    assert compare_fingerprints(load_backbone(tiny_bert).fingerprint(), backbone.fingerprint()) == []


@pytest.mark.parametrize("backbone", ["tiny_bert", "tiny_roberta"])
def test_slow_and_fast_tokenizers_of_one_model_agree(request, backbone):
    from transformers import AutoTokenizer

    path = request.getfixturevalue(backbone)
    fast = AutoTokenizer.from_pretrained(path, use_fast=True)
    slow = AutoTokenizer.from_pretrained(path, use_fast=False)
    assert fast.is_fast and not slow.is_fast
    a, b = tokenizer_identity(fast), tokenizer_identity(slow)
    assert {k: v for k, v in a.items() if k != "class"} == {k: v for k, v in b.items() if k != "class"}


# -- another width -----------------------------------------------------------


def test_backbone_of_another_width_is_refused_as_another_backbone(tiny_bert, tmp_path):
    nlp = _pipeline(tiny_bert)
    nlp.to_disk(tmp_path / "pipe")
    wide = _copy_backbone(tiny_bert, tmp_path / "wide-bert", hidden_size=48, intermediate_size=96)
    assert load_backbone(wide).hidden_width == 48
    with pytest.raises(ValueError, match=r"\[PT-E006\].*different backbone") as info:
        spacy.load(tmp_path / "pipe", config=_override(wide))
    message = str(info.value)
    assert "the architecture differs (hidden_size 32 vs 48)" in message
    assert "PT-E008" not in message
    assert describe_fingerprint(load_backbone(tiny_bert).fingerprint()) in message
    assert describe_fingerprint(load_backbone(wide).fingerprint()) in message
    assert tiny_bert in message and wide in message
    # The same from bytes.
    config = copy.deepcopy(nlp.config)
    config["components"]["ptuning_ner"]["model"]["tok2vec"]["backbone"] = wide
    with pytest.raises(ValueError, match=r"\[PT-E006\].*hidden_size 32 vs 48"):
        spacy.blank("en").from_config(config).from_bytes(nlp.to_bytes())


# -- integrity ---------------------------------------------------------------


def _set_nan(header):
    tensors = st_load(header["weights"])
    name = sorted(tensors)[0]
    tensors[name].view(-1)[1] = float("nan")
    header["weights"] = st_save(tensors)
    header["weights_sha256"] = hashlib.sha256(header["weights"]).hexdigest()
    return header


def test_nan_prompts_are_refused(tiny_bert, tmp_path):
    nlp = _pipeline(tiny_bert)
    nlp.to_disk(tmp_path / "pipe")
    _edit_adapter(tmp_path / "pipe" / "ptuning_ner" / "model", _set_nan)
    with pytest.raises(ValueError, match=r"\[PT-E014\].*'prompts\.") as info:
        spacy.load(tmp_path / "pipe")
    assert "non-finite" in str(info.value)
    # A diverged run saved from memory is refused on load too.
    module = get_adapter(nlp.get_pipe("ptuning_ner").model)
    with torch.no_grad():
        next(module.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(ValueError, match=r"\[PT-E014\]"):
        spacy.blank("en").from_config(nlp.config).from_bytes(nlp.to_bytes())


def test_flipped_bits_are_refused_by_the_checksum(tiny_bert, tmp_path):
    nlp = _pipeline(tiny_bert)
    nlp.to_disk(tmp_path / "pipe")
    model_file = tmp_path / "pipe" / "ptuning_ner" / "model"
    data = bytearray(model_file.read_bytes())
    header = [h for h in _headers(bytes(data))][0]
    start = bytes(data).find(header["weights"])
    assert start > 0
    # Flip the low bits of the last value: the file still parses, the
    # safetensors still load, the values are still finite.
    data[start + len(header["weights"]) - 4] ^= 0x5A
    model_file.write_bytes(bytes(data))
    damaged = _headers(model_file.read_bytes())[0]
    assert all(bool(torch.isfinite(t).all()) for t in st_load(damaged["weights"]).values())
    with pytest.raises(ValueError, match=r"\[PT-E015\]") as info:
        spacy.load(tmp_path / "pipe")
    assert header["weights_sha256"] in str(info.value)


def _headers(model_bytes):
    msg = srsly.msgpack_loads(model_bytes)
    return [srsly.msgpack_loads(d) for saved in msg["shims"] for d in saved]


def test_a_newer_format_is_refused_clearly(tiny_bert, tmp_path):
    nlp = _pipeline(tiny_bert)
    nlp.to_disk(tmp_path / "pipe")
    _edit_adapter(tmp_path / "pipe" / "ptuning_ner" / "model", lambda h: {**h, "format": "spacy-ptuning-adapter/9"})
    with pytest.raises(ValueError, match=r"\[PT-E016\].*adapter/9"):
        spacy.load(tmp_path / "pipe")


# -- format /1 ---------------------------------------------------------------


def _to_format_1(backbone):
    def edit(header):
        assert header["format"] == ADAPTER_FORMAT
        return {
            "format": LEGACY_FORMAT,
            "backbone": header["backbone"],
            "fingerprint": legacy_fingerprint(load_backbone(backbone).model),
            "method": header["method"],
            "num_virtual_tokens": header["num_virtual_tokens"],
            "weights": header["weights"],
        }

    return edit


def test_format_1_adapters_still_load_and_are_checked(tiny_bert, other_tiny_bert, tmp_path):
    nlp = _pipeline(tiny_bert)
    nlp.to_disk(tmp_path / "pipe")
    _edit_adapter(tmp_path / "pipe" / "ptuning_ner" / "model", _to_format_1(tiny_bert))
    loaded = spacy.load(tmp_path / "pipe")
    for x, y in zip(_vectors(nlp), _vectors(loaded)):
        numpy.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match=r"\[PT-E006\].*sampled hash") as info:
        spacy.load(tmp_path / "pipe", config=_override(other_tiny_bert))
    assert legacy_fingerprint(load_backbone(tiny_bert).model)["weights_sha256"] in str(info.value)
    assert legacy_fingerprint(load_backbone(other_tiny_bert).model)["weights_sha256"] in str(info.value)
    # Non-finite weights are refused in /1 files too (they have no checksum).
    _edit_adapter(tmp_path / "pipe" / "ptuning_ner" / "model", _set_nan)
    with pytest.raises(ValueError, match=r"\[PT-E014\]"):
        spacy.load(tmp_path / "pipe")


# -- the real MiniLM backbone -----------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModel

    from spacy_ptuning.model.backbone import DEFAULT_BACKBONE, resolve_backbone_path

    path = resolve_backbone_path(DEFAULT_BACKBONE)
    return {d: AutoModel.from_pretrained(path, torch_dtype=getattr(torch, d)) for d in DTYPES}


@pytest.mark.slow
def test_minilm_dtypes_agree_and_real_changes_do_not(minilm):
    sketches = {}
    for dtype, model in minilm.items():
        weight_sketch(model)  # the projection matrix is drawn once
        sketches[dtype] = weight_sketch(model)  # its time: bench/, not a test (~0.1 s on two cores)
    honest = max(weight_ratios(sketches[a], sketches[b]).max() for a in DTYPES for b in DTYPES)
    assert honest < TOLERANCE / 4, honest
    assert len(srsly.msgpack_dumps(sketches["float32"])) < 24_000
    base = minilm["float32"]
    generator = torch.Generator().manual_seed(0)

    def change_row(m):
        row = m.embeddings.word_embeddings.weight[2000]
        row.copy_(torch.randn(row.shape, generator=generator) * row.std())

    def scale_layer(m):
        for p in m.encoder.layer[3].parameters():
            p.mul_(1.05)

    def other_model(m):
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * p.std() + p.mean())

    for change in (change_row, scale_layer, other_model):
        model = copy.deepcopy(base)
        with torch.no_grad():
            change(model)
        ratio = weight_ratios(sketches["float32"], weight_sketch(model)).max()
        assert ratio > 2.5 * TOLERANCE, (change.__name__, ratio)
        assert not math.isnan(ratio)
