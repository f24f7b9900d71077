"""The thinc side: Docs -> FullTransformerBatch over an adapter, as
spacy-transformers' TransformerModel does over a whole transformer.

Why our own forward rather than spacy-transformers' ``TransformerModel``: its
model owns and serialises the HF transformer (we borrow a shared one and save
only prompts), and its windows are sized for the full model length, while
input prompts take positions and every token must still get a vector, so
oversize windows are split here (:func:`_split_oversize`). Tokenisation,
alignment, truncation and the output classes are spacy-transformers' own.
"""
from typing import Callable, List, Optional, Tuple

import numpy
from spacy.tokens import Doc, Span
from spacy_transformers.align import get_alignment, get_alignment_via_offset_mapping
from spacy_transformers.data_classes import FullTransformerBatch, WordpieceBatch
from spacy_transformers.layers.transformer_model import huggingface_tokenize
from spacy_transformers.truncate import truncate_oversize_splits
from thinc.api import ArgsKwargs, Model, xp2torch
from thinc.types import Ragged
from thinc.layers.pytorchwrapper import forward as pytorch_forward
from transformers.file_utils import ModelOutput

from ..model.adapter import Adapter
from ..errors import ConfigError, Errors
from ..model.serialization import AdapterShim


def adapter_layer(module: Adapter) -> Model[WordpieceBatch, ModelOutput]:
    """Thinc layer around the prompted encoder (only the prompts train)."""
    return Model(
        "ptuning-adapter",
        pytorch_forward,
        attrs={"convert_inputs": _convert_inputs, "convert_outputs": _convert_outputs},
        shims=[AdapterShim(module)],
    )


def _convert_inputs(model: Model, wps: WordpieceBatch, is_train: bool):
    device = model.shims[0]._model.backbone.device  # the prompts are on it too (a compacted adapter has no parameters)
    kwargs = {
        "input_ids": xp2torch(wps.input_ids, device=device),
        "attention_mask": xp2torch(wps.attention_mask, device=device),
    }
    if wps.token_type_ids is not None:
        kwargs["token_type_ids"] = xp2torch(wps.token_type_ids, device=device)
    return ArgsKwargs(args=(), kwargs=kwargs), lambda dX: []


def _convert_outputs(model: Model, inputs_outputs, is_train: bool):
    _, hidden = inputs_outputs

    def backprop(d_output: ModelOutput) -> ArgsKwargs:
        return ArgsKwargs(args=(hidden,), kwargs={"grad_tensors": d_output.values()})

    return ModelOutput(last_hidden_state=hidden), backprop


def ptuning_transformer_model(
    module: Adapter, get_spans: Callable
) -> Model[List[Doc], FullTransformerBatch]:
    """Docs -> FullTransformerBatch, like spacy-transformers' TransformerModel
    (same span getters, tokenisation and alignment) over a prompted encoder."""
    return Model(
        "ptuning-transformer",
        _transformer_forward,
        layers=[adapter_layer(module)],
        attrs={"get_spans": get_spans},
        dims={"nO": module.backbone.hidden_width},
    )


def find_adapter_layers(component) -> List[Tuple[Model, Model, Adapter]]:
    """(tok2vec layer, its ptuning-transformer, adapter) of every
    spacy-ptuning tok2vec inside a pipeline component (none for other
    components)."""
    model = getattr(component, "model", None)
    if not isinstance(model, Model):
        return []
    found = []
    for node in model.walk():
        if node.name == "ptuning-tok2vec":
            found.append((node, transformer_of(node), get_adapter(node)))
    return found


def transformer_of(tok2vec: Model) -> Model:
    """The ptuning-transformer layer of a ptuning tok2vec (its one layer is
    chain(ptuning-transformer, split_trf_batch, trfs2arrays):
    ``architectures._allow_empty_batches`` says why by position)."""
    return tok2vec.layers[0].layers[0]


def get_adapter(model: Model) -> Adapter:
    """The Adapter inside any model built by this package."""
    for node in model.walk():
        for shim in node.shims:
            if isinstance(shim, AdapterShim):
                return shim._model
    raise ValueError("No spacy-ptuning adapter in this model.")


