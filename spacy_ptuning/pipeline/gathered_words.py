"""Word features of many pipelines' docs in one call, for a mixed-adapter
batch (``serving.mixed_batch``): the same numbers as each pipeline's own
``WordFeatures.v1`` model, without running its thinc layers one by one.

Why not the models' own forward: at inference a ``WordFeatures.v1`` model
is about thirty thinc nodes (feature extraction, four hash tables, a maxout
mix, a residual maxout window CNN), each called with its own closures and
list/ragged conversions, and its matrix products go through thinc's blis
``gemm``, which on a few dozen rows runs at a fraction of numpy's BLAS
speed. A server batch over 32 adapters pays that 32 times: measured as most
of what NER adapters lose at 1,000 tenants (``bench/batch_tenants.py``). Here a
:class:`Plan` reads the layers' parameters once per batch and runs thinc's
own ops on them (``hash``, ``gather_add``, ``maxout``, ``flatten``,
``seq2col``) in the order the layers run them, with the array library's
matrix product in place of thinc's ``gemm`` (faster on a few dozen rows),
so results equal the model's own to float rounding (tested against it); a
doc's attributes (``doc.to_array``) are read once for every group it is in.

Only the structure spaCy builds for ``MultiHashEmbed.v2`` (no static
vectors) into ``MaxoutWindowEncoder.v2`` (what ``WordFeatures.v1`` and
``spacy.HashEmbedCNN`` make) has a plan; any other word-features model
keeps running its own forward, so nothing here limits what a config may
name.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy
from spacy.ml.featureextractor import forward as _extract_forward
from spacy.tokens import Doc
from thinc.api import Model
from thinc.layers.chain import forward as _chain_forward
from thinc.layers.concatenate import forward as _concatenate_forward
from thinc.layers.dropout import forward as _dropout_forward
from thinc.layers.expand_window import forward as _expand_window_forward
from thinc.layers.hashembed import forward as _hashembed_forward
from thinc.layers.layernorm import forward as _layernorm_forward
from thinc.layers.list2ragged import forward as _list2ragged_forward
from thinc.layers.maxout import forward as _maxout_forward
from thinc.layers.ragged2list import forward as _ragged2list_forward
from thinc.layers.residual import forward as _residual_forward
from thinc.layers.with_array import forward as _with_array_forward
from thinc.types import Floats2d

from .half_storage import as_float32, gather_rows, is_layer


@dataclass(frozen=True)
class Table:
    """One hash embedding: the column of the extracted features it reads,
    its hash seed, and its layer (whose ``E`` is read at each call)."""

    column: int
    seed: int
    layer: Model


@dataclass(frozen=True)
class Maxout:
    """A maxout layer and the layer norm after it."""

    maxout: Model
    norm: Model


@dataclass(frozen=True)
class Plan:
    """What a word-features model computes, as data: extract ``columns``,
    embed with ``tables`` and concatenate, ``mix``, then per ``encoder``
    layer ``x + maxout(seq2col(x, window))`` over the docs flattened with
    ``pad`` zero rows around each."""

    columns: Tuple
    tables: Tuple[Table, ...]
    mix: Maxout
    encoder: Tuple[Maxout, ...]
    window: int
    pad: int
    width: int


def plan_of(model: Model) -> Optional[Plan]:
    """The plan of ``model`` if it has spaCy's hash-embed-CNN structure and
    is initialised, else None (it then runs its own forward)."""
    try:
        return _plan_of(model)
    except _NoPlan:
        return None


class _NoPlan(Exception):
    pass


def _need(condition) -> None:
    if not condition:
        raise _NoPlan


def _steps(model: Model) -> List[Model]:
    """A chain's layers, nested chains flattened; dropout (inference: the
    identity) left out."""
    if model._func is _chain_forward:
        return [step for layer in model.layers for step in _steps(layer)]
    return [] if model._func is _dropout_forward else [model]


def _plan_of(model: Model) -> Plan:
    steps = _steps(model)
    _need(len(steps) == 6)
    extract, to_ragged, embed, mix, to_list, encode = steps
    _need(extract._func is _extract_forward and to_ragged._func is _list2ragged_forward)
    _need(to_list._func is _ragged2list_forward)
    columns = extract.attrs["columns"]
    _need(embed._func is _with_array_forward and embed.attrs.get("pad", 0) == 0)
    (concat,) = embed.layers
    _need(concat._func is _concatenate_forward)
    tables = []
    for table in concat.layers:
        parts = _steps(table)
        _need(len(parts) == 2 and is_layer(parts[1], _hashembed_forward) and parts[1].has_param("E"))
        column = table.attrs.get("column")
        _need(isinstance(column, int) and 0 <= column < len(columns))
        _need(parts[0].attrs.get("index") == (slice(0, None), column))  # thinc's ints_getitem of that column
        tables.append(Table(column, int(parts[1].attrs["seed"]), parts[1]))
    _need(mix._func is _with_array_forward)
    (mix_layer,) = mix.layers
    mixed = _maxout(mix_layer)
    _need(mixed.maxout.get_dim("nI") == sum(t.layer.get_param("E").shape[1] for t in tables))
    _need(encode._func is _with_array_forward)
    (stack,) = encode.layers
    encoder = []
    window = None
    for block in _steps(stack):
        _need(block._func is _residual_forward)
        (cnn,) = block.layers
        expand, *rest = _steps(cnn)
        _need(expand._func is _expand_window_forward)
        _need(window is None or expand.attrs["window_size"] == window)
        window = expand.attrs["window_size"]
        layer = _maxout(rest)
        _need(layer.maxout.get_dim("nI") == layer.maxout.get_dim("nO") * (2 * window + 1))
        encoder.append(layer)
    _need(encoder)
    width = mixed.maxout.get_dim("nO")
    _need(all(layer.maxout.get_dim("nO") == width for layer in encoder))
    return Plan(tuple(columns), tuple(tables), mixed, tuple(encoder), window, int(encode.attrs["pad"]), width)


def _maxout(layer) -> Maxout:
    """Maxout then LayerNorm (thinc's ``Maxout(normalize=True)``): a model,
    or its steps."""
    steps = _steps(layer) if isinstance(layer, Model) else layer
    _need(len(steps) == 2 and is_layer(steps[0], _maxout_forward) and steps[1]._func is _layernorm_forward)
    _need(steps[0].has_param("W") and steps[1].has_param("G"))
    return Maxout(steps[0], steps[1])


def gathered_word_features(groups: Sequence[Tuple[Plan, Sequence[Doc]]]) -> List[List[Floats2d]]:
    """Each group's docs through its plan: per group, one ``(len(doc),
    width)`` array per doc, as the planned model's ``predict(docs)``. A doc
    in several groups (two components of one pipeline) has its attributes
    read once."""
    features: Dict[Tuple[int, Tuple], numpy.ndarray] = {}  # (doc id, columns) -> uint64 (tokens, columns)
    out = []
    for plan, docs in groups:
        ops = plan.mix.maxout.ops
        lengths = [len(doc) for doc in docs]
        if not sum(lengths):
            out.append([ops.alloc2f(0, plan.width) for _ in docs])
            continue
        for doc in docs:
            key = (id(doc), plan.columns)
            if key not in features:
                array = doc.to_array(list(plan.columns)).reshape((len(doc), len(plan.columns)))
                features[key] = ops.asarray2i(array, dtype="uint64")
        F = ops.xp.concatenate([features[(id(doc), plan.columns)] for doc in docs])
        embedded = []
        for table in plan.tables:
            vectors = table.layer.get_param("E")
            keys = ops.hash(ops.as_contig(F[:, table.column], dtype="uint64"), table.seed) % vectors.shape[0]
            embedded.append(gather_rows(ops, vectors, keys))  # a float16 table too (half_storage.py)
        X = _apply(ops, plan.mix, ops.xp.hstack(embedded))
        Xf = ops.flatten(ops.unflatten(X, ops.asarray1i(lengths)), pad=plan.pad)
        for layer in plan.encoder:
            Xf = Xf + _apply(ops, layer, ops.seq2col(Xf, plan.window))
        out.append(ops.unflatten(Xf, ops.asarray1i(lengths), pad=plan.pad))
    return out


def _apply(ops, layer: Maxout, X):
    """maxout then layer norm, as thinc's Maxout and LayerNorm forwards."""
    model = layer.maxout
    nO, nP, nI = model.get_dim("nO"), model.get_dim("nP"), model.get_dim("nI")
    # The array library's matmul, not ops.gemm: on these small shapes (tens of
    # rows) numpy's BLAS ran 3-6x thinc's blis gemm (bench/RESULTS.md); the
    # same product to float32 rounding.
    # float32 weights, also where a server holds them in float16 (half_storage.py).
    Y = ops.xp.matmul(X, ops.reshape2f(as_float32(model.get_param("W")), nO * nP, nI).T)
    Y += ops.reshape1f(as_float32(model.get_param("b")), nO * nP)
    best, _ = ops.maxout(ops.reshape3f(Y, Y.shape[0], nO, nP))
    mu = best.mean(axis=1, keepdims=True)
    var = best.var(axis=1, keepdims=True) + 1e-08
    Y = (best - mu) * var ** (-1.0 / 2.0)
    Y = Y * layer.norm.get_param("G")
    Y += layer.norm.get_param("b")
    return Y
