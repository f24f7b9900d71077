"""Entity recognition as token tagging: a softmax over BILUO tags for every
token of the prompted vectors, decoded into well-formed entities.

This is the sequence-labelling setup of the P-Tuning v2 paper (a linear
classifier over each token's vector), beside spaCy's transition-based
``ner``. Why a component of our own: spaCy's ``ner`` only takes a
transition-based model, and spaCy's ``tagger`` writes ``token.tag_``, not
entities. The model is spaCy's own ``spacy.Tagger.v2`` (tok2vec, then a
softmax per token) and the loss is thinc's sequence cross-entropy, as
spaCy's Tagger uses them; what differs is what the tags mean:

- the component's labels are entity types; its tags are ``O`` and
  ``B-``/``I-``/``L-``/``U-`` of each type (:func:`tag_names`), the gold tags
  those of ``Example.get_aligned_ner`` (tokens whose annotation is missing
  or misaligned give no loss);
- prediction decodes the tag scores with a Viterbi search restricted to
  valid BILUO sequences (:func:`decode`): the best-scoring sequence that is
  a set of non-overlapping entities, never a stray ``I-`` or an entity left
  open, whatever the softmax says token by token;
- entities already set on a doc (an entity ruler before it) are kept;
  predicted entities that would overlap one are dropped.

The head is per token and the same shape for every adapter with the same
labels, which a server can batch across adapters; the transition-based
parser's state machine cannot be.
"""
from itertools import islice
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import numpy
from spacy.pipeline import TrainablePipe
from spacy.tokens import Doc
from spacy.training import Example, biluo_tags_to_spans, validate_examples, validate_get_examples
from thinc.api import Model, SequenceCategoricalCrossentropy, set_dropout_rate

from ..errors import ConfigError, Errors

OUT = "O"
# Tag order within an entity type: tag index 1 + 4 * type + position.
MOVES = ("B", "I", "L", "U")


def tag_names(labels: Sequence[str]) -> List[str]:
    """``["O", "B-L1", "I-L1", "L-L1", "U-L1", "B-L2", ...]`` of entity types."""
    return [OUT] + [f"{move}-{label}" for label in labels for move in MOVES]


def transitions(n_labels: int) -> Tuple[numpy.ndarray, numpy.ndarray, numpy.ndarray]:
    """(start, step, end) of valid BILUO sequences over ``tag_names`` of
    ``n_labels`` types, as 0 (allowed) or -inf (not) to add to scores:
    ``start[j]``: a sequence may begin with tag j; ``step[i, j]``: tag j may
    follow tag i; ``end[i]``: a sequence may end with tag i."""
    n = 1 + 4 * n_labels
    opening = [0] + [1 + 4 * k + m for k in range(n_labels) for m in (0, 3)]  # O, B-, U-
    closed = [0] + [1 + 4 * k + m for k in range(n_labels) for m in (2, 3)]  # O, L-, U-
    allowed = numpy.zeros((n, n), dtype=bool)
    allowed[numpy.ix_(closed, opening)] = True
    for k in range(n_labels):
        inside = [1 + 4 * k, 2 + 4 * k]  # after B-k or I-k: I-k or L-k
        allowed[numpy.ix_(inside, [2 + 4 * k, 3 + 4 * k])] = True
    start = numpy.full(n, -numpy.inf)
    start[opening] = 0.0
    end = numpy.full(n, -numpy.inf)
    end[closed] = 0.0
    return start, numpy.where(allowed, 0.0, -numpy.inf), end


def decode(scores: Sequence[numpy.ndarray], n_labels: int) -> List[numpy.ndarray]:
    """For each doc's ``(tokens, tags)`` scores, the tag ids of the valid
    BILUO sequence with the highest total score (Viterbi). The scores are
    log-probabilities or the logits they come from (a token's
    normalisation adds the same constant to every path, so the best path is
    the same). All docs step together, padded to the longest: a padded step
    keeps each tag's best score and points back to the same tag."""
    lengths = [len(s) for s in scores]
    n_docs, width = len(scores), max(lengths, default=0)
    out = [numpy.zeros((n,), dtype="int64") for n in lengths]
    if width == 0:
        return out
    start, step, end = transitions(n_labels)
    n_tags = step.shape[0]
    padded = numpy.zeros((n_docs, width, n_tags))
    for d, doc_scores in enumerate(scores):
        padded[d, : lengths[d]] = doc_scores
    live = numpy.arange(width)[None, :] < numpy.asarray(lengths)[:, None]  # (docs, width)
    stay = numpy.broadcast_to(numpy.arange(n_tags), (n_docs, n_tags))
    best = start + padded[:, 0]
    back = numpy.zeros((n_docs, width, n_tags), dtype="int32")
    for t in range(1, width):
        candidates = best[:, :, None] + step  # [doc, previous tag, tag]
        moved = candidates.argmax(axis=1)
        back[:, t] = numpy.where(live[:, t, None], moved, stay)
        best = numpy.where(live[:, t, None], candidates.max(axis=1) + padded[:, t], best)
    tags = numpy.zeros((n_docs, width), dtype="int64")
    tags[:, -1] = numpy.argmax(best + end, axis=1)
    rows = numpy.arange(n_docs)
    for t in range(width - 1, 0, -1):
        tags[:, t - 1] = back[rows, t, tags[:, t]]
    for d, n in enumerate(lengths):
        out[d] = tags[d, :n]
    return out


