#!/usr/bin/env python
"""Training and inference words/s of the shipped NER defaults against
spacy-transformers full fine-tuning of the same backbone, in one process,
interleaved, on CoNLL-2003 sentences: the speed issue's targets (training
>= 5x, inference >= 3.5x).

Systems: ``st`` (spacy-transformers ``transformer`` + ``ner``, the MiniLM
fine-tuned, float32: what spaCy users run today), ``ours`` (``ptuning_ner``
with the factory defaults: whatever ``dtype = "auto"`` picks here) and
``ours-float32`` (the same with ``dtype = "float32"``). Each round trains
every system ``--steps`` steps on the same ~1,000-word batches (``nlp.update``,
Adam) and runs ``nlp.pipe`` over the same dev sentences; the table reports
the median over rounds, so one noisy round does not decide.

    python bench/speed.py [--rounds 3] [--steps 10] [--dev-sents 1000]
"""
import argparse
import statistics
import time
from pathlib import Path

from lib import common

SYSTEMS = {
    "st": "spacy-transformers trf + ner, full fine-tuning (float32)",
    "ours": "ours ptuning_ner, shipped defaults",
    "ours-float32": "ours ptuning_ner, dtype = \"float32\"",
}


def build(system: str):
    if system == "st":
        return common.st_pipeline("ner")
    return common.ptuning_ner(**({"dtype": "float32"} if system == "ours-float32" else {}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=common.DEFAULT_DATA)
    p.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=list(SYSTEMS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="nlp.update steps per system and round")
    p.add_argument("--dev-sents", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64, help="nlp.pipe batch size")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    import spacy
    import torch

    torch.set_num_threads(args.threads)
    vocab = spacy.blank("en").vocab
    train = common.read_conll(args.data_dir / "conll2003" / "train.iob", vocab, limit=3000)
    dev = common.read_conll(args.data_dir / "conll2003" / "dev.iob", vocab, limit=args.dev_sents)
    texts = [" ".join(common.words(d)) for d in dev]
    dev_words = sum(len(d) for d in dev)
    lengths = [len(d) for d in train]
    nlps, sgds, streams = {}, {}, {}
    for s in args.systems:
        nlp = nlps[s] = build(s)
        egs = common.examples(nlp, train)
        sgds[s] = nlp.initialize(lambda: egs[:500])
        streams[s] = common.epoch_batches(egs, lengths, seed=0)  # the same batches for every system
        list(nlp.pipe(texts[:128], batch_size=args.batch_size))  # warm-up
        nlp.update(next(streams[s])[1], sgd=sgds[s])
    load0 = common.machine_info()["loadavg_start"]
    train_wps = {s: [] for s in args.systems}
    infer_wps = {s: [] for s in args.systems}
    for r in range(args.rounds):
        for s in args.systems[r % len(args.systems):] + args.systems[: r % len(args.systems)]:
            nlp, words = nlps[s], 0
            start = time.perf_counter()
            for _ in range(args.steps):
                batch = next(streams[s])[1]
                nlp.update(batch, sgd=sgds[s], drop=0.1)
                words += sum(len(e.reference) for e in batch)
            train_wps[s].append(words / (time.perf_counter() - start))
            start = time.perf_counter()
            list(nlp.pipe(texts, batch_size=args.batch_size))
            infer_wps[s].append(dev_words / (time.perf_counter() - start))
            print(f"round {r + 1} {s}: train {train_wps[s][-1]:.0f} w/s, inference {infer_wps[s][-1]:.0f} w/s",
                  flush=True)
    ours = next((nlps[s] for s in args.systems if s == "ours"), None)
    if ours is not None:
        module = ours.get_pipe("ptuning_ner").model.get_ref("tok2vec")
        from spacy_ptuning.pipeline.transformer_model import get_adapter

        print(f"\n'ours' backbone dtype here: {get_adapter(module).backbone.dtype}")
    med = {s: (statistics.median(train_wps[s]), statistics.median(infer_wps[s])) for s in args.systems}
    ref = med.get("st")
    print(f"\nCoNLL-2003: {args.steps} training steps of ~1,000 words and {len(texts)} dev sentences "
          f"({dev_words} words, nlp.pipe batch {args.batch_size}) per system and round; median of "
          f"{args.rounds} interleaved rounds; {args.threads} torch threads; load average at start {load0}\n")
    print("| system | train words/s | (× st) | inference words/s | (× st) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for s in args.systems:
        tr, inf = med[s]
        rt = f"{tr / ref[0]:.2f}×" if ref else "-"
        ri = f"{inf / ref[1]:.2f}×" if ref else "-"
        print(f"| {SYSTEMS[s]} | {tr:,.0f} | {rt} | {inf:,.0f} | {ri} |")


if __name__ == "__main__":
    main()
