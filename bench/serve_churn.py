#!/usr/bin/env python
"""Churn: more adapters on disk than the server may hold, Zipf traffic over
all of them, some folders corrupt. Does any accepted request get lost?

``--on-disk`` adapters (the load test's ten kinds, perturbed copies as in
``serve_tenants.py``; initialised, not trained) and ``--corrupt`` broken ones
(the three faults of ``serve_cold.py``, cycling) lie in one folder. One
server (``python -m spacy ptuning serve`` on 127.0.0.1) holds at most
``--resident`` of them (``--max-loaded``), preloaded at start. ``--clients``
closed-loop clients send one dev sentence per request to adapters drawn by
Zipf(s=``--zipf``) over a fixed shuffle of every name on disk (the broken
ones among them), for ``--seconds`` or ``--max-requests``, whichever ends
first. A 503 with Retry-After (loads it could not do in time) is retried
after it, as a client would, up to ``--retry-for`` seconds from the first
try.

Counted, per request: answered (200); the broken adapters' own errors (500
with their numbered [PT-E...] message, the expected answer); refused in the
end (503 after every retry: not accepted, nothing lost); and **lost**: any
other answer (504, 5xx without a numbered error, a dropped connection). The
goal: zero lost, and every broken adapter failing alone. Also printed:
docs/s, p50/p95, the pool's loads and evictions, RSS at the end.

    python bench/serve_churn.py [--on-disk 3000] [--resident 1000] [--corrupt 30] [--seconds 120]

The copies (about 2 MB each) go to bench/results/churn_adapters/ and are
deleted at the end unless --keep. ``--compact float32|float16`` makes them
from compacted serving copies of the ten kinds (``spacy ptuning compact
[--storage-dtype float16]``): what an operator with tens of thousands of
adapters on disk would serve; float16 copies take about half the disk.
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
from lib.serving import Server, build_adapters, load_test_args, metric, percentile, tenant_texts
from serve_cold import FAULTS, broken_copy, make_adapters


def zipf_order(names: List[str], s: float):
    order = sorted(names)
    random.Random(7).shuffle(order)
    return order, [1.0 / (r + 1) ** s for r in range(len(order))]


async def traffic(url: str, tasks: Dict[str, str], texts, args) -> List[dict]:
    import httpx

    order, weights = zipf_order(list(tasks), args.zipf)
    records: List[dict] = []
    end = time.perf_counter() + args.seconds
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)

    async def client(k: int, http) -> None:
        rng = random.Random(k)
        while time.perf_counter() < end and len(records) < args.max_requests:
            name = rng.choices(order, weights)[0]
            text = rng.choice(texts[tasks[name]])
            start, tries, loads = time.perf_counter(), 0, 0
            while True:
                tries += 1
                try:
                    r = await http.post(f"{url}/adapters/{name}/process", json={"texts": [text]})
                    code, detail, retry = r.status_code, ("" if r.status_code == 200 else r.text[:300]), r.headers.get("retry-after")
                    loads = max(loads, int(r.headers.get("x-adapter-loads", 0)))
                except httpx.HTTPError as e:
                    code, detail, retry = type(e).__name__, str(e)[:300], None
                if code != 503 or retry is None or time.perf_counter() - start + float(retry) > args.retry_for:
                    break
                await asyncio.sleep(float(retry))
            records.append({"name": name, "code": code, "latency": time.perf_counter() - start, "tries": tries,
                            "detail": detail, "cold": loads > 0})

    async with httpx.AsyncClient(timeout=args.retry_for + 60, limits=limits) as http:
        await asyncio.gather(*(client(k, http) for k in range(args.clients)))
    return records


def outcome(record: dict, broken: set) -> str:
    code, detail = record["code"], record["detail"]
    if code == 200:
        return "answered" if record["name"] not in broken else "lost"  # a broken adapter must not answer
    if record["name"] in broken and code == 500 and "[PT-E" in detail:
        return "broken, own error"
    if code == 503:
        return "refused (503 after retries)"
    return "lost"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=common.DEFAULT_DATA)
    p.add_argument("--on-disk", type=int, default=3000)
    p.add_argument("--resident", type=int, default=1000)
    p.add_argument("--corrupt", type=int, default=30)
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=120)
    p.add_argument("--max-requests", type=int, default=50_000)
    p.add_argument("--retry-for", type=float, default=60, help="seconds a client keeps retrying a 503")
    p.add_argument("--mode", default="mixed")
    p.add_argument("--server-args", default="")
    p.add_argument("--out-dir", type=Path, default=common.RESULTS)
    p.add_argument("--keep", action="store_true", help="keep the adapter copies")
    p.add_argument("--compact", choices=("none", "float32", "float16"), default="none",
                   help="copy compacted serving copies of the kinds (spacy ptuning compact), in this dtype")
    args = p.parse_args()

    texts = tenant_texts(args.data_dir)
    base = build_adapters(args.out_dir / "serve_adapters", args.data_dir, False)["ptuning"]
    folder = args.out_dir / "churn_adapters"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started, load_start = time.time(), os.getloadavg()
    try:
        t0 = time.perf_counter()
        if args.compact != "none":
            from spacy_ptuning.pipeline.compaction import save_compacted

            kinds = folder / ".kinds"  # hidden: the pool does not serve it
            for kind in sorted(p for p in base.iterdir() if (p / "config.cfg").is_file()):
                save_compacted(kind, kinds / kind.name, storage_dtype=args.compact)
            base = kinds
        tasks = make_adapters(base, folder, args.on_disk, 0)
        broken = dict(broken_copy(base, folder, FAULTS[k % len(FAULTS)], k) for k in range(args.corrupt))
        made_s = time.perf_counter() - t0
        disk_mb = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20
        server = Server(folder, load_test_args(args.mode, args.resident, "all") + args.server_args.split())
        try:
            t0 = time.perf_counter()
            server.wait_ready(timeout=3600)
            ready_s = time.perf_counter() - t0
            before = server.metrics()
            t0 = time.perf_counter()
            records = asyncio.run(traffic(server.url, {**tasks, **broken}, texts, args))
            seconds = time.perf_counter() - t0
            after = server.metrics()
            rss = server.rss_mb()
            alive = server.proc.poll() is None
        finally:
            server.stop()
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)

    counts: Dict[str, int] = {}
    for r in records:
        counts[outcome(r, set(broken))] = counts.get(outcome(r, set(broken)), 0) + 1
    lost = [r for r in records if outcome(r, set(broken)) == "lost"]
    ok = [r["latency"] for r in records if r["code"] == 200]
    # Warm: every adapter resident when the request arrived; cold: it waited
    # for a load (the server's X-Adapter-Loads header).
    warm = [r["latency"] for r in records if r["code"] == 200 and not r["cold"]]
    cold = [r["latency"] for r in records if r["code"] == 200 and r["cold"]]
    delta = lambda key: metric(after, key) - metric(before, key)  # noqa: E731
    asked_broken = sorted({r["name"] for r in records if r["name"] in broken})
    row = {
        "requests": len(records), "seconds": seconds, "docs_per_s": len(ok) / seconds,
        "p50_ms": 1000 * percentile(ok, 50), "p95_ms": 1000 * percentile(ok, 95), "p99_ms": 1000 * percentile(ok, 99),
        "warm": len(warm), "cold": len(cold),
        "warm_p50_ms": 1000 * percentile(warm, 50), "warm_p95_ms": 1000 * percentile(warm, 95),
        "cold_p50_ms": 1000 * percentile(cold, 50), "cold_p95_ms": 1000 * percentile(cold, 95),
        "outcomes": counts, "lost": len(lost), "lost_examples": lost[:5],
        "retried": sum(r["tries"] > 1 for r in records),
        "adapters_asked": len({r["name"] for r in records}), "broken_asked": len(asked_broken),
        "loads": delta("ptuning_adapter_loads_total"), "load_failures": delta("ptuning_adapter_load_failures_total"),
        "evictions": delta("ptuning_adapter_evictions_total"), "rss_mb": rss,
        "load_ms": 1000 * delta("ptuning_adapter_load_seconds_total") / max(1.0, delta("ptuning_adapter_loads_total")), "server_alive": alive,
        # The permanent generation before and after the traffic (serving/gc_pauses.py):
        # with the loaded pipelines untied it follows the resident adapters; growth is frozen cycles.
        "frozen_before": metric(before, "ptuning_gc_frozen_objects"), "frozen_after": metric(after, "ptuning_gc_frozen_objects"),
        "ready_s": ready_s, "copies_made_s": made_s,
    }
    f = lambda v, d=0: f"{v:,.{d}f}"  # noqa: E731
    table = "\n".join([
        "| on disk | resident | corrupt | requests | docs/s | p50 / p95 / p99 ms | answered | broken, own error | "
        "refused (503) | **lost** | adapters asked | loads | evictions | RSS MB |",
        "| ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {args.on_disk:,} | {args.resident:,} | {args.corrupt} | {len(records):,} | {f(row['docs_per_s'], 1)} | "
        f"{f(row['p50_ms'])} / {f(row['p95_ms'])} / {f(row['p99_ms'])} | {counts.get('answered', 0):,} | "
        f"{counts.get('broken, own error', 0):,} ({len(asked_broken)} adapters) | {counts.get('refused (503 after retries)', 0):,} | "
        f"**{len(lost)}** | {row['adapters_asked']:,} | {f(row['loads'])} | {f(row['evictions'])} | {f(rss)} |",
        "",
        "| answered | count | p50 ms | p95 ms |",
        "| --- | ---: | ---: | ---: |",
        f"| warm (all adapters resident on arrival) | {len(warm):,} | {f(row['warm_p50_ms'])} | {f(row['warm_p95_ms'])} |",
        f"| cold (waited for a load) | {len(cold):,} | {f(row['cold_p50_ms'])} | {f(row['cold_p95_ms'])} |",
    ])
    footer = (f"\n\nMachine: {common.machine_info()}; load average at start {load_start}, at end {os.getloadavg()}; "
              f"Zipf s={args.zipf} over all {args.on_disk + args.corrupt} names, {args.clients} clients, {seconds:.0f} s, "
              f"mode {args.mode}, 503s retried for {args.retry_for:g} s, server args {args.server_args!r}; "
              f"{row['retried']:,} requests retried a 503; mean load {row['load_ms']:.0f} ms; frozen objects {row['frozen_before']:,.0f} before the traffic, "
              f"{row['frozen_after']:,.0f} after; copies made in {made_s:.0f} s, server ready (preload of "
              f"{args.resident:,}) in {ready_s:.0f} s; adapters on disk {disk_mb:,.0f} MB (--compact {args.compact}); "
              f"server alive at the end: {alive}; "
              f"total {(time.time() - started) / 60:.1f} min.")
    if lost:
        footer += "\n\nLost, first five: " + "; ".join(f"{r['name']}: {r['code']} {r['detail'][:120]}" for r in lost[:5])
    print(table + footer)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out_dir / f"serve_churn_{stamp}"
    out.with_suffix(".json").write_text(json.dumps({"result": row, "args": vars(args) | {
        "data_dir": str(args.data_dir), "out_dir": str(args.out_dir)}}, indent=1, default=str))
    out.with_suffix(".md").write_text(table + footer + "\n")


if __name__ == "__main__":
    main()
