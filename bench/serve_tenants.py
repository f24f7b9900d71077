#!/usr/bin/env python
"""Retention as tenants grow: one server holding N resident adapters of mixed
kinds, against the same server holding one, under the same traffic.

The adapters: the ten kinds of the load test (``lib.serving.ADAPTERS``: NER
and sentiment, prefix / prompt / prompt_encoder, 8-64 virtual tokens) built
once each, then copied N/10 times with their prompts perturbed (random, not
trained: throughput does not depend on the prompt values, NER decoding
aside; each copy is a distinct adapter to the server, with its own
checksum). Copies are made by rewriting the adapter's safetensors inside the
saved model (milliseconds each), not by training or re-saving pipelines.

For each N (``--tenants 1,10,100,1000``): a server with ``--max-loaded N
--preload all`` on 127.0.0.1; ``--clients`` closed-loop clients send one dev
sentence per request (CoNLL-2003 to NER adapters, SST-2 to sentiment ones)
to adapters drawn uniformly or Zipf(s=1.1) (``--traffic``), for
``--seconds`` or ``--max-requests``, whichever ends first, in each batching
mode (``--modes mixed,per_adapter``). Prints docs/s, p50/p95, errors, RSS
and RSS per resident adapter, with retention = docs/s / docs/s at N = 1 of
the same mode and traffic; writes bench/results/serve_tenants_*.json/.md.

    python bench/serve_tenants.py [--tenants 1,10,100,1000] [--seconds 30] [--traffic uniform,zipf]

The copies go to bench/results/tenant_adapters/ (git-ignored; about 1.4 MB
an adapter) and are deleted at the end unless --keep.
"""
import argparse
import asyncio
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Dict, List

from lib import common
from lib.serving import ADAPTERS, Server, build_adapters, closed_loop, load_test_args, percentile, tenant_texts


def perturbed_copy(src: Path, dst: Path, seed: int) -> None:
    """A copy of the pipeline folder ``src`` whose adapter prompts are its
    own (``src``'s plus seeded noise), with the envelope's checksum redone."""
    import numpy
    import srsly
    from safetensors.numpy import load, save

    from spacy_ptuning.model.serialization import weights_checksum

    shutil.copytree(src, dst)
    rng = numpy.random.default_rng(seed)
    for model_file in dst.glob("*/model"):
        msg = srsly.msgpack_loads(model_file.read_bytes())
        changed = False
        for node_shims in msg["shims"]:
            for i, shim in enumerate(node_shims):
                try:
                    env = srsly.msgpack_loads(shim)
                except Exception:
                    continue
                if not isinstance(env, dict) or not str(env.get("format", "")).startswith("spacy-ptuning-adapter/"):
                    continue
                tensors = {k: v + rng.normal(0, 0.02, v.shape).astype(v.dtype) for k, v in load(env["weights"]).items()}
                env["weights"] = save(tensors)
                env["weights_sha256"] = weights_checksum(env["weights"])
                node_shims[i] = srsly.msgpack_dumps(env)
                changed = True
        if changed:
            model_file.write_bytes(srsly.msgpack_dumps(msg))


def make_tenants(base: Path, out: Path, n: int) -> Dict[str, str]:
    """n adapters in ``out`` (name -> task), cycling over the ten kinds."""
    out.mkdir(parents=True, exist_ok=True)
    tasks = {}
    for k in range(n):
        name, task, _, _ = ADAPTERS[k % len(ADAPTERS)]
        tenant = f"{name}-t{k:05d}"
        if not (out / tenant).exists():
            perturbed_copy(base / name, out / tenant, seed=k)
        tasks[tenant] = task
    return tasks


