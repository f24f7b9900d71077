#!/usr/bin/env python
"""Cold starts: requests for adapters that are on disk but not loaded, sent
while warm traffic runs. It measures what they cost and whether they stall
the warm adapters.

One server (``python -m spacy ptuning serve`` in a child process on
127.0.0.1) holds ``--warm`` resident adapters (preloaded). Beside them are
``--isolated + --burst`` cold ones and ``--corrupt`` broken ones. The
adapters are the ten kinds of the load test (NER and sentiment;
prefix / prompt / prompt_encoder; 8-64 virtual tokens), copied with their
prompts perturbed (``serve_tenants.perturbed_copy``). They are initialised,
not trained: load cost and throughput do not depend on the prompt values.
``--max-loaded`` is large enough that nothing is evicted, so every cold
request is a first load.

``--clients`` closed-loop clients send one dev sentence per request to the
warm adapters for the whole run. Each warm latency is kept with the time it
was sent, so it can be put in the window of a phase:

  quiet     ``--seconds`` of warm traffic alone
  isolated  one client asks ``--isolated`` cold adapters, one at a time,
            and then asks each one again at once, now warm. The extra cost
            of a cold start is the cold latency minus the same adapter's
            warm latency, taken pairwise
  burst     ``--burst`` cold adapters asked at once (all in flight
            together), with the ``--corrupt`` broken adapters among them,
            from a separate process so that the burst's client work does
            not delay the reading of warm answers
  after     ``--seconds`` of warm traffic alone again

The broken adapters each get one fault: the model file cut in half, the
config not parseable, the weights changed without their checksum. Each must
fail alone with its numbered error while the rest are served.

Prints one table: the p50/p95 of the warm latencies in each window, the
cold latencies and their extra cost, the errors, and the pool's load count
and load seconds. Writes bench/results/serve_cold_*.json/.md. Every phase
is bounded in time and requests. The adapter copies (about 1.4 MB each) go
to bench/results/cold_adapters/ and are deleted at the end.

    python bench/serve_cold.py [--warm 100] [--isolated 40] [--burst 500] [--seconds 15]
"""
import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

from lib import common
from lib.serving import ADAPTERS, Server, build_adapters, load_test_args, metric, percentile, tenant_texts
from serve_tenants import adapter_envelopes, perturbed_copy

FAULTS = ("truncated", "config", "checksum")
ROOT = Path(__file__).resolve().parent.parent


def make_adapters(base: Path, folder: Path, n: int, start: int) -> Dict[str, str]:
    """n perturbed copies (name -> task), tenant numbers from ``start``."""
    tasks = {}
    for k in range(start, start + n):
        name, task, _, _ = ADAPTERS[k % len(ADAPTERS)]
        tenant = f"{name}-t{k:05d}"
        perturbed_copy(base / name, folder / tenant, seed=k)
        tasks[tenant] = task
    return tasks


def broken_copy(base: Path, folder: Path, fault: str, k: int) -> Tuple[str, str]:
    """A copy of the first kind with one fault; its name and task."""
    name, task, _, _ = ADAPTERS[0]
    tenant = f"broken-{fault}-{k}"
    perturbed_copy(base / name, folder / tenant, seed=100_000 + k)
    model = next((folder / tenant).glob("*/model"))
    if fault == "truncated":
        model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    elif fault == "config":
        (folder / tenant / "config.cfg").write_text("[nlp\nlang = en\n")
    elif fault == "checksum":
        import srsly

        # One weight changed inside the envelope, its recorded checksum kept.
        msg = srsly.msgpack_loads(model.read_bytes())
        for node_shims, i, env in adapter_envelopes(msg):
            weights = bytearray(env["weights"])
            weights[-1] ^= 0x5A
            env["weights"] = bytes(weights)
            node_shims[i] = srsly.msgpack_dumps(env)
        model.write_bytes(srsly.msgpack_dumps(msg))
    return tenant, task


async def _post(http, url: str, name: str, text: str) -> Tuple[object, float, str]:
    import httpx

    start = time.perf_counter()
    try:
        r = await http.post(f"{url}/adapters/{name}/process", json={"texts": [text]})
        code, detail = r.status_code, ("" if r.status_code == 200 else r.text[:300])
    except httpx.HTTPError as e:
        code, detail = type(e).__name__, str(e)[:300]
    return code, time.perf_counter() - start, detail


