"""P-Tuning v2 (Liu et al. 2022): deep key/value prefixes in every layer."""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ...errors import ConfigError, Errors
from . import MethodSettings, register


class PrefixEncoder(nn.Module):
    """P-Tuning v2: a key and a value prefix for every layer.

    Without reparameterisation the prefixes are free parameters; with
    ``projection > 0`` they are produced from a (P, kv_width) embedding by a
    two-layer tanh MLP of that hidden size, as in the P-Tuning v2 code.
    """

    def __init__(
        self,
        num_virtual_tokens: int,
        num_layers: int,
        kv_width: int,
        projection: int = 0,
        dropout: float = 0.0,
        init_std: float = 0.02,
    ):
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.num_layers = num_layers
        self.kv_width = kv_width
        out_width = num_layers * 2 * kv_width
        if projection > 0:
            self.embedding = nn.Parameter(torch.randn(num_virtual_tokens, kv_width) * init_std)
            self.mlp: Optional[nn.Module] = nn.Sequential(
                nn.Linear(kv_width, projection), nn.Tanh(), nn.Linear(projection, out_width)
            )
        else:
            self.embedding = nn.Parameter(torch.randn(num_virtual_tokens, out_width) * init_std)
            self.mlp = None
        self.dropout = nn.Dropout(dropout)

    def forward(self) -> torch.Tensor:
        """The prefixes of one row, (layers, 2, P, kv_width): index 0 of the
        second axis is the key, 1 the value (``injection.KEY``/``VALUE``)."""
        flat = self.embedding if self.mlp is None else self.mlp(self.embedding)
        flat = self.dropout(flat)
        # (P, layers * 2 * width) -> (layers, 2, P, width)
        per_layer = flat.view(self.num_virtual_tokens, self.num_layers, 2, self.kv_width)
        return per_layer.permute(1, 2, 0, 3)


@register("prefix")
@dataclass
class PrefixTuning(MethodSettings):
    """prefix_projection: hidden size of the MLP reparameterisation of the
    prefixes (0 = free prefixes)."""

    prefix_projection: int = 0

    def validate_options(self) -> None:
        p = self.prefix_projection
        if isinstance(p, bool) or not isinstance(p, int) or p < 0:
            raise ConfigError(Errors.E012.format(option="prefix_projection", rule="0 (none) or a positive hidden size", value=p))

    def build(self, backbone) -> nn.Module:
        return PrefixEncoder(self.num_virtual_tokens, backbone.num_layers, backbone.kv_width, self.prefix_projection, self.prompt_dropout)
