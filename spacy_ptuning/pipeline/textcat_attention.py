"""A text classifier head that pools a doc's token vectors by the mean and by
a learned attention, side by side.

Why not spaCy's heads: ``spacy.TextCatReduce.v1`` pools without parameters
(first, last, max, mean), so over frozen-backbone vectors a classifier can
only weigh all tokens alike; ``spacy.TextCatParametricAttention.v1`` learns
the weighting but adds a fixed width x width key transform and a residual
maxout (about 0.8M parameters, 3.2 MB, at the 448-wide vectors of
``PTuningTransformer.v2`` with word features), more than the adapter's own
prompts and past its size budget. This head uses thinc's own layers
(``ParametricAttention.v2`` without key transform: one learned query of
``width`` numbers; ``reduce_mean``; ``Maxout``; the output layer and resizing
as ``TextCatReduce.v1`` builds them), so that it adds ``width`` parameters
plus an optional hidden layer of ``hidden_width``.
"""
from functools import partial
from typing import List, Optional

from spacy.ml.models.textcat import NEG_VALUE, resize_and_set_ref
from spacy.tokens import Doc
from spacy.util import registry
from thinc.api import (
    Linear,
    Logistic,
    Maxout,
    Model,
    ParametricAttention_v2,
    Softmax,
    chain,
    concatenate,
    list2ragged,
    reduce_mean,
    reduce_sum,
    resizable,
)
from thinc.layers.chain import init as init_chain
from thinc.layers.resizable import resize_linear_weighted
from thinc.types import Floats2d

from ..errors import ConfigError, Errors


@registry.architectures("spacy_ptuning.TextCatAttention.v1")
def textcat_attention_v1(
    tok2vec: Model[List[Doc], List[Floats2d]],
    exclusive_classes: bool,
    hidden_width: int = 0,
    maxout_pieces: int = 2,
    nO: Optional[int] = None,
) -> Model[List[Doc], Floats2d]:
    """Scores of a doc from ``[mean of its token vectors, their attention-
    weighted sum]`` (twice tok2vec's width), through a maxout layer of
    ``hidden_width`` (with layer norm) if it is > 0, then a softmax
    (``exclusive_classes``) or a logistic per label."""
    if isinstance(hidden_width, bool) or not isinstance(hidden_width, int) or hidden_width < 0:
        raise ConfigError(Errors.E053.format(option="hidden_width", value=hidden_width, rule="an integer >= 0 (0: no hidden layer)"))
    if isinstance(maxout_pieces, bool) or not isinstance(maxout_pieces, int) or maxout_pieces < 1:
        raise ConfigError(Errors.E053.format(option="maxout_pieces", value=maxout_pieces, rule="a positive integer"))
    attention = ParametricAttention_v2()
    pooled = chain(tok2vec, list2ragged(), concatenate(reduce_mean(), chain(attention, reduce_sum())))
    hidden = Maxout(nO=hidden_width, nP=maxout_pieces, normalize=True) if hidden_width else None
    fill_defaults = {"b": NEG_VALUE if exclusive_classes else 0, "W": 0}
    output_layer = Softmax(nO=nO) if exclusive_classes else Linear(nO=nO)
    resizable_layer = resizable(output_layer, resize_layer=partial(resize_linear_weighted, fill_defaults=fill_defaults))
    layers = [pooled] + ([hidden] if hidden is not None else []) + [resizable_layer]
    if not exclusive_classes:
        layers.append(Logistic())
    model = chain(*layers)
    model.init = _init
    model.set_ref("tok2vec", tok2vec)
    model.set_ref("attention_layer", attention)
    model.set_ref("output_layer", output_layer)
    if hidden is not None:
        model.set_ref("hidden_layer", hidden)
    model.attrs["resize_output"] = partial(resize_and_set_ref, resizable_layer=resizable_layer)
    model.attrs["multi_label"] = not exclusive_classes
    if nO is not None:
        model.set_dim("nO", nO)
    return model


def _init(model: Model, X=None, Y=None) -> Model:
    """Initialise tok2vec first, so that the pooled width (twice its ``nO``)
    is known to the layers after it."""
    tok2vec = model.get_ref("tok2vec")
    if X is not None:
        tok2vec.initialize(X)
    width = tok2vec.get_dim("nO")
    model.get_ref("attention_layer").set_dim("nO", width)
    first = model.get_ref("hidden_layer") if model.has_ref("hidden_layer") else model.get_ref("output_layer")
    first.set_dim("nI", 2 * width)
    init_chain(model, X, Y)
    return model
