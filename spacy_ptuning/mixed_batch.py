"""Mixed-adapter batches: one backbone pass in which every row uses its own
adapter's prompts, then each adapter's head on its own rows.

This is the inference path of a multi-task server: requests for ten tasks that
arrive together cost one pass of the shared backbone, not ten. HF PEFT batches
different adapters in one forward only for LoRA; NeMo's prompt table does it
for input prompts of one model. Here every method mixes in one pass:

* P-Tuning v2 rows get their own key/value prefixes, padded to the longest
  prefix of the batch and masked per row (``injection.injected_prefix`` with a
  prefix mask);
* input-prompt rows (P-Tuning v1, prompt tuning) get their own virtual tokens
  in front of their text, so their text starts at position P of that adapter,
  exactly as when the adapter runs alone; every row is right-padded;
* all rows go in as ``inputs_embeds`` (the backbone's own embedding of the ids
  for the text), so that prefix and input-prompt rows share the pass.

Rows are grouped by length as ``Adapter.forward`` does. Each adapter's rows are
then put back into a spacy-transformers ``FullTransformerBatch`` for its docs,
pooled to token vectors by the component's own layers, and the component runs
as usual, with its tok2vec answering from these vectors
(:func:`precomputed`). Results equal running each pipeline alone (within
float rounding; tested on every family).

Why not spaCy's ``Language.pipe``: it runs one pipeline over many docs; here
many pipelines run over their own docs, and the backbone pass must be shared
between them.
"""
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from spacy.language import Language
from spacy.tokens import Doc
from spacy_transformers.data_classes import FullTransformerBatch
from thinc.api import Model
from transformers.file_utils import ModelOutput

from .adapter import Adapter, length_groups
from .backbone import Backbone
from .injection import KEY, VALUE, injected_prefix
from .transformer_model import find_adapter_layers, prepare_wordpieces

_local = threading.local()


@dataclass
class MixedStats:
    """Counters of the backbone passes made by :func:`pipe_mixed`."""

    passes: int = 0
    rows: int = 0
    adapters_per_pass: List[int] = field(default_factory=list)


@dataclass
class _Row:
    adapter: Adapter
    input_ids: torch.Tensor  # (L,)
    token_types: Optional[torch.Tensor]  # (L,) or None


@contextmanager
def _answering(vectors: Dict[Tuple[int, int], object]) -> Iterator[None]:
    previous = getattr(_local, "vectors", None)
    _local.vectors = vectors
    try:
        yield
    finally:
        _local.vectors = previous


def precomputed(tok2vec: Model, docs: Sequence[Doc]) -> Optional[list]:
    """The token vectors a mixed pass computed for these docs and this tok2vec
    layer, in this thread; None when there are none (the normal path)."""
    vectors = getattr(_local, "vectors", None)
    if not vectors:
        return None
    keys = [(id(tok2vec), id(doc)) for doc in docs]
    if not all(key in vectors for key in keys):
        return None
    return [vectors[key] for key in keys]


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
    jobs = []  # (tok2vec layer, inner chain, adapter, docs): one set of passes for all
    for nlp, indices in by_nlp.values():
        own = [docs[i] for i in indices]
        layers = [find_adapter_layers(pipe) for _, pipe in nlp.pipeline]
        positions = [k for k, found in enumerate(layers) if found]
        contiguous = positions and positions == list(range(positions[0], positions[-1] + 1))
        first = positions[0] if contiguous else len(nlp.pipeline)  # else: no mixing
        _run_pipes(nlp, own, 0, first)
        stages.append((nlp, indices, own, first))
        for found in layers[first:]:
            jobs.extend((tok2vec, inner, adapter, own) for tok2vec, inner, adapter in found)
    vectors = _mixed_vectors(jobs, max_batch_tokens, stats)
    with _answering(vectors):
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


def _run_pipes(nlp: Language, docs: List[Doc], start: int, end: int) -> None:
    """nlp's components start..end on docs, in place, as nlp.pipe would."""
    for _, proc in nlp.pipeline[start:end]:
        docs[:] = list(proc.pipe(docs)) if hasattr(proc, "pipe") else [proc(doc) for doc in docs]


def _mixed_vectors(jobs, max_batch_tokens: int, stats: Optional[MixedStats]) -> Dict[Tuple[int, int], object]:
    """Token vectors for every (tok2vec, doc) of the jobs, from shared passes."""
    vectors: Dict[Tuple[int, int], object] = {}
    prepared = []  # (job, nested_spans, wordpieces, align, backbone key, first row index)
    rows_by_backbone: Dict[int, Tuple[Backbone, List[_Row]]] = {}
    for job in jobs:
        tok2vec, inner, adapter, docs = job
        batch = prepare_wordpieces(inner.layers[0], docs)
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
        for r in range(ids.shape[0]):
            n = int(mask[r].sum())
            rows.append(_Row(adapter, ids[r, :n], types[r, :n] if types is not None else None))
        prepared.append((job, nested_spans, wordpieces, align, id(adapter.backbone), start))
    hidden: Dict[int, List[torch.Tensor]] = {}
    for key, (backbone, rows) in rows_by_backbone.items():
        hidden[key] = encode_rows(backbone, rows, max_batch_tokens, stats)
    for (tok2vec, inner, adapter, docs), nested_spans, wordpieces, align, key, start in prepared:
        batch_size, width = wordpieces.input_ids.shape
        out = torch.zeros((batch_size, width, adapter.backbone.hidden_width), device=adapter.backbone.device)
        for r in range(batch_size):
            h = hidden[key][start + r]
            out[r, : h.shape[0]] = h
        full = FullTransformerBatch(
            spans=nested_spans,
            wordpieces=wordpieces,
            model_output=ModelOutput(last_hidden_state=out),
            align=align,
        )
        arrays = full
        for layer in inner.layers[1:]:  # split_trf_batch, trfs2arrays: the component's own
            arrays = layer.predict(arrays)
        width = tok2vec.get_dim("nO")
        for doc, array in zip(docs, arrays):  # (0, width) for an empty doc, as the tok2vec answers
            vectors[(id(tok2vec), id(doc))] = array if len(doc) else tok2vec.ops.alloc2f(0, width)
    return vectors


