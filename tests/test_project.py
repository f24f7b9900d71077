"""The spaCy project and the benchmark's scoring: workflows name real commands,
variables resolve, missing data fails with a clear message, and the scores the
benchmark reports are computed correctly."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent
sys.path.insert(0, str(REPO / "bench"))

import compare  # noqa: E402


def test_project_workflows_resolve():
    from weasel.util import load_project_config

    config = load_project_config(REPO)  # substitutes ${vars...}; fails on an unknown variable
    names = {c["name"] for c in config["commands"]}
    for workflow in ("demo", "all"):
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


def test_bio_decoding_is_seqeval_like():
    tags = ["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-ORG", "I-MISC", "B-ORG", "B-ORG"]
    assert compare.bio_spans(tags) == [
        (0, 2, "PER"), (3, 5, "LOC"), (5, 6, "ORG"), (6, 7, "MISC"), (7, 8, "ORG"), (8, 9, "ORG"),
    ]


def test_span_f1_and_accuracy():
    gold = [{(0, 2, "PER"), (3, 4, "LOC")}, {(1, 2, "ORG")}]
    pred = [{(0, 2, "PER"), (3, 5, "LOC")}, {(1, 2, "ORG"), (0, 1, "MISC")}]
    s = compare.score("ner", gold, pred)
    # tp 2, fp 2, fn 1
    assert s["p"] == pytest.approx(0.5) and s["r"] == pytest.approx(2 / 3)
    assert s["score"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert compare.score("textcat", ["POSITIVE", "NEGATIVE", "POSITIVE", "NEGATIVE"],
                         ["POSITIVE", "POSITIVE", "POSITIVE", "NEGATIVE"])["score"] == pytest.approx(0.75)


def test_time_schedule_warms_up_then_decays_to_zero():
    f = [compare.lr_factor(t, budget=100, warmup_frac=0.1) for t in (0, 5, 10, 55, 100, 120)]
    assert f[0] == pytest.approx(0.01) and f[1] == pytest.approx(0.5) and f[2] == pytest.approx(1.0)
    assert f[3] == pytest.approx(0.5) and f[4] == 0.0 and f[5] == 0.0


def test_same_batches_for_every_system():
    lengths = [5, 40, 12, 7, 30, 22, 9, 15] * 20
    a = compare.make_batches(lengths, seed=0, epoch=0, size=100)
    assert a == compare.make_batches(lengths, seed=0, epoch=0, size=100)
    assert a != compare.make_batches(lengths, seed=0, epoch=1, size=100)
    assert sorted(i for b in a for i in b) == list(range(len(lengths)))
