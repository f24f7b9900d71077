#!/usr/bin/env python
"""Memory per resident adapter: RSS growth per adapter loaded in an
AdapterPool, as saved (``compact=False``) and as the server holds it
(``compact=True``: the prompt module replaced by the prompts it computes),
against the adapter's own bytes (``pool.resident_bytes``: its prompts, or
prompt module, and its head and word features: every tensor the pipeline
holds besides the shared backbone; what ``--max-resident-mb`` counts).

For each of the load test's ten kinds (``lib.serving.ADAPTERS``), ``--copies``
perturbed copies (as ``serve_tenants.py`` makes them) are loaded one after
another in this process; RSS per adapter = (RSS after - RSS before) /
copies. The goal of the thousands-of-adapters issue: RSS per adapter <= its
own bytes + 0.5 MB.

    python bench/adapter_memory.py [--copies 20]

``--scale 500,1000,3000``: where the memory of many resident adapters goes.
One process loads that many perturbed copies of the ten kinds (round-robin,
compacted, as the server holds them) and, at each count, splits RSS into
malloc's in-use bytes (``mallinfo2``: heap in use + its mmapped blocks),
malloc's free-but-kept bytes (fragmentation), and the rest (torch/numpy
mappings, code), beside the adapters' own bytes and the number of objects
Python's cycle collector tracks. ``--storage-dtypes float32,float16``:
each storage dtype of the pool (``serve --storage-dtype``) in its own fresh
process, side by side in one table; ``float16-copies``: a float16 pool
serving float16 compacted copies (``spacy ptuning compact --storage-dtype
float16``) instead of halving the adapters as trained at each load.
"""
import argparse
import concurrent.futures
import ctypes
import gc
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path