class EntityTagger(TrainablePipe):
    """Named entities from a softmax over BILUO tags per token (module
    docstring). Its model maps docs to one ``(tokens, len(tag_names))`` score
    array per doc, e.g. ``spacy.Tagger.v2`` over a ptuning tok2vec."""

    def __init__(self, vocab, model: Model, name: str = "ner", *, scorer: Optional[Callable] = None):
        self.vocab = vocab
        self.model = model
        self.name = name
        self._rehearsal_model = None
        self.cfg = {"labels": []}
        self.scorer = scorer

    @property
    def labels(self) -> Tuple[str, ...]:
        """The entity types."""
        return tuple(self.cfg["labels"])

    @property
    def label_data(self) -> Tuple[str, ...]:
        return self.labels

    @property
    def tag_names(self) -> List[str]:
        return tag_names(self.labels)

    def add_label(self, label: str) -> int:
        if not isinstance(label, str) or not label or label != label.strip():
            raise ConfigError(Errors.E055.format(label=repr(label), name=self.name))
        if label in self.labels:
            return 0
        self._allow_extra_label()
        self.cfg["labels"].append(label)
        self.vocab.strings.add(label)
        return 1

    def _allow_extra_label(self) -> None:
        if self.model.has_dim("nO") and self.model.get_dim("nO"):
            raise ConfigError(Errors.E056.format(name=self.name, labels=list(self.labels)))

    def initialize(self, get_examples: Callable[[], Iterable[Example]], *, nlp=None, labels=None) -> None:
        validate_get_examples(get_examples, "EntityTagger.initialize")
        if labels is not None:
            for label in labels:
                self.add_label(label)
        else:
            found = {ent.label_ for eg in get_examples() for ent in eg.reference.ents}
            for label in sorted(found):
                self.add_label(label)
        if not self.labels:
            raise ConfigError(Errors.E057.format(name=self.name))
        docs = [eg.predicted for eg in islice(get_examples(), 10)]
        width = len(self.tag_names)
        self.model.initialize(X=docs, Y=[self.model.ops.alloc2f(len(doc), width) for doc in docs])

    def predict(self, docs: Iterable[Doc]) -> List[numpy.ndarray]:
        """One array of tag ids per doc: the best valid BILUO sequence."""
        docs = list(docs)
        if not any(len(doc) for doc in docs):
            return [numpy.zeros((0,), dtype="int64") for _ in docs]
        scores = self.model.predict(docs)
        to_numpy = self.model.ops.to_numpy
        return decode([to_numpy(doc_scores)[: len(doc)].astype("float64") for doc, doc_scores in zip(docs, scores)],
                      len(self.labels))

    def set_annotations(self, docs: Iterable[Doc], batch_tag_ids: Sequence[numpy.ndarray]) -> None:
        names = self.tag_names
        for doc, tag_ids in zip(docs, batch_tag_ids):
            predicted = biluo_tags_to_spans(doc, [names[int(i)] for i in tag_ids])
            taken = {i for ent in doc.ents for i in range(ent.start, ent.end)}
            kept = [s for s in predicted if not taken.intersection(range(s.start, s.end))]
            doc.set_ents(sorted([*doc.ents, *kept], key=lambda s: s.start), default="outside")

    def update(self, examples: Iterable[Example], *, drop: float = 0.0, sgd=None, losses=None):
        if losses is None:
            losses = {}
        losses.setdefault(self.name, 0.0)
        examples = list(examples)
        validate_examples(examples, "EntityTagger.update")
        if not any(len(eg.predicted) for eg in examples):
            return losses
        set_dropout_rate(self.model, drop)
        scores, backprop = self.model.begin_update([eg.predicted for eg in examples])
        loss, d_scores = self.get_loss(examples, scores)
        backprop(d_scores)
        if sgd not in (None, False):
            self.finish_update(sgd)
        losses[self.name] += loss
        return losses

    def get_loss(self, examples: Iterable[Example], scores) -> Tuple[float, List]:
        """Cross-entropy against the gold BILUO tags (``get_aligned_ner``);
        a token whose tag is missing ("-") or misaligned (None) gives none."""
        names = self.tag_names
        known = set(names)
        truths = []
        for eg in examples:
            tags = [None if tag in (None, "", "-") else tag for tag in eg.get_aligned_ner()]
            unknown = sorted({t for t in tags if t is not None and t not in known})
            if unknown:
                raise ConfigError(Errors.E058.format(name=self.name, tags=unknown, labels=list(self.labels)))
            truths.append(tags)
        loss_func = SequenceCategoricalCrossentropy(names=names, normalize=False)
        d_scores, loss = loss_func(scores, truths)
        return float(loss), d_scores
