"""The spaCy project and the benchmark's scoring: workflows name real commands,
variables resolve, missing data fails with a clear message, and the scores the
benchmark reports are computed correctly."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent
sys.path.insert(0, str(REPO / "bench"))

from lib import common  # noqa: E402


def test_project_workflows_resolve():
    from weasel.util import load_project_config

    config = load_project_config(REPO)  # substitutes ${vars...}; fails on an unknown variable
    names = {c["name"] for c in config["commands"]}
    for workflow in ("demo", "all", "medical"):
        missing = [step for step in config["workflows"][workflow] if step not in names]
        assert not missing, f"workflow {workflow} names unknown commands {missing}"
    script = " ".join(" ".join(c["script"]) for c in config["commands"])
    assert "${" not in script
    for path in ("configs/ner.cfg", "configs/textcat.cfg", "bench/compare.py", "bench/report.py"):
        assert path in script and (REPO / path).exists()


def test_missing_data_says_what_to_do(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "check_data.py"), str(tmp_path), "conll2003/train.iob",
         "--command", "benchmark"],
        capture_output=True, text=True,
    )
    assert result.returncode == 1
    assert "conll2003/train.iob" in result.stderr
    assert "--vars.data_dir" in result.stderr and "spacy project run benchmark" in result.stderr


def test_report_without_results_fails_clearly(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "report.py"), str(tmp_path), "--out", str(tmp_path / "r.md")],
        capture_output=True, text=True,
    )
    assert result.returncode != 0
    assert "no bench/compare.py results" in result.stderr and "project run benchmark" in result.stderr
    assert not (tmp_path / "r.md").exists()


def test_iob_decoding_is_seqeval_like():
    """PEFT's word tags become entities through spaCy's converters: an I- after
    O or after another type opens an entity."""
    import spacy

    tags = ["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-ORG", "I-MISC", "B-ORG", "B-ORG"]
    doc = common.doc_with_tags(spacy.blank("en").vocab, list("abcdefghi"), tags)
    assert [(e.start, e.end, e.label_) for e in doc.ents] == [
        (0, 2, "PER"), (3, 5, "LOC"), (5, 6, "ORG"), (6, 7, "MISC"), (7, 8, "ORG"), (8, 9, "ORG"),
    ]
    assert common.iob_tags(doc) == ["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "B-ORG", "B-MISC", "B-ORG", "B-ORG"]


def test_conll_reader(tmp_path):
    import spacy

    path = tmp_path / "train.iob"
    path.write_text("EU NNP B-NP I-ORG\nrejects VBZ B-VP O\n\n\nPeter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER\n"
                    "\nBRUSSELS NNP B-NP B-LOC\n", encoding="utf8")
    vocab = spacy.blank("en").vocab
    docs = common.read_conll(path, vocab)
    assert [[t.text for t in d] for d in docs] == [["EU", "rejects"], ["Peter", "Blackburn"], ["BRUSSELS"]]
    assert [[(e.start, e.end, e.label_) for e in d.ents] for d in docs] == [[(0, 1, "ORG")], [(0, 2, "PER")],
                                                                          [(0, 1, "LOC")]]
    assert len(common.read_conll(path, vocab, limit=2)) == 2
    assert [len(d) for d in common.read_conll(path, vocab, n_sents=2)] == [4, 1]


def test_bc5cdr_two_column_iob_reads_as_task_data(tmp_path):
    """BC5CDR's 'TOKEN NER' lines: the converter takes the word and the tag,
    multi-token entities and both types survive into (words, tags) pairs."""
    (tmp_path / "bc5cdr").mkdir()
    sents = ["Selegiline B-Chemical\n- O\ninduced O\npostural B-Disease\nhypotension I-Disease",
             "Parkinson B-Disease\n' I-Disease\ns I-Disease\ndisease I-Disease\n. O",
             "Naloxone B-Chemical\nreverses O\nit O"]
    for split in ("train", "dev"):
        (tmp_path / "bc5cdr" / f"{split}.iob").write_text("\n\n".join(sents) + "\n", encoding="utf8")
    train, dev, _ = common.task_data("bc5cdr", tmp_path)
    assert train == dev
    assert train[0] == (["Selegiline", "-", "induced", "postural", "hypotension"],
                        ["B-Chemical", "O", "O", "B-Disease", "I-Disease"])
    assert train[1][1] == ["B-Disease", "I-Disease", "I-Disease", "I-Disease", "O"] and len(train) == 3
    assert {t for _, tags in train for t in tags} <= set(common.TASKS["bc5cdr"].labels)


def test_system_variants_parse_and_refuse_what_does_not_apply():
    assert common.parse_system("prefix") == ("prefix", {})
    assert common.parse_system("prefix:n=64,lr=0.02,proj=512,dtype=bfloat16") == (
        "prefix", {"num_virtual_tokens": 64, "lr": 0.02, "prefix_projection": 512, "dtype": "bfloat16"})
    assert common.parse_system("st:lr=3e-5") == ("st", {"lr": 3e-5})
    assert common.parse_system("st:lora=8,lr=1e-3") == ("st", {"lora_rank": 8, "lr": 1e-3})
    assert common.parse_system("prompt:avg=0") == ("prompt", {"use_averages": 0})
    assert "[n=64, lr=0.02]" in common.label("prefix:n=64,lr=0.02", "bc5cdr")
    for bad, why in [("st:n=64", "does not apply"), ("prompt:proj=8", "does not apply"),
                     ("peft:dtype=bfloat16", "does not apply"), ("prefix:dtype=fp8", "dtype is one of"),
                     ("prefix:x=1", "KEY one of"), ("adapter", "unknown system"),
                     ("prefix:lora=8", "does not apply"), ("st:avg=1", "does not apply"),
                     ("prefix:avg=yes", "avg is 0 or 1")]:
        with pytest.raises(ValueError, match=why):
            common.parse_system(bad)


def test_ner_head_variants_are_the_shipped_configs_heads():
    # head=parser on configs/ner.cfg must train what configs/ner_parser.cfg
    # ships, and head=tagger on ner_parser.cfg what ner.cfg ships.
    from spacy.util import load_config

    blocks = {name: load_config(REPO / "configs" / f"{name}.cfg", interpolate=False)["components"]["ner"]
              for name in ("ner", "ner_parser")}
    for start, head, want in (("ner", "parser", "ner_parser"), ("ner_parser", "tagger", "ner"),
                              ("ner", "tagger", "ner"), ("ner_parser", "parser", "ner_parser")):
        block = load_config(REPO / "configs" / f"{start}.cfg", interpolate=False)["components"]["ner"]
        common.set_ner_head(block, head)
        assert block == blocks[want], (start, head)


def test_benchmark_rows_without_settings_are_the_configs_defaults(tmp_path):
    # A row without settings must be what a user of the config trains: its
    # prompt length and peak rate come from the config, not from the bench.
    text = (REPO / "configs" / "ner.cfg").read_text()
    assert "num_virtual_tokens = " in text and "initial_rate = " in text
    lines = [("num_virtual_tokens = 7" if line.startswith("num_virtual_tokens = ") else
              "initial_rate = 0.003" if line.startswith("initial_rate = ") else line) for line in text.splitlines()]
    odd = tmp_path / "odd.cfg"
    odd.write_text("\n".join(lines))
    assert common.config_defaults("bc5cdr", odd) == (7, 0.003)
    from spacy.util import load_config

    shipped = load_config(REPO / "configs" / "textcat.cfg", interpolate=True)
    assert common.config_defaults("textcat") == (
        shipped["components"]["textcat"]["model"]["tok2vec"]["num_virtual_tokens"],
        shipped["training"]["optimizer"]["learn_rate"]["initial_rate"])


def test_entity_f1_and_accuracy_are_spacys():
    import spacy
    from spacy.training import Example

    vocab = spacy.blank("en").vocab

    def doc(spans, cats=None):
        d = common.doc_with_tags(vocab, list("abcdef"), ["O"] * 6)
        d.ents = [d.char_span(2 * s, 2 * e - 1, label=lab) for s, e, lab in spans]
        d.cats = cats or {}
        return d

    gold = [[(0, 2, "PER"), (3, 4, "LOC")], [(1, 2, "ORG")]]
    pred = [[(0, 2, "PER"), (3, 5, "LOC")], [(1, 2, "ORG"), (0, 1, "MISC")]]
    s = common.score("ner", [Example(doc(p), doc(g)) for g, p in zip(gold, pred)])
    # tp 2, fp 2, fn 1
    assert s["p"] == pytest.approx(0.5) and s["r"] == pytest.approx(2 / 3)
    assert s["score"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert s["per_type"]["LOC"] == {"p": 0.0, "r": 0.0, "f": 0.0} and s["per_type"]["PER"]["f"] == 1.0
    pos, neg = {"POSITIVE": 0.9, "NEGATIVE": 0.1}, {"POSITIVE": 0.2, "NEGATIVE": 0.8}
    egs = [Example(doc([], p), doc([], g)) for g, p in [(pos, pos), (neg, pos), (pos, pos), (neg, neg)]]
    assert common.score("textcat", egs)["score"] == pytest.approx(0.75)


def test_time_schedule_warms_up_then_decays_to_zero():
    f = [common.lr_factor(t, budget=100, warmup_frac=0.1) for t in (0, 5, 10, 55, 100, 120)]
    assert f[0] == pytest.approx(0.01) and f[1] == pytest.approx(0.5) and f[2] == pytest.approx(1.0)
    assert f[3] == pytest.approx(0.5) and f[4] == 0.0 and f[5] == 0.0


def test_same_batches_for_every_system():
    lengths = [5, 40, 12, 7, 30, 22, 9, 15] * 20
    a = common.make_batches(lengths, seed=0, epoch=0, size=100)
    assert a == common.make_batches(lengths, seed=0, epoch=0, size=100)
    assert a != common.make_batches(lengths, seed=0, epoch=1, size=100)
    assert sorted(i for b in a for i in b) == list(range(len(lengths)))
    e0, e1 = (common.make_batches(lengths, seed=0, epoch=e) for e in (0, 1))  # 1,000 words a batch
    stream = common.epoch_batches([f"s{i}" for i in range(len(lengths))], lengths, seed=0)
    assert [next(stream) for _ in range(len(e0) + 1)] == [(e, [f"s{i}" for i in b]) for e, b in [(0, b) for b in e0] + [(1, e1[0])]]
    assert e0 != e1


def test_trainer_stops_at_the_budget_and_logs_each_step():
    calls = []
    trainer = common.Trainer(lambda batch: len(batch), ((0, [1] * n) for n in range(1, 100)),
                             before_step=calls.append)
    log = trainer.run(until_steps=3)
    assert [x[1] for x in log] == [1, 2, 3] and trainer.words == 6 and calls[0] == 0.0
    assert all(x[2] > 0 for x in log)  # peak RSS of the step, MB
    trainer.run(until_seconds=trainer.seconds)  # nothing left to train
    assert trainer.steps == 3


def test_isolated_process_runs_calls_and_reports_errors():
    import os

    with common.Isolated() as child:
        assert child.call(os.getpid) != os.getpid()
        with pytest.raises(RuntimeError, match="ZeroDivisionError"):
            child.call(divmod, 1, 0)
        assert "ZeroDivisionError" in child.failed
        assert child.call(divmod, 7, 2) == (3, 1)  # still serving after an error
