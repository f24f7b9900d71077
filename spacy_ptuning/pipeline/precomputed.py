"""Token vectors computed ahead of a pipeline's run, answered by its tok2vec.

A mixed-adapter pass (``serving.mixed_batch``) computes the prompted
transformer's vectors of many pipelines' docs in shared backbone passes,
then runs each pipeline's components as usual; the tok2vec layer of each
component (``architectures._allow_empty_forward``) answers from these
vectors instead of running its adapter again.

The vectors travel on the docs themselves, in ``doc.user_data`` under
``(KEY, tok2vec.id)`` (thinc's unique model id), so that nothing global or
thread-local routes them, and each doc's owner (one request) is the only
reader. :func:`attached` removes them when the components have run, also
when one of them raises, so a doc never leaves with arrays in its user data
(``doc.to_bytes`` would serialise them).
"""
from contextlib import contextmanager
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

from spacy.tokens import Doc
from thinc.api import Model
from thinc.types import Floats2d

KEY = "spacy_ptuning.precomputed"


@contextmanager
def attached(vectors: Iterable[Tuple[Model, Doc, Floats2d]]) -> Iterator[None]:
    """Put each (tok2vec, doc, vectors) on its doc for the duration."""
    keys = []
    try:
        for tok2vec, doc, array in vectors:
            key = (KEY, tok2vec.id)
            doc.user_data[key] = array
            keys.append((doc, key))
        yield
    finally:
        for doc, key in keys:
            doc.user_data.pop(key, None)


def precomputed(tok2vec: Model, docs: Sequence[Doc]) -> Optional[List[Floats2d]]:
    """The vectors attached for this tok2vec to every one of these docs, or
    None (then the tok2vec computes its own: the normal path)."""
    key = (KEY, tok2vec.id)
    found = [doc.user_data.get(key) for doc in docs]
    return None if any(v is None for v in found) else found
