"""Reading more of the frozen backbone than its last layer: a learned,
softmax-weighted mix of chosen hidden states (ELMo's scalar mix).

A frozen encoder's best features for a task are rarely all in its last layer
(the feature-based ablation of the BERT paper combines several layers to come
within a few tenths of fine-tuning on CoNLL-2003). The mix costs k + 1
parameters, travels with the adapter's prompts (it is part of the adapter's
state, so it is saved in the same safetensors), and is applied in the one
prompted pass (``model.encode``, through ``Adapter.read_hidden``) that an
adapter alone and a mixed-adapter batch both run, each row with its own
adapter's mix.

Hidden-state indices follow Hugging Face's ``output_hidden_states``: 0 is
the embedding output, ``num_layers`` the last layer, negative indices count
from the end (-1 = last).
"""
from typing import List, Optional, Sequence

import torch
from torch import nn

from ..errors import ConfigError, Errors


def resolve_layers(layers: Optional[Sequence[int]], num_layers: int) -> Optional[List[int]]:
    """The hidden-state indices of a ``layer_mix`` setting, each in
    0..num_layers, or None for the last layer alone (the v1 behaviour);
    E046 for a setting that names no layer, a layer twice or a layer the
    backbone does not have."""
    if layers is None:
        return None
    count = num_layers + 1  # the embedding output and every layer
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers:
        raise ConfigError(Errors.E046.format(value=layers, problem="it must be a non-empty list of hidden-state indices", count=count, last=num_layers))
    resolved = []
    for index in layers:
        if isinstance(index, bool) or not isinstance(index, int) or not -count <= index < count:
            raise ConfigError(Errors.E046.format(value=list(layers), problem=f"{index!r} is not a layer of this backbone", count=count, last=num_layers))
        resolved.append(index % count)
    if len(set(resolved)) != len(resolved):
        raise ConfigError(Errors.E046.format(value=list(layers), problem="it names a layer twice", count=count, last=num_layers))
    return resolved


class ScalarMix(nn.Module):
    """``scale * sum_i softmax(weights)_i * hidden_states[layers[i]]``.

    The weights start equal (zeros), as in ELMo; ``scale`` starts at 1. The
    mix is computed in float32 whatever the backbone's dtype."""

    def __init__(self, layers: Sequence[int]):
        super().__init__()
        self.layers = list(layers)
        self.weights = nn.Parameter(torch.zeros(len(self.layers)))
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        """hidden_states: every hidden state of the pass (HF's tuple), each
        (..., width); returns the mix, float32, of the same shape."""
        weights = torch.softmax(self.weights, dim=0)
        mixed = weights[0] * hidden_states[self.layers[0]].float()
        for w, index in zip(weights[1:], self.layers[1:]):
            mixed = mixed + w * hidden_states[index].float()
        return self.scale * mixed