def cold_isolated(url: str, plan: List[Tuple[str, str]]) -> List[dict]:
    """Each adapter asked cold, then at once again (warm), one at a time."""
    import httpx

    async def run():
        out = []
        async with httpx.AsyncClient(timeout=120) as http:
            for name, text in plan:
                cold = await _post(http, url, name, text)
                warm = await _post(http, url, name, text)
                out.append({"name": name, "cold": cold, "warm": warm})
        return out

    return asyncio.run(run())


def cold_burst(url: str, plan: List[Tuple[str, str]], deadline_s: float = 600) -> dict:
    """Every adapter of the plan asked at once. A 503 (the server refusing
    loads it could not do within its timeout) is retried after its
    Retry-After, as a client would, until ``deadline_s``; the latency is
    from the first try to the answer."""
    import httpx

    async def one(http, name: str, text: str, start: float):
        tries = 0
        while True:
            tries += 1
            try:
                r = await http.post(f"{url}/adapters/{name}/process", json={"texts": [text]})
                code, detail, retry = r.status_code, ("" if r.status_code == 200 else r.text[:300]), r.headers.get("retry-after")
            except httpx.HTTPError as e:
                code, detail, retry = type(e).__name__, str(e)[:300], None
            if code != 503 or retry is None or time.perf_counter() - start > deadline_s:
                return code, time.perf_counter() - start, detail, tries
            await asyncio.sleep(float(retry))

    async def run():
        limits = httpx.Limits(max_connections=len(plan), max_keepalive_connections=len(plan))
        async with httpx.AsyncClient(timeout=120, limits=limits) as http:
            start = time.perf_counter()
            results = await asyncio.gather(*(one(http, name, text, start) for name, text in plan))
            return {"seconds": time.perf_counter() - start, "results": [
                {"name": name, "code": code, "latency": lat, "detail": detail, "tries": tries}
                for (name, _), (code, lat, detail, tries) in zip(plan, results)]}

    return asyncio.run(run())


class WarmTraffic:
    """Closed-loop clients over the warm adapters until stopped; every answer
    kept as (time sent, latency, status)."""

    def __init__(self, url: str, tasks: Dict[str, str], texts, clients: int, max_requests: int):
        self.url, self.tasks, self.texts = url, tasks, texts
        self.clients, self.max_requests = clients, max_requests
        self.records: List[Tuple[float, float, object]] = []
        self.stop = asyncio.Event()

    async def run(self) -> None:
        import httpx

        names = sorted(self.tasks)
        limits = httpx.Limits(max_connections=self.clients, max_keepalive_connections=self.clients)

        async def client(k: int, http) -> None:
            rng = random.Random(k)
            while not self.stop.is_set() and len(self.records) < self.max_requests:
                name = rng.choice(names)
                sent = time.perf_counter()
                code, lat, _ = await _post(http, self.url, name, rng.choice(self.texts[self.tasks[name]]))
                self.records.append((sent, lat, code))

        async with httpx.AsyncClient(timeout=120, limits=limits) as http:
            await asyncio.gather(*(client(k, http) for k in range(self.clients)))

    def window(self, start: float, end: float) -> dict:
        lats = [lat for sent, lat, code in self.records if start <= sent < end and code == 200]
        errors: Dict[str, int] = {}
        for sent, _, code in self.records:
            if start <= sent < end and code != 200:
                errors[str(code)] = errors.get(str(code), 0) + 1
        return {"n": len(lats), "docs_per_s": len(lats) / max(end - start, 1e-9),
                "p50_ms": 1000 * percentile(lats, 50), "p95_ms": 1000 * percentile(lats, 95),
                "max_ms": 1000 * max(lats) if lats else float("nan"), "errors": errors}


