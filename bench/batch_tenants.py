#!/usr/bin/env python
"""The compute path alone as tenants grow: ``run_items`` (what the server's
batcher runs) on batches of 8 texts for 8 adapters drawn uniformly from N
resident ones, in this process, no HTTP, one torch thread, for ``--seconds``
per N. The adapters are ``serve_tenants.py``'s perturbed copies, loaded
compacted, as the server holds them.

    python bench/batch_tenants.py [--tenants 10,1000] [--seconds 20]
"""
import argparse
import os
import random
import shutil
import time
from pathlib import Path

from lib import common
from lib.serving import build_adapters, tenant_texts
from serve_tenants import make_tenants


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=common.DEFAULT_DATA)
    p.add_argument("--tenants", default="10,1000")
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--out-dir", type=Path, default=common.RESULTS)
    args = p.parse_args()
    import torch

    from spacy_ptuning.serving.mixed_batch import run_items
    from spacy_ptuning.serving.pool import AdapterPool

    torch.set_num_threads(1)
    texts = tenant_texts(args.data_dir, 500)
    base = build_adapters(args.out_dir / "serve_adapters", args.data_dir, False)["ptuning"]
    load_start = os.getloadavg()
    lines = ["| resident adapters | batches | docs/s |", "| ---: | ---: | ---: |"]
    for n in (int(k) for k in args.tenants.split(",")):
        folder = args.out_dir / "tenant_adapters_inprocess"
        shutil.rmtree(folder, ignore_errors=True)
        try:
            tasks = make_tenants(base, folder, n)
            pool = AdapterPool(folder, max_loaded=n + 1, check_interval=None, compact=True)
            names = sorted(tasks)
            for name in names:
                pool.get(name)
            rng = random.Random(0)

            def batch():
                return [(pool.get(name), rng.choice(texts[tasks[name]])) for name in (rng.choice(names) for _ in range(8))]

            for _ in range(5):  # warm-up
                run_items(batch())
            count, start = 0, time.perf_counter()
            while time.perf_counter() - start < args.seconds:
                run_items(batch())
                count += 1
            seconds = time.perf_counter() - start
            lines.append(f"| {n:,} | {count} | {8 * count / seconds:.1f} |")
            print(lines[-1], flush=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    print("\n".join(lines) + f"\n\nMachine: {common.machine_info()}; load average at start {load_start}, at end {os.getloadavg()}.")


if __name__ == "__main__":
    main()
