#!/usr/bin/env python
"""Padding efficiency and training speed with and without length grouping.

Trains ptuning_ner (MiniLM, prefix) on real CoNLL-2003 batches (spaCy's
batch_by_words, 1,000 words) twice, interleaved: max_batch_tokens=0 (one
padded batch, like spacy-transformers) and the default (length-sorted groups).
Prints real wordpieces / positions sent to the backbone and words/s.

    python bench/padding.py [--data-dir ../shared/data] [--steps 12] [--threads 2]
"""
import argparse
import sys
import time
from pathlib import Path

import spacy
import torch
from spacy.training import Example
from spacy.training.batchers import minibatch_by_words
from spacy.util import fix_random_seed
from thinc.api import Adam

from spacy_ptuning import get_adapter


def read_iob(path: Path, limit: int):
    sents, words, tags = [], [], []
    for line in path.read_text(encoding="utf8").splitlines():
        if not line.strip():
            if words:
                sents.append((words, tags))
                words, tags = [], []
                if len(sents) >= limit:
                    break
            continue
        parts = line.split()
        words.append(parts[0])
        tags.append(parts[-1])
    if words and len(sents) < limit:
        sents.append((words, tags))
    return sents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    parser.add_argument("--sents", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    train = Path(args.data_dir) / "conll2003" / "train.iob"
    if not train.exists():
        sys.exit(f"CoNLL-2003 not found at {train}: pass --data-dir (see ../shared/data/README.md).")
    torch.set_num_threads(args.threads)
    from spacy.training import biluo_tags_to_spans, iob_to_biluo
    from spacy.tokens import Doc

    setups = {"one padded batch (max_batch_tokens=0)": 0, "length groups (default 4096)": 4096}
    pipes = {}
    for label, budget in setups.items():
        fix_random_seed(0)
        nlp = spacy.blank("en")
        nlp.add_pipe("ptuning_ner", config={"model": {"tok2vec": {"max_batch_tokens": budget}}})
        pipes[label] = nlp
    examples = []
    vocab = pipes[next(iter(pipes))].vocab
    for words, tags in read_iob(train, args.sents):
        ref = Doc(vocab, words=words)
        ref.ents = biluo_tags_to_spans(ref, iob_to_biluo(tags))
        examples.append(Example(Doc(vocab, words=words), ref))
    batches = list(minibatch_by_words(examples, size=1000, tolerance=0.2))[: args.steps]
    stats = {label: {"seconds": 0.0, "words": 0} for label in setups}
    for label, nlp in pipes.items():
        nlp.initialize(lambda: examples[:100])
        stats[label]["opt"] = Adam(0.01)
    for batch in batches:  # interleaved
        n_words = sum(len(e.predicted) for e in batch)
        for label, nlp in pipes.items():
            start = time.perf_counter()
            nlp.update(batch, sgd=stats[label]["opt"])
            stats[label]["seconds"] += time.perf_counter() - start
            stats[label]["words"] += n_words
    print(f"\nCoNLL-2003 train, first {args.sents} sentences, {len(batches)} batches of ~1,000 words, "
          f"torch threads {args.threads}, torch {torch.__version__}\n")
    print("| setup | real / sent wordpieces | train words/s | s per step |")
    print("| --- | ---: | ---: | ---: |")
    for label, nlp in pipes.items():
        module = get_adapter(nlp.get_pipe("ptuning_ner").model)
        s = stats[label]
        print(f"| {label} | {module.tokens_real / module.tokens_sent:.2f} | "
              f"{s['words'] / s['seconds']:.0f} | {s['seconds'] / len(batches):.2f} |")


if __name__ == "__main__":
    main()
