#!/usr/bin/env python
"""Where the time goes around the backbone: a per-stage breakdown of
inference (``nlp.pipe``) and training (``nlp.update``) of a ptuning NER
pipeline on CoNLL-2003 sentences, with a float32 and a bfloat16 backbone.

Stages are the cumulative time of the functions that do them (cProfile), so
a stage includes what it calls; "other" is the rest of the total. cProfile
slows Python-heavy stages more than the backbone's C++ kernels, so read the
shares as an upper bound for the Python stages.

    python bench/overhead.py [--sents 1000] [--batch-size 64] [--steps 20]
"""
import argparse
import cProfile
import pstats
import time
from pathlib import Path

from lib import common

STAGES = [  # (stage, (file suffix, function name)), first match wins per function
    ("spaCy tokenizer (make_doc)", ("spacy/language.py", "make_doc")),
    ("HF tokenizer", ("spacy_transformers/layers/transformer_model.py", "huggingface_tokenize")),
    ("truncation", ("spacy_transformers/truncate.py", "truncate_oversize_splits")),
    ("span coverage check", ("spacy_ptuning/transformer_model.py", "_check_coverage")),
    ("span getter", ("spacy_transformers/span_getters.py", "get_strided_spans")),
    ("backbone + prompts (forward)", ("spacy_ptuning/adapter.py", "forward")),
    ("backward (autograd)", ("torch/autograd/__init__.py", "backward")),
    ("pooling (trfs2arrays)", ("spacy_transformers/layers/trfs2arrays.py", "forward")),
    ("optimizer (thinc, prompts)", ("thinc/shims/pytorch.py", "finish_update")),
]
# Compiled code is invisible to cProfile and falls in "other": spaCy's NER
# transition system and set_annotations, spacy-transformers' alignment.


def breakdown(profile: cProfile.Profile, total: float) -> dict:
    stats = pstats.Stats(profile)
    out = {}
    for stage, (suffix, name) in STAGES:
        cum = sum(v[3] for (file, _, func), v in stats.stats.items() if file.endswith(suffix) and func == name)
        out[stage] = cum
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=common.DEFAULT_DATA)
    p.add_argument("--sents", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    import spacy
    from thinc.api import Adam

    vocab = spacy.blank("en").vocab
    dev = common.read_conll(args.data_dir / "conll2003" / "dev.iob", vocab, limit=args.sents)
    train = common.read_conll(args.data_dir / "conll2003" / "train.iob", vocab, limit=2000)
    texts = [" ".join(common.words(d)) for d in dev]
    n_words = sum(len(t.split()) for t in texts)
    rows = []
    for dtype in ("float32", "bfloat16"):
        nlp = common.ptuning_ner(dtype=dtype)
        egs = common.examples(nlp, train)
        nlp.initialize(lambda: egs[:300])
        list(nlp.pipe(texts[:128], batch_size=args.batch_size))  # warm-up
        prof = cProfile.Profile()
        start = time.perf_counter()
        prof.enable()
        list(nlp.pipe(texts, batch_size=args.batch_size))
        prof.disable()
        total = time.perf_counter() - start
        rows.append(("inference", dtype, n_words / total, total, breakdown(prof, total)))
        sgd = Adam(0.01)
        batches = common.epoch_batches(egs, [len(e.predicted) for e in egs], seed=0)
        prof = cProfile.Profile()
        words = 0
        start = time.perf_counter()
        prof.enable()
        for _ in range(args.steps):
            _, batch = next(batches)
            nlp.update(batch, sgd=sgd)
            words += sum(len(e.predicted) for e in batch)
        prof.disable()
        total = time.perf_counter() - start
        rows.append(("training", dtype, words / total, total, breakdown(prof, total)))
    stages = [s for s, _ in STAGES]
    print("| run | backbone | words/s (profiled) | " + " | ".join(stages) + " | other |")
    print("| --- | --- | ---: | " + " | ".join("---:" for _ in stages) + " | ---: |")
    for run, dtype, wps, total, parts in rows:
        other = total - sum(parts.values())  # the stages do not call each other
        cells = " | ".join(f"{100 * parts[s] / total:.1f} %" for s in stages)
        print(f"| {run} | {dtype} | {wps:.0f} | {cells} | {100 * max(0.0, other) / total:.1f} % |")
    print("\n'other' = the total minus the stages (which do not call each other): spaCy's and "
          "thinc's per-batch work, the NER head's own layers and its loss, Python glue.")


if __name__ == "__main__":
    main()
