"""Word features beside the prompted transformer: spaCy's own hash embedding
of a token's norm, prefix, suffix and shape, contextualised by spaCy's
maxout window CNN, trained with the prompts.

Why: a general-vocabulary transformer splits specialised names into
wordpieces that blur what their spelling says ("-mycin", "-itis", "-emia");
a suffix or shape embedding keeps it, for a few thousand parameters per
feature row. Nothing here is new code: the layers are spaCy's
``MultiHashEmbed.v2`` and ``MaxoutWindowEncoder.v2`` (what ``spacy init
config`` builds for a CPU pipeline), resolved from spaCy's registry, with
sizes chosen for a small saved adapter. The architecture concatenates their
output with the transformer's vectors (``PTuningTransformer.v2``,
``word_features``); any other docs-to-vectors model with an ``nO`` may take
their place there.
"""
from typing import List, Sequence

from spacy.tokens import Doc
from spacy.util import registry
from thinc.api import Model
from thinc.types import Floats2d

from ..errors import ConfigError, Errors

DEFAULT_ATTRS = ("NORM", "PREFIX", "SUFFIX", "SHAPE")
# Fewer rows than spaCy's CPU defaults (5000, 1000, 2500, 2500): the tables are
# most of the saved size (rows x width x 4 bytes), and the adapter should stay
# small beside its prompts; 5,000 rows of width 64 are 1.3 MB.
DEFAULT_ROWS = (2500, 500, 1500, 500)


@registry.architectures("spacy_ptuning.WordFeatures.v1")
def word_features_v1(
    width: int = 64,
    attrs: Sequence[str] = DEFAULT_ATTRS,
    rows: Sequence[int] = DEFAULT_ROWS,
    window_size: int = 1,
    maxout_pieces: int = 3,
    depth: int = 2,
) -> Model[List[Doc], List[Floats2d]]:
    """Hash embeddings of ``attrs`` (one table of ``rows[i]`` rows each),
    ``width`` wide, then ``depth`` maxout window layers of ``window_size``
    tokens each side: one vector of ``width`` per token."""
    _check_positive("width", width)
    _check_positive("depth", depth)
    _check_positive("maxout_pieces", maxout_pieces)
    if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 0:
        raise ConfigError(Errors.E047.format(option="window_size", value=window_size, rule="an integer >= 0"))
    if isinstance(attrs, str) or not attrs or len(rows) != len(attrs):
        raise ConfigError(
            Errors.E047.format(option="rows", value=list(rows), rule=f"one row count per attribute of attrs ({list(attrs)})")
        )
    for count in rows:
        _check_positive("rows", count)
    embed = registry.get("architectures", "spacy.MultiHashEmbed.v2")(
        width=width, attrs=list(attrs), rows=list(rows), include_static_vectors=False
    )
    encode = registry.get("architectures", "spacy.MaxoutWindowEncoder.v2")(
        width=width, window_size=window_size, maxout_pieces=maxout_pieces, depth=depth
    )
    return registry.get("architectures", "spacy.Tok2Vec.v2")(embed=embed, encode=encode)


def _check_positive(option: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(Errors.E047.format(option=option, value=value, rule="a positive integer"))
