"""The prompted backbone pass, written once: rows of wordpieces, each with
its own adapter's prompts, through the frozen backbone.

Training and inference of one adapter (``Adapter.forward``) and the
mixed-adapter passes of a server (``serving.mixed_batch``) both call
:func:`encode_rows`; one adapter alone is the case where every row has the
same adapter. A row's result depends only on its own wordpieces and
adapter (up to float rounding of the batch it shares), which is what makes
mixed batches equal each pipeline alone.

How a pass places the prompts:

* every row goes in as ``inputs_embeds`` (the backbone's own embedding of
  the ids), so that prefix rows and input-prompt rows share a pass;
* input-prompt rows (P-Tuning v1, prompt tuning) get their virtual tokens in
  front of their text, so their text starts at position V of that adapter,
  exactly as when the adapter runs alone; every row is right-padded;
* P-Tuning v2 rows get their own key/value prefixes, right-aligned in the
  pass's P prefix columns and masked per row (``injection.injected_prefix``
  with a prefix mask);
* each adapter reads its own rows out: its mix of hidden states, or the
  last layer (``Adapter.read_hidden``).

One prompt representation end to end: an adapter's prompts for one row
(``Adapter.prompt_row``) are (V, embed_width) for input prompts and
(layers, 2, P, kv_width) for prefixes, as the prompt modules produce them.
"""
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import torch

from .injection import KEY, VALUE, injected_prefix

if TYPE_CHECKING:  # the adapter calls this module; only its type is needed here
    from .adapter import Adapter
    from .backbone import Backbone


@dataclass
class Row:
    """One sequence of real wordpieces (no padding) and its adapter."""

    adapter: "Adapter"
    input_ids: torch.Tensor  # (L,)
    token_types: Optional[torch.Tensor] = None  # (L,) or None


def rows_of_batch(adapter: "Adapter", input_ids, attention_mask, token_type_ids=None) -> List[Row]:
    """The rows of a padded batch (either padding side): each row's real
    wordpieces, where its attention mask is 1."""
    rows = []
    for r in range(input_ids.shape[0]):
        real = attention_mask[r].bool()
        types = token_type_ids[r][real] if token_type_ids is not None else None
        rows.append(Row(adapter, input_ids[r][real], types))
    return rows


def virtual_positions(adapter: "Adapter") -> int:
    """Positions a row of this adapter takes before its text."""
    return adapter.num_virtual_tokens if adapter.input_prompts else 0


def encode_rows(
    backbone: "Backbone", rows: Sequence[Row], max_batch_tokens: int = 4096
) -> Tuple[List[torch.Tensor], List[List[int]]]:
    """The vectors (L, width), float32, of each row's wordpieces, in as few
    passes as the token budget allows (rows of similar length together;
    ``max_batch_tokens`` <= 0: one pass), and the groups of row indices that
    shared a pass. Gradients reach the prompts when grad is enabled."""
    lengths = [virtual_positions(row.adapter) + len(row.input_ids) for row in rows]
    groups = length_groups(lengths, max_batch_tokens) if max_batch_tokens > 0 else [list(range(len(rows)))]
    prompts: Dict[int, torch.Tensor] = {}
    for row in rows:
        if id(row.adapter) not in prompts:
            prompts[id(row.adapter)] = row.adapter.prompt_row()
    result: List[Optional[torch.Tensor]] = [None] * len(rows)
    for group in groups:
        for i, h in zip(group, _encode_group(backbone, [rows[i] for i in group], prompts)):
            result[i] = h
    return result, groups  # type: ignore[return-value]


