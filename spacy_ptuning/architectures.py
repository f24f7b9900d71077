"""Registered thinc architectures."""
from typing import Callable, List, Optional

from spacy.tokens import Doc
from spacy.util import registry
from spacy_transformers.layers import split_trf_batch
from spacy_transformers.layers.trfs2arrays import trfs2arrays
from spacy_transformers.span_getters import configure_strided_spans
from thinc.api import Model, chain, reduce_mean
from thinc.types import Floats2d, Ragged

from .backbone import DEFAULT_BACKBONE, load_backbone
from .adapter import Adapter
from .transformer_model import ptuning_transformer_model


@registry.architectures("spacy_ptuning.PTuningTransformer.v1")
def ptuning_transformer_v1(
    backbone: str = DEFAULT_BACKBONE,
    method: str = "prefix",
    num_virtual_tokens: int = 16,
    prefix_projection: int = 0,
    prompt_encoder: str = "lstm",
    prompt_dropout: float = 0.0,
    get_spans: Optional[Callable] = None,
    pooling: Optional[Model[Ragged, Floats2d]] = None,
    grad_factor: float = 1.0,
    revision: Optional[str] = None,
    dtype: str = "float32",
    max_batch_tokens: int = 4096,
) -> Model[List[Doc], List[Floats2d]]:
    """A frozen, shared Hugging Face encoder with trainable continuous prompts,
    usable as the tok2vec of any spaCy component: one vector per token.

    backbone: HF name or local path (default: the embedded all-MiniLM-L6-v2).
    method: "prefix" (P-Tuning v2 key/value prefixes in every layer),
        "prompt_encoder" (P-Tuning v1: input prompts from a bi-LSTM/MLP) or
        "prompt" (prompt tuning: free input embeddings).
    num_virtual_tokens: prefix / prompt length.
    prefix_projection: hidden size of the MLP reparameterisation of the
        prefixes (0 = none). Only for method "prefix".
    prompt_encoder: "lstm" or "mlp" (method "prompt_encoder" only).
    prompt_dropout: dropout on the prefixes / prompts while training.
    get_spans: spacy-transformers span getter splitting docs into windows
        (default: strided spans, window 128, stride 96).
    pooling: wordpieces -> token pooling (default: mean).
    grad_factor: scale of the gradient flowing back into the prompts.
    revision: HF revision of the backbone.
    dtype: backbone weights dtype: float32, bfloat16 or float16 (prompts
        always train in float32).
    max_batch_tokens: the backbone runs on length-sorted groups of similar
        length of at most this many padded wordpieces (less padding);
        0 sends the whole batch padded to its longest sequence.
    """
    shared = load_backbone(backbone, revision=revision, dtype=dtype)
    module = Adapter(
        shared,
        method=method,
        num_virtual_tokens=num_virtual_tokens,
        prefix_projection=prefix_projection,
        prompt_encoder=prompt_encoder,
        prompt_dropout=prompt_dropout,
        max_batch_tokens=max_batch_tokens,
    )
    if get_spans is None:
        get_spans = configure_strided_spans(window=128, stride=96)
    if pooling is None:
        pooling = reduce_mean()
    model = chain(
        ptuning_transformer_model(module, get_spans),
        split_trf_batch(),
        trfs2arrays(pooling, grad_factor),
    )
    model.set_dim("nO", shared.hidden_width)
    return _allow_empty_batches(model)


def _allow_empty_batches(model: Model[List[Doc], List[Floats2d]]) -> Model[List[Doc], List[Floats2d]]:
    """Answer a batch of only empty docs with (0, nO) arrays (trfs2arrays
    cannot pool an empty batch)."""

    def forward(outer: Model, docs: List[Doc], is_train: bool):
        if all(len(doc) == 0 for doc in docs):
            width = outer.get_dim("nO")
            return [outer.ops.alloc2f(0, width) for _ in docs], lambda d_outputs: docs
        return model(docs, is_train)

    return Model(
        "ptuning-tok2vec",
        forward,
        layers=[model],
        dims={"nO": model.get_dim("nO")},
    )
