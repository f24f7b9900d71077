#!/usr/bin/env python
"""The compute path alone as tenants grow, and where its time goes.

``run_items`` (what the server's batcher runs) on batches of ``--batch``
texts, in this process, no HTTP, one torch thread, for ``--seconds`` per
N. The texts go to adapters drawn uniformly from N resident ones
(``serve_tenants.py``'s perturbed copies of the load test's ten kinds: NER
and sentiment, prefix / prompt / prompt_encoder, 8-64 tokens; loaded
compacted, as the server holds them). Every N draws the same kinds in the
same order, so the same texts: at N = 10 a batch holds at most one adapter
per kind (what ten one-adapter servers would compute, in one pass), at
N = 1,000 up to ``--batch`` distinct adapters. The difference is the cost
of distinct adapters per batch; the stage columns say in which part of
``pipe_mixed`` it is (tokenisation and alignment, the backbone pass,
pooling back to tokens, the word features of the NER adapters when
gathered for the whole batch, and each kind of component).

``--words gathered,thinc`` runs each N both ways: the word features gathered
for all pipelines of a batch (``pipeline.gathered_words``, what the server
does) and each model's own thinc forward (their time then counts in the
NER components' column).

    python bench/batch_tenants.py [--tenants 10,1000] [--batch 8,32] [--seconds 20] [--words gathered,thinc] [--ner-head tagger]
"""
import argparse
import os
import random
import shutil
import time
from collections import defaultdict
from pathlib import Path

from lib import common
from lib.serving import ADAPTERS, build_adapters, tenant_texts
from serve_tenants import make_tenants

STAGES = ("wordpieces", "backbone", "pooling", "words", "ner", "textcat")


def instrument(clock):
    """Wrap the stages of ``mixed_batch`` so that their seconds add up in
    ``clock`` (bench only: the module's names are rebound, not its code)."""
    from spacy_ptuning.serving import mixed_batch

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                clock[name] += time.perf_counter() - t
        return wrapper

    mixed_batch.prepare_wordpieces = timed("wordpieces", mixed_batch.prepare_wordpieces)
    mixed_batch.encode_rows = timed("backbone", mixed_batch.encode_rows)
    mixed_batch.vectors_from_batch = timed("pooling", mixed_batch.vectors_from_batch)
    mixed_batch.gathered_word_features = timed("words", mixed_batch.gathered_word_features)
    run_pipes = mixed_batch._run_pipes

    def components(nlp, docs, start, end):
        for k in range(start, end):
            name = "ner" if nlp.pipeline[k][0].endswith("ner") else "textcat"
            timed(name, run_pipes)(nlp, docs, k, k + 1)

    mixed_batch._run_pipes = components


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=common.DEFAULT_DATA)
    p.add_argument("--tenants", default="10,1000")
    p.add_argument("--batch", default="8,32")
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--words", default="gathered", help="gathered, thinc or both (comma-separated): how word features run")
    p.add_argument("--ner-head", default="parser", choices=("parser", "tagger"),
                   help="the NER kinds' head: ptuning_ner (parser) or ptuning_ner_tagger (tagger)")
    p.add_argument("--out-dir", type=Path, default=common.RESULTS)
    args = p.parse_args()
    modes = args.words.split(",")
    if not set(modes) <= {"gathered", "thinc"}:
        p.error("--words: gathered, thinc, or gathered,thinc")
    import torch

    from spacy_ptuning.serving import mixed_batch
    from spacy_ptuning.serving.mixed_batch import MixedStats, run_items
    from spacy_ptuning.serving.pool import AdapterPool

    torch.set_num_threads(1)
    clock = defaultdict(float)
    instrument(clock)
    texts = tenant_texts(args.data_dir, 500)
    base = build_adapters(args.out_dir / "serve_adapters", args.data_dir, False, args.ner_head)["ptuning"]
    counts = [int(k) for k in args.tenants.split(",")]
    if any(n < len(ADAPTERS) or n % len(ADAPTERS) for n in counts):
        p.error(f"--tenants: each N must be a multiple of {len(ADAPTERS)} (the kinds), so that every N has every kind")
    folder = args.out_dir / "tenant_adapters_inprocess"
    shutil.rmtree(folder, ignore_errors=True)
    load_start = os.getloadavg()
    gathered = mixed_batch.planned_words
    lines = ["| batch | tenants | word features | adapters a batch | passes a batch | docs/s | ms a batch | " + " | ".join(f"{s} ms" for s in STAGES) + " |",
             "| ---: | --- | --- | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in STAGES) + " |"]
    try:
        tasks = make_tenants(base, folder, max(counts))
        pool = AdapterPool(folder, max_loaded=max(counts) + 1, check_interval=None, compact=True)
        names = sorted(tasks)
        by_index = sorted(names, key=lambda name: int(name.rsplit("-t", 1)[1]))  # tenant k is of kind k % 10
        for name in names:
            pool.get(name)
        for size in (int(b) for b in args.batch.split(",")):
            for n, mode in ((n, mode) for n in counts for mode in modes):
                mixed_batch.planned_words = gathered if mode == "gathered" else (lambda pipe, tok2vec: None)
                rng, copies = random.Random(0), random.Random(1)  # the same kinds and texts at every N

                def batch():
                    chosen = [by_index[copies.randrange(n // len(ADAPTERS)) * len(ADAPTERS) + rng.randrange(len(ADAPTERS))]
                              for _ in range(size)]
                    distinct.append(len(set(chosen)))
                    return [(pool.get(name), rng.choice(texts[tasks[name]])) for name in chosen]

                distinct = []
                for _ in range(3):  # warm-up
                    run_items(batch())
                clock.clear()
                del distinct[:]
                stats = MixedStats()
                count, start = 0, time.perf_counter()
                while time.perf_counter() - start < args.seconds:
                    run_items(batch(), stats=stats)
                    count += 1
                seconds = time.perf_counter() - start
                per_batch = sum(distinct) / count
                stages = " | ".join(f"{1000 * clock[s] / count:.1f}" for s in STAGES)
                lines.append(f"| {size} | {n:,} | {mode} | {per_batch:.1f} | {stats.passes / count:.1f} | "
                             f"{size * count / seconds:.1f} | {1000 * seconds / count:.1f} | {stages} |")
                print(lines[-1], flush=True)
    finally:
        mixed_batch.planned_words = gathered
        shutil.rmtree(folder, ignore_errors=True)
    print("\n".join(lines) + f"\n\nNER head: {args.ner_head}. Machine: {common.machine_info()}; "
          f"load average at start {load_start}, at end {os.getloadavg()}.")


if __name__ == "__main__":
    main()