from lib import common
from lib.serving import ADAPTERS, build_adapters
from serve_tenants import perturbed_copy


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(folder: Path, compact: bool, copies: int) -> list:
    """Per kind: RSS growth per adapter over ``copies`` loads, and own bytes."""
    from spacy_ptuning.serving.pool import AdapterPool, resident_bytes

    pool = AdapterPool(folder, max_loaded=10**6, check_interval=None, compact=compact)
    rows = []
    for kind, *_ in ADAPTERS:
        pool.get(f"{kind}-0")  # first of its kind: shared tokenizer and caches
        gc.collect()
        before = rss_mb()
        for k in range(1, copies + 1):
            nlp = pool.get(f"{kind}-{k}")
        gc.collect()
        rows.append({"kind": kind, "compact": compact, "rss_per_adapter_mb": (rss_mb() - before) / copies, "own_mb": resident_bytes(nlp) / 2**20})
    return rows


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def malloc_mb() -> dict:
    """glibc's mallinfo2: bytes in use (heap + mmapped blocks) and free in the heap, MB."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _Mallinfo2
    info = libc.mallinfo2()
    return {"malloc_used_mb": (info.uordblks + info.hblkhd) / 2**20, "malloc_free_mb": info.fordblks / 2**20}


def scale(folder: Path, counts: list, storage: str = "float32") -> list:
    """At each count of resident adapters: RSS and where it goes.
    ``storage`` "float16-copies": a float16 pool over float16 compacted
    copies (``folder`` holds those)."""
    from spacy_ptuning.serving.pool import AdapterPool, resident_bytes

    pool = AdapterPool(folder, max_loaded=10**6, check_interval=None, compact=True, storage_dtype=storage.split("-")[0])
    kinds = [kind for kind, *_ in ADAPTERS]
    for kind in kinds:  # first of each kind: shared tokenizer and caches
        pool.get(f"{kind}-0")
    gc.collect()
    base = {"rss_mb": rss_mb(), **malloc_mb(), "objects": len(gc.get_objects())}
    rows, own, loaded = [], 0, 0
    for count in counts:
        while loaded < count:
            kind, k = kinds[loaded % len(kinds)], 1 + loaded // len(kinds)
            own += resident_bytes(pool.get(f"{kind}-{k}"))
            loaded += 1
        gc.collect()
        now = {"rss_mb": rss_mb(), **malloc_mb(), "objects": len(gc.get_objects())}
        row = {"storage": storage, "adapters": count, "own_mb": own / 2**20 / count, "rss_total_mb": now["rss_mb"]}
        for key in ("rss_mb", "malloc_used_mb", "malloc_free_mb"):
            row[key.replace("_mb", "_per_adapter_mb")] = (now[key] - base[key]) / count
        row["objects_per_adapter"] = (now["objects"] - base["objects"]) / count
        rows.append(row)
        print(row, flush=True)
    return rows


def main_scale(args) -> None:
    counts = sorted(int(c) for c in args.scale.split(","))
    base = build_adapters(args.out_dir / "serve_adapters", args.data_dir, False)["ptuning"]
    tmp = Path(tempfile.mkdtemp(prefix="adapter-memory-"))
    load_start = os.getloadavg()
    try:
        per_kind = -(-counts[-1] // len(ADAPTERS))
        storages = args.storage_dtypes.split(",")
        folders = {"": base}
        if "float16-copies" in storages:  # compacted float16 serving copies of the kinds (spacy ptuning compact)
            from spacy_ptuning.pipeline.compaction import save_compacted

            for kind, *_ in ADAPTERS:
                save_compacted(base / kind, tmp / "kinds16" / kind, storage_dtype="float16")
            folders["float16-copies"] = tmp / "kinds16"
        for arm, kinds in folders.items():
            for kind, *_ in ADAPTERS:
                for k in range(per_kind + 1):
                    perturbed_copy(kinds / kind, tmp / (arm or "copies") / f"{kind}-{k}", seed=k)
        rows = []
        for storage in storages:  # each in a fresh process
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
                folder = tmp / ("float16-copies" if storage == "float16-copies" else "copies")
                rows += ex.submit(scale, folder, counts, storage).result()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = ["| storage | resident adapters | own MB / adapter | RSS MB / adapter | malloc in use | malloc free (kept) | "
             "RSS - own | objects / adapter | process RSS MB |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['storage']} | {r['adapters']:,} | {r['own_mb']:.2f} | {r['rss_per_adapter_mb']:.2f} | {r['malloc_used_per_adapter_mb']:.2f} | "
                     f"{r['malloc_free_per_adapter_mb']:.2f} | {r['rss_per_adapter_mb'] - r['own_mb']:+.2f} | {r['objects_per_adapter']:,.0f} | {r['rss_total_mb']:,.0f} |")
    footer = (f"\n\nMachine: {common.machine_info()}; load average at start {load_start}, at end {os.getloadavg()}; "
              f"the ten kinds round-robin, compacted, loaded in one process.")
    print("\n".join(lines) + footer)
    out = args.out_dir / f"adapter_memory_scale_{time.strftime('%Y%m%d-%H%M%S')}.md"
    out.write_text("\n".join(lines) + footer + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=common.DEFAULT_DATA)
    p.add_argument("--copies", type=int, default=20)
    p.add_argument("--out-dir", type=Path, default=common.RESULTS)
    p.add_argument("--scale", default="", help="counts of resident adapters, e.g. 500,1000,3000: where their memory goes")
    p.add_argument("--storage-dtypes", default="float32", help="with --scale: the pool's storage dtypes, e.g. float32,float16; "
                   "float16-copies: a float16 pool over float16 compacted copies (spacy ptuning compact --storage-dtype float16)")
    args = p.parse_args()
    if args.scale:
        return main_scale(args)
    base = build_adapters(args.out_dir / "serve_adapters", args.data_dir, False)["ptuning"]
    tmp = Path(tempfile.mkdtemp(prefix="adapter-memory-"))
    load_start = os.getloadavg()
    rows = []
    try:
        for kind, *_ in ADAPTERS:
            for k in range(args.copies + 1):
                perturbed_copy(base / kind, tmp / f"{kind}-{k}", seed=k)
        for compact in (False, True):  # each arm in a fresh process: no memory freed by the other to reuse
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
                for row in ex.submit(measure, tmp, compact, args.copies).result():
                    rows.append(row)
                    print(row, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = ["| adapter | as saved: own MB | RSS MB / adapter | served (compact): own MB | RSS MB / adapter | RSS - own |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for kind, *_ in ADAPTERS:
        a = next(r for r in rows if r["kind"] == kind and not r["compact"])
        b = next(r for r in rows if r["kind"] == kind and r["compact"])
        lines.append(f"| {kind} | {a['own_mb']:.2f} | {a['rss_per_adapter_mb']:.2f} | {b['own_mb']:.2f} | "
                     f"{b['rss_per_adapter_mb']:.2f} | {b['rss_per_adapter_mb'] - b['own_mb']:+.2f} |")
    mean = lambda c, key: sum(r[key] for r in rows if r["compact"] == c) / len(ADAPTERS)  # noqa: E731
    lines.append(f"| mean of the ten | {mean(False, 'own_mb'):.2f} | {mean(False, 'rss_per_adapter_mb'):.2f} | "
                 f"{mean(True, 'own_mb'):.2f} | {mean(True, 'rss_per_adapter_mb'):.2f} | "
                 f"{mean(True, 'rss_per_adapter_mb') - mean(True, 'own_mb'):+.2f} |")
    footer = (f"\n\nMachine: {common.machine_info()}; load average at start {load_start}, at end {os.getloadavg()}; "
              f"{args.copies} copies of each kind loaded in one process.")
    print("\n".join(lines) + footer)
    out = args.out_dir / f"adapter_memory_{time.strftime('%Y%m%d-%H%M%S')}.md"
    out.write_text("\n".join(lines) + footer + "\n")


if __name__ == "__main__":
    main()