async def phases(server: Server, warm_tasks, isolated_plan, burst_plan, texts, args) -> dict:
    loop = asyncio.get_running_loop()
    traffic = WarmTraffic(server.url, warm_tasks, texts, args.clients, args.max_requests)
    runner = asyncio.create_task(traffic.run())
    marks: Dict[str, Tuple[float, float]] = {}
    out: dict = {}
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
        await loop.run_in_executor(pool, cold_isolated, server.url, [])  # start the child before timing
        await asyncio.sleep(3)  # warm-up, outside every window
        t = time.perf_counter()
        await asyncio.sleep(args.seconds)
        marks["quiet"] = (t, time.perf_counter())
        before = server.metrics()
        t = time.perf_counter()
        out["isolated"] = await loop.run_in_executor(pool, cold_isolated, server.url, isolated_plan)
        marks["isolated"] = (t, time.perf_counter())
        mid = server.metrics()
        t = time.perf_counter()
        burst = loop.run_in_executor(pool, cold_burst, server.url, burst_plan)
        trace = []
        while args.trace and not burst.done():
            m = await loop.run_in_executor(None, server.metrics)
            trace.append((round(time.perf_counter() - t, 1), {k: m.get(k) for k in (
                "ptuning_loads_waiting", "ptuning_load_turn_seconds_total", "ptuning_load_turns_total",
                "ptuning_adapter_loads_total", "ptuning_queue_texts", "ptuning_rejected_total", "ptuning_timeouts_total")}))
            print("trace", trace[-1], flush=True)
            await asyncio.sleep(1.0)
        out["burst"] = await burst
        out["trace"] = trace
        marks["burst"] = (t, time.perf_counter())
        after = server.metrics()
        t = time.perf_counter()
        await asyncio.sleep(args.seconds)
        marks["after"] = (t, time.perf_counter())
    traffic.stop.set()
    await runner
    out["windows"] = {phase: traffic.window(*span) | {"seconds": span[1] - span[0]} for phase, span in marks.items()}
    out["pool"] = {
        "isolated": {k: metric(mid, f"ptuning_adapter_{k}_total") - metric(before, f"ptuning_adapter_{k}_total")
                     for k in ("loads", "load_failures")},
        "burst": {k: metric(after, f"ptuning_adapter_{k}_total") - metric(mid, f"ptuning_adapter_{k}_total")
                  for k in ("loads", "load_failures")},
    }
    for phase, (m0, m1) in {"isolated": (before, mid), "burst": (mid, after)}.items():
        for key in ("ptuning_adapter_load_seconds_total", "ptuning_load_turn_seconds_total"):
            out["pool"][phase][key] = metric(m1, key) - metric(m0, key)
        out["pool"][phase]["load_seconds"] = out["pool"][phase]["ptuning_adapter_load_seconds_total"]
        out["pool"][phase]["turn_share"] = out["pool"][phase]["ptuning_load_turn_seconds_total"] / max(
            1e-9, marks[phase][1] - marks[phase][0])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=common.DEFAULT_DATA)
    p.add_argument("--warm", type=int, default=100)
    p.add_argument("--isolated", type=int, default=40)
    p.add_argument("--burst", type=int, default=500)
    p.add_argument("--corrupt", type=int, default=3, help="broken adapters in the burst (one fault each, cycling)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=15)
    p.add_argument("--max-requests", type=int, default=100_000, help="warm requests at most, over the whole run")
    p.add_argument("--mode", default="mixed")
    p.add_argument("--server-args", default="")
    p.add_argument("--out-dir", type=Path, default=common.RESULTS)
    p.add_argument("--keep", action="store_true", help="keep the adapter copies")
    p.add_argument("--trace", action="store_true", help="print the server's load metrics every second of the burst")
    p.add_argument("--before", default="", help="also run a git ref of the package (e.g. c332c9f), first, on the same adapters")
    args = p.parse_args()

    texts = tenant_texts(args.data_dir)
    base = build_adapters(args.out_dir / "serve_adapters", args.data_dir, False)["ptuning"]
    folder = args.out_dir / "cold_adapters"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started, load_start = time.time(), os.getloadavg()
    rng = random.Random(0)
    try:
        warm = make_adapters(base, folder, args.warm, 0)
        isolated = make_adapters(base, folder, args.isolated, args.warm)
        burst = make_adapters(base, folder, args.burst, args.warm + args.isolated)
        broken = dict(broken_copy(base, folder, FAULTS[k % len(FAULTS)], k) for k in range(args.corrupt))
        isolated_plan = [(n, rng.choice(texts[t])) for n, t in isolated.items()]
        burst_plan = [(n, rng.choice(texts[t])) for n, t in {**burst, **broken}.items()]
        rng.shuffle(burst_plan)
        total = len(warm) + len(isolated) + len(burst) + len(broken)
        versions = [("after (working tree)", None)]
        if args.before:
            tmp = Path(tempfile.mkdtemp(prefix="serve-cold-"))
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(tmp / "src"), args.before], check=True)
            versions.insert(0, (f"before ({args.before})", tmp / "src"))
        results = {}
        try:
            for label, src in versions:
                server = Server(folder, load_test_args(args.mode, total + 10, ",".join(warm)) + args.server_args.split(),
                                src=src)
                try:
                    t0 = time.perf_counter()
                    server.wait_ready(timeout=1800)
                    ready = time.perf_counter() - t0
                    result = asyncio.run(phases(server, warm, isolated_plan, burst_plan, texts, args))
                    results[label] = result | {"rss_mb": server.rss_mb(), "ready_s": ready}
                finally:
                    server.stop()
        finally:
            if args.before:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / "src")], check=False)
                shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)

    tables = [table_of(label, result) for label, result in results.items()]
    info = common.machine_info()
    footer = (f"\n\nMachine: {info}; load average at start {load_start}, at end {os.getloadavg()}; "
              f"{args.warm} warm adapters, {args.clients} warm clients, mode {args.mode}, server args {args.server_args!r}; "
              + "; ".join(f"{label}: ready in {r['ready_s']:.1f} s, RSS at end {r['rss_mb']:,.0f} MB" for label, r in results.items())
              + f"; total {(time.time() - started) / 60:.1f} min.")
    table = "\n\n".join(tables)
    print(table + footer)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out_dir / f"serve_cold_{stamp}"
    out.with_suffix(".json").write_text(json.dumps({"results": results, "args": vars(args) | {
        "data_dir": str(args.data_dir), "out_dir": str(args.out_dir)}}, indent=1, default=str))
    out.with_suffix(".md").write_text(table + footer + "\n")