def _encode_group(backbone: "Backbone", rows: List[Row], prompts: Dict[int, torch.Tensor]) -> List[torch.Tensor]:
    model = backbone.model
    device = backbone.device
    embed = model.get_input_embeddings()
    dtype = embed.weight.dtype
    B = len(rows)
    virtual = [virtual_positions(r.adapter) for r in rows]
    lengths = [len(r.input_ids) for r in rows]
    S = max(1, max(v + n for v, n in zip(virtual, lengths)))
    # The text of every row, embedded in one call, then shifted right by the
    # row's input prompts where it has some.
    ids = torch.zeros((B, max(1, max(lengths))), dtype=rows[0].input_ids.dtype, device=device)
    for b, row in enumerate(rows):
        ids[b, : lengths[b]] = row.input_ids
    text = embed(ids)
    # One adapter in the group (training, one pipeline alone): its prompts
    # as views of one row, not a copy per row.
    single = rows[0].adapter if all(r.adapter is rows[0].adapter for r in rows) else None
    if not any(virtual):
        embeds = text[:, :S]
    elif single is not None:
        embeds = torch.cat([prompts[id(single)].to(dtype).unsqueeze(0).expand(B, -1, -1), text], dim=1)[:, :S]
    else:
        embeds = torch.zeros((B, S, text.shape[-1]), dtype=dtype, device=device)
        for b, row in enumerate(rows):
            V, L = virtual[b], lengths[b]
            if V:
                embeds[b, :V] = prompts[id(row.adapter)].to(dtype)
            embeds[b, V : V + L] = text[b, :L]
    positions = torch.arange(S, device=device)
    total = torch.tensor([v + n for v, n in zip(virtual, lengths)], device=device)
    mask = (positions[None, :] < total[:, None]).long()
    extra = {"output_hidden_states": any(r.adapter.mix is not None for r in rows)}
    if backbone.takes_token_types and any(r.token_types is not None for r in rows):
        types = torch.zeros((B, S), dtype=torch.long, device=device)
        for b, row in enumerate(rows):
            if row.token_types is not None:
                types[b, virtual[b] : virtual[b] + lengths[b]] = row.token_types
        extra["token_type_ids"] = types
    P = max((r.adapter.num_virtual_tokens for r in rows if not r.adapter.input_prompts), default=0)
    if P and single is not None:
        prefix = [(layer[KEY].expand(B, -1, -1), layer[VALUE].expand(B, -1, -1)) for layer in prompts[id(single)].to(dtype)]
        full_mask = torch.cat([mask.new_ones((B, P)), mask], dim=1) if backbone.family.mask_includes_prefix else mask
        with injected_prefix(backbone, prefix):
            output = model(inputs_embeds=embeds, attention_mask=full_mask, **extra)
    elif P:
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
            output = model(inputs_embeds=embeds, attention_mask=full_mask, **extra)
    else:
        output = model(inputs_embeds=embeds, attention_mask=mask, **extra)
    # Each adapter reads its own rows (its mix of hidden states, or the last).
    by_adapter: Dict[int, Tuple["Adapter", List[int]]] = {}
    for b, row in enumerate(rows):
        by_adapter.setdefault(id(row.adapter), (row.adapter, []))[1].append(b)
    result: List[Optional[torch.Tensor]] = [None] * B
    for adapter, indices in by_adapter.values():
        index = None if len(indices) == B else torch.tensor(indices, device=device)
        hidden = adapter.read_hidden(output, index)
        for k, b in enumerate(indices):
            result[b] = hidden[k, virtual[b] : virtual[b] + lengths[b]]
    return result  # type: ignore[return-value]


def length_groups(lengths: List[int], max_tokens: int, max_ratio: float = 1.5) -> List[List[int]]:
    """Indices grouped by similar length, shortest first: a group closes when
    its padded size would pass max_tokens or its longest sequence would be
    more than max_ratio times its shortest."""
    groups: List[List[int]] = []
    current: List[int] = []
    shortest = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        n = max(1, lengths[i])
        if current and ((len(current) + 1) * n > max_tokens or n > max_ratio * shortest):
            groups.append(current)
            current = []
        if not current:
            shortest = n
        current.append(i)
    if current:
        groups.append(current)
    return groups


