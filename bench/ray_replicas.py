#!/usr/bin/env python
"""Ray Serve: throughput of 1 vs 2 replicas, and memory per replica with ten
adapters (``spacy_ptuning.ray.serve``), beside our own one-process server.

The ten adapters and the traffic of ``bench/lib/serving.py`` (MiniLM backbone;
5 NER adapters get CoNLL-2003 dev sentences, 5 sentiment adapters SST-2 dev
sentences; one sentence per request, adapters drawn uniformly; ``--clients``
closed-loop clients), on a local Ray instance with this machine's CPUs,
HTTP on 127.0.0.1. Configurations (each for ``--seconds`` or
``--max-requests``, whichever ends first, then torn down):

  ray 1x2   one replica with 2 CPUs (torch gets 2 threads: Ray sets
            OMP_NUM_THREADS to the replica's CPUs)
  ray 2x1   two replicas with 1 CPU each (1 thread each)
  ours      ``python -m spacy ptuning serve`` (one process, mixed batching)

Before each timed run every adapter gets one request, one at a time, so
that Serve's multiplexed routing places them (5 per replica with 2
replicas); the RSS of each replica process is read after that (ten adapters
known to the deployment) and after the run.

    python bench/ray_replicas.py [--seconds 60] [--max-requests 20000] [--clients 16]

Writes bench/results/ray_replicas_<time>.json and prints a Markdown table.
"""
import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List

from lib import common
from lib import serving

APP = "bench"


def replica_pids() -> List[int]:
    """PIDs of the PTuningDeployment replica processes (Ray names them
    ``ray::ServeReplica:APP:PTuningDeployment``)."""
    import psutil

    pids = []
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            text = " ".join(proc.info["cmdline"] or []) + " " + (proc.info["name"] or "")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if f"ServeReplica:{APP}:PTuningDeployment" in text:
            pids.append(proc.info["pid"])
    return sorted(pids)


def rss_mb(pids: List[int]) -> List[float]:
    import psutil

    out = []
    for pid in pids:
        try:
            out.append(round(psutil.Process(pid).memory_info().rss / 2**20, 1))
        except psutil.NoSuchProcess:
            out.append(float("nan"))
    return out


def run_ray(folder: Path, replicas: int, cpus: float, port: int, work, names, args) -> dict:
    import httpx
    from ray import serve

    from spacy_ptuning.ray.serve import build_app

    url = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    serve.run(build_app({"adapters_dir": str(folder), "num_replicas": replicas, "num_cpus": cpus, "max_models": 10,
                         "check_interval": -1}), name=APP, route_prefix="/")
    placement: Dict[str, str] = {}
    with httpx.Client(base_url=url, timeout=120) as http:
        for name in names:  # one at a time: Serve places each new adapter on the replica with the fewest
            r = http.post(f"/adapters/{name}/process", json={"texts": ["warm up ."]})
            r.raise_for_status()
            placement[name] = r.headers["x-ptuning-replica"]
            time.sleep(0.5)
    startup_s = time.perf_counter() - start
    asyncio.run(serving.closed_loop(url, work, args.clients, 5, 300))  # warm
    pids = replica_pids()
    rss_before = rss_mb(pids)
    run = asyncio.run(serving.closed_loop(url, work, args.clients, args.seconds, args.max_requests))
    rss_after = rss_mb(pids)
    serve.delete(APP)
    return summarise(f"ray {replicas}x{cpus:g}", run, {
        "replicas": replicas, "cpus_per_replica": cpus, "startup_s": round(startup_s, 1),
        "adapters_per_replica": sorted({r: sum(v == r for v in placement.values()) for r in placement.values()}.values()),
        "rss_mb_per_replica_10_adapters": rss_before, "rss_mb_per_replica_after": rss_after,
    })


def run_ours(folder: Path, work, args) -> dict:
    server = serving.Server(folder, serving.load_test_args("mixed", 10, "all"))
    try:
        server.wait_ready()
        asyncio.run(serving.closed_loop(server.url, work, args.clients, 5, 300))
        rss_before = server.rss_mb()
        run = asyncio.run(serving.closed_loop(server.url, work, args.clients, args.seconds, args.max_requests))
        rss_after = server.rss_mb()
    finally:
        server.stop()
    return summarise("ours (1 process)", run, {"replicas": 1, "cpus_per_replica": os.cpu_count(),
                                                "rss_mb_per_replica_10_adapters": [round(rss_before, 1)],
                                                "rss_mb_per_replica_after": [round(rss_after, 1)]})


def summarise(mode: str, run: dict, extra: dict) -> dict:
    lat = run["latencies"]
    return {
        "mode": mode, "ok": len(lat), "seconds": round(run["seconds"], 1),
        "errors": {str(k): v for k, v in run["statuses"].items() if k != 200},
        "docs_per_s": round(len(lat) / run["seconds"], 1),
        "p50_ms": round(1000 * serving.percentile(lat, 50), 1),
        "p95_ms": round(1000 * serving.percentile(lat, 95), 1),
        **extra,
    }


def render(report: dict) -> str:
    lines = [
        f"Machine: {report['machine'].get('cpu_model', '?')}, {os.cpu_count()} CPUs; load before: {report['load_before']}; "
        f"{report['clients']} clients, {report['seconds_per_config']} s or {report['max_requests']} requests per configuration",
        "",
        "| configuration | docs/s | p50 ms | p95 ms | errors | adapters per replica | RSS per replica, 10 adapters (MB) | after run (MB) |",
        "|---|---:|---:|---:|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['mode']} | {r['docs_per_s']} | {r['p50_ms']} | {r['p95_ms']} | {r['errors'] or 0} | "
            f"{r.get('adapters_per_replica', [10])} | {r['rss_mb_per_replica_10_adapters']} | {r['rss_mb_per_replica_after']} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=common.DEFAULT_DATA)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--max-requests", type=int, default=20000)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--configs", default="1x2,2x1", help="REPLICASxCPUS,... for Ray")
    p.add_argument("--no-ours", action="store_true", help="skip our own server's run")
    p.add_argument("--out-dir", type=Path, default=common.RESULTS)
    args = p.parse_args()
    import ray
    import spacy
    from ray import serve

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    vocab = spacy.blank("en").vocab
    texts = {
        "ner": [" ".join(common.words(d)) for d in common.read_conll(args.data_dir / "conll2003" / "dev.iob", vocab)],
        "textcat": [d.text for d in common.read_sst2(args.data_dir / "sst2" / "dev.tsv", vocab)],
    }
    folder = serving.build_adapters(args.out_dir / "serve_adapters", args.data_dir, False)["ptuning"]
    tasks = {name: task for name, task, _, _ in serving.ADAPTERS}
    names = [a[0] for a in serving.ADAPTERS]

    def work(rng):
        name = rng.choice(names)
        return name, rng.choice(texts[tasks[name]])

    report = {"machine": common.machine_info(), "load_before": [round(x, 2) for x in os.getloadavg()], "clients": args.clients,
              "seconds_per_config": args.seconds, "max_requests": args.max_requests, "results": []}
    port = serving.free_port()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for config in args.configs.split(","):
            replicas, cpus = config.split("x")
            row = run_ray(folder, int(replicas), float(cpus), port, work, names, args)
            report["results"].append(row)
            print(json.dumps(row), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    if not args.no_ours:
        row = run_ours(folder, work, args)
        report["results"].append(row)
        print(json.dumps(row), flush=True)
    path = common.save_json(report, args.out_dir / (common.stamped("ray_replicas") + ".json"))
    print(render(report))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