def prepare_wordpieces(
    model: Model, docs: List[Doc]
) -> Optional[Tuple[List[List[Span]], WordpieceBatch, Ragged]]:
    """The windows (spans), wordpieces and alignment the adapter runs on, for
    a ptuning-transformer model; None when the docs hold no tokens."""
    module: Adapter = get_adapter(model)
    get_spans = model.attrs["get_spans"]
    nested_spans = get_spans(docs)
    _check_coverage(docs, nested_spans, get_spans)
    # An empty span (e.g. doc_spans of an empty doc) has no token to encode.
    nested_spans = [[span for span in doc_spans if len(span)] for doc_spans in nested_spans]
    flat_spans = [span for doc_spans in nested_spans for span in doc_spans]
    if not flat_spans:  # only empty docs
        return None
    # A tokenizer of our own for this call: the shared backbone's public one
    # may be in use, or reconfigured, by any other code (backbone.TokenizerPool).
    with module.backbone.borrow_tokenizer() as tokenizer:
        while True:
            batch_encoding = huggingface_tokenize(tokenizer, [span.text for span in flat_spans])
            lengths = batch_encoding["attention_mask"].sum(axis=1)
            nested_spans, changed = _split_oversize(nested_spans, lengths, module.max_length)
            if not changed:
                break
            flat_spans = [span for doc_spans in nested_spans for span in doc_spans]
        wordpieces = WordpieceBatch.from_batch_encoding(batch_encoding)
        if "offset_mapping" in batch_encoding:
            align = get_alignment_via_offset_mapping(flat_spans, batch_encoding["offset_mapping"])
        else:
            align = get_alignment(flat_spans, wordpieces.strings, tokenizer.all_special_tokens)
    wordpieces, align = truncate_oversize_splits(wordpieces, align, module.max_length)
    return nested_spans, wordpieces, align


def _transformer_forward(
    model: Model, docs: List[Doc], is_train: bool
) -> Tuple[FullTransformerBatch, Callable]:
    adapter = model.layers[0]  # adapter_layer
    prepared = prepare_wordpieces(model, docs)
    if prepared is None:  # only empty docs
        return FullTransformerBatch.empty(len(docs)), lambda d_output: docs
    nested_spans, wordpieces, align = prepared
    model_output, backprop_adapter = adapter(wordpieces, is_train)
    output = FullTransformerBatch(
        spans=nested_spans, wordpieces=wordpieces, model_output=model_output, align=align
    )

    def backprop(d_output: FullTransformerBatch) -> List[Doc]:
        backprop_adapter(d_output.model_output)
        return docs

    return output, backprop


def _check_coverage(docs: List[Doc], nested_spans: List[List[Span]], get_spans: Callable) -> None:
    """Refuse spans that leave a token of its doc without a window (it would
    get a zero vector, silently). Strided spans are checked when the config
    is resolved (``architectures._check_span_getter``); this catches any
    getter, on its output. Cost: one pass over the spans, 0.03 ms for a batch
    of 128 docs or one 20,000-token doc (a fifth of the getter's own time)."""
    for i, (doc, spans) in enumerate(zip(docs, nested_spans)):
        if not len(doc):
            continue
        # The usual case, spans in order without gaps, needs no array.
        end = 0
        for span in spans:
            if span.doc is not doc or span.start > end:
                break
            end = max(end, span.end)
        else:
            if end >= len(doc):
                continue
        covered = numpy.zeros(len(doc), dtype=bool)
        for span in spans:
            if span.doc is doc:
                covered[span.start : span.end] = True
        if not covered.all():
            missing = numpy.flatnonzero(~covered)
            raise ConfigError(
                Errors.E021.format(
                    getter=_describe(get_spans),
                    missing=len(missing),
                    total=len(doc),
                    doc=i,
                    first=int(missing[0]),
                    text=doc[int(missing[0])].text,
                )
            )


def _describe(get_spans: Callable) -> str:
    func = getattr(get_spans, "func", get_spans)
    name = getattr(func, "__qualname__", type(func).__name__)
    keywords = getattr(get_spans, "keywords", None)
    return f"{name}({keywords})" if keywords else name


def _split_oversize(
    nested_spans: List[List[Span]], lengths, max_length: int
) -> Tuple[List[List[Span]], bool]:
    """Halve every span of several tokens whose wordpieces exceed max_length,
    so that every token gets a vector; single oversize tokens are left to
    spacy-transformers' truncate_oversize_splits."""
    result, i, changed = [], 0, False
    for doc_spans in nested_spans:
        fitted = []
        for span in doc_spans:
            if lengths[i] > max_length and len(span) > 1:
                middle = len(span) // 2
                fitted.extend([span[:middle], span[middle:]])
                changed = True
            else:
                fitted.append(span)
            i += 1
        result.append(fitted)
    return result, changed
