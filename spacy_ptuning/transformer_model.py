"""The thinc side: Docs -> FullTransformerBatch over an adapter, as
spacy-transformers' TransformerModel does over a whole transformer.

Why our own forward rather than spacy-transformers' ``TransformerModel``: its
model owns and serialises the HF transformer (we borrow a shared one and save
only prompts), and its windows are sized for the full model length, while
input prompts take positions and every token must still get a vector, so
oversize windows are split here (:func:`_split_oversize`). Tokenisation,
alignment, truncation and the output classes are spacy-transformers' own.
"""
from typing import Callable, List, Tuple

from spacy.tokens import Doc, Span
from spacy_transformers.align import get_alignment, get_alignment_via_offset_mapping
from spacy_transformers.data_classes import FullTransformerBatch, WordpieceBatch
from spacy_transformers.layers.transformer_model import huggingface_tokenize
from spacy_transformers.truncate import truncate_oversize_splits
from thinc.api import ArgsKwargs, Model, xp2torch
from thinc.layers.pytorchwrapper import forward as pytorch_forward
from transformers.file_utils import ModelOutput

from .adapter import Adapter
from .serialization import AdapterShim


def adapter_layer(module: Adapter) -> Model[WordpieceBatch, ModelOutput]:
    """Thinc layer around the prompted encoder (only the prompts train)."""
    return Model(
        "ptuning-adapter",
        pytorch_forward,
        attrs={"convert_inputs": _convert_inputs, "convert_outputs": _convert_outputs},
        shims=[AdapterShim(module)],
    )


def _convert_inputs(model: Model, wps: WordpieceBatch, is_train: bool):
    device = next(model.shims[0]._model.parameters()).device
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


def get_adapter(model: Model) -> Adapter:
    """The Adapter inside any model built by this package."""
    for node in model.walk():
        for shim in node.shims:
            if isinstance(shim, AdapterShim):
                return shim._model
    raise ValueError("No spacy-ptuning adapter in this model.")


def _transformer_forward(
    model: Model, docs: List[Doc], is_train: bool
) -> Tuple[FullTransformerBatch, Callable]:
    adapter = model.layers[0]
    module: Adapter = adapter.shims[0]._model
    tokenizer = module.backbone.tokenizer
    nested_spans = model.attrs["get_spans"](docs)
    flat_spans = [span for doc_spans in nested_spans for span in doc_spans]
    if not flat_spans:  # only empty docs
        return FullTransformerBatch.empty(len(docs)), lambda d_output: docs
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
    model_output, backprop_adapter = adapter(wordpieces, is_train)
    output = FullTransformerBatch(
        spans=nested_spans, wordpieces=wordpieces, model_output=model_output, align=align
    )

    def backprop(d_output: FullTransformerBatch) -> List[Doc]:
        backprop_adapter(d_output.model_output)
        return docs

    return output, backprop


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