def table_of(label: str, result: dict) -> str:
    f = lambda v, d=1: "-" if v is None or v != v else f"{v:,.{d}f}"  # noqa: E731
    iso = result["isolated"]
    cold_ok = [r for r in iso if r["cold"][0] == 200 and r["warm"][0] == 200]
    extra = [r["cold"][1] - r["warm"][1] for r in cold_ok]
    burst_rows = result["burst"]["results"]
    burst_ok = [r["latency"] for r in burst_rows if r["code"] == 200 and not r["name"].startswith("broken-")]
    burst_errors: Dict[str, int] = {}
    for r in burst_rows:
        if not r["name"].startswith("broken-") and r["code"] != 200:
            burst_errors[str(r["code"])] = burst_errors.get(str(r["code"]), 0) + 1
    broken_rows = [r for r in burst_rows if r["name"].startswith("broken-")]
    w = result["windows"]
    lines = [
        "Warm traffic, by window:", "",
        "| window | seconds | warm answers | docs/s | p50 ms | p95 ms | max ms | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        *[f"| {phase} | {f(v['seconds'])} | {v['n']:,} | {f(v['docs_per_s'])} | {f(v['p50_ms'])} | {f(v['p95_ms'])} | "
          f"{f(v['max_ms'])} | {v['errors'] or 0} |" for phase, v in w.items()],
        "", "Cold requests:", "",
        "| phase | cold requests | answered | p50 ms | p95 ms | max ms | extra p50 ms | extra p95 ms | p95 - warm p95 ms | loads | load s | retried (503) | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        f"| isolated (one at a time) | {len(iso)} | {len(cold_ok)} | {f(1000 * percentile([r['cold'][1] for r in cold_ok], 50))} | "
        f"{f(1000 * percentile([r['cold'][1] for r in cold_ok], 95))} | {f(1000 * max((r['cold'][1] for r in cold_ok), default=float('nan')))} | "
        f"{f(1000 * percentile(extra, 50))} | {f(1000 * percentile(extra, 95))} | "
        f"{f(1000 * percentile([r['cold'][1] for r in cold_ok], 95) - w['isolated']['p95_ms'])} | {result['pool']['isolated']['loads']:.0f} | "
        f"{f(result['pool']['isolated']['load_seconds'], 2)} | - | {len(iso) - len(cold_ok)} |",
        f"| burst (all at once, {f(result['burst']['seconds'])} s) | {len(burst_rows) - len(broken_rows)} | {len(burst_ok)} | "
        f"{f(1000 * percentile(burst_ok, 50))} | {f(1000 * percentile(burst_ok, 95))} | {f(1000 * max(burst_ok, default=float('nan')))} | - | - | - | "
        f"{result['pool']['burst']['loads']:.0f} | {f(result['pool']['burst']['load_seconds'], 2)} | "
        f"{sum(r['tries'] > 1 for r in burst_rows)} | {burst_errors or 0} |",
        "", f"Share of the burst's wall time spent in load turns: {f(result['pool']['burst']['turn_share'], 2)}.",
        "", "Broken adapters in the burst:", "",
        "| adapter | status | answer |", "| --- | --- | --- |",
        *[f"| {r['name']} | {r['code']} | {r['detail'][:160].replace('|', '/')} |" for r in sorted(broken_rows, key=lambda r: r["name"])],
    ]
    return f"### {label}\n\n" + "\n".join(lines)


if __name__ == "__main__":
    main()
