#!/usr/bin/env python
"""Padding efficiency and training speed with and without length grouping.

Trains ptuning_ner (MiniLM, prefix) on real CoNLL-2003 batches (spaCy's
batch_by_words, 1,000 words, in file order) twice, interleaved batch by
batch: max_batch_tokens=0 (one padded batch, like spacy-transformers) and the
default (length-sorted groups). Prints real wordpieces / positions sent to
the backbone and words/s.

    python bench/padding.py [--data-dir ../shared/data] [--steps 12] [--threads 2]
"""
import argparse
from pathlib import Path

from lib import common


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=common.DEFAULT_DATA)
    parser.add_argument("--sents", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from spacy.training.batchers import minibatch_by_words
    from spacy.util import fix_random_seed
    from thinc.api import Adam

    from spacy_ptuning import get_adapter

    torch.set_num_threads(args.threads)
    setups = {"one padded batch (max_batch_tokens=0)": 0, "length groups (default 4096)": 4096}
    pipes = {}
    for label, budget in setups.items():
        fix_random_seed(0)
        pipes[label] = common.ptuning_ner(max_batch_tokens=budget)
    nlp0 = next(iter(pipes.values()))
    examples = common.examples(nlp0, common.read_conll(args.data_dir / "conll2003" / "train.iob", nlp0.vocab,
                                                       args.sents))
    batches = list(minibatch_by_words(examples, size=1000, tolerance=0.2))[: args.steps]
    trainers = {}
    for label, nlp in pipes.items():
        nlp.initialize(lambda: examples[:100])
        trainers[label] = common.Trainer(common.nlp_update(nlp, Adam(0.01)), ((0, b) for b in batches))
    for step in range(1, len(batches) + 1):  # interleaved
        for trainer in trainers.values():
            trainer.run(until_steps=step)
    print(f"\nCoNLL-2003 train, first {args.sents} sentences, {len(batches)} batches of ~1,000 words, "
          f"torch threads {args.threads}, torch {torch.__version__}\n")
    print("| setup | real / sent wordpieces | train words/s | s per step |")
    print("| --- | ---: | ---: | ---: |")
    for label, nlp in pipes.items():
        module = get_adapter(nlp.get_pipe("ptuning_ner").model)
        t = trainers[label]
        print(f"| {label} | {module.tokens_real / module.tokens_sent:.2f} | "
              f"{t.words / t.seconds:.0f} | {t.seconds / len(batches):.2f} |")


if __name__ == "__main__":
    main()
