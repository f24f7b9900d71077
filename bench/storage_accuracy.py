#!/usr/bin/env python
"""What holding resident adapters in float16 costs in accuracy and saves in
memory (``serve --storage-dtype float16``, ``AdapterPool(storage_dtype=...)``).

For CoNLL-2003 NER (configs/ner.cfg) and SST-2 (configs/textcat.cfg): train
one adapter with the shipped config (float32 backbone, ``--steps`` steps, as
``dtype_accuracy.py`` trains), save it, and load it twice as the server
does (compacted): prompts and word-feature tables as computed (float32),
and held in float16. Both are scored on all dev sentences, one sentence a
doc, and compared doc by doc with each other. Prints one table; JSON to
bench/results/.

    python bench/storage_accuracy.py [--steps 300] [--tasks ner,textcat] [--seed 0]
"""
import argparse
import os
import shutil
import tempfile
from pathlib import Path

from dtype_accuracy import read_task, train
from lib import common

STORAGE = ("float32", "float16")


def _prediction(doc):
    return (tuple((e.start, e.end, e.label_) for e in doc.ents), max(doc.cats, key=doc.cats.get) if doc.cats else None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=common.DEFAULT_DATA)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--tasks", default="ner,textcat")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    import spacy

    from spacy_ptuning.serving.pool import AdapterPool, resident_bytes

    vocab = spacy.blank("en").vocab
    load_start = os.getloadavg()
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="storage-accuracy-"))
    try:
        for task in args.tasks.split(","):
            train_records, dev = read_task(task, args.data_dir, vocab)
            nlp, words_per_s = train(task, train_records, args.steps, args.seed, "float32")
            nlp.to_disk(tmp / task)
            print(f"{task}: trained {args.steps} steps, {words_per_s:.0f} words/s", flush=True)
            served = {}
            for storage in STORAGE:
                pool = AdapterPool({task: tmp / task}, check_interval=None, compact=True, storage_dtype=storage, dtype="float32")
                served[storage] = pool.get(task)
            outputs = {}
            for storage in STORAGE:
                egs, secs = common.predict(served[storage], dev)
                outputs[storage] = egs
                rows.append({"task": task, "storage": storage, "steps": args.steps,
                             "own_mb": resident_bytes(served[storage]) / 2**20,
                             "dev": 100 * common.score(task, egs)["score"], "infer_s": secs})
            exact, half = outputs["float32"], outputs["float16"]
            changed = sum(_prediction(a.predicted) != _prediction(b.predicted) for a, b in zip(exact, half))
            cat_diff = max((abs(a.predicted.cats[k] - b.predicted.cats[k]) for a, b in zip(exact, half) for k in a.predicted.cats), default=0.0)
            rows[-1].update({"docs_changed": changed, "docs": len(dev), "max_cat_diff": cat_diff})
            print(rows[-2:], flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    metric = {"ner": "dev ents_f", "textcat": "dev accuracy"}
    lines = ["| task | metric | storage | own MB | dev (one sentence a doc) | docs predicted otherwise than float32 | largest cat score difference | inference s |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        changed = f"{r['docs_changed']} of {r['docs']}" if "docs_changed" in r else "-"
        diff = f"{r['max_cat_diff']:.1e}" if r["task"] == "textcat" and "max_cat_diff" in r else "-"
        lines.append(f"| {r['task']} | {metric[r['task']]} | {r['storage']} | {r['own_mb']:.2f} | {r['dev']:.2f} | {changed} | {diff} | {r['infer_s']:.1f} |")
    footer = (f"\n\nMachine: {common.machine_info()}; load average at start {load_start}, at end {os.getloadavg()}; "
              f"{args.steps} training steps, seed {args.seed}, float32 backbone; served compacted by AdapterPool.")
    print("\n".join(lines) + footer)
    common.save_json({"machine": common.machine_info(), "rows": rows}, common.RESULTS / f"{common.stamped('storage_accuracy')}.json")


if __name__ == "__main__":
    main()
