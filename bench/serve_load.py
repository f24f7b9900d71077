#!/usr/bin/env python
"""Load test of the multi-task server (``python -m spacy ptuning serve``).

Ten adapters on one backbone (5 NER on CoNLL-2003 labels, 5 sentiment on
SST-2 labels; prompt lengths 8-64; methods prefix, prompt and
prompt_encoder), 16 concurrent clients sending one dev sentence per request
(CoNLL-2003 dev to NER adapters, SST-2 dev to sentiment ones, adapters drawn
uniformly), each mode for a fixed time and request budget, one server process
at a time on 127.0.0.1:

  (a) mixed       our server, one backbone pass for the texts of many adapters
  (b) per_adapter our server, each adapter's texts in its own nlp.pipe
  (c) st          ten spacy-transformers pipelines (transformer + the same
                  head) of the same backbone, behind the same server code

then a server holding one adapter under the same traffic (its RSS after
the run is the baseline for "RSS with ten adapters"), (d) churn: 100 adapters with --max-loaded 20 under random traffic, and
(e) overload: open-loop arrivals at 3x the capacity (a) measured, with a
small queue: accepted requests must complete, the rest get 503.

Reports docs/s, words/s, p50/p95/p99 latency, errors (by status), server RSS
(with 1 adapter loaded and with all), rows per backbone pass, adapter loads
and evictions; writes bench/results/serve_load*.json/.md and a PNG.

    python bench/serve_load.py [--seconds 60] [--max-requests 20000] [--data-dir ../shared/data]

The adapters are initialised on the data's labels, not trained: throughput
does not depend on the prompt values (NER decoding aside). They are built
once into bench/results/serve_adapters/ (--rebuild to redo).
"""
import argparse
import asyncio
import json
import shutil
from pathlib import Path
from typing import Dict, List

from lib import common
from lib.serving import ADAPTERS, Server, build_adapters, closed_loop, load_test_args, metric, open_loop, percentile

SERVER_ARGS: List[str] = []  # --server-args: more options for every server started


