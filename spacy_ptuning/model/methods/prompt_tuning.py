"""Prompt tuning (Lester et al. 2021): free input embeddings, initialised
from vocabulary rows."""
from dataclasses import dataclass

import torch
from torch import nn

from . import MethodSettings, register


class SoftPrompt(nn.Module):
    """Prompt tuning: free virtual-token embeddings at the input, initialised
    from the embeddings of ``init_from`` (rows of the backbone's vocabulary)."""

    def __init__(self, init_from: torch.Tensor, dropout: float = 0.0):
        super().__init__()
        self.embedding = nn.Parameter(init_from.detach().clone().float())
        self.dropout = nn.Dropout(dropout)

    def forward(self) -> torch.Tensor:
        """The virtual tokens of one row, (V, embed_width)."""
        return self.dropout(self.embedding)


def _vocab_rows(backbone, n: int) -> torch.Tensor:
    """n random rows of the backbone's input embeddings (drawn from torch's
    global generator, which spaCy's [system] seed seeds)."""
    vocab = backbone.model.get_input_embeddings().weight
    rows = torch.randint(0, vocab.shape[0], (n,))
    return vocab[rows.to(vocab.device)].detach().float().cpu()


@register("prompt")
@dataclass
class PromptTuning(MethodSettings):
    input_prompts = True

    def build(self, backbone) -> nn.Module:
        return SoftPrompt(_vocab_rows(backbone, self.num_virtual_tokens), self.prompt_dropout)
