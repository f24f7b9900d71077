"""Word features held in float16, for a server's resident adapters.

A resident adapter's word features (``WordFeatures.v1``: four ``HashEmbed``
tables, 5,000 rows of width 64, and the maxout layers that mix and
contextualise them) are most of its bytes: 1.8 MB of about 2 MB in float32.
A server holding thousands of adapters can keep them in half the bytes. The
arithmetic is unchanged: a table's rows are read (four a token) and summed
in float32, a maxout layer's weights are cast to float32 for its product.
The result is that of the same model with those parameters rounded to
float16 (tested against thinc's own forward on the rounded model).

Why our own forwards and not thinc's: thinc's ``HashEmbed`` sums its rows
with ``ops.gather_add``, which takes float32 or float64 tables only, and
thinc's ``Maxout`` multiplies with ``ops.gemm``, float32 only. The two
forwards here are thinc's, with the table's sum replaced
(:func:`gather_rows`) and the maxout weights read as float32
(:class:`_Float32Params`). Inference only: a halved model is never trained
(PT-E049). Saved, it keeps its float16 parameters (the pool that halves it
also compacts its adapters: a serving copy, ``pipeline.compaction``), and
our components' loads give layers whose saved parameters are float16 the
forwards here again (:func:`halve_loaded`).
Other layers (layer norms, heads, spaCy's parser, whose weights its Cython
code reads as float32) keep their float32 parameters.
"""
from typing import Callable, Tuple

import numpy
from thinc.api import Model
from thinc.layers.hashembed import forward as _hashembed_forward
from thinc.layers.maxout import forward as _maxout_forward
from thinc.types import Floats2d, Ints1d

from ..errors import AdapterError, Errors


def gather_rows(ops, table, keys) -> Floats2d:
    """The sum of each row of ``keys``' table rows, float32: thinc's
    ``gather_add`` for a float32 table, a gather and a float32 sum for a
    float16 one."""
    if table.dtype == numpy.float32:
        return ops.gather_add(table, keys)
    return table[keys].sum(axis=1, dtype="float32")


def as_float32(array):
    """``array`` if it is float32, else a float32 copy."""
    return array if array.dtype == numpy.float32 else array.astype("float32")


def half_hashembed_forward(model: Model, ids: Ints1d, is_train: bool) -> Tuple[Floats2d, Callable]:
    """thinc's ``HashEmbed`` forward over a float16 table (inference only)."""
    _refuse_training(is_train)
    vectors = model.get_param("E")
    nV, nO = vectors.shape
    if len(ids) == 0:
        return model.ops.alloc2f(0, nO), _no_backprop
    ids = model.ops.as_contig(ids, dtype="uint64")
    keys = model.ops.hash(ids, model.attrs["seed"]) % nV
    return gather_rows(model.ops, vectors, keys), _no_backprop


class _Float32Params:
    """A layer as its own forward sees it, its float16 parameters read as
    float32 (dims, ops and attributes are the layer's own)."""

    __slots__ = ("_layer",)

    def __init__(self, layer: Model):
        self._layer = layer

    def get_param(self, name: str):
        return as_float32(self._layer.get_param(name))

    def __getattr__(self, name: str):
        return getattr(self._layer, name)


def half_maxout_forward(model: Model, X, is_train: bool):
    """thinc's ``Maxout`` forward with float16 weights (inference only)."""
    _refuse_training(is_train)
    best, _ = _maxout_forward(_Float32Params(model), X, False)
    return best, _no_backprop


def _refuse_training(is_train: bool) -> None:
    if is_train:
        raise AdapterError(Errors.E049.format(action="trained"))


def _no_backprop(d_output):
    raise AdapterError(Errors.E049.format(action="trained"))


# thinc's forward -> its float16 twin, and the parameters held in float16.
_HALVED = {_hashembed_forward: (half_hashembed_forward, ("E",)), _maxout_forward: (half_maxout_forward, ("W", "b"))}
_TWINS = {half: original for original, (half, _) in _HALVED.items()}


def is_layer(model: Model, forward: Callable) -> bool:
    """Whether ``model`` runs thinc's ``forward``, or its float16 twin."""
    return model._func is forward or _TWINS.get(model._func) is forward


def halve(model: Model) -> int:
    """Hold the parameters of every initialised ``HashEmbed`` table and
    ``Maxout`` layer under ``model`` in float16 (run by the forwards above);
    returns the bytes freed. Layers already halved are left as they are."""
    freed = 0
    for node in model.walk():
        if node._func not in _HALVED:
            continue
        half_forward, names = _HALVED[node._func]
        if not all(node.has_param(name) for name in names):
            continue  # not initialised: it runs (and fails) as itself
        for name in names:
            value = node.get_param(name)
            half = value.astype("float16")
            node.set_param(name, half)
            freed += value.nbytes - half.nbytes
        node._func = half_forward
    return freed


def halve_loaded(model: Model) -> int:
    """After a load: the ``HashEmbed`` and ``Maxout`` layers under ``model``
    whose parameters were saved in float16 (a serving copy, ``python -m
    spacy ptuning compact --storage-dtype float16``) run the float16
    forwards above (thinc's own would fail on them); returns how many."""
    count = 0
    for node in model.walk():
        if node._func in _HALVED:
            _, names = _HALVED[node._func]
            if all(node.has_param(name) for name in names) and any(node.get_param(name).dtype == numpy.float16 for name in names):
                halve(node)
                count += 1
    return count
