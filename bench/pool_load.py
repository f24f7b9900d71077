#!/usr/bin/env python
"""Loading an adapter into a running process whose backbone is already in
memory: AdapterPool.get (shared Vocab/Tokenizer) vs spacy.load, on the load
test's ten adapters (bench/serve_load.py builds them once), and the pool's
loads of their compacted serving copies (``spacy ptuning compact``, float32
and ``--storage-dtype float16`` into a pool with ``storage_dtype="float16"``;
made here in a temporary folder), per adapter kind, in one run.

    python bench/pool_load.py [--rounds 5]
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

from lib import common
from lib.serving import build_adapters


def _p95(times):
    times = sorted(times)
    return times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=common.DEFAULT_DATA)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    import spacy
    from spacy_ptuning.pipeline.compaction import save_compacted
    from spacy_ptuning.serving.pool import AdapterPool

    folder = build_adapters(common.RESULTS / "serve_adapters", common.Path(args.data_dir), False)["ptuning"]
    with tempfile.TemporaryDirectory() as tmp:
        compacted, halved = Path(tmp) / "float32", Path(tmp) / "float16"
        sizes = {}
        for path in sorted(folder.iterdir()):
            if (path / "config.cfg").is_file():
                _, before, after = save_compacted(path, compacted / path.name)
                _, _, half = save_compacted(path, halved / path.name, storage_dtype="float16")
                sizes[path.name] = (before, after, half)
        pools = {"AdapterPool.get": AdapterPool(folder, max_loaded=1),  # every get of another name loads it
                 "AdapterPool.get, compacted copies": AdapterPool(compacted, max_loaded=1),
                 "AdapterPool.get, float16 compacted copies": AdapterPool(halved, max_loaded=1, storage_dtype="float16", compact=True)}
        *names, warm = pools["AdapterPool.get"].names()
        for pool in pools.values():
            pool.get(warm)("warm up")  # the backbone, and the first tokenizer, in memory
        times = {label: {} for label in (*pools, "spacy.load")}
        for _ in range(args.rounds):  # alternately, so that a busier moment hits all alike
            for name in names:
                for label, pool in pools.items():
                    start = time.perf_counter()
                    pool.get(name)
                    times[label].setdefault(name, []).append(time.perf_counter() - start)
                    pool.get(warm)
                start = time.perf_counter()
                spacy.load(folder / name)
                times["spacy.load"].setdefault(name, []).append(time.perf_counter() - start)
    print("| how | loads | p50 ms | p95 ms |")
    print("| --- | ---: | ---: | ---: |")
    for label, per_name in times.items():
        every = [t for ts in per_name.values() for t in ts]
        print(f"| {label} | {len(every)} | {1000 * statistics.median(every):.0f} | {1000 * _p95(every):.0f} |")
    print()
    print("| adapter | saved MB: as trained / compacted / float16 | load p50 / max ms: as trained | compacted | float16 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    cells = lambda ts: f"{1000 * statistics.median(ts):.0f} / {1000 * max(ts):.0f}"  # noqa: E731
    for name in names:
        mb = " / ".join(f"{b / 2**20:.2f}" for b in sizes[name])
        print(f"| {name} | {mb} | " + " | ".join(cells(times[label][name]) for label in pools) + " |")


if __name__ == "__main__":
    main()
