"""The shipped configs train with `spacy train` (tiny backbone swapped in)."""
import subprocess
import sys
from pathlib import Path

import pytest
import spacy
from spacy.tokens import DocBin

from spacy_ptuning import get_adapter

CONFIGS = Path(__file__).parent.parent / "configs"
SENTS = [
    ("alice visited paris today", [(0, 5, "PER"), (14, 19, "LOC")], "POS"),
    ("bob hated the film in london", [(0, 3, "PER"), (22, 28, "LOC")], "NEG"),
    ("carol loves rome", [(0, 5, "PER"), (12, 16, "LOC")], "POS"),
    ("an awful plot , said dave", [(21, 25, "PER")], "NEG"),
]


def _write_corpus(path: Path) -> Path:
    nlp = spacy.blank("en")
    db = DocBin()
    for text, ents, label in SENTS * 3:
        doc = nlp.make_doc(text)
        doc.ents = [doc.char_span(s, e, label=l) for s, e, l in ents]
        doc.cats = {"POS": float(label == "POS"), "NEG": float(label == "NEG")}
        db.add(doc)
    db.to_disk(path)
    return path


@pytest.mark.parametrize("config,components,cli", [
    ("ner.cfg", ["ner"], False), ("ner_parser.cfg", ["ner"], False), ("textcat.cfg", ["textcat"], False),
    ("multitask.cfg", ["ner", "textcat"], True),
])
def test_spacy_train(tiny_bert, tmp_path, capsys, config, components, cli):
    """Each shipped config trains; one of them through the `spacy train` CLI
    in a subprocess (entry points, the printed summary), the others through
    spaCy's own train function in this process (same code path, faster)."""
    corpus = _write_corpus(tmp_path / "train.spacy")
    overrides = {
        "paths.train": str(corpus), "paths.dev": str(corpus),
        "training.max_steps": 6, "training.eval_frequency": 3,
        "training.optimizer.learn_rate.warmup_steps": 1,
    }
    for name in components:
        overrides[f"components.{name}.model.tok2vec.backbone"] = tiny_bert
    if cli:
        args = [arg for key, value in overrides.items() for arg in (f"--{key}", str(value))]
        cmd = [sys.executable, "-m", "spacy", "train", str(CONFIGS / config), "--output", str(tmp_path / "out"), *args]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        log = result.stdout + result.stderr
    else:
        from spacy.cli.train import train

        train(CONFIGS / config, tmp_path / "out", overrides=overrides)
        log = capsys.readouterr().out
    assert f"{components[0]}: training" in log and "method=prefix" in log
    nlp = spacy.load(tmp_path / "out" / "model-last")
    assert nlp.pipe_names == components
    modules = [get_adapter(nlp.get_pipe(n).model) for n in components]
    assert len({id(m.backbone) for m in modules}) == 1  # one backbone for all adapters
    doc = nlp("alice visited paris")
    if "textcat" in components:
        assert set(doc.cats) == {"POS", "NEG"}


@pytest.mark.parametrize("config", ["ner.cfg", "ner_parser.cfg", "textcat.cfg", "multitask.cfg"])
def test_factory_defaults_are_the_shipped_configs(config):
    """`nlp.add_pipe("ptuning_ner")` builds what the shipped config trains:
    every setting the factory's default model names (prompt length, method,
    backbone, head, span getter) has the config's value."""
    from spacy.language import Language
    from spacy.util import dict_to_dot, load_config

    shipped = load_config(CONFIGS / config)
    for name, block in shipped["components"].items():
        default = dict_to_dot(Language.get_factory_meta(block["factory"]).default_config["model"])
        trained = dict_to_dot(block["model"])
        differ = {k: (v, trained.get(k, "<absent>")) for k, v in default.items() if trained.get(k, "<absent>") != v}
        assert not differ, f"{config} [components.{name}] vs factory default (default, config): {differ}"
