"""Prefix injection: how P-Tuning v2's key/value prefixes reach every layer.

Forward hooks on each layer's key and value projections prepend the prefix
keys/values of the adapter that is running *in this thread* (see
:func:`injected_prefix`). The hooks rely only on the projections' module
names, which the checkpoint format fixes (see ``backbone.Family``), not on the
attention code or the cache API. Families whose attention takes (L, L)-shaped
arguments get those padded for the prefix columns by a pre-hook on the
attention module.

The injection state is thread-local, so one shared backbone serves adapters
in several threads at once; each run counts the projections it saw and
:func:`injected_prefix` turns a count that does not match the number of layers
(a silent change in how transformers computes attention) into an error.
"""
import inspect
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator, List, Optional, Sequence, Tuple

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .backbone import Backbone, Family

KEY, VALUE = 0, 1  # index of the keys / values in one layer's prefix pair
KVPrefix = Sequence[Tuple[torch.Tensor, torch.Tensor]]
_local = threading.local()


def install_hooks(
    model: torch.nn.Module,
    keys: List[torch.nn.Module],
    values: List[torch.nn.Module],
    family: "Family",
) -> None:
    """Install the prefix hooks on a freshly loaded backbone (once)."""
    for key_proj in keys:
        key_proj.register_forward_hook(_prefix_hook(model, KEY))
    for value_proj in values:
        value_proj.register_forward_hook(_prefix_hook(model, VALUE))
    if family.attention:
        for name, module in model.named_modules():
            if name.endswith(family.attention):
                module.register_forward_pre_hook(
                    _attention_hook(model, module, family.pad_args), with_kwargs=True
                )
                if family.relative_bias:
                    method = getattr(module, family.relative_bias)
                    setattr(module, family.relative_bias, _real_keys_only(model, method))


class _Injection:
    """The prefix of the adapter running in this thread, how many key / value
    projections have run (= the layer index, also for shared layers), and the
    hidden states entering the current attention module (where a family's
    projections also see other inputs)."""

    def __init__(self, model: torch.nn.Module, prefix: KVPrefix, mask: Optional[torch.Tensor] = None):
        self.model = model
        self.prefix = prefix
        self.mask = mask
        self.calls = [0, 0]
        self.hidden: Optional[torch.Tensor] = None

    @property
    def length(self) -> int:
        return self.prefix[0][KEY].shape[1]


def _active(model: torch.nn.Module) -> Optional[_Injection]:
    active = getattr(_local, "active", None)
    return active if active is not None and active.model is model else None


def _prefix_hook(model: torch.nn.Module, which: int):
    def hook(module, inputs, output):
        active = _active(model)
        if active is None or (active.hidden is not None and inputs[0] is not active.hidden):
            return output
        layer = active.calls[which]
        active.calls[which] += 1
        prefix = active.prefix[layer][which]
        return torch.cat([prefix.to(output.dtype), output], dim=1)

    return hook


def _attention_hook(model: torch.nn.Module, module: torch.nn.Module, pad_args):
    signature = inspect.signature(module.forward)

    def hook(module, args, kwargs):
        active = _active(model)
        if active is None:
            return None
        bound = signature.bind(*args, **kwargs)
        active.hidden = next(iter(bound.arguments.values()))
        for arg, kind in pad_args:
            value = bound.arguments.get(arg)
            if value is None:
                continue
            shape = (*value.shape[:-1], active.length)
            if kind == "keep_mask" and active.mask is not None:
                # Per-row prefix columns (mixed batches): (B, P) -> (B, 1.., P).
                view = (active.mask.shape[0],) + (1,) * (value.dim() - 2) + (active.length,)
                pad = active.mask.view(view).expand(shape).to(value.dtype)
            else:  # keep_mask: every prefix column is kept; bias: no bias
                pad = value.new_full(shape, 1 if kind == "keep_mask" else 0)
            bound.arguments[arg] = torch.cat([pad, value], dim=-1)
        return bound.args, bound.kwargs

    return hook


def _real_keys_only(model: torch.nn.Module, method):
    """Wrap a relative-bias method(query, key, ...): prefix keys get zeros."""

    def relative_bias(query_layer, key_layer, *args, **kwargs):
        active = _active(model)
        if active is None:
            return method(query_layer, key_layer, *args, **kwargs)
        P = active.length
        score = method(query_layer, key_layer[:, P:], *args, **kwargs)
        if not torch.is_tensor(score):
            return score
        return torch.cat([score.new_zeros((*score.shape[:-1], P)), score], dim=-1)

    return relative_bias


@contextmanager
def injected_prefix(
    backbone: "Backbone", prefix: KVPrefix, mask: Optional[torch.Tensor] = None
) -> Iterator[None]:
    """Within this block, in this thread only, every layer of the backbone
    attends to ``prefix[layer] = (keys, values)``, each (batch, P, kv_width).

    ``mask`` (batch, P), 1 = attend, is for batches whose rows hold prefixes
    of different adapters and lengths (padded to P): for families whose 2-D
    attention mask covers the prefix the caller puts it there too; for the
    others (``mask_includes_prefix=False``) it fills their keep-mask here.
    """
    previous = getattr(_local, "active", None)
    injection = _Injection(backbone.model, prefix, mask)
    _local.active = injection
    try:
        yield
    finally:
        _local.active = previous
    if injection.calls != [backbone.num_layers, backbone.num_layers]:
        raise RuntimeError(
            f"Prefix injection ran {injection.calls} key/value projections for "
            f"{backbone.num_layers} layers of '{backbone.name}': this transformers "
            "version computes attention differently from what spacy-ptuning supports."
        )
