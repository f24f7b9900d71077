#!/usr/bin/env python
"""Loading an adapter into a running process whose backbone is already in
memory: AdapterPool.get (shared Vocab/Tokenizer) vs spacy.load, on the load
test's ten adapters (bench/serve_load.py builds them once).

    python bench/pool_load.py [--rounds 5]
"""
import argparse
import statistics
import time

from lib import common
from lib.serving import build_adapters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=common.DEFAULT_DATA)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    import spacy
    from spacy_ptuning.serving.pool import AdapterPool

    folder = build_adapters(common.RESULTS / "serve_adapters", common.Path(args.data_dir), False)["ptuning"]
    pool = AdapterPool(folder, max_loaded=1)  # every get of another name loads it
    names = pool.names()
    pool.get(names[0])("warm up")  # the backbone, and the first tokenizer, in memory
    pooled, plain = [], []
    for _ in range(args.rounds):
        for name in names[1:]:
            start = time.perf_counter()
            pool.get(name)
            pooled.append(time.perf_counter() - start)
            start = time.perf_counter()
            spacy.load(folder / name)
            plain.append(time.perf_counter() - start)
    print("| how | loads | p50 ms | p95 ms |")
    print("| --- | ---: | ---: | ---: |")
    for label, times in (("AdapterPool.get", pooled), ("spacy.load", plain)):
        times = sorted(times)
        p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
        print(f"| {label} | {len(times)} | {1000 * statistics.median(times):.0f} | {1000 * p95:.0f} |")


if __name__ == "__main__":
    main()