def summarise(mode: str, run: dict, server: Server, rss: Dict[str, float], before: dict, after: dict) -> dict:
    ok = len(run["latencies"])
    def delta(name):
        return metric(after, name) - metric(before, name)

    passes, rows = delta("ptuning_backbone_passes_total"), delta("ptuning_backbone_rows_total")
    batches, batch_texts = delta("ptuning_batch_texts_count"), delta("ptuning_batch_texts_sum")
    return {
        "mode": mode,
        "ok": ok,
        "errors": {str(k): v for k, v in run["statuses"].items() if k != 200},
        "docs_per_s": ok / run["seconds"],
        "words_per_s": run.get("words", 0) / run["seconds"],
        "p50_ms": 1000 * percentile(run["latencies"], 50),
        "p95_ms": 1000 * percentile(run["latencies"], 95),
        "p99_ms": 1000 * percentile(run["latencies"], 99),
        "rows_per_pass": rows / passes if passes else None,
        "texts_per_batch": batch_texts / batches if batches else None,
        "rss_mb": rss,
        "loads": metric(after, "ptuning_adapter_loads_total") + metric(after, "ptuning_adapter_reloads_total"),
        "evictions": metric(after, "ptuning_adapter_evictions_total"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=common.DEFAULT_DATA)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--max-requests", type=int, default=20000)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--modes", default="mixed,per_adapter,st,one,churn,overload")
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--out-dir", type=Path, default=common.RESULTS)
    p.add_argument("--server-args", default="", help="more options for every server, e.g. '--threads 0'")
    args = p.parse_args()
    SERVER_ARGS.extend(args.server_args.split())
    import spacy

    vocab = spacy.blank("en").vocab
    texts = {
        "ner": [" ".join(common.words(d)) for d in common.read_conll(args.data_dir / "conll2003" / "dev.iob", vocab)],
        "textcat": [d.text for d in common.read_sst2(args.data_dir / "sst2" / "dev.tsv", vocab)],
    }
    folders = build_adapters(args.out_dir / "serve_adapters", args.data_dir, args.rebuild)
    tasks = {name: task for name, task, _, _ in ADAPTERS}

    def work_for(names):
        def work(rng):
            name = rng.choice(names)
            return name, rng.choice(texts[tasks[name]])

        return work

    modes = args.modes.split(",")
    results, capacity = [], None
    for mode in ("mixed", "per_adapter", "st"):
        if mode not in modes:
            continue
        folder = folders["st" if mode == "st" else "ptuning"]
        server = Server(folder, load_test_args("per_adapter" if mode == "st" else mode, 10, ADAPTERS[0][0], ()) + SERVER_ARGS)
        try:
            server.wait_ready()
            names = [a[0] for a in ADAPTERS]
            # RSS after traffic to one adapter, then after traffic to all ten;
            # mode "one" gives a one-adapter server's RSS after a full run.
            asyncio.run(closed_loop(server.url, work_for(names[:1]), args.clients, 5, 300))
            rss = {"1 adapter": server.rss_mb()}
            asyncio.run(closed_loop(server.url, work_for(names), args.clients, 5, 300))
            rss["10 adapters"] = server.rss_mb()
            before = server.metrics()
            run = asyncio.run(closed_loop(server.url, work_for(names), args.clients, args.seconds, args.max_requests))
            after = server.metrics()
            rss["after run"] = server.rss_mb()
            row = summarise(mode, run, server, rss, before, after)
            results.append(row)
            if mode == "mixed":
                capacity = row["docs_per_s"]
            print(json.dumps(row), flush=True)
        finally:
            server.stop()
    if "one" in modes:  # the same traffic to a server holding one adapter: its RSS
        one = args.out_dir / "serve_adapters" / "one"
        if not one.exists():
            shutil.copytree(folders["ptuning"] / ADAPTERS[0][0], one / ADAPTERS[0][0])
        server = Server(one, load_test_args("mixed", 10, "all", ()) + SERVER_ARGS)
        try:
            server.wait_ready()
            names = [ADAPTERS[0][0]]
            asyncio.run(closed_loop(server.url, work_for(names), args.clients, 10, 600))
            before = server.metrics()
            run = asyncio.run(closed_loop(server.url, work_for(names), args.clients, args.seconds, args.max_requests))
            row = summarise("one adapter (mixed)", run, server, {"after run": server.rss_mb()}, before, server.metrics())
            results.append(row)
            print(json.dumps(row), flush=True)
        finally:
            server.stop()
    if "churn" in modes:  # 100 adapters, 20 loaded at most, uniform random traffic
        churn = args.out_dir / "serve_adapters" / "churn"
        names = []
        for k in range(100):
            base, task, _, _ = ADAPTERS[k % len(ADAPTERS)]
            name = f"{base}-c{k:02d}"
            tasks[name] = task
            names.append(name)
            if not (churn / name).exists():
                shutil.copytree(folders["ptuning"] / base, churn / name)
        server = Server(churn, load_test_args("mixed", 20, "", ()) + SERVER_ARGS)
        try:
            server.wait_ready()
            before = server.metrics()
            run = asyncio.run(closed_loop(server.url, work_for(names), args.clients, args.seconds, args.max_requests))
            after = server.metrics()
            row = summarise("churn (100 adapters, max 20 loaded)", run, server, {"end": server.rss_mb()}, before, after)
            results.append(row)
            print(json.dumps(row), flush=True)
        finally:
            server.stop()
    if "overload" in modes:
        rate = 3 * (capacity or 50)
        server = Server(folders["ptuning"], load_test_args("mixed", 10, "all", ["--max-queue", "64"]) + SERVER_ARGS)
        try:
            server.wait_ready()
            names = [a[0] for a in ADAPTERS]
            run = asyncio.run(open_loop(server.url, work_for(names), rate, min(30, args.seconds), args.max_requests))
            row = summarise(f"overload (open loop, {rate:.0f} req/s = 3x capacity)", run, server,
                            {"end": server.rss_mb()}, {}, server.metrics())
            row["offered"] = run["offered"]
            results.append(row)
            print(json.dumps(row), flush=True)
        finally:
            server.stop()
    report = {"machine": common.machine_info(), "args": {k: str(v) for k, v in vars(args).items()}, "results": results}
    stem = common.stamped("serve_load")
    common.save_json(report, args.out_dir / f"{stem}.json")
    md = render(report)
    (args.out_dir / f"{stem}.md").write_text(md)
    plot(results, args.out_dir / f"{stem}.png")
    print(md)


def render(report: dict) -> str:
    lines = [
        "| mode | docs/s | words/s | p50 ms | p95 ms | p99 ms | texts/batch | rows/backbone pass | RSS MiB | loads | evictions | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    for r in report["results"]:
        rss = ", ".join(f"{k}: {v:.0f}" for k, v in r["rss_mb"].items())
        rpp = f"{r['rows_per_pass']:.1f}" if r["rows_per_pass"] else "-"
        tpb = f"{r['texts_per_batch']:.1f}" if r["texts_per_batch"] else "-"
        errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"
        lines.append(
            f"| {r['mode']} | {r['docs_per_s']:.1f} | {r['words_per_s']:.0f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | "
            f"{r['p99_ms']:.0f} | {tpb} | {rpp} | {rss} | {r['loads']:.0f} | {r['evictions']:.0f} | {errors} |"
        )
    m = report["machine"]
    lines.append(f"\n{m['cpu_count']} CPUs ({m['cpu_model']}), torch {m['versions']['torch']}, "
                 f"spaCy {m['versions']['spacy']}; load average at start {m['loadavg_start'][0]:.2f}")
    return "\n".join(lines) + "\n"


def plot(results: List[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [r for r in results if r["ok"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = [r["mode"].split(" (")[0] for r in rows]
    axes[0].bar(labels, [r["docs_per_s"] for r in rows])
    axes[0].set_ylabel("docs/s (1 sentence per request)")
    for q, marker in (("p50_ms", "o"), ("p95_ms", "s"), ("p99_ms", "^")):
        axes[1].plot(labels, [r[q] for r in rows], marker=marker, label=q.replace("_ms", ""))
    axes[1].set_ylabel("latency (ms)")
    axes[1].legend()
    for ax in axes:
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle("spacy-ptuning server, 10 adapters, 16 clients")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
