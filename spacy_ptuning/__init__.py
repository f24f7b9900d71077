"""spacy-ptuning: P-Tuning v2, P-Tuning v1 and prompt tuning for spaCy over a
frozen Hugging Face transformer that all adapters share."""
from .architectures import ptuning_transformer_v1
from .backbone import DEFAULT_BACKBONE, Backbone, load_backbone
from .components import (
    make_ptuning_ner,
    make_ptuning_textcat,
    make_ptuning_textcat_multilabel,
    trainable_summary,
)
from .adapter import Adapter
from .errors import PTuningError
from .transformer_model import get_adapter

__version__ = "0.1.0"
__all__ = [
    "Adapter",
    "DEFAULT_BACKBONE",
    "PTuningError",
    "Backbone",
    "get_adapter",
    "load_backbone",
    "make_ptuning_ner",
    "make_ptuning_textcat",
    "make_ptuning_textcat_multilabel",
    "ptuning_transformer_v1",
    "trainable_summary",
]
