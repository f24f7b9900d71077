"""Registered thinc architectures, and the checks that make a built pipeline
safe to run anywhere spaCy runs one: on the device thinc was told to use
(:func:`_check_torch_device`), with span getters that give every token a
window (:func:`_check_span_getter`); in worker processes
(``nlp.pipe(n_process=...)``) see ``model.threads``."""
import functools
from typing import Callable, List, Optional

import torch
from spacy.tokens import Doc
from spacy.util import registry
from spacy_transformers.layers import split_trf_batch
from spacy_transformers.layers.trfs2arrays import trfs2arrays
from spacy_transformers.span_getters import configure_strided_spans, get_strided_spans
from thinc.api import CupyOps, Model, chain, concatenate, get_current_ops, reduce_mean
from thinc.layers.concatenate import forward as _concatenate_forward
from thinc.types import Floats2d, Ragged

from ..model.backbone import DEFAULT_BACKBONE, load_backbone
from ..model.adapter import Adapter
from ..errors import ConfigError, Errors
from .precomputed import precomputed
from . import textcat_attention as _textcat_attention  # noqa: F401  (registers TextCatAttention.v1)
from . import word_features as _word_features  # noqa: F401  (registers WordFeatures.v1)
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
    dtype: str = "auto",
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
        (default: strided spans, window 128, stride 96). Strided spans must
        have stride <= window; any getter must give every token a window.
    pooling: wordpieces -> token pooling (default: mean).
    grad_factor: scale of the gradient flowing back into the prompts.
    revision: HF revision of the backbone.
    dtype: backbone weights dtype: auto (the default: bfloat16 where the
        device computes it natively, else float32; the choice and the reason
        are printed at initialisation), float32, bfloat16 or float16.
        Prompts always train in float32. In half precision a text's result
        depends slightly on the batch it is in (padding changes the rounding);
        float32 makes results stable across batches to ~1e-5.
    max_batch_tokens: the backbone runs on length-sorted groups of similar
        length of at most this many padded wordpieces (less padding);
        0 sends the whole batch padded to its longest sequence.
    """
    return _prompted_tok2vec(
        backbone, method, num_virtual_tokens, prefix_projection, prompt_encoder, prompt_dropout,
        get_spans, pooling, grad_factor, revision, dtype, max_batch_tokens,
    )


@registry.architectures("spacy_ptuning.PTuningTransformer.v2")
def ptuning_transformer_v2(
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
    dtype: str = "auto",
    max_batch_tokens: int = 4096,
    layer_mix: Optional[List[int]] = None,
    word_features: Optional[Model[List[Doc], List[Floats2d]]] = None,
) -> Model[List[Doc], List[Floats2d]]:
    """PTuningTransformer.v1 reading more than the backbone's last layer.

    Every v1 setting means what it means there (null for the two below
    builds exactly v1's model), plus:

    layer_mix: hidden states to mix with learned softmax weights and a scale
        (ELMo's scalar mix, ``layer_mix.py``): indices of HF's
        ``hidden_states``, 0 = embedding output, -1 = last layer; e.g.
        [-1, -2, -3, -4]. null: the last layer alone.
    word_features: a docs-to-vectors model trained with the prompts whose
        vectors are concatenated to the transformer's (e.g.
        ``spacy_ptuning.WordFeatures.v1``: hash embeddings of norm, prefix,
        suffix and shape through a CNN); the output width is the sum.
    """
    model = _prompted_tok2vec(
        backbone, method, num_virtual_tokens, prefix_projection, prompt_encoder, prompt_dropout,
        get_spans, pooling, grad_factor, revision, dtype, max_batch_tokens, layer_mix,
    )
    if word_features is None:
        return model
    if not isinstance(word_features, Model) or not word_features.has_dim("nO") or not word_features.get_dim("nO"):
        raise ConfigError(Errors.E048.format(found=type(word_features).__name__ if not isinstance(word_features, Model) else f"model '{word_features.name}' without nO"))
    return words_beside(model, word_features)


def words_beside(prompted: Model, word_features: Model) -> Model[List[Doc], List[Floats2d]]:
    """thinc's ``concatenate(prompted, word_features)``, same layers, dims and
    init (pipelines saved with thinc's node load into it), that at inference
    answers from vectors a mixed-adapter batch attached for it
    (:func:`precomputed`: the prompted vectors and the word features of many
    pipelines computed together, ``pipeline.gathered_words``); else it runs
    thinc's concatenate forward. Its own forward is how the mixed batch
    finds it (:func:`beside_of`)."""
    thincs = concatenate(prompted, word_features)
    model = Model(
        thincs.name,
        _beside_forward,
        init=thincs.init,
        dims={name: thincs.maybe_get_dim(name) for name in thincs.dim_names},
        layers=[prompted, word_features],
    )
    model.set_dim("nO", prompted.get_dim("nO") + word_features.get_dim("nO"))
    return model


def _beside_forward(model: Model, docs: List[Doc], is_train: bool):
    if not is_train:
        vectors = precomputed(model, docs)
        if vectors is not None:
            return vectors, lambda d_outputs: docs
    return _concatenate_forward(model, docs, is_train)


def beside_of(model: Model, tok2vec: Model) -> Optional[Model]:
    """The :func:`words_beside` node in ``model`` whose prompted side is
    ``tok2vec``, or None (v1 models, v2 without word features)."""
    for node in model.walk():
        if node._func is _beside_forward and node.layers[0] is tok2vec:
            return node
    return None


def _prompted_tok2vec(
    backbone, method, num_virtual_tokens, prefix_projection, prompt_encoder, prompt_dropout,
    get_spans, pooling, grad_factor, revision, dtype, max_batch_tokens, layer_mix=None,
) -> Model[List[Doc], List[Floats2d]]:
    _check_torch_device()
    if get_spans is None:
        get_spans = configure_strided_spans(window=128, stride=96)
    _check_span_getter(get_spans)
    shared = load_backbone(backbone, revision=revision, dtype=dtype)
    module = Adapter(
        shared,
        method=method,
        num_virtual_tokens=num_virtual_tokens,
        prefix_projection=prefix_projection,
        prompt_encoder=prompt_encoder,
        prompt_dropout=prompt_dropout,
        max_batch_tokens=max_batch_tokens,
        layer_mix=layer_mix,
        requested_dtype=dtype,
    )
    if pooling is None:
        pooling = reduce_mean()
    model = chain(ptuning_transformer_model(module, get_spans), split_trf_batch(), trfs2arrays(pooling, grad_factor))
    model.set_dim("nO", shared.hidden_width)
    return _allow_empty_batches(model)


def _allow_empty_batches(model: Model[List[Doc], List[Floats2d]]) -> Model[List[Doc], List[Floats2d]]:
    """Answer a batch of only empty docs with (0, nO) arrays (trfs2arrays
    cannot pool an empty batch). The forward is a module-level function, so
    the model pickles (spawned workers, pickle.dumps(nlp)).

    Its one layer is chain(ptuning-transformer, split_trf_batch,
    trfs2arrays), the layer tree of release 0.1.0 (saved pipelines load
    into it). Other modules reach into it only through
    ``transformer_model.transformer_of`` and :func:`vectors_from_batch`,
    by position: named refs would read better, but thinc's
    ``Model.copy()`` (which spaCy's ``replace_listeners`` calls) does not
    carry refs over (thinc 8.3 ``Model._copy``), and a copied pipeline
    would fail on them."""
    return Model(
        "ptuning-tok2vec",
        _allow_empty_forward,
        layers=[model],
        dims={"nO": model.get_dim("nO")},
    )


def vectors_from_batch(tok2vec: Model, batch) -> List[Floats2d]:
    """The token vectors a ptuning tok2vec makes of a FullTransformerBatch
    computed elsewhere (a mixed-adapter pass): its own split and pooling
    layers, at inference."""
    arrays = batch
    for layer in tok2vec.layers[0].layers[1:]:  # split_trf_batch, trfs2arrays
        arrays = layer.predict(arrays)
    return arrays


def _allow_empty_forward(outer: Model, docs: List[Doc], is_train: bool):
    width = outer.get_dim("nO")
    if not is_train:  # vectors from a mixed-adapter pass (mixed_batch.pipe_mixed)
        vectors = precomputed(outer, docs)
        if vectors is not None:
            return _full_width(outer, vectors, width), lambda d_outputs: docs
    if all(len(doc) == 0 for doc in docs):
        return [outer.ops.alloc2f(0, width) for _ in docs], lambda d_outputs: docs
    vectors, backprop = outer.layers[0](docs, is_train)
    return _full_width(outer, vectors, width), backprop


def _full_width(outer: Model, vectors: List[Floats2d], width: int) -> List[Floats2d]:
    """trfs2arrays answers an empty doc in a batch with a (0, 0) array; make it
    (0, width), so that layers concatenating ours with others' (word features)
    can stack the rows."""
    return [v if v.shape[0] or v.shape[1] == width else outer.ops.alloc2f(0, width) for v in vectors]


def _check_span_getter(get_spans: Callable) -> None:
    """Refuse strided spans that leave tokens out (stride > window), when the
    config is resolved rather than as zero vectors at prediction time.

    spacy-transformers' ``strided_spans.v1`` (what configs name) steps
    ``stride`` tokens and takes ``window`` of them, so a stride above the
    window skips ``stride - window`` tokens per step, and those tokens get no
    wordpiece and a zero vector; a stride of 0 divides by zero. Its getter is
    a ``functools.partial`` of a module-level function, so its settings are
    readable here and existing configs keep working unchanged (no registered
    wrapper of our own that configs would have to switch to). Other getters
    (sentences, whole docs, custom ones) are checked on their output at
    prediction time (``transformer_model._check_coverage``).
    """
    if isinstance(get_spans, functools.partial) and get_spans.func is get_strided_spans:
        window = get_spans.keywords.get("window")
        stride = get_spans.keywords.get("stride")
        ok = all(isinstance(v, int) and v >= 1 for v in (window, stride))
        if not ok or stride > window:
            raise ConfigError(Errors.E020.format(window=window, stride=stride))


def _check_torch_device() -> None:
    """Refuse a GPU run that torch cannot follow, with what to install.

    ``spacy train --gpu-id 0`` / ``spacy.require_gpu()`` make thinc's current
    ops CupyOps once CuPy sees a GPU; the backbone then goes to
    ``torch.device("cuda")``. A CPU-only torch build (the package's default
    pin) fails there deep inside torch ("Torch not compiled with CUDA
    enabled"). Without CuPy, thinc itself stops earlier ("Cannot use GPU, CuPy
    is not installed"), before any of our code runs.
    """
    if isinstance(get_current_ops(), CupyOps) and not torch.cuda.is_available():
        if torch.version.cuda is None:
            reason = f"this torch ({torch.__version__}) is a CPU-only build"
        else:
            reason = (
                f"this torch ({torch.__version__}, CUDA {torch.version.cuda}) sees no GPU "
                "(check the NVIDIA driver and CUDA_VISIBLE_DEVICES)"
            )
        raise ConfigError(Errors.E022.format(reason=reason))