def encode_rows(
    backbone: Backbone,
    rows: Sequence[_Row],
    max_batch_tokens: int = 4096,
    stats: Optional[MixedStats] = None,
) -> List[torch.Tensor]:
    """Hidden states (L, width) of each row's text wordpieces, each row with
    its own adapter's prompts, in as few backbone passes as the token budget
    allows (rows of similar total length together)."""
    lengths = [_virtual(row.adapter) + len(row.input_ids) for row in rows]
    groups = length_groups(lengths, max_batch_tokens) if max_batch_tokens > 0 else [list(range(len(rows)))]
    result: List[Optional[torch.Tensor]] = [None] * len(rows)
    with torch.no_grad():
        prompts = {}  # per adapter: input prompts (V, E) or prefixes (layers, 2, P, W)
        for row in rows:
            if id(row.adapter) not in prompts:
                row.adapter.eval()
                values = row.adapter.prompt_values(1)
                if row.adapter.input_prompts:
                    prompts[id(row.adapter)] = values[0]
                else:
                    prompts[id(row.adapter)] = torch.stack([torch.stack([k[0], v[0]]) for k, v in values])
        for group in groups:
            outputs = _encode_group(backbone, [rows[i] for i in group], prompts)
            for i, h in zip(group, outputs):
                result[i] = h
            if stats is not None:
                stats.passes += 1
                stats.rows += len(group)
                stats.adapters_per_pass.append(len({id(rows[i].adapter) for i in group}))
    return result  # type: ignore[return-value]


def _virtual(adapter: Adapter) -> int:
    return adapter.num_virtual_tokens if adapter.input_prompts else 0


def _encode_group(backbone: Backbone, rows: List[_Row], prompts: dict) -> List[torch.Tensor]:
    model = backbone.model
    device = backbone.device
    embed = model.get_input_embeddings()
    dtype = embed.weight.dtype
    B = len(rows)
    virtual = [_virtual(r.adapter) for r in rows]
    lengths = [len(r.input_ids) for r in rows]
    S = max(v + n for v, n in zip(virtual, lengths))
    # The text of every row, embedded in one call, then shifted right by the
    # row's input prompts where it has some.
    ids = torch.zeros((B, max(lengths)), dtype=rows[0].input_ids.dtype, device=device)
    for b, row in enumerate(rows):
        ids[b, : lengths[b]] = row.input_ids
    text = embed(ids)
    if not any(virtual):
        embeds = text if S == text.shape[1] else text[:, :S]
    else:
        embeds = torch.zeros((B, S, text.shape[-1]), dtype=dtype, device=device)
        for b, row in enumerate(rows):
            V, L = virtual[b], lengths[b]
            if V:
                embeds[b, :V] = prompts[id(row.adapter)].to(dtype)
            embeds[b, V : V + L] = text[b, :L]
    mixes = any(r.adapter.mix is not None for r in rows)
    positions = torch.arange(S, device=device)
    total = torch.tensor([v + n for v, n in zip(virtual, lengths)], device=device)
    mask = (positions[None, :] < total[:, None]).long()
    extra = {}
    if backbone.takes_token_types and any(r.token_types is not None for r in rows):
        types = torch.zeros((B, S), dtype=torch.long, device=device)
        for b, row in enumerate(rows):
            if row.token_types is not None:
                types[b, virtual[b] : virtual[b] + lengths[b]] = row.token_types
        extra["token_type_ids"] = types
    P = max((r.adapter.num_virtual_tokens for r in rows if not r.adapter.input_prompts), default=0)
    if P:
        # Each row's prefixes right-aligned in P columns, the rest masked.
        stacked = torch.zeros((backbone.num_layers, 2, B, P, backbone.kv_width), dtype=dtype, device=device)
        sizes = torch.zeros(B, dtype=torch.long, device=device)
        for b, row in enumerate(rows):
            if not row.adapter.input_prompts:
                n = row.adapter.num_virtual_tokens
                stacked[:, :, b, P - n :] = prompts[id(row.adapter)].to(dtype)
                sizes[b] = n
        prefix_mask = (torch.arange(P, device=device)[None, :] >= (P - sizes)[:, None]).long()
        full_mask = torch.cat([prefix_mask, mask], dim=1) if backbone.family.mask_includes_prefix else mask
        prefix = [(layer[KEY], layer[VALUE]) for layer in stacked]
        with injected_prefix(backbone, prefix, prefix_mask):
            output = model(inputs_embeds=embeds, attention_mask=full_mask, output_hidden_states=mixes, **extra)
    else:
        output = model(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=mixes, **extra)
    # Each adapter reads its own rows (its mix of hidden states, or the last).
    by_adapter: Dict[int, Tuple[Adapter, List[int]]] = {}
    for b, row in enumerate(rows):
        by_adapter.setdefault(id(row.adapter), (row.adapter, []))[1].append(b)
    result: List[Optional[torch.Tensor]] = [None] * B
    for adapter, indices in by_adapter.values():
        index = None if len(indices) == B else torch.tensor(indices, device=device)
        hidden = adapter.read_hidden(output, index)
        for k, b in enumerate(indices):
            result[b] = hidden[k, virtual[b] : virtual[b] + lengths[b]]
    return result  # type: ignore[return-value]
