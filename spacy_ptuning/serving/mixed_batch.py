"""Mixed-adapter batches: one backbone pass in which every row uses its own
adapter's prompts, then each adapter's head on its own rows.

This is the inference path of a multi-task server: requests for ten tasks that
arrive together cost one pass of the shared backbone, not ten. HF PEFT batches
different adapters in one forward only for LoRA; NeMo's prompt table does it
for input prompts of one model. Here every method mixes in one pass: the
prompted pass of ``model.encode`` (the one an adapter alone runs too), where
each row carries its own adapter's prefixes or input prompts.

Each adapter's rows are
then put back into a spacy-transformers ``FullTransformerBatch`` for its docs,
pooled to token vectors by the component's own layers, and the component runs
as usual, with its tok2vec answering from these vectors
(``pipeline.precomputed``). Word features beside the transformer
(``PTuningTransformer.v2``'s ``word_features``) are computed for all
pipelines' docs in one call too (``pipeline.gathered_words``), and their
``words_beside`` node answers with both side by side. Results equal running
each pipeline alone (within float rounding; tested on every family).

Why not spaCy's ``Language.pipe``: it runs one pipeline over many docs; here
many pipelines run over their own docs, and the backbone pass must be shared
between them.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from spacy.language import Language
from spacy.tokens import Doc
from spacy_transformers.data_classes import FullTransformerBatch
from transformers.file_utils import ModelOutput

from ..model import encode
from ..model.backbone import Backbone
from ..model.encode import Row, rows_of_batch
from ..pipeline.architectures import beside_of, vectors_from_batch
from ..pipeline.gathered_words import Plan, gathered_word_features, plan_of
from ..pipeline.precomputed import attached
from ..pipeline.transformer_model import find_adapter_layers, prepare_wordpieces


@dataclass
class MixedStats:
    """Counters of the backbone passes made by :func:`pipe_mixed`."""

    passes: int = 0
    rows: int = 0
    adapters_per_pass: List[int] = field(default_factory=list)


def pipe_mixed(
    requests: Sequence[Tuple[Language, Union[str, Doc]]],
    *,
    max_batch_tokens: int = 4096,
    stats: Optional[MixedStats] = None,
) -> List[Doc]:
    """Process each ``(nlp, text)`` with its own pipeline, sharing the backbone
    passes of all pipelines that use the same backbone. Returns the docs in
    the order of ``requests``, as ``[nlp(text) for nlp, text in requests]``.

    A pipeline whose spacy-ptuning components are separated by other
    components (which could change the docs between them) runs alone.
    """
    docs = [nlp.make_doc(t) if isinstance(t, str) else t for nlp, t in requests]
    by_nlp: Dict[int, Tuple[Language, List[int]]] = {}
    for i, (nlp, _) in enumerate(requests):
        by_nlp.setdefault(id(nlp), (nlp, []))[1].append(i)
    stages = []  # (nlp, indices, its docs, index of its first ptuning component)
    jobs = []  # (tok2vec layer, its transformer, adapter, docs): one set of passes for all
    words = []  # (words_beside node, its plan, its tok2vec, docs): word features gathered for all
    for nlp, indices in by_nlp.values():
        own = [docs[i] for i in indices]
        layers = [find_adapter_layers(pipe) for _, pipe in nlp.pipeline]
        positions = [k for k, found in enumerate(layers) if found]
        contiguous = positions and positions == list(range(positions[0], positions[-1] + 1))
        first = positions[0] if contiguous else len(nlp.pipeline)  # else: no mixing
        _run_pipes(nlp, own, 0, first)
        stages.append((nlp, indices, own, first))
        for (_, pipe), found in zip(nlp.pipeline[first:], layers[first:]):
            for tok2vec, transformer, adapter in found:
                jobs.append((tok2vec, transformer, adapter, own))
                planned = planned_words(pipe, tok2vec)
                if planned is not None:
                    words.append((*planned, tok2vec, own))
    vectors = _mixed_vectors(jobs, max_batch_tokens, stats)
    answers = [(tok2vec, doc, vectors[(id(tok2vec), id(doc))]) for tok2vec, _, _, own in jobs for doc in own]
    gathered = gathered_word_features([(plan, own) for _, plan, _, own in words])
    for (beside, _, tok2vec, own), arrays in zip(words, gathered):
        answers.extend((beside, doc, beside.ops.xp.hstack([vectors[(id(tok2vec), id(doc))], array]))
                     for doc, array in zip(own, arrays))
    with attached(answers):
        for nlp, _, own, first in stages:
            _run_pipes(nlp, own, first, len(nlp.pipeline))
    for _, indices, own, _ in stages:
        for i, doc in zip(indices, own):
            docs[i] = doc
    return docs


def run_items(
    items: Sequence[Tuple[Language, str]],
    *,
    batching: str = "mixed",
    max_batch_tokens: int = 4096,
    stats: Optional[MixedStats] = None,
) -> List[Doc]:
    """``[nlp(text) for nlp, text in items]`` as a server runs it: with
    :func:`pipe_mixed` (``batching="mixed"``) or each pipeline's own
    ``nlp.pipe`` (``"per_adapter"``).

    An empty text runs alone (``nlp("")``), so that its answer does not
    depend on what else is in the batch: a text classifier pools nothing
    for it, and pooled in a batch with other texts it would answer the
    head's bias instead of the all-zero scores it gets alone.
    """
    docs: List[Optional[Doc]] = [None] * len(items)
    rest = []
    for i, (nlp, text) in enumerate(items):
        if text == "":
            docs[i] = nlp(text)
        else:
            rest.append(i)
    if batching == "mixed":
        for i, doc in zip(rest, pipe_mixed([items[i] for i in rest], max_batch_tokens=max_batch_tokens, stats=stats)):
            docs[i] = doc
    else:
        groups: Dict[int, Tuple[Language, List[int]]] = {}
        for i in rest:
            groups.setdefault(id(items[i][0]), (items[i][0], []))[1].append(i)
        for nlp, indices in groups.values():
            for i, doc in zip(indices, nlp.pipe([items[i][1] for i in indices])):
                docs[i] = doc
    return docs  # type: ignore[return-value]


def planned_words(pipe, tok2vec) -> Optional[Tuple[object, Plan]]:
    """The word features beside ``tok2vec`` in ``pipe``'s model
    (``PTuningTransformer.v2``'s ``word_features``) and their plan, if they
    have one; else None (the component runs them itself)."""
    model = getattr(pipe, "model", None)
    beside = beside_of(model, tok2vec) if model is not None else None
    plan = plan_of(beside.layers[1]) if beside is not None else None
    return (beside, plan) if plan is not None else None


def _run_pipes(nlp: Language, docs: List[Doc], start: int, end: int) -> None:
    """nlp's components start..end on docs, in place, as nlp.pipe would."""
    for _, proc in nlp.pipeline[start:end]:
        docs[:] = list(proc.pipe(docs)) if hasattr(proc, "pipe") else [proc(doc) for doc in docs]


def _mixed_vectors(jobs, max_batch_tokens: int, stats: Optional[MixedStats]) -> Dict[Tuple[int, int], object]:
    """Token vectors for every (tok2vec, doc) of the jobs, from shared passes."""
    vectors: Dict[Tuple[int, int], object] = {}
    prepared = []  # (job, nested_spans, wordpieces, align, mask, backbone key, first row index)
    rows_by_backbone: Dict[int, Tuple[Backbone, List[Row]]] = {}
    for job in jobs:
        tok2vec, transformer, adapter, docs = job
        batch = prepare_wordpieces(transformer, docs)
        if batch is None:  # only empty docs: as the tok2vec answers them
            for doc in docs:
                vectors[(id(tok2vec), id(doc))] = tok2vec.ops.alloc2f(0, tok2vec.get_dim("nO"))
            continue
        nested_spans, wordpieces, align = batch
        backbone, rows = rows_by_backbone.setdefault(id(adapter.backbone), (adapter.backbone, []))
        start = len(rows)
        device = adapter.backbone.device
        ids = torch.as_tensor(wordpieces.input_ids, device=device)
        mask = torch.as_tensor(wordpieces.attention_mask, device=device)
        types = wordpieces.token_type_ids
        types = torch.as_tensor(types, device=device) if types is not None else None
        rows.extend(rows_of_batch(adapter, ids, mask, types))
        prepared.append((job, nested_spans, wordpieces, align, mask, id(adapter.backbone), start))
    hidden: Dict[int, List[torch.Tensor]] = {}
    for key, (backbone, rows) in rows_by_backbone.items():
        hidden[key] = encode_rows(backbone, rows, max_batch_tokens, stats)
    for (tok2vec, _, adapter, docs), nested_spans, wordpieces, align, mask, key, start in prepared:
        batch_size, width = wordpieces.input_ids.shape
        out = torch.zeros((batch_size, width, adapter.backbone.hidden_width), device=adapter.backbone.device)
        for r in range(batch_size):
            out[r, mask[r].bool()] = hidden[key][start + r]
        full = FullTransformerBatch(
            spans=nested_spans,
            wordpieces=wordpieces,
            model_output=ModelOutput(last_hidden_state=out),
            align=align,
        )
        arrays = vectors_from_batch(tok2vec, full)  # the component's own pooling
        width = tok2vec.get_dim("nO")
        for doc, array in zip(docs, arrays):  # (0, width) for an empty doc, as the tok2vec answers
            vectors[(id(tok2vec), id(doc))] = array if len(doc) else tok2vec.ops.alloc2f(0, width)
    return vectors


def encode_rows(
    backbone: Backbone,
    rows: Sequence[Row],
    max_batch_tokens: int = 4096,
    stats: Optional[MixedStats] = None,
) -> List[torch.Tensor]:
    """The prompted pass (``model.encode``) over rows of many adapters, at
    inference (eval mode, no gradient), counting its passes in ``stats``."""
    for adapter in {id(row.adapter): row.adapter for row in rows}.values():
        adapter.eval()
    with torch.no_grad():
        hidden, groups = encode.encode_rows(backbone, rows, max_batch_tokens)
    if stats is not None:
        for group in groups:
            stats.passes += 1
            stats.rows += len(group)
            stats.adapters_per_pass.append(len({id(rows[i].adapter) for i in group}))
    return hidden