def measure(server: Server, tasks: Dict[str, str], texts: Dict[str, list], traffic: str, args) -> dict:
    """One bounded closed-loop run over the server's tenants."""
    names = sorted(tasks)
    order = names[:]
    random.Random(7).shuffle(order)  # which tenants are popular: not the kind order
    weights = [1.0 / (r + 1) ** 1.1 for r in range(len(order))] if traffic == "zipf" else None

    def work(rng):
        name = rng.choices(order, weights)[0] if weights else rng.choice(order)
        return name, rng.choice(texts[tasks[name]])

    asyncio.run(closed_loop(server.url, work, args.clients, 3, 200))  # warm
    run = asyncio.run(closed_loop(server.url, work, args.clients, args.seconds, args.max_requests))
    ok = len(run["latencies"])
    return {
        "ok": ok,
        "errors": {str(k): v for k, v in run["statuses"].items() if k != 200},
        "docs_per_s": ok / run["seconds"],
        "p50_ms": 1000 * percentile(run["latencies"], 50),
        "p95_ms": 1000 * percentile(run["latencies"], 95),
        "rss_mb": server.rss_mb(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=common.DEFAULT_DATA)
    p.add_argument("--tenants", default="1,10,100,1000")
    p.add_argument("--traffic", default="uniform,zipf")
    p.add_argument("--modes", default="mixed,per_adapter")
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--max-requests", type=int, default=10000)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--out-dir", type=Path, default=common.RESULTS)
    p.add_argument("--keep", action="store_true", help="keep the adapter copies")
    p.add_argument("--server-args", default="")
    args = p.parse_args()

    texts = tenant_texts(args.data_dir)
    base = build_adapters(args.out_dir / "serve_adapters", args.data_dir, False)["ptuning"]
    folder = args.out_dir / "tenant_adapters"
    counts = [int(n) for n in args.tenants.split(",")]
    rows: List[dict] = []
    started = time.time()
    load_start = os.getloadavg()
    try:
        for n in counts:
            t0 = time.perf_counter()
            shutil.rmtree(folder, ignore_errors=True)
            tasks = make_tenants(base, folder, n)
            made = time.perf_counter() - t0
            for mode in args.modes.split(","):
                server = Server(folder, load_test_args(mode, n, "all") + args.server_args.split())
                try:
                    t1 = time.perf_counter()
                    server.wait_ready(timeout=3600)
                    ready = time.perf_counter() - t1
                    for traffic in args.traffic.split(","):
                        rows.append(measure(server, tasks, texts, traffic, args) | {
                            "tenants": n, "mode": mode, "traffic": traffic, "ready_s": ready, "made_s": made})
                        print(json.dumps(rows[-1]), flush=True)
                finally:
                    server.stop()
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    for row in rows:
        one = next((r for r in rows if r["tenants"] == counts[0] and r["mode"] == row["mode"] and r["traffic"] == row["traffic"]), None)
        row["retention"] = row["docs_per_s"] / one["docs_per_s"] if one and one["docs_per_s"] else None
        row["p95_vs_one"] = row["p95_ms"] / one["p95_ms"] if one and one["p95_ms"] else None
        row["rss_per_tenant_mb"] = (row["rss_mb"] - one["rss_mb"]) / max(1, row["tenants"] - counts[0]) if one and row["tenants"] > counts[0] else None
    lines = ["| tenants | mode | traffic | docs/s | retention | p50 ms | p95 ms | p95 / one | errors | RSS MB | MB per extra tenant | ready s |",
             "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    for r in rows:
        f = lambda v, d=1: "-" if v is None else f"{v:,.{d}f}"  # noqa: E731
        lines.append(f"| {r['tenants']:,} | {r['mode']} | {r['traffic']} | {f(r['docs_per_s'])} | {f(r['retention'], 2)} | "
                     f"{f(r['p50_ms'])} | {f(r['p95_ms'])} | {f(r['p95_vs_one'], 2)} | {r['errors'] or 0} | {f(r['rss_mb'], 0)} | "
                     f"{f(r['rss_per_tenant_mb'], 2)} | {f(r['ready_s'])} |")
    info = common.machine_info()
    table = "\n".join(lines)
    footer = (f"\n\nMachine: {info}; load average at start {load_start}, at end {os.getloadavg()}; "
              f"{args.clients} clients, {args.seconds:g} s or {args.max_requests} requests a run; "
              f"total {(time.time() - started) / 60:.1f} min.")
    print(table + footer)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out_dir / f"serve_tenants_{stamp}"
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "args": vars(args) | {"data_dir": str(args.data_dir), "out_dir": str(args.out_dir)}}, indent=1))
    out.with_suffix(".md").write_text(table + footer + "\n")


if __name__ == "__main__":
    main()
